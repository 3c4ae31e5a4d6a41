"""Shared base of the Byzantine-robust, coordinate-wise aggregators (FedMedian, FedTrimmedAvg).

They work one tensor name at a time: the K clients' deltas of that tensor are stacked into a
``K × …`` tensor, reduced over the first dimension, and added to the global tensor. Memory is
K tensors of one name, never K whole adapters. Client weights (num_samples) are ignored: a
robust aggregator must not let a client buy influence by claiming more samples.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch

from .base import FedAlgorithm, Tensors, Update


def stacked_deltas(updates: Sequence[Update], name: str) -> torch.Tensor:
    """The K deltas of tensor ``name``, stacked into a float32 ``K × shape`` tensor."""
    if not updates:
        raise ValueError("aggregation needs at least one update")
    first = updates[0].get(name)
    stacked = torch.empty((len(updates), *first.shape), dtype=first.dtype)
    stacked[0] = first
    for i, update in enumerate(updates[1:], start=1):  # filled in place: K tensors in memory, not 2K
        tensor = update.get(name)
        if tensor.shape != first.shape:
            raise ValueError(f"tensor {name!r} of {update.client_id!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(first.shape)}")
        stacked[i] = tensor
    return stacked


class CoordinateWiseAlgorithm(FedAlgorithm):
    """``w ← w + reduce(Δ_1, …, Δ_K)`` with ``reduce`` applied coordinate by coordinate."""

    @abstractmethod
    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        """Reduce the ``K × shape`` stacked deltas over dimension 0 to one ``shape`` tensor."""

    def aggregate(self, global_params, updates, state):
        new_global: Tensors = {
            k: w.to(torch.float32) + self.reduce(stacked_deltas(updates, k)) for k, w in global_params.items()
        }
        return new_global, dict(state)
