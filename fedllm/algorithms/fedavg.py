"""FedAvg (McMahan et al., 2017): w ← w + Δ̄, the sample-weighted mean of the client deltas."""

from __future__ import annotations

from .base import MeanDeltaAlgorithm


class FedAvg(MeanDeltaAlgorithm):
    name = "fedavg"

    def server_step(self, global_params, mean_delta, state):
        new_global = {k: global_params[k].to(mean_delta[k].dtype) + mean_delta[k] for k in global_params}
        return new_global, dict(state)
