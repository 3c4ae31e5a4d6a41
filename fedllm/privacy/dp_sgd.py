"""Sample-level DP-SGD in a client's local training (``--dp_sgd``), on the LoRA parameters.

Each optimizer step of TRL's trainer becomes (Abadi et al. 2016), for a batch of B examples::

    g_j = ∇_θ ℓ(x_j)                    one backward pass per example: exact per-example gradients
    ĝ_j = g_j · min(1, C / ‖g_j‖)       ‖·‖ over all trainable (LoRA) parameters together
    g   = (Σ_j ĝ_j + N(0, σ²C² I)) / B  then the optimizer's step (global grad-norm clipping is off)

The algorithm's own term (FedProx's proximal gradient) depends on no example: it is added once, unclipped.

The client's own accountant (Google's dp-accounting) composes one sampled Gaussian mechanism per step:
a batch of B of the client's n examples, analysed as sampling without replacement under replace-one
(sensitivity 2C, multiplier σ/2). The trainer shuffles and cuts epochs rather than drawing each batch
independently; that common practice is what Opacus and TF Privacy also report, and docs/privacy.md says so.
The steps of every round are kept in ``dp_sgd.json`` in the client's folder, so ε accumulates across
rounds and restarts.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..fsutil import atomic_write_bytes

LEDGER_FILE = "dp_sgd.json"


@dataclass
class DPSGDLedger:
    """The DP-SGD steps a client has taken, and what they cost."""

    dataset_size: int
    batch_size: int
    noise_multiplier: float
    delta: float
    steps: int = 0

    @classmethod
    def open(cls, folder: Path, dataset_size: int, batch_size: int, noise_multiplier: float,
             delta: float) -> DPSGDLedger:
        path = Path(folder) / LEDGER_FILE
        ledger = cls(dataset_size, batch_size, noise_multiplier, delta)
        if path.exists():
            stored = json.loads(path.read_text())
            if {k: stored.get(k) for k in ("dataset_size", "batch_size", "noise_multiplier", "delta")} != {
                    "dataset_size": dataset_size, "batch_size": batch_size, "noise_multiplier": noise_multiplier,
                    "delta": delta}:
                raise ValueError(f"{path} was written with other DP-SGD settings ({stored}); its ε does not "
                                 "compose with these. Use a new --output_dir, or the same settings")
            ledger.steps = int(stored["steps"])
        return ledger

    def add(self, folder: Path, steps: int) -> None:
        self.steps += steps
        Path(folder).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(folder) / LEDGER_FILE, json.dumps(asdict(self), indent=1).encode())

    def epsilon(self) -> float | None:
        """ε at ``delta`` after every step so far; None without noise."""
        if self.noise_multiplier <= 0:
            return None
        if self.steps == 0:
            return 0.0
        from dp_accounting import dp_event
        from dp_accounting.privacy_accountant import NeighboringRelation
        from dp_accounting.rdp import rdp_privacy_accountant

        accountant = rdp_privacy_accountant.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        step = dp_event.SampledWithoutReplacementDpEvent(
            self.dataset_size, min(self.batch_size, self.dataset_size),
            dp_event.GaussianDpEvent(self.noise_multiplier / 2))
        accountant.compose(step, self.steps)
        return float(accountant.get_epsilon(self.delta))


def default_delta(dataset_size: int) -> float:
    return 1.0 / max(dataset_size, 2) ** 1.1


def dp_sgd_trainer(base_cls: type, hook: Any, params: Mapping[str, torch.nn.Parameter], clip_norm: float,
                   noise_multiplier: float) -> type:
    """A subclass of a TRL trainer whose every step is DP-SGD (module docstring) over the trainable ``params``."""
    trainable = list(params.values())

    class DPSGDTrainer(base_cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            model.train()
            inputs = self._prepare_inputs(inputs)
            batch = next(v.shape[0] for v in inputs.values() if torch.is_tensor(v) and v.dim() > 0)
            summed = [torch.zeros_like(p, dtype=torch.float32) for p in trainable]
            losses = []
            for j in range(batch):
                example = {k: v[j:j + 1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v
                           for k, v in inputs.items()}
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, example)
                grads = torch.autograd.grad(loss, trainable, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, trainable, strict=True)]
                norm = math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads))
                factor = min(1.0, clip_norm / (norm + 1e-12))
                for acc, g in zip(summed, grads, strict=True):
                    acc.add_(g.float(), alpha=factor)
                losses.append(loss.detach())
            generator = torch.Generator(device="cpu").manual_seed(secrets.randbits(63))
            for acc in summed:
                noise = torch.randn(acc.shape, generator=generator, dtype=torch.float32)
                acc.add_(noise.to(acc.device), alpha=noise_multiplier * clip_norm).div_(batch)
            extra = hook.extra_loss(params)
            extra_grads = torch.autograd.grad(extra, trainable, allow_unused=True) if extra is not None else None
            for i, (p, g) in enumerate(zip(trainable, summed, strict=True)):
                if extra_grads is not None and extra_grads[i] is not None:
                    g = g + extra_grads[i].float()
                p.grad = g.to(p.dtype) if p.grad is None else p.grad + g.to(p.dtype)
            return torch.stack(losses).mean()

    return DPSGDTrainer
