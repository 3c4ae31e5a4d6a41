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
        # The k//2 + 1 smallest values in ascending order are exactly the first k//2 + 1 of a full sort,
        # and all the median needs; selecting them is several times faster than sorting all K.
        ordered = stacked.topk(k // 2 + 1, dim=0, largest=False, sorted=True).values
        if k % 2:
            return ordered[k // 2]
        return (ordered[k // 2 - 1] + ordered[k // 2]) / 2
