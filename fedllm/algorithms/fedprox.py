"""FedProx (Li et al., 2020): FedAvg on the server, a proximal term in every client's loss.

Client i minimises ``F_i(p) + (μ/2) · Σ_p ‖p − w(p)‖²`` over its trainable tensors ``p``, with
``w(p)`` the global value of ``p`` at the start of the round and μ = ``--prox_mu``. The term's
gradient ``μ (p − w)`` pulls local training back towards the global adapter, which limits client
drift on heterogeneous data. The server step is FedAvg's: ``w ← w + Δ̄``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import ClientHook, Tensors
from .fedavg import FedAvg
from .fedprox_config import FedProxConfig


class FedProxHook(ClientHook):
    """Adds ``(μ/2) · Σ_p ‖p − w(p)‖²`` to the training loss."""

    def __init__(self, mu: float):
        self.mu = mu
        self._global: Tensors = {}

    def begin_round(self, params: Mapping[str, torch.nn.Parameter], global_tensors: Mapping[str, torch.Tensor]) -> None:
        # The params hold the global adapter now; copy them so w sits on their device.
        self._global = {name: p.detach().to(torch.float32, copy=True) for name, p in params.items()}

    def extra_loss(self, params: Mapping[str, torch.nn.Parameter]) -> torch.Tensor:
        squared = sum((p.to(torch.float32) - self._global[name]).pow(2).sum() for name, p in params.items())
        return 0.5 * self.mu * squared


class FedProx(FedAvg):
    """FedAvg on the server; :class:`FedProxHook` on the clients."""

    name = "fedprox"
    config_class = FedProxConfig

    def client_hook(self) -> ClientHook:
        return FedProxHook(self.hparams.prox_mu)
