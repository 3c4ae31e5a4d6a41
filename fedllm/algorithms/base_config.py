"""The hyperparameters of a federated algorithm: a dataclass of federation options that checks its ranges.

Every algorithm names its hyperparameter dataclass in ``FedAlgorithm.config_class``, as TRL pairs
``DPOConfig`` with ``DPOTrainer``: :class:`~.fedprox_config.FedProxConfig` with
:class:`~.fedprox.FedProx`. A field *is* the federation option of the same name --
``FedOptConfig.fedopt_tau`` is ``--fedopt_tau`` -- and its default and help are that option's:
:mod:`fedllm.config` builds ``FederationArguments`` from the built-in algorithms' dataclasses, so each
hyperparameter is defined once, next to its algorithm. :meth:`AlgorithmConfig.validate` refuses a
value out of range with a message naming the flag and the range; a federation validates the
hyperparameters of its own ``--fed_alg`` only.

The ``*_config`` modules import no torch: ``fedllm.config`` (and ``python config.py``) import them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ..config import FederationArguments

C = TypeVar("C", bound="AlgorithmConfig")


def _allowed(above: float | None, at_least: float | None, below: float | None, at_most: float | None) -> str:
    """The range as the messages say it: ``> 0``, ``>= 1``, ``< 1``, ``in [0, 1)``."""
    def number(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    low = (above, "(", ">") if above is not None else (at_least, "[", ">=") if at_least is not None else None
    high = (below, ")", "<") if below is not None else (at_most, "]", "<=") if at_most is not None else None
    if low and high:
        return f"in {low[1]}{number(low[0])}, {number(high[0])}{high[1]}"
    bound, _, relation = low or high
    return f"{relation} {number(bound)}"


def range_problem(flag: str, value: Any, *, above: float | None = None, at_least: float | None = None,
                  below: float | None = None, at_most: float | None = None) -> str | None:
    """What is wrong with ``--flag value`` given its range, or None when the value lies in it.

    ``above``/``below`` are open bounds, ``at_least``/``at_most`` closed ones. NaN, ±inf and
    non-numbers lie in no range.
    """
    allowed = _allowed(above, at_least, below, at_most)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"--{flag} must be a finite number {allowed}, got {value!r}"
    if ((above is not None and not value > above) or (at_least is not None and not value >= at_least)
            or (below is not None and not value < below) or (at_most is not None and not value <= at_most)):
        return f"--{flag} must be {allowed}, got {value!r}"
    return None


def check_range(flag: str, value: Any, **bounds: float) -> None:
    """Raise ValueError with :func:`range_problem`'s message when ``--flag value`` is out of range."""
    problem = range_problem(flag, value, **bounds)
    if problem:
        raise ValueError(problem)


@dataclass
class AlgorithmConfig:
    """The hyperparameters every algorithm has, and the base of each algorithm's own.

    An algorithm without hyperparameters of its own (FedAvg, SCAFFOLD, FedMedian) uses it as it is.
    A subclass adds its fields -- each named after the federation option that sets it -- and extends
    :meth:`validate`.
    """

    max_update_norm: float = field(
        default=0.0,
        metadata={"help": "Clip each client delta to this L2 norm C before any algorithm sees it: "
                          "Δ_i ← Δ_i·min(1, C/‖Δ_i‖). C >= 0; 0 = off."},
    )

    @classmethod
    def from_federation(cls: type[C], federation: Any) -> C:
        """This dataclass filled with the federation's values of its options (not validated)."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [name for name in names if not hasattr(federation, name)]
        if unknown:
            raise ValueError(f"{cls.__name__} declares {', '.join(unknown)}, which are not federation options: "
                             "name each hyperparameter after the flag that sets it (python config.py lists them)")
        return cls(**{name: getattr(federation, name) for name in names})

    def validate(self, federation: FederationArguments) -> None:
        """Raise ValueError, naming the flag and its range, at the first value out of range.

        ``federation`` holds the other options, for rules that involve them (Krum's on
        ``--sample_clients``). A subclass calls ``super().validate(federation)`` first.
        """
        check_range("max_update_norm", self.max_update_norm, at_least=0)
