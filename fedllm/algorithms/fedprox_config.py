"""FedProx's hyperparameter (:class:`~.fedprox.FedProx`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import AlgorithmConfig, check_range


@dataclass
class FedProxConfig(AlgorithmConfig):
    """Client i minimises ``F_i(p) + (μ/2)·Σ_p ‖p − w(p)‖²``."""

    prox_mu: float = field(
        default=0.01, metadata={"help": "FedProx proximal weight μ >= 0 (0: plain local training, as FedAvg)."}
    )

    def validate(self, federation) -> None:
        super().validate(federation)
        check_range("prox_mu", self.prox_mu, at_least=0)
