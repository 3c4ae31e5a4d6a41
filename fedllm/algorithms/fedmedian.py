"""FedMedian (Yin et al., 2018): ``w ← w + median(Δ_1, …, Δ_K)`` coordinate by coordinate.

Unweighted; for an even K the median is the mean of the two middle values. It tolerates fewer
than half the clients sending arbitrary deltas.
"""

from __future__ import annotations

import torch

from .robust import CoordinateWiseAlgorithm


class FedMedian(CoordinateWiseAlgorithm):
    name = "fedmedian"

    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        k = stacked.shape[0]
        ordered = stacked.sort(dim=0).values
        if k % 2:
            return ordered[k // 2]
        return (ordered[k // 2 - 1] + ordered[k // 2]) / 2
