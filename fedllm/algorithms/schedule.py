"""Learning rate across rounds, set by the server and applied by every client.

OpenFedLLM's cosine schedule: ``lr_r = lr_min + ½·(lr_0 − lr_min)·(1 + cos(π·r/R))`` for the
0-based round index r of R rounds; it starts at lr_0 and would reach lr_min at r = R.
"""

from __future__ import annotations

import math
from typing import Any


def cosine_learning_rate(round_index: int, num_rounds: int, lr_initial: float, lr_min: float) -> float:
    """``lr_min + ½·(lr_initial − lr_min)·(1 + cos(π·round_index/num_rounds))``; round_index is 0-based."""
    return lr_min + 0.5 * (lr_initial - lr_min) * (1 + math.cos(math.pi * round_index / num_rounds))


def round_learning_rate(config: Any, round_number: int) -> float:
    """The local learning rate of round ``round_number`` (1-based) under ``config.lr_schedule``."""
    if config.lr_schedule == "constant":
        return config.learning_rate
    if config.lr_schedule == "cosine":
        return cosine_learning_rate(round_number - 1, config.num_rounds, config.learning_rate, config.min_learning_rate)
    raise ValueError(f"unknown --lr_schedule {config.lr_schedule!r}; expected 'constant' or 'cosine'")
