"""FedTrimmedAvg (Yin et al., 2018): the coordinate-wise β-trimmed mean of the deltas.

For every coordinate the ⌊β·K⌋ largest and the ⌊β·K⌋ smallest of the K deltas are dropped and
the rest averaged, unweighted; β = ``--trim_ratio`` in [0, 0.5). At least one value is always
kept: when 2⌊β·K⌋ ≥ K the trim is reduced to ⌊(K−1)/2⌋ per end.
"""

from __future__ import annotations

import math

import torch

from .fedtrimmedavg_config import FedTrimmedAvgConfig
from .robust import CoordinateWiseAlgorithm


class FedTrimmedAvg(CoordinateWiseAlgorithm):
    name = "fedtrimmedavg"
    config_class = FedTrimmedAvgConfig

    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        k = stacked.shape[0]
        trim = min(math.floor(self.hparams.trim_ratio * k), (k - 1) // 2)
        return stacked.sort(dim=0).values[trim:k - trim].mean(dim=0)
