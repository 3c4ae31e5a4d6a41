#!/usr/bin/env python
"""fedllm simulation: N clients in one process, on the same code as the HTTP deployment.

    python simulate.py --model_name_or_path DIR --client_data ../shared/datasets/dolly15k_fed10 \\
        --fed_alg fedavg --num_clients 10 --sample_clients 2 --num_rounds 20 --max_steps 10 --output_dir runs/fedavg
    python simulate.py ... --dataset_name data.jsonl --split_strategy dirichlet --split_field category --split_alpha 0.5
    python simulate.py ... --mode local      # every client alone;  --mode central: all data pooled

Rerun the same command to resume a killed run. Options: fedllm/config.py (FederationArguments,
SimulatedClientArguments, SimulationArguments); docs/simulation.md.
"""

from __future__ import annotations

import logging
import sys

from fedllm.config import FederationArguments, SimulatedClientArguments, SimulationArguments, parse_args


def main(argv: list[str] | None = None) -> int:
    federation, client, sim = parse_args((FederationArguments, SimulatedClientArguments, SimulationArguments), argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from fedllm.data import DataFormatError
    from fedllm.simulation import run_simulation

    print(f"{'client':>10} " if sim.mode == "local" else "", end="")
    print("round  clients  train loss  seconds", flush=True)
    try:
        result = run_simulation(federation, client, sim)
    except (DataFormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, path in result.adapters.items():
        print(f"final adapter ({name}): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
