"""``fedllm simulate``: N clients in one process, on the same code as the HTTP deployment (``simulate.py``).

    fedllm simulate --model_name_or_path DIR --client_data ../shared/datasets/dolly15k_fed10 \\
        --fed_alg fedavg --num_clients 10 --sample_clients 2 --num_rounds 20 --max_steps 10 --output_dir runs/fedavg
    fedllm simulate ... --dataset_name data.jsonl --split_strategy dirichlet --split_field category --split_alpha 0.5
    fedllm simulate ... --mode local      # every client alone;  --mode central: all data pooled
    fedllm simulate ... --report_to mlflow  # each round to a tracker: tensorboard, mlflow, wandb

Rerun the same command to resume a killed run. Options: fedllm/config.py (FederationArguments,
SimulatedClientArguments, SimulationArguments); docs/simulation.md.
"""

from __future__ import annotations

import logging
import sys

from ..config import FederationArguments, SimulatedClientArguments, SimulationArguments
from . import EXIT_OK, EXIT_USAGE, parse_options


def main(argv: list[str] | None = None) -> int:
    federation, client, sim = parse_options((FederationArguments, SimulatedClientArguments, SimulationArguments), argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..data import DataFormatError
    from ..simulation import run_simulation

    print(f"{'client':>10} " if sim.mode == "local" else "", end="")
    print("round  clients  train loss  seconds", flush=True)
    try:
        result = run_simulation(federation, client, sim)
    except (DataFormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for name, path in result.adapters.items():
        print(f"final adapter ({name}): {path}")
    return EXIT_OK
