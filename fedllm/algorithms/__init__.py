"""Federated algorithms, selected by ``--fed_alg``.

Adding one is a new module with a :class:`~fedllm.algorithms.base.FedAlgorithm` subclass plus
one line in ``BUILTIN``. Third-party packages register theirs under the entry-point group
``fedllm.algorithms`` (name -> ``module:Class``), e.g. in their ``pyproject.toml``::

    [project.entry-points."fedllm.algorithms"]
    fedclipavg = "my_fedllm_plugin.fedclipavg:FedClipAvg"

after which ``--fed_alg fedclipavg`` selects it on a server where that package is installed
(a built-in name always wins over an entry point of the same name). ``docs/algorithms.md``
walks through a complete example.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from .base import (
    CONTROL_PREFIX,
    ClientHook,
    ClippedUpdate,
    FedAlgorithm,
    InMemoryUpdate,
    MeanDeltaAlgorithm,
    Update,
    run_aggregation,
    weighted_mean_delta,
)
from .fedadagrad import FedAdagrad
from .fedadam import FedAdam
from .fedavg import FedAvg
from .fedavgm import FedAvgM
from .fedmedian import FedMedian
from .fedopt import FedOpt
from .fedprox import FedProx
from .fedtrimmedavg import FedTrimmedAvg
from .fedyogi import FedYogi
from .krum import Krum
from .scaffold import Scaffold
from .schedule import cosine_learning_rate, round_learning_rate

BUILTIN: dict[str, type[FedAlgorithm]] = {
    FedAvg.name: FedAvg,
    FedProx.name: FedProx,
    Scaffold.name: Scaffold,
    FedAvgM.name: FedAvgM,
    FedAdagrad.name: FedAdagrad,
    FedYogi.name: FedYogi,
    FedAdam.name: FedAdam,
    FedMedian.name: FedMedian,
    FedTrimmedAvg.name: FedTrimmedAvg,
    Krum.name: Krum,
}

ENTRY_POINT_GROUP = "fedllm.algorithms"


def available_algorithms() -> dict[str, type[FedAlgorithm]]:
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.load())
    return found


def get_algorithm(name: str, config: Any) -> FedAlgorithm:
    algorithms = available_algorithms()
    if name not in algorithms:
        raise ValueError(f"unknown --fed_alg {name!r}; available: {', '.join(sorted(algorithms))}")
    return algorithms[name](config)


__all__ = [
    "BUILTIN", "CONTROL_PREFIX", "ENTRY_POINT_GROUP", "ClientHook", "ClippedUpdate", "FedAdagrad", "FedAdam",
    "FedAlgorithm", "FedAvg", "FedAvgM", "FedMedian", "FedOpt", "FedProx", "FedTrimmedAvg", "FedYogi",
    "InMemoryUpdate", "Krum", "MeanDeltaAlgorithm", "Scaffold", "Update", "available_algorithms",
    "cosine_learning_rate", "get_algorithm", "round_learning_rate", "run_aggregation", "weighted_mean_delta",
]
