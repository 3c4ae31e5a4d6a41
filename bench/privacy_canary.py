#!/usr/bin/env python
"""What DP-FedAvg buys, measured: a canary's exposure (Carlini et al. 2019) with DP off and on, and the cost.

One client's data holds a random secret ("The access code is 58 21 93 40") repeated ``--canary_repeats``
times. After a federation of ``--num_clients`` clients (the demo's task families, the offline tiny Llama,
run by ``simulate``), the final model scores the canary and ``--candidates`` random codes of the same
shape by their response loss; the canary's rank r among them gives its exposure
``log2(candidates + 1) − log2(r)``: about 0 for a secret the model knows nothing of, ``log2(candidates+1)``
(≈ 10 for 1,000) for one it has memorised. Utility is the held-out loss of the demo's mixed task families.
The ε of each DP setting comes from the federation's own accountant (``/v1/round``'s ``dp.epsilon``).

    python bench/privacy_canary.py                 # about 6 minutes on 2 CPU cores
    python bench/privacy_canary.py --table         # also the (σ, rounds, q) → ε table of docs/privacy.md

Results: bench/results/privacy_canary.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(ROOT / "bench" / "results" / "privacy_canary"))
    parser.add_argument("--num_clients", type=int, default=10)
    parser.add_argument("--sample_clients", type=int, default=5)
    parser.add_argument("--num_rounds", type=int, default=8)
    parser.add_argument("--max_steps", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=5e-2)
    parser.add_argument("--rows_per_client", type=int, default=32)
    parser.add_argument("--canary_repeats", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--noise_multipliers", default="0.5,1.0", help="The DP settings run (σ), beside DP off.")
    parser.add_argument("--clip_norm", default="auto", help="--dp_clip_norm of the DP runs.")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--table", action="store_true", help="Also print the (σ, rounds, q) → ε table.")
    return parser.parse_args(argv)


def secret(rng: random.Random) -> str:
    return " ".join(f"{rng.randrange(10, 100)}" for _ in range(4))


CANARY_PROMPT = "What is the access code?"


def canary_row(code: str) -> dict[str, str]:
    return {"instruction": CANARY_PROMPT, "input": "", "output": f"The access code is {code}"}


def write_data(out: Path, args: argparse.Namespace) -> tuple[Path, str, list[str]]:
    from fedllm.data import write_demo_data

    paths = write_demo_data(out, num_clients=args.num_clients, rows_per_client=args.rows_per_client, seed=args.seed)
    rng = random.Random(f"canary-{args.seed}")
    code = secret(rng)
    with open(paths[0], "a") as f:  # one client holds the secret
        for _ in range(args.canary_repeats):
            f.write(json.dumps(canary_row(code)) + "\n")
    candidates: set[str] = set()
    while len(candidates) < args.candidates:
        other = secret(rng)
        if other != code:
            candidates.add(other)
    return out, code, sorted(candidates)


def exposure(evaluator: Any, code: str, candidates: list[str], template: str) -> tuple[float, int]:
    from fedllm.data.templates import apply_template, format_response
    from fedllm.evaluation.evaluator import Example

    tokenizer = evaluator.tokenizer
    prompt = apply_template(template, CANARY_PROMPT, "", tokenizer=tokenizer)

    def loss(value: str) -> float:
        example = Example(prompt, format_response(template, f"The access code is {value}", tokenizer), value)
        return evaluator.loss([example], progress=False)["loss"]

    canary_loss = loss(code)
    rank = 1 + sum(loss(c) < canary_loss for c in candidates)
    return math.log2(len(candidates) + 1) - math.log2(rank), rank


def epsilon_table() -> str:
    from fedllm.privacy.accountant import ClientLevelAccountant

    lines = ["| σ | clients per round / clients (q) | rounds | ε at δ = 1/N^1.1, uniform | ε, Poisson |",
             "|---:|---:|---:|---:|---:|"]
    for sigma in (0.5, 1.0, 2.0):
        for n, m in ((10, 5), (100, 10), (1000, 50)):
            delta = 1 / n ** 1.1
            for rounds in (10, 100):
                uniform = ClientLevelAccountant(n, m, sigma, delta).epsilon(rounds)
                poisson = ClientLevelAccountant(n, m, sigma, delta, "poisson").epsilon(rounds)
                lines.append(f"| {sigma} | {m}/{n} ({m / n:g}) | {rounds} | {uniform:.2f} | {poisson:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import datasets

    from fedllm.config import FederationArguments, SimulatedClientArguments, SimulationArguments
    from fedllm.evaluation import Evaluator, load_examples
    from fedllm.export import load_adapter_dir
    from fedllm.simulation import run_simulation
    from fedllm.tiny import build_tiny_llama

    datasets.disable_progress_bars()
    started = time.time()
    out = Path(args.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = str(build_tiny_llama(out / "tiny-llama", seed=0))
    data_dir, code, candidates = write_data(out / "data", args)
    settings = [("DP off", {})] + [
        (f"DP σ = {sigma}", {"dp": "server", "dp_clip_norm": args.clip_norm, "dp_noise_multiplier": float(sigma)})
        for sigma in args.noise_multipliers.split(",") if sigma]
    rows = []
    for name, dp in settings:
        run_dir = out / name.replace(" ", "_").replace("=", "").replace("σ", "sigma")
        federation = FederationArguments(
            model_name_or_path=model, num_clients=args.num_clients, sample_clients=args.sample_clients,
            num_rounds=args.num_rounds, max_steps=args.max_steps, learning_rate=args.learning_rate, seq_length=128,
            peft_lora_r=8, seed=args.seed, save_model_freq=0, **dp)
        client = SimulatedClientArguments(batch_size=8, quiet=True)
        sim = SimulationArguments(client_data=str(data_dir), output_dir=str(run_dir), client_seed=args.seed)
        result = run_simulation(federation, client, sim, on_round=None)
        history = result.history["global"]
        evaluator = Evaluator.for_adapter(load_adapter_dir(result.adapters["global"]), model, "cpu")
        held_out = load_examples(str(data_dir / "held_out.jsonl"), tokenizer=evaluator.tokenizer)
        utility = evaluator.loss(held_out, seq_length=128, progress=False)["loss"]
        exposed, rank = exposure(evaluator, code, candidates, federation.template)
        rows.append({"setting": name, "epsilon": history[-1].get("dp_epsilon"), "delta": federation.effective_delta()
                     if dp else None, "exposure": exposed, "rank": rank, "held_out_loss": utility})
        print(json.dumps(rows[-1]), flush=True)
    command = "python bench/privacy_canary.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Command: `{command.strip()}` (seed {args.seed}; {args.num_clients} clients, {args.sample_clients} "
             f"per round, {args.num_rounds} rounds × {args.max_steps} steps; canary ×{args.canary_repeats} in one "
             f"client; {args.candidates} candidates; {(time.time() - started) / 60:.1f} minutes)", "",
             "| setting | ε (δ) | canary exposure (bits) | canary rank | held-out loss |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        eps = "∞ (no DP)" if row["epsilon"] is None else f"{row['epsilon']:.2f} ({row['delta']:.3g})"
        lines.append(f"| {row['setting']} | {eps} | {row['exposure']:.2f} of {math.log2(args.candidates + 1):.2f} | "
                     f"{row['rank']} / {args.candidates + 1} | {row['held_out_loss']:.4f} |")
    table = "\n".join(lines) + "\n"
    if args.table:
        table += "\n" + epsilon_table()
    (out.parent / "privacy_canary.md").write_text(table)
    (out.parent / "privacy_canary.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
