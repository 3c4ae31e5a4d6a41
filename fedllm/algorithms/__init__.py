"""Federated algorithms, selected by ``--fed_alg``.

Adding one is a new module with a :class:`~fedllm.algorithms.base.FedAlgorithm` subclass plus
one line in ``BUILTIN``. Third-party packages register theirs under the entry-point group
``fedllm.algorithms`` (name -> ``module:Class``).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from .base import (
    ClientHook,
    FedAlgorithm,
    InMemoryUpdate,
    MeanDeltaAlgorithm,
    Update,
    run_aggregation,
    weighted_mean_delta,
)
from .fedavg import FedAvg

BUILTIN: dict[str, type[FedAlgorithm]] = {
    FedAvg.name: FedAvg,
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
    "BUILTIN", "ENTRY_POINT_GROUP", "ClientHook", "FedAlgorithm", "InMemoryUpdate", "MeanDeltaAlgorithm",
    "Update", "available_algorithms", "get_algorithm", "run_aggregation", "weighted_mean_delta",
]
