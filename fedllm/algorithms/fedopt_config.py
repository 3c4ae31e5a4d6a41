"""The FedOpt family's hyperparameters (:class:`~.fedopt.FedOpt`): FedAdagrad's, and FedYogi's and FedAdam's."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import AlgorithmConfig, check_range


@dataclass
class FedOptConfig(AlgorithmConfig):
    """The FedOpt step ``w ← w + η·m/(√v + τ)``, v starting at τ² (FedAdagrad's; FedYogi and FedAdam add β's)."""

    fedopt_eta: float = field(
        default=1e-3, metadata={"help": "FedAdagrad/FedYogi/FedAdam server learning rate η > 0."}
    )
    fedopt_tau: float = field(
        default=1e-3,
        metadata={"help": "FedAdagrad/FedYogi/FedAdam adaptivity τ > 0 (also v's initial value τ²)."},
    )

    def validate(self, federation) -> None:
        super().validate(federation)
        check_range("fedopt_eta", self.fedopt_eta, above=0)
        check_range("fedopt_tau", self.fedopt_tau, above=0)  # τ = 0: v = 0 where Δ̄ = 0, and 0/0 in the global


@dataclass
class FedOptMomentsConfig(FedOptConfig):
    """FedOpt with decaying moments: ``m ← β1·m + (1 − β1)·Δ̄``, and β2 in v's update (FedYogi's, FedAdam's)."""

    fedopt_beta1: float = field(
        default=0.9, metadata={"help": "FedYogi/FedAdam first-moment decay β1, in [0, 1)."}
    )
    fedopt_beta2: float = field(
        default=0.99, metadata={"help": "FedYogi/FedAdam second-moment decay β2, in [0, 1)."}
    )

    def validate(self, federation) -> None:
        super().validate(federation)
        check_range("fedopt_beta1", self.fedopt_beta1, at_least=0, below=1)
        check_range("fedopt_beta2", self.fedopt_beta2, at_least=0, below=1)
