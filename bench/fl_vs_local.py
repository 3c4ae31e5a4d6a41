#!/usr/bin/env python
"""OpenFedLLM's finding, reproduced small: federated training vs each client alone vs all data pooled.

On Dolly-15k split into 10 non-IID clients (``../shared/datasets/dolly15k_fed10``: 2-3 task categories
per client), with the offline tiny Llama, this runs ``simulate`` in ``local`` and ``central`` mode and
with each of the seven algorithms, for the same schedule (``--num_rounds`` rounds of ``--max_steps``
steps per trained client; ``central`` trains ``--max_steps x --sample_clients`` steps per round, the
compute of one federated round), then evaluates every final adapter on the held-out ``global_test.json``
(80 examples, 10 per category; loss on response tokens). For ``local`` the table gives the mean over
the 10 clients (and their range). Results: ``OUTPUT_DIR/results.json`` and ``OUTPUT_DIR/fl_vs_local.md``.

    python bench/fl_vs_local.py                       # ~10 minutes on 2 CPU cores
    python bench/fl_vs_local.py --num_rounds 2 --algorithms fedavg    # a smoke run

A rerun with the same arguments reuses finished runs (the simulations resume); ``--overwrite`` starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client_data", default=str(ROOT.parent / "shared" / "datasets" / "dolly15k_fed10"))
    parser.add_argument("--test_data", default=None, help="Held-out set (default: CLIENT_DATA/global_test.json).")
    parser.add_argument("--model_name_or_path", default=None, help="Default: the tiny Llama, built offline.")
    parser.add_argument("--output_dir", default=str(ROOT / "bench" / "results" / "fl_vs_local"))
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--num_rounds", type=int, default=10)
    parser.add_argument("--max_steps", type=int, default=5)
    parser.add_argument("--sample_clients", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=2e-2)
    parser.add_argument("--fedopt_eta", type=float, default=2e-2,
                        help="FedAdagrad/FedYogi/FedAdam server rate: the client rate here (OpenFedLLM's 1e-3 "
                             "suits clients at 2e-5).")
    parser.add_argument("--seq_length", type=int, default=256)
    parser.add_argument("--dataset_sample", type=int, default=200, help="Examples per client.")
    parser.add_argument("--seed", type=int, default=2023)
    parser.add_argument("--overwrite", action="store_true", help="Delete earlier runs in --output_dir first.")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace, model: str, mode: str, fed_alg: str, output_dir: Path):
    from fedllm.config import FederationArguments, SimulatedClientArguments, SimulationArguments

    federation = FederationArguments(
        model_name_or_path=model, fed_alg=fed_alg, num_clients=10, sample_clients=args.sample_clients,
        num_rounds=args.num_rounds, max_steps=args.max_steps, learning_rate=args.learning_rate,
        seq_length=args.seq_length, fedopt_eta=args.fedopt_eta, seed=args.seed, save_model_freq=0,
    )
    client = SimulatedClientArguments(dataset_sample=args.dataset_sample, batch_size=args.batch_size, quiet=True)
    sim = SimulationArguments(client_data=args.client_data, mode=mode, output_dir=str(output_dir),
                              client_seed=args.seed)
    return federation, client, sim


def total_steps(history: dict[str, list[dict[str, Any]]]) -> int:
    return int(sum(m.get("steps", 0) for runs in history.values() for h in runs for m in h["metrics"].values()))


def markdown(rows: list[dict[str, Any]], command: str, args: argparse.Namespace, seconds: float) -> str:
    lines = [
        f"Command: `{command}` (seed {args.seed}; {seconds / 60:.1f} minutes in all)",
        "",
        "| setting | held-out loss | perplexity | client steps (total) | train seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        loss = f"{row['loss']:.4f}"
        if "loss_min" in row:
            loss += f" (clients {row['loss_min']:.4f} – {row['loss_max']:.4f})"
        steps = "—" if row["steps"] is None else str(row["steps"])
        secs = "—" if row["seconds"] is None else f"{row['seconds']:.0f}"
        lines.append(f"| {row['setting']} | {loss} | {row['perplexity']:.1f} | {steps} | {secs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import datasets

    from fedllm.evaluation import Evaluator, load_examples
    from fedllm.export import load_adapter_dir
    from fedllm.simulation import run_simulation
    from fedllm.tiny import build_tiny_llama

    datasets.disable_progress_bars()
    started = time.time()
    output_dir = Path(args.output_dir)
    if args.overwrite:
        shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = args.model_name_or_path or str(build_tiny_llama(output_dir / "tiny-llama", seed=0))
    test_data = args.test_data or str(Path(args.client_data) / "global_test.json")

    plan = [("local", "local", "fedavg"), ("central", "central", "fedavg")]
    plan += [(alg, "federated", alg) for alg in args.algorithms.split(",") if alg]
    runs: dict[str, tuple[Any, float]] = {}
    for name, mode, fed_alg in plan:
        print(f"--- {name}", flush=True)
        run_started = time.time()
        federation, client, sim = settings(args, model, mode, fed_alg, output_dir / name)
        runs[name] = (run_simulation(federation, client, sim), time.time() - run_started)

    first = next(iter(runs.values()))[0]
    evaluator = Evaluator(model, lora_config=load_adapter_dir(next(iter(first.adapters.values()))).lora_config)
    examples = load_examples(test_data, tokenizer=evaluator.tokenizer, template="alpaca")

    def held_out_loss() -> dict[str, float]:
        return evaluator.loss(examples, seq_length=args.seq_length, batch_size=args.batch_size, progress=False)

    with evaluator.model.disable_adapter():
        base = held_out_loss()
    rows = [{"setting": "base model (no training)", "loss": base["loss"], "perplexity": base["perplexity"],
             "steps": None, "seconds": None}]
    for name, (result, seconds) in runs.items():
        losses = []
        for adapter in result.adapters.values():
            evaluator.set_adapter(load_adapter_dir(adapter).tensors)
            losses.append(held_out_loss()["loss"])
        mean = statistics.fmean(losses)
        row = {"setting": name if name in ("local", "central") else f"federated: {name}", "loss": mean,
               "perplexity": math.exp(mean), "steps": total_steps(result.history),
               "seconds": seconds}
        if len(losses) > 1:
            row.update(loss_min=min(losses), loss_max=max(losses), client_losses=dict(zip(result.adapters, losses,
                                                                                          strict=True)))
        rows.append(row)

    seconds = time.time() - started
    command = "python bench/fl_vs_local.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(rows, command.strip(), args, seconds)
    (output_dir / "fl_vs_local.md").write_text(table)
    (output_dir / "results.json").write_text(json.dumps(
        {"args": vars(args), "test_examples": len(examples), "eval_tokens": base["loss_tokens"], "rows": rows,
         "seconds": seconds, "settings": dataclasses.asdict(settings(args, model, "federated", "fedavg",
                                                                     output_dir)[0])}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
