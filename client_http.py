#!/usr/bin/env python
"""fedllm client: run on each data owner's machine.

    python client_http.py --server_url http://HOST:8080 --client_id alice --dataset_name ./alice.jsonl

Polls the server, trains a LoRA adapter locally when sampled, uploads only the delta, and saves
the final global adapter to --output_dir/final_adapter. Options: fedllm/config.py (ClientArguments).
"""

from __future__ import annotations

import logging
import sys

from fedllm.config import ClientArguments, parse_args


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_args((ClientArguments,), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("fedllm.client")
    from fedllm.client.http import ServerError
    from fedllm.client.runner import GlobalAdapterError, run_client
    from fedllm.client.trainer import ModelMismatchError
    from fedllm.data import DataFormatError

    try:
        report = run_client(args)
    except (ServerError, ModelMismatchError, GlobalAdapterError, DataFormatError, ValueError, ConnectionError) as exc:
        log.error("%s", exc)
        return 2
    rows = [f"{'round':>5} {'loss':>8} {'steps':>5} {'seconds':>8} {'KiB down':>9} {'KiB up':>8}"]
    for r in report.rounds:
        loss = f"{r.train_loss:.4f}" if r.train_loss is not None else "n/a"
        rows.append(f"{r.round:>5} {loss:>8} {r.steps:>5} {r.seconds:>8.1f} {r.bytes_down / 1024:>9.1f} {r.bytes_up / 1024:>8.1f}")
    print(f"client {args.client_id}: joined {len(report.rounds)} rounds", file=sys.stderr)
    print("\n".join(rows), file=sys.stderr)
    print(f"final adapter: {report.final_adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
