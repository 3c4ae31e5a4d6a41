"""Client-level DP-FedAvg (McMahan et al. 2018) with fixed or adaptive clipping (Andrew et al. 2021).

A wrapper around a mean-delta algorithm (FedAvg, FedProx, FedAvgM, the FedOpt family), not a branch in it.
With C the clip norm, m the participants (under Poisson sampling the expected count qN, fixed in advance)
and σ the noise multiplier, each round::

    Δ̂_i = Δ_i · min(1, C / ‖Δ_i‖)                    (‖·‖ over all adapter tensors together)
    Δ̄   = (1/m) Σ_i Δ̂_i + N(0, (σ_Δ·C/m)² I)         (equal weights: sample counts are no bounded sensitivity)
    w, s ← inner.server_step(w, Δ̄, s)                 (the FedOpt moments see only the noised mean)

Adaptive clipping (``--dp_clip_norm auto``) also privatises the count of unclipped updates and moves C
geometrically towards the ``--dp_target_quantile`` γ of the norms::

    b̄ = (Σ_i 1[‖Δ_i‖ ≤ C] + N(0, σ_b²)) / m,     C ← C · exp(−η_C (b̄ − γ)),
    σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2)

so that the two releases together cost exactly one Gaussian mechanism of noise multiplier σ (Andrew et
al., Theorem 1): the accountant charges σ either way. Without adaptive clipping σ_Δ = σ.

The noise generator is seeded from the operating system's entropy every round, so neither the seed nor
the noise can be recomputed from the server's state or settings.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping, Sequence

import torch

from ..algorithms.base import ClippedUpdate, FedAlgorithm, MeanDeltaAlgorithm, Tensors, Update, weighted_mean_delta

STATE_CLIP_NORM = "dp.clip_norm"  # the clip norm of the next round, persisted with the algorithm state
UNCLIPPED_METRIC = "dp_unclipped"  # --dp client: 1 when the client's delta was within C before clipping


class _EqualWeight:
    """An update counted once, whatever its sample count."""

    def __init__(self, update: Update):
        self._update = update
        self.client_id = update.client_id
        self.num_samples = 1

    def get(self, name: str) -> torch.Tensor:
        return self._update.get(name)

    def names(self):
        return self._update.names()


def _secure_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


class DPFedAvg(FedAlgorithm):
    """DP-FedAvg around ``inner``; ``generator`` (tests) replaces the per-round entropy-seeded one."""

    def __init__(self, inner: MeanDeltaAlgorithm, config, generator: Callable[[], torch.Generator] | None = None):
        self.inner = inner
        self.name = inner.name
        self.config = config
        self.hparams = inner.hparams
        self._generator = generator or _secure_generator

    def add_noise(self, mean: dict[str, torch.Tensor], clip: float, denominator: float,
                  generator: torch.Generator | None = None) -> None:
        """Add N(0, (σ_Δ·C / denominator)²) to every coordinate of ``mean``, in place: the mechanism's one noise step
        (also the secure path's, on the unmasked mean). ``generator``: the round's, else a fresh one."""
        std = self.mean_noise_multiplier() * clip / denominator
        if std > 0:
            generator = generator or self._generator()
            for tensor in mean.values():
                tensor.add_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32), alpha=std)

    # ------------------------------------------------------------------ parameters of the mechanism
    def clip_norm(self, state: Mapping[str, torch.Tensor]) -> float:
        return float(state[STATE_CLIP_NORM]) if self.config.adaptive_clipping else self.config.fixed_clip_norm()

    def mean_noise_multiplier(self) -> float:
        """σ_Δ: all of σ with fixed clipping; with adaptive clipping what the count's noise leaves of it."""
        z = self.config.dp_noise_multiplier
        if z <= 0 or not self.config.adaptive_clipping:
            return z
        return (z ** -2 - (2 * self.config.clipped_count_stddev()) ** -2) ** -0.5

    def denominator(self, participants: int) -> float:
        """m: the participants, or under Poisson sampling the expected count qN (a fixed sensitivity)."""
        if self.config.client_sampling == "poisson":
            return float(self.config.sample_clients)  # q·N = (sample_clients / num_clients)·num_clients
        return float(max(participants, 1))

    # ------------------------------------------------------------------ FedAlgorithm
    def init_state(self, global_params):
        state = dict(self.inner.init_state(global_params))
        if self.config.adaptive_clipping:
            state[STATE_CLIP_NORM] = torch.tensor(self.config.dp_initial_clip_norm, dtype=torch.float64)
        return state

    def aggregate(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[Update],
                  state: Mapping[str, torch.Tensor]) -> tuple[Tensors, Tensors]:
        clip = self.clip_norm(state)
        inner_state = {k: v for k, v in state.items() if k != STATE_CLIP_NORM}
        clipped = [ClippedUpdate(u, global_params.keys(), clip) for u in updates]
        denominator = self.denominator(len(updates))
        if clipped:
            mean = weighted_mean_delta([_EqualWeight(c) for c in clipped], global_params.keys())
            scale = len(clipped) / denominator
            if scale != 1.0:
                for tensor in mean.values():
                    tensor.mul_(scale)
        else:  # an empty Poisson round: the noise alone
            mean = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in global_params.items()}
        generator = self._generator()  # the round's one stream: the mean's noise, then the clipped count's
        self.add_noise(mean, clip, denominator, generator)
        new_global, new_state = self.inner.server_step(global_params, mean, inner_state)
        new_state = dict(new_state)
        if self.config.adaptive_clipping:
            unclipped = sum(self._unclipped(u, c) for u, c in zip(updates, clipped, strict=True))
            noisy = unclipped + float(torch.randn((), generator=generator, dtype=torch.float64)) * \
                self.config.clipped_count_stddev()
            fraction = noisy / denominator
            new_clip = clip * math.exp(-self.config.dp_clip_learning_rate * (fraction - self.config.dp_target_quantile))
            new_state[STATE_CLIP_NORM] = torch.tensor(new_clip, dtype=torch.float64)
        return new_global, new_state

    def _unclipped(self, update: Update, clipped: ClippedUpdate) -> int:
        """1[‖Δ_i‖ ≤ C]: measured here (--dp server), or reported by the client that clipped (--dp client)."""
        if self.config.dp == "client":
            return int(getattr(update, "metrics", {}).get(UNCLIPPED_METRIC, 0) >= 0.5)
        return int(clipped.scale() == 1.0)

    def global_extras(self, state):
        return self.inner.global_extras({k: v for k, v in state.items() if k != STATE_CLIP_NORM})

    def upload_extras(self, adapter_names):
        return self.inner.upload_extras(adapter_names)

    def client_hook(self):
        return self.inner.client_hook()


def clip_delta(tensors: Mapping[str, torch.Tensor], adapter_names: Sequence[str], clip_norm: float
               ) -> tuple[dict[str, torch.Tensor], bool]:
    """--dp client: the delta scaled to L2 norm at most C (adapter tensors only), and whether it was within C."""
    norm = math.sqrt(sum(float(torch.linalg.vector_norm(tensors[n].float())) ** 2 for n in adapter_names))
    if norm <= clip_norm:
        return dict(tensors), True
    scale = clip_norm / norm
    return {k: (v * scale if k in adapter_names else v) for k, v in tensors.items()}, False
