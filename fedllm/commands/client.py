"""``fedllm client``: run on each data owner's machine (``client_http.py``, ``run_client.sh``).

    fedllm client --server_url http://HOST:8080 --client_id alice --dataset_name ./alice.jsonl

Polls the server, trains a LoRA adapter locally when sampled, uploads only the delta, and saves
the final global adapter to --output_dir/final_adapter. Options: fedllm/config.py (ClientArguments).
Exit 0 when the federation finished, 2 on what the user can act on (the server refused, another model,
an untrusted server, bad data or options), 1 on anything unexpected.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import TYPE_CHECKING

from ..config import ClientArguments
from ..logs import setup_logging
from . import EXIT_OK, EXIT_USAGE, parse_options

if TYPE_CHECKING:
    from ..client.runner import ClientReport


def summary_table(report: ClientReport) -> str:
    """The final summary: one row per round joined, then the totals."""
    header = f"{'round':>5} {'loss':>8} {'eval':>8} {'steps':>5} {'seconds':>8} {'KiB down':>9} {'KiB up':>8}"
    rows = [header, "-" * len(header)]

    def fmt(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "n/a"

    for r in report.rounds:
        rows.append(f"{r.round:>5} {fmt(r.train_loss):>8} {fmt(r.eval_loss):>8} {r.steps:>5} {r.seconds:>8.1f} "
                    f"{r.bytes_down / 1024:>9.1f} {r.bytes_up / 1024:>8.1f}")
    rows.append("-" * len(header))
    train_seconds = sum(r.seconds for r in report.rounds)
    rows.append(f"{'total':>5} {'':>8} {'':>8} {report.steps:>5} {train_seconds:>8.1f} "
                f"{report.bytes_down / 1024:>9.1f} {report.bytes_up / 1024:>8.1f}")
    for what, epsilon, delta in (("federation DP (client level)", report.dp_epsilon, report.dp_delta),
                                 ("this client's DP-SGD", report.dp_sgd_epsilon, report.dp_sgd_delta)):
        if delta is not None:  # the privacy spent, as the accountants computed it
            rows.append(f"{what}: ε = {'n/a' if epsilon is None else f'{epsilon:.3f}'} at δ = {delta:.3g}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_options((ClientArguments,), argv)
    setup_logging("INFO", args.log_format)
    log = logging.getLogger("fedllm.client")
    import requests

    from ..client.http import ServerError
    from ..client.runner import GlobalAdapterError, run_client
    from ..client.trainer import ModelMismatchError
    from ..data import DataFormatError

    try:
        report = run_client(args)
    # One line and exit 2 for what the user can act on. ValueError covers the client's refusals of the server
    # (trust.UntrustedServerError, trust.InsecureTransportError), a missing model (adapter.ModelNotFoundError),
    # another federation's state and bad options; requests' errors are TLS and URL problems.
    except (ServerError, ModelMismatchError, GlobalAdapterError, DataFormatError, ValueError, ConnectionError,
            requests.RequestException) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    headline = (f"client {args.client_id}: joined {len(report.rounds)} of {report.num_rounds} rounds, "
                f"{report.steps} steps, {report.bytes_down / 1024:.1f} KiB down, {report.bytes_up / 1024:.1f} KiB up, "
                f"{report.seconds:.1f}s in all")
    if args.log_format == "json":
        log.info(headline, extra={"event": "client_summary", "client_id": args.client_id,
                                  "rounds": [dataclasses.asdict(r) for r in report.rounds],
                                  "num_rounds": report.num_rounds, "steps": report.steps,
                                  "bytes_down": report.bytes_down, "bytes_up": report.bytes_up,
                                  "seconds": report.seconds, "final_adapter": str(report.final_adapter)})
    else:
        print(f"\n{headline}\n{summary_table(report)}", file=sys.stderr)
    print(f"final adapter: {report.final_adapter}")
    return EXIT_OK

