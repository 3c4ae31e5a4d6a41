"""``fedllm config``: every fedllm option in one place, grouped, with its help text (``config.py``).

The definitions live in :mod:`fedllm.config` and, for the algorithms' hyperparameters, next to each
algorithm in ``fedllm/algorithms/*_config.py``; this command documents them. Options can also come from a
YAML/JSON file: ``--config FILE``. Imports no torch, so it answers at once.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from importlib.metadata import entry_points

from ..algorithms import BUILTIN_CONFIGS, ENTRY_POINT_GROUP, AlgorithmConfig
from ..compression.config import CompressionArguments
from ..config import (
    ClientArguments,
    EvaluationArguments,
    FederationIdentityArguments,
    FederationOperationalArguments,
    ServerArguments,
    SimulationArguments,
)
from ..privacy.config import PrivacyArguments
from . import EXIT_OK, EXIT_USAGE

WIDTH = 100


def _wrap(text: str, indent: int, hang: int = 0) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=" " * indent, subsequent_indent=" " * (indent + hang))


def _doc(cls: type) -> str:
    """A class's docstring as one plain line (no reST ``literals``)."""
    return " ".join(cls.__doc__.split()).replace("``", "")


def _options(fields: list[dataclasses.Field], indent: int) -> list[str]:
    """``--name TYPE`` and, below it, the help text with the choices and the default."""
    lines = []
    for f in fields:
        # The annotation's text, or the type HfArgumentParser resolved it to once options were parsed in-process.
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines.append(f"{' ' * indent}--{f.name} {type_name.replace(' | None', '').upper()}")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = f.metadata.get("choices")
        text = f.metadata.get("help", "") + (f" One of: {', '.join(choices)}." if choices else "")
        lines += _wrap(f"{text} (default: {default})", indent + 4)
    return lines


def _group(title: str, used_by: str, group: type) -> str:
    lines = [f"== {title} ({group.__name__}; {used_by})", *_wrap(_doc(group), 3), ""]
    return "\n".join([*lines, *_options(list(dataclasses.fields(group)), 2)])


def _algorithm_group() -> str:
    """The algorithms' hyperparameters under the names of the algorithms they belong to."""
    lines = [
        "== Algorithm hyperparameters (AlgorithmArguments; federation options, set like the others)",
        *_wrap("Each algorithm's dataclass in fedllm/algorithms/*_config.py. Only those of --fed_alg apply, and only "
               "they are validated; they are identity settings.", 3),
        "",
        "  every algorithm (AlgorithmConfig):",
        *_options(list(dataclasses.fields(AlgorithmConfig)), 4),
    ]
    common = {f.name for f in dataclasses.fields(AlgorithmConfig)}
    by_config: dict[type, list[str]] = {}
    for name, config in BUILTIN_CONFIGS.items():
        by_config.setdefault(config, []).append(name)
    for config, names in by_config.items():
        if config is not AlgorithmConfig:
            lines += ["", *_wrap(f"{', '.join(names)} ({config.__name__}): {_doc(config)}", 2, hang=2)]
            lines += _options([f for f in dataclasses.fields(config) if f.name not in common], 4)
    lines += ["", f"  {', '.join(by_config[AlgorithmConfig])}: no hyperparameters of their own."]
    plugins = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN_CONFIGS]
    if plugins:
        lines += ["", *_wrap("installed plugins (their hyperparameters are options above; docs/algorithms.md): "
                             + ", ".join(f"{ep.name} ({ep.value})" for ep in plugins), 2)]
    return "\n".join(lines)


def describe() -> str:
    return "\n\n".join([
        _group("Federation identity", "fedllm server, fedllm simulate; served to clients", FederationIdentityArguments),
        _group("Federation, operational", "fedllm server, fedllm simulate; served to clients",
               FederationOperationalArguments),
        _algorithm_group(),
        _group("Differential privacy (identity too)", "fedllm server, fedllm simulate; served to clients",
               PrivacyArguments),
        _group("Compression and communication budget (codec options identity, the budget operational)",
               "fedllm server, fedllm simulate; served to clients", CompressionArguments),
        _group("Server", "fedllm server, server_http.py, run_server.sh", ServerArguments),
        _group("Client", "fedllm client, client_http.py, run_client.sh", ClientArguments),
        _group("Simulation", "fedllm simulate, with the federation options and the client's local-training ones",
               SimulationArguments),
        _group("Evaluation", "fedllm evaluate, fedllm export", EvaluationArguments),
    ])



def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(__doc__)
        return EXIT_OK
    if argv:
        print(f"error: fedllm config takes no arguments, got {' '.join(argv)!r}", file=sys.stderr)
        return EXIT_USAGE
    print(describe())
    return EXIT_OK
