"""The programs of fedllm, one module per ``fedllm`` subcommand, each with ``main(argv) -> exit code``.

``fedllm`` (:mod:`fedllm.cli`) and the top-level scripts (``server_http.py``, ``client_http.py``,
``simulate.py``, ``evaluate.py``, ``export.py``, ``config.py``) call the same ``main``. Exit codes, for shells:
:data:`EXIT_OK`, :data:`EXIT_FAILURE` (a runtime failure: an unexpected error, with its traceback) and
:data:`EXIT_USAGE` (bad usage, or a configuration or input the command refuses: one line saying why, argparse's
code too).
"""

from __future__ import annotations

import sys
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def parse_options(dataclass_types: tuple[type, ...], argv: list[str] | None) -> tuple[Any, ...]:
    """:func:`fedllm.config.parse_args`, with a bad ``--config`` file refused like a bad flag (exit 2)."""
    import yaml

    from ..config import parse_args

    try:
        return parse_args(dataclass_types, argv)
    except SystemExit as exc:
        if not isinstance(exc.code, str):  # argparse's own exit (0 for --help, 2 for a bad flag)
            raise
        message = exc.code
    except (OSError, ValueError, yaml.YAMLError) as exc:  # --config FILE unreadable or not YAML/JSON
        message = f"--config: {exc}"
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)
