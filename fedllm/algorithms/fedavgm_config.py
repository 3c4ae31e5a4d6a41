"""FedAvgM's hyperparameters (:class:`~.fedavgm.FedAvgM`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import AlgorithmConfig, check_range


@dataclass
class FedAvgMConfig(AlgorithmConfig):
    """``v ← β·v + Δ̄``, ``w ← w + η_s·v``."""

    server_momentum: float = field(
        default=0.9, metadata={"help": "FedAvgM server momentum β, in [0, 1) (0: FedAvg with a server learning rate)."}
    )
    server_lr: float = field(default=1.0, metadata={"help": "FedAvgM server learning rate η_s > 0."})

    def validate(self, federation) -> None:
        super().validate(federation)
        check_range("server_momentum", self.server_momentum, at_least=0, below=1)  # β >= 1: v grows without bound
        check_range("server_lr", self.server_lr, above=0)
