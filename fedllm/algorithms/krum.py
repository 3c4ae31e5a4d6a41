"""Krum and multi-Krum (Blanchard et al., 2017).

Each delta Δ_i is scored by the sum of the squared L2 distances to its K − f − 2 nearest other
deltas (f = ``--krum_malicious``), and the m lowest-scored deltas are averaged unweighted
(m = ``--krum_keep``): ``w ← w + (1/m)·Σ_{i∈best m} Δ_i``. m = 1 is Krum, m > 1 multi-Krum.

Krum's guarantee needs K > 2f + 2, so a Krum federation needs ``--sample_clients`` > 2f + 2 and
m ≤ ``--sample_clients`` − f (:class:`~.krum_config.KrumConfig`). A round that closes at its deadline
with fewer updates (``--min_fit_clients``) clamps the neighbour count to ``max(K − f − 2, 1)`` (at most
K − 1), and m to K, so it never fails for want of clients.

The K × K squared-distance matrix is accumulated tensor by tensor, so memory is K tensors of
one name (two passes over the updates: distances, then the average).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import FedAlgorithm, Tensors, Update
from .krum_config import KrumConfig
from .robust import stacked_deltas


class Krum(FedAlgorithm):
    name = "krum"
    config_class = KrumConfig

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
        neighbours = min(max(k - self.hparams.krum_malicious - 2, 1), k - 1)
        scores = [
            torch.cat([dist[i, :i], dist[i, i + 1:]]).sort().values[:neighbours].sum().item() for i in range(k)
        ]
        keep = min(self.hparams.krum_keep, k)
        return sorted(sorted(range(k), key=lambda i: scores[i])[:keep])

    def aggregate(self, global_params, updates, state):
        names = list(global_params)
        chosen = [updates[i] for i in self.select(self.squared_distances(updates, names))]
        new_global: Tensors = {k: global_params[k].to(torch.float32) + stacked_deltas(chosen, k).mean(dim=0) for k in names}
        return new_global, dict(state)
