"""Federated algorithms, selected by ``--fed_alg``.

An algorithm is a module with a :class:`~fedllm.algorithms.base.FedAlgorithm` subclass and, if it
has hyperparameters, their dataclass in a ``*_config`` module next to it (:mod:`.base_config`); adding
one is those modules plus one line in ``_BUILTIN``. Third-party packages register theirs under the
entry-point group ``fedllm.algorithms`` (name -> ``module:Class``), e.g. in their ``pyproject.toml``::

    [project.entry-points."fedllm.algorithms"]
    fedclipavg = "my_fedllm_plugin.fedclipavg:FedClipAvg"

after which ``--fed_alg fedclipavg`` selects it on a server where that package is installed
(a built-in name always wins over an entry point of the same name). ``docs/algorithms.md``
walks through a complete example.

Importing the package imports only the hyperparameter dataclasses, which need no torch
(``fedllm.config`` builds the federation's options from them); the algorithms, and torch, are
imported when first used.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from .base_config import AlgorithmConfig, check_range, range_problem
from .fedavgm_config import FedAvgMConfig
from .fedkseed_config import FedKSeedConfig
from .fedopt_config import FedOptConfig, FedOptMomentsConfig
from .fedprox_config import FedProxConfig
from .fedtrimmedavg_config import FedTrimmedAvgConfig
from .krum_config import KrumConfig
from .schedule import cosine_learning_rate, round_learning_rate

if TYPE_CHECKING:
    from .base import FedAlgorithm

# --fed_alg -> the algorithm's module and class (imported on first use) and its hyperparameters (its
# config_class, here so that they are read without importing the algorithm).
_BUILTIN: dict[str, tuple[str, str, type[AlgorithmConfig]]] = {
    "fedavg": ("fedavg", "FedAvg", AlgorithmConfig),
    "fedprox": ("fedprox", "FedProx", FedProxConfig),
    "scaffold": ("scaffold", "Scaffold", AlgorithmConfig),
    "fedavgm": ("fedavgm", "FedAvgM", FedAvgMConfig),
    "fedadagrad": ("fedadagrad", "FedAdagrad", FedOptConfig),
    "fedyogi": ("fedyogi", "FedYogi", FedOptMomentsConfig),
    "fedadam": ("fedadam", "FedAdam", FedOptMomentsConfig),
    "fedmedian": ("fedmedian", "FedMedian", AlgorithmConfig),
    "fedtrimmedavg": ("fedtrimmedavg", "FedTrimmedAvg", FedTrimmedAvgConfig),
    "krum": ("krum", "Krum", KrumConfig),
    "fedkseed": ("fedkseed", "FedKSeed", FedKSeedConfig),
}

BUILTIN_CONFIGS: dict[str, type[AlgorithmConfig]] = {name: config for name, (_, _, config) in _BUILTIN.items()}

ENTRY_POINT_GROUP = "fedllm.algorithms"

# The package's exports that import torch, by module: imported on first access (PEP 562 __getattr__).
_LAZY_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["CONTROL_PREFIX", "ClientHook", "ClippedUpdate", "FedAlgorithm", "InMemoryUpdate",
                     "MeanDeltaAlgorithm", "Update", "run_aggregation", "weighted_mean_delta"], "base"),
    "FedOpt": "fedopt",
    **{cls: module for module, cls, _ in _BUILTIN.values()},
}


def _import(module: str, attribute: str) -> Any:
    return getattr(import_module(f".{module}", __name__), attribute)


def _builtin_classes() -> dict[str, type[FedAlgorithm]]:
    return {name: _import(module, cls) for name, (module, cls, _) in _BUILTIN.items()}


def __getattr__(name: str) -> Any:
    if name == "BUILTIN":  # --fed_alg -> class of every built-in algorithm
        value: Any = _builtin_classes()
    elif name in _LAZY_EXPORTS:
        value = _import(_LAZY_EXPORTS[name], name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def available_algorithms() -> dict[str, type[FedAlgorithm]]:
    found = _builtin_classes()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.load())
    return found


def algorithm_class(name: str) -> type[FedAlgorithm]:
    """The algorithm ``--fed_alg name`` selects, built in or from an entry point."""
    algorithms = available_algorithms()
    if name not in algorithms:
        raise ValueError(f"unknown --fed_alg {name!r}; available: {', '.join(sorted(algorithms))}")
    return algorithms[name]


def algorithm_config_class(name: str) -> type[AlgorithmConfig]:
    """The hyperparameter dataclass of ``--fed_alg name`` (a built-in one's without importing torch)."""
    return BUILTIN_CONFIGS[name] if name in BUILTIN_CONFIGS else algorithm_class(name).config_class


def get_algorithm(name: str, config: Any) -> FedAlgorithm:
    return algorithm_class(name)(config)


__all__ = [
    "BUILTIN", "BUILTIN_CONFIGS", "CONTROL_PREFIX", "ENTRY_POINT_GROUP", "AlgorithmConfig", "ClientHook",
    "ClippedUpdate", "FedAdagrad", "FedAdam", "FedAlgorithm", "FedAvg", "FedAvgM", "FedAvgMConfig", "FedKSeed", "FedKSeedConfig", "FedMedian",
    "FedOpt", "FedOptConfig", "FedOptMomentsConfig", "FedProx", "FedProxConfig", "FedTrimmedAvg",
    "FedTrimmedAvgConfig", "FedYogi", "InMemoryUpdate", "Krum", "KrumConfig", "MeanDeltaAlgorithm", "Scaffold",
    "Update", "algorithm_class", "algorithm_config_class", "available_algorithms", "check_range",
    "cosine_learning_rate", "get_algorithm", "range_problem", "round_learning_rate", "run_aggregation",
    "weighted_mean_delta",
]
