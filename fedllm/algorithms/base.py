"""The interface every federated algorithm implements, and the helpers they share.

An algorithm has a server side -- persistent state plus ``aggregate`` -- and, where it changes
local training, a client side (:class:`ClientHook`). Everything here is pure torch: no HTTP,
no Flask, no files beyond what an :class:`Update` hides, so the HTTP server, the simulation
and the tests all run the same code.

Notation used in the docstrings: ``w`` the global adapter, ``Δ_i = w_i − w`` client i's delta,
``n_i`` its number of samples, ``S`` the clients of the round, ``n_S = Σ_{i∈S} n_i`` and
``Δ̄ = Σ_{i∈S} (n_i / n_S) Δ_i`` the sample-weighted mean delta.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch

Tensors = dict[str, torch.Tensor]

# Prefix of the control-variate tensors that travel in the same safetensors file as the adapter.
CONTROL_PREFIX = "control."


class Update(Protocol):
    """One client's contribution to a round, read lazily so aggregation holds one at a time."""

    client_id: str
    num_samples: int

    def get(self, name: str) -> torch.Tensor:
        """The named tensor of this update as float32 (a delta, or a ``control.`` tensor)."""
        ...

    def names(self) -> Iterable[str]:
        ...


class InMemoryUpdate:
    """An :class:`Update` backed by a dict, for simulation and tests."""

    def __init__(self, client_id: str, num_samples: int, tensors: Mapping[str, torch.Tensor]):
        self.client_id = client_id
        self.num_samples = num_samples
        self._tensors = dict(tensors)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].to(torch.float32)

    def names(self) -> Iterable[str]:
        return self._tensors.keys()


def weighted_mean_delta(updates: Sequence[Update], names: Iterable[str]) -> Tensors:
    """Δ̄ = Σ_i (n_i / n_S) Δ_i, accumulated one update at a time in float32.

    Memory is one adapter for the accumulator plus one tensor of one update.
    """
    names = list(names)
    total = sum(u.num_samples for u in updates)
    if not updates or total <= 0:
        raise ValueError("aggregation needs at least one update with num_samples > 0")
    acc: Tensors = {}
    for update in updates:
        weight = update.num_samples / total
        for name in names:
            delta = update.get(name)
            if name in acc:
                acc[name].add_(delta, alpha=weight)
            else:
                acc[name] = delta.mul(weight)
    return acc


class ClientHook:
    """How an algorithm changes one round of local training. The default changes nothing.

    ``params`` maps adapter tensor names (as on the wire) to the live trainable parameters.
    ``global_tensors`` is everything the server sent with the round (the adapter, and for
    SCAFFOLD the ``control.`` tensors).
    """

    def begin_round(self, params: Mapping[str, torch.nn.Parameter], global_tensors: Mapping[str, torch.Tensor]) -> None:
        """Called after the global adapter is loaded, before the first step."""

    def extra_loss(self, params: Mapping[str, torch.nn.Parameter]) -> torch.Tensor | None:
        """A term added to the training loss at every step, or None."""
        return None

    def after_optimizer_step(self, params: Mapping[str, torch.nn.Parameter], lr: float) -> None:
        """Called after every optimizer step, with the step's learning rate."""

    def end_round(self, params: Mapping[str, torch.nn.Parameter], num_steps: int, lr: float) -> Tensors:
        """Extra tensors to upload with the delta (names prefixed ``control.``)."""
        return {}

    def state_dict(self) -> Tensors:
        """Client state that must survive between rounds and restarts (e.g. SCAFFOLD's c_i)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""


class FedAlgorithm(ABC):
    """Server side of a federated algorithm.

    Subclasses set ``name`` and implement :meth:`aggregate`; algorithms that keep server state
    (moments, momentum, control variates) return it from :meth:`init_state` and
    :meth:`aggregate`. The state is a flat dict of tensors so the server can persist it as
    safetensors next to the global adapter and resume bit for bit.
    """

    name: ClassVar[str]

    def __init__(self, config: Any):
        """``config`` carries the hyperparameters (a ``FederationArguments``)."""
        self.config = config

    def init_state(self, global_params: Mapping[str, torch.Tensor]) -> Tensors:
        return {}

    @abstractmethod
    def aggregate(
        self, global_params: Mapping[str, torch.Tensor], updates: Sequence[Update], state: Mapping[str, torch.Tensor]
    ) -> tuple[Tensors, Tensors]:
        """Return the new global adapter and the new state."""

    def global_extras(self, state: Mapping[str, torch.Tensor]) -> Tensors:
        """Tensors served to clients with the global adapter (e.g. SCAFFOLD's ``control.`` c)."""
        return {}

    def upload_extras(self, adapter_names: Iterable[str]) -> dict[str, str]:
        """Extra tensors a client must upload: name -> the adapter tensor whose shape it has."""
        return {}

    def client_hook(self) -> ClientHook:
        return ClientHook()


class MeanDeltaAlgorithm(FedAlgorithm):
    """An algorithm whose server step is a function of Δ̄ alone (FedAvg and the FedOpt family)."""

    def aggregate(self, global_params, updates, state):
        mean_delta = weighted_mean_delta(updates, global_params.keys())
        return self.server_step(global_params, mean_delta, state)

    @abstractmethod
    def server_step(
        self, global_params: Mapping[str, torch.Tensor], mean_delta: Tensors, state: Mapping[str, torch.Tensor]
    ) -> tuple[Tensors, Tensors]:
        """Return the new global adapter and state given Δ̄."""


def run_aggregation(
    algorithm: FedAlgorithm,
    global_params: Mapping[str, torch.Tensor],
    updates: Sequence[Update],
    state: Mapping[str, torch.Tensor],
) -> tuple[Tensors, Tensors]:
    """Aggregate one round: the single entry point used by the HTTP server and the simulation."""
    return algorithm.aggregate(global_params, updates, state)
