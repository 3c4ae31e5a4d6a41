#!/usr/bin/env python
"""FedKSeed learns: held-out loss after every round of a full-parameter zeroth-order federation, and its bytes.

On Dolly-15k split into 10 non-IID clients (``../shared/datasets/dolly15k_fed10``) with the offline tiny Llama
(every parameter tuned, about 0.2M), ``simulate`` (the server's and the client's own code in one process) runs
``--fed_alg fedkseed`` with K = 4096 seeds, 2 clients a round, for each of a few federation seeds (the pool, the
sampling and the clients' own seeds change with it). After every round the served global (K scalars) is rebuilt
into ``w₀ − Σ_s A[s] z(σ_s)`` and scored on the held-out ``global_test.json`` (loss on response tokens); the
table gives the mean over the seeds per round. Bytes per client per round: the upload body (as the server counts
it) plus the served global file.

Zeroth-order steps move the loss slowly: each estimates one directional derivative, so the schedule is hundreds
of cheap steps (two forward passes each) at a small learning rate, and ``--seq_length 512`` (the tiny Llama's
longest) so that about half of Dolly's examples survive TRL's rule that drops an example whose prompt alone fills
the sequence (at 256, 86 of 100 are dropped).

    OMP_NUM_THREADS=1 nice -n 10 python -m bench.fedkseed     # about 12 minutes on 2 shared CPU cores
    python -m bench.fedkseed --quick                           # 1 seed, 2 rounds of 10 steps

Results: ``bench/results/fedkseed.{json,md}``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, Table, Target, benchmark_main, write_results  # noqa: E402

NAME = "fedkseed"
TITLE = "FedKSeed (K = 4096, full-parameter, zeroth-order) on the tiny Llama: held-out loss per round and bytes"
DOLLY = ROOT.parent / "shared" / "datasets" / "dolly15k_fed10"
SEQ_LENGTH = 512
# (rounds, steps a round, federation seeds); the learning rate and ε are the same in both
FULL = (5, 100, (2023, 2024))
QUICK = (2, 10, (2023,))
LEARNING_RATE = 1e-3
EPSILON = 1e-3


def kseed_loss(evaluator: Any, tensors: Mapping[str, Any], held_out: Callable[[], float]) -> float:
    """``held_out()`` of the base model rebuilt as w₀ − Σ A[s] z(σ_s) from a FedKSeed global (the LoRA layers
    disabled; the evaluator's PEFT model names the parameters as the clients' trainer does, so z(σ) is theirs)."""
    from fedllm.algorithms.fedkseed import POOL, SCALARS, draw_seeds, rebuild

    base = evaluator.model.get_base_model()
    tuned = sorted((n, p) for n, p in base.named_parameters() if "lora_" not in n)
    w0 = {n: p.detach().clone() for n, p in tuned}
    rebuild(tuned, w0, tensors[SCALARS], draw_seeds(tensors[SCALARS].numel(), int(tensors[POOL][0])))
    try:
        with evaluator.model.disable_adapter():
            return held_out()
    finally:
        rebuild(tuned, w0, tensors[SCALARS].new_zeros(tensors[SCALARS].shape), [])


def federation_lora(model: str) -> Any:
    """The LoRA config a federation with the default flags gives the clients' PEFT model."""
    from fedllm.adapter import build_lora_config, load_model_config
    from fedllm.config import FederationArguments

    defaults = FederationArguments(model_name_or_path=model)
    config = load_model_config(model)
    return build_lora_config(config, r=defaults.peft_lora_r, alpha=defaults.peft_lora_alpha,
                             dropout=defaults.peft_lora_dropout, target_modules=defaults.target_module_list(),
                             base_model_name_or_path=model)


def run(out_dir: Path, quick: bool = False) -> bool:
    import datasets
    from safetensors.torch import load_file

    from fedllm.config import FederationArguments, SimulatedClientArguments, SimulationArguments
    from fedllm.evaluation import Evaluator, load_examples
    from fedllm.simulation import run_simulation
    from fedllm.tiny import build_tiny_llama

    if not DOLLY.is_dir():
        print(f"{DOLLY} is absent: nothing to run", file=sys.stderr)
        return False
    started = time.time()
    datasets.disable_progress_bars()
    rounds, steps, seeds = QUICK if quick else FULL
    work = Path(tempfile.mkdtemp(prefix="fedllm-fedkseed-"))
    model = str(build_tiny_llama(work / "tiny-llama", seed=0))
    evaluator = Evaluator(model, lora_config=federation_lora(model), device="cpu")
    examples = load_examples(str(DOLLY / "global_test.json"), tokenizer=evaluator.tokenizer, template="alpaca")

    def held_out() -> float:
        return evaluator.loss(examples, seq_length=SEQ_LENGTH, batch_size=8, progress=False)["loss"]

    with evaluator.model.disable_adapter():
        base_loss = held_out()
    runs: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        print(f"--- seed {seed}", flush=True)
        folder = work / f"seed{seed}"
        losses = [base_loss]

        def score(name: str, record: Mapping[str, Any], folder: Path = folder, losses: list[float] = losses) -> None:
            served = max((folder / "state" / "globals").glob("v*[0-9].safetensors"))
            losses.append(kseed_loss(evaluator, load_file(str(served)), held_out))
            print(f"round {record['round']}: train {record['train_loss']:.4f}, held-out {losses[-1]:.4f}",
                  flush=True)

        run_started = time.time()
        federation = FederationArguments(model_name_or_path=model, fed_alg="fedkseed", kseed_k=4096,
                                         kseed_epsilon=EPSILON, learning_rate=LEARNING_RATE, num_clients=10,
                                         sample_clients=2, num_rounds=rounds, max_steps=steps,
                                         seq_length=SEQ_LENGTH, seed=seed, save_model_freq=0)
        client = SimulatedClientArguments(dataset_sample=40 if quick else 100, batch_size=8, quiet=True)
        sim = SimulationArguments(client_data=str(DOLLY), output_dir=str(folder), client_seed=seed)
        result = run_simulation(federation, client, sim, on_round=score)
        history = result.history["global"]
        served = max((folder / "state" / "globals").glob("v*[0-9].safetensors")).stat().st_size
        clients = sum(len(h["participants"]) for h in history)
        runs[seed] = {"held_out": losses, "train_loss": [h["train_loss"] for h in history],
                      "up_bytes": sum(h["bytes_received"] for h in history) / clients,
                      "down_bytes": served, "seconds": time.time() - run_started}
    shutil.rmtree(work, ignore_errors=True)

    mean = [sum(r["held_out"][i] for r in runs.values()) / len(runs) for i in range(rounds + 1)]
    per_round = max(r["up_bytes"] + r["down_bytes"] for r in runs.values())
    table = Table(f"Dolly-15k, 10 non-IID clients, 2 a round, {steps} zeroth-order steps a round at η = "
                  f"{LEARNING_RATE:g}, ε = {EPSILON:g}, seq {SEQ_LENGTH}, tiny Llama: held-out loss after each round "
                  f"(round 0: the base model)", ["round", *(f"seed {s}" for s in seeds), "mean", "change vs round 0"])
    for i in range(rounds + 1):
        table.rows.append([i, *(f"{runs[s]['held_out'][i]:.4f}" for s in seeds), f"{mean[i]:.4f}",
                           f"{mean[i] - mean[0]:+.4f}"])
    bytes_table = Table("Bytes per client per round (the worst seed)", ["up B", "down B", "total KB"])
    worst = max(runs.values(), key=lambda r: r["up_bytes"] + r["down_bytes"])
    bytes_table.rows.append([worst["up_bytes"], worst["down_bytes"], per_round / 1e3])
    falling = all(b < a for a, b in zip(mean, mean[1:], strict=False))
    targets = [
        Target("FedKSeed bytes per client per round (up + down), K = 4096", "< 20 KB", f"{per_round / 1e3:.1f} KB",
               per_round < 20_000),
        Target(f"held-out loss falls every round (mean over {len(seeds)} seeds)", "monotonic",
               " → ".join(f"{v:.3f}" for v in mean), None if quick else falling),
    ]
    notes = [f"{time.time() - started:.0f} s in all; {len(examples)} held-out examples, loss on response tokens "
             f"(those whose prompt fills {SEQ_LENGTH} tokens score nothing).",
             "Each client draws its steps' seeds by (client id, round, --seed) (fedllm.algorithms.fedkseed."
             "step_generator): the two clients of a round walk different directions."]
    write_results(NAME, TITLE, out_dir, quick=quick,
                  params={"quick": quick, "rounds": rounds, "steps": steps, "seeds": list(seeds),
                          "learning_rate": LEARNING_RATE, "epsilon": EPSILON, "seq_length": SEQ_LENGTH},
                  tables=[table, bytes_table], targets=targets, notes=notes, data={"runs": runs, "mean": mean})
    return True


if __name__ == "__main__":
    benchmark_main(NAME, __doc__, run)
