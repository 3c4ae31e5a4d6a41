"""FedYogi (Reddi et al., ICLR 2021).

``m ← β1·m + (1−β1)·Δ̄``, ``v ← v − (1−β2)·Δ̄²·sign(v − Δ̄²)``, ``w ← w + η·m/(√v + τ)``.
Unlike Adam's, Yogi's v moves by at most (1−β2)·Δ̄² per round, in the direction of Δ̄².
"""

from __future__ import annotations

import torch

from .fedopt import FedOpt


class FedYogi(FedOpt):
    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.hparams.fedopt_beta2) * delta_sq * torch.sign(v - delta_sq)
