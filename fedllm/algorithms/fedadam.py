"""FedAdam (Reddi et al., ICLR 2021).

``m ← β1·m + (1−β1)·Δ̄``, ``v ← β2·v + (1−β2)·Δ̄²``, ``w ← w + η·m/(√v + τ)``.
"""

from __future__ import annotations

import torch

from .fedopt import FedOpt


class FedAdam(FedOpt):
    name = "fedadam"

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        beta2 = self.hparams.fedopt_beta2
        return v * beta2 + delta_sq * (1 - beta2)
