"""FedAvgM (Hsu et al., 2019): FedAvg with server momentum.

``v ← β·v + Δ̄`` then ``w ← w + η_s·v``, with β = ``--server_momentum`` and η_s = ``--server_lr``;
v starts at 0 and is kept in the state as ``momentum.<name>``. With β = 0 and η_s = 1 this is FedAvg.
"""

from __future__ import annotations

import torch

from .base import MeanDeltaAlgorithm, Tensors
from .fedavgm_config import FedAvgMConfig

MOMENTUM_PREFIX = "momentum."


class FedAvgM(MeanDeltaAlgorithm):
    name = "fedavgm"
    config_class = FedAvgMConfig

    def init_state(self, global_params):
        return {MOMENTUM_PREFIX + k: torch.zeros_like(t, dtype=torch.float32) for k, t in global_params.items()}

    def server_step(self, global_params, mean_delta, state):
        beta, lr = self.hparams.server_momentum, self.hparams.server_lr
        new_global: Tensors = {}
        new_state: Tensors = {}
        for k, w in global_params.items():
            v = state[MOMENTUM_PREFIX + k].mul(beta).add_(mean_delta[k])
            new_state[MOMENTUM_PREFIX + k] = v
            new_global[k] = w.to(torch.float32) + lr * v
        return new_global, new_state
