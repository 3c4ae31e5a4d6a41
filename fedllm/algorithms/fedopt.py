"""FedOpt (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).

The server treats ``−Δ̄`` as a pseudo-gradient and takes one adaptive-optimizer step per round::

    m ← β1·m + (1 − β1)·Δ̄              (FedYogi, FedAdam; FedAdagrad uses m = Δ̄)
    v ← second_moment(v, Δ̄²)           (per subclass)
    w ← w + η · m / (√v + τ)

with η = ``--fedopt_eta``, τ = ``--fedopt_tau``, β1 = ``--fedopt_beta1``, β2 = ``--fedopt_beta2``.
m starts at 0 and v at τ²; there is no bias correction. Both are kept in the state as
``m.<name>`` and ``v.<name>``.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch

from .base import MeanDeltaAlgorithm, Tensors
from .fedopt_config import FedOptMomentsConfig

FIRST_MOMENT_PREFIX = "m."
SECOND_MOMENT_PREFIX = "v."


class FedOpt(MeanDeltaAlgorithm):
    """Base of FedAdagrad, FedYogi and FedAdam; subclasses define the second-moment update."""

    config_class = FedOptMomentsConfig
    # Whether the step uses the first moment m (FedYogi, FedAdam) or Δ̄ itself (FedAdagrad, whose
    # config_class has no β's).
    uses_first_moment: ClassVar[bool] = True

    def init_state(self, global_params):
        tau = self.hparams.fedopt_tau
        state: Tensors = {}
        for k, t in global_params.items():
            if self.uses_first_moment:
                state[FIRST_MOMENT_PREFIX + k] = torch.zeros_like(t, dtype=torch.float32)
            state[SECOND_MOMENT_PREFIX + k] = torch.full_like(t, tau * tau, dtype=torch.float32)
        return state

    @abstractmethod
    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """The new v given the old v and Δ̄² (must not modify ``v`` in place)."""

    def server_step(self, global_params, mean_delta, state):
        eta, tau = self.hparams.fedopt_eta, self.hparams.fedopt_tau
        beta1 = self.hparams.fedopt_beta1 if self.uses_first_moment else None
        new_global: Tensors = {}
        new_state: Tensors = {}
        scratch: dict[torch.Size, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # per shape, reused
        for k, w in global_params.items():
            delta = mean_delta[k]
            if delta.shape not in scratch:
                scratch[delta.shape] = tuple(torch.empty_like(delta, dtype=torch.float32) for _ in range(3))
            delta_sq, update, denominator = scratch[delta.shape]
            if self.uses_first_moment:
                step = state[FIRST_MOMENT_PREFIX + k].mul(beta1).add_(delta, alpha=1 - beta1)
                new_state[FIRST_MOMENT_PREFIX + k] = step
            else:
                step = delta
            v = self.second_moment(state[SECOND_MOMENT_PREFIX + k], torch.square(delta, out=delta_sq))
            new_state[SECOND_MOMENT_PREFIX + k] = v
            if v.untyped_storage().data_ptr() == delta_sq.untyped_storage().data_ptr():  # v kept Δ̄²'s buffer
                scratch[delta.shape] = (torch.empty_like(delta_sq), update, denominator)
            # w + η·step/(√v + τ): the same operations in the same order (so the same bits), in reused
            # buffers, and the result written into Δ̄'s own buffer (no longer needed, see server_step):
            # the step holds Δ̄, m and v -- three adapters -- and a few tensors, not four adapters.
            torch.mul(step, eta, out=update).div_(torch.sqrt(v, out=denominator).add_(tau))
            new_global[k] = torch.add(update, w.to(torch.float32), out=delta)
        return new_global, new_state
