"""Krum and multi-Krum (Blanchard et al., 2017).

Each delta Δ_i is scored by the sum of the squared L2 distances to its K − f − 2 nearest other
deltas (f = ``--krum_malicious``), and the m lowest-scored deltas are averaged unweighted
(m = ``--krum_keep``): ``w ← w + (1/m)·Σ_{i∈best m} Δ_i``. m = 1 is Krum, m > 1 multi-Krum.

Krum's guarantee needs K > 2f + 2. With fewer clients the neighbour count is clamped to
``max(K − f − 2, 1)`` (at most K − 1), and m to K, so a round never fails for want of clients.

The K × K squared-distance matrix is accumulated tensor by tensor, so memory is K tensors of
one name (two passes over the updates: distances, then the average).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import FedAlgorithm, Tensors, Update
from .robust import stacked_deltas


class Krum(FedAlgorithm):
    name = "krum"

    def __init__(self, config):
        super().__init__(config)
        if config.krum_malicious < 0 or config.krum_keep < 1:
            raise ValueError("--krum_malicious must be >= 0 and --krum_keep >= 1")

    @staticmethod
    def squared_distances(updates: Sequence[Update], names: Sequence[str]) -> torch.Tensor:
        """D[i, j] = ‖Δ_i − Δ_j‖² over all tensors in ``names``, one name at a time."""
        k = len(updates)
        dist = torch.zeros(k, k, dtype=torch.float32)
        for name in names:
            stacked = stacked_deltas(updates, name).flatten(start_dim=1)
            for i in range(k):
                for j in range(i + 1, k):
                    d = (stacked[i] - stacked[j]).square().sum()
                    dist[i, j] += d
                    dist[j, i] += d
        return dist

    def select(self, dist: torch.Tensor) -> list[int]:
        """Indices of the m lowest Krum scores (ties to the lower index), in ascending order."""
        k = dist.shape[0]
        neighbours = min(max(k - self.config.krum_malicious - 2, 1), k - 1)
        scores = [
            torch.cat([dist[i, :i], dist[i, i + 1:]]).sort().values[:neighbours].sum().item() for i in range(k)
        ]
        keep = min(self.config.krum_keep, k)
        return sorted(sorted(range(k), key=lambda i: scores[i])[:keep])

    def aggregate(self, global_params, updates, state):
        names = list(global_params)
        chosen = [updates[i] for i in self.select(self.squared_distances(updates, names))]
        new_global: Tensors = {k: global_params[k].to(torch.float32) + stacked_deltas(chosen, k).mean(dim=0) for k in names}
        return new_global, dict(state)
