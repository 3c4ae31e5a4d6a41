"""FedAdagrad (Reddi et al., ICLR 2021): ``v ← v + Δ̄²``, ``w ← w + η·Δ̄/(√v + τ)``."""

from __future__ import annotations

import torch

from .fedopt import FedOpt
from .fedopt_config import FedOptConfig


class FedAdagrad(FedOpt):
    name = "fedadagrad"
    config_class = FedOptConfig
    uses_first_moment = False

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v + delta_sq
