"""FedTrimmedAvg's hyperparameter (:class:`~.fedtrimmedavg.FedTrimmedAvg`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import AlgorithmConfig, check_range


@dataclass
class FedTrimmedAvgConfig(AlgorithmConfig):
    """The coordinate-wise mean after dropping the ⌊β·K⌋ largest and smallest of the K deltas."""

    trim_ratio: float = field(
        default=0.1, metadata={"help": "FedTrimmedAvg: fraction β trimmed at each end, in [0, 0.5)."}
    )

    def validate(self, federation) -> None:
        super().validate(federation)
        check_range("trim_ratio", self.trim_ratio, at_least=0, below=0.5)  # β >= 0.5 would trim everything
