#!/usr/bin/env python
"""Every fedllm option in one place: ``python config.py`` prints them all with their help text.

The definitions live in :mod:`fedllm.config` (so the installed library has them too); this file is
the entry point that documents them. Options can also come from a YAML/JSON file: ``--config FILE``.
"""

from __future__ import annotations

from fedllm.config import (
    ClientArguments,
    EvaluationArguments,
    FederationArguments,
    ServerArguments,
    SimulationArguments,
    parse_args,
)

__all__ = [
    "ClientArguments", "EvaluationArguments", "FederationArguments", "ServerArguments", "SimulationArguments",
    "parse_args",
]


def describe() -> str:
    from transformers import HfArgumentParser

    parts = []
    for group, used_by in ((FederationArguments, "server_http.py / run_server.sh (served to clients)"),
                           (ServerArguments, "server_http.py / run_server.sh"),
                           (ClientArguments, "client_http.py / run_client.sh"),
                           (SimulationArguments, "simulate.py (with the federation and client options)"),
                           (EvaluationArguments, "evaluate.py")):
        parser = HfArgumentParser((group,), prog=used_by, usage=f"{group.__name__} options")
        parts.append(f"== {group.__name__}: {group.__doc__.strip()}\n" + parser.format_help().split("options:", 1)[-1])
    return "\n".join(parts)


if __name__ == "__main__":
    print(describe())
