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

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch

from ..threads import torch_threads
from .base_config import AlgorithmConfig

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

    Memory is one adapter for the accumulator plus one tensor of one update. An update with a
    ``read_into(name, out)`` method (the server's file-backed updates) is read into one reused buffer
    per shape (``out=None``: a new tensor the caller owns) instead of a new tensor per read.
    """
    names = list(names)
    total = sum(u.num_samples for u in updates)
    if not updates or total <= 0:
        raise ValueError("aggregation needs at least one update with num_samples > 0")
    acc: Tensors = {}
    buffers: dict[torch.Size, torch.Tensor] = {}
    for update in updates:
        weight = update.num_samples / total
        read_into = getattr(update, "read_into", None)
        for name in names:
            if read_into is None:
                delta = update.get(name)
                if name in acc:
                    acc[name].add_(delta, alpha=weight)
                else:
                    acc[name] = delta.mul(weight)
            elif name in acc:
                shape = acc[name].shape
                if shape not in buffers:
                    buffers[shape] = torch.empty(shape, dtype=torch.float32)
                acc[name].add_(read_into(name, buffers[shape]), alpha=weight)
            else:
                acc[name] = read_into(name, None).mul_(weight)  # a tensor of our own: scaled in place
    return acc


class ClientHook:
    """How an algorithm changes one round of local training. The default changes nothing.

    ``params`` maps adapter tensor names (as on the wire) to the live trainable parameters.
    ``global_tensors`` is everything the server sent with the round (the adapter, and for
    SCAFFOLD the ``control.`` tensors).

    The state that survives between rounds (:meth:`state_dict`) is the caller's to keep: before
    every round the caller loads the *committed* state into the hook (:meth:`load_state_dict`), and
    after :meth:`end_round` it takes :meth:`state_dict` as the state the round leaves, which stays
    pending until the server accepts the round's upload (``fedllm.client.state``). So a hook never
    carries a state the server does not know of into the next round.
    """

    def begin_round(self, params: Mapping[str, torch.nn.Parameter], global_tensors: Mapping[str, torch.Tensor]) -> None:
        """Called after the global adapter is loaded, before the first step."""

    def extra_loss(self, params: Mapping[str, torch.nn.Parameter]) -> torch.Tensor | None:
        """A term R(params) of the local objective, or None; each optimizer step's gradient gets ∇R exactly once."""
        return None

    def after_optimizer_step(self, params: Mapping[str, torch.nn.Parameter], lr: float) -> None:
        """Called after every optimizer step, with the step's learning rate."""

    def end_round(self, params: Mapping[str, torch.nn.Parameter], num_steps: int, lr: float) -> Tensors:
        """Extra tensors to upload with the delta (names prefixed ``control.``)."""
        return {}

    def state_dict(self) -> Tensors:
        """Client state that must survive between rounds and restarts (e.g. SCAFFOLD's c_i); after
        :meth:`end_round`, the state the round leaves."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the whole state by what :meth:`state_dict` returned ({}: the initial state)."""


class FedAlgorithm(ABC):
    """Server side of a federated algorithm.

    Subclasses set ``name`` and implement :meth:`aggregate`; algorithms that keep server state
    (moments, momentum, control variates) return it from :meth:`init_state` and
    :meth:`aggregate`. The state is a flat dict of tensors so the server can persist it as
    safetensors next to the global adapter and resume bit for bit.

    An algorithm with hyperparameters sets ``config_class`` to their dataclass (see
    :mod:`.base_config`) and reads them from ``self.hparams``.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    # Whether the global tensors are a LoRA adapter the server exports as PEFT directories (FedKSeed's are not).
    exports_peft_adapter: ClassVar[bool] = True

    def __init__(self, config: Any):
        """``config`` is the federation's ``FederationArguments``; ``self.hparams`` its values of the
        algorithm's hyperparameters (a ``config_class``), validated."""
        self.config = config
        self.hparams = self.config_class.from_federation(config)
        self.hparams.validate(config)

    def init_state(self, global_params: Mapping[str, torch.Tensor]) -> Tensors:
        return {}

    def initial_global(self, adapter: Mapping[str, torch.Tensor]) -> Tensors:
        """The first global version's tensors (what clients download, what is aggregated), given the initial
        LoRA adapter: the adapter itself, except for algorithms that tune something else (FedKSeed's scalars)."""
        return dict(adapter)

    def upload_format(self, spec: Mapping[str, tuple[int, ...]], wire_dtype: str, max_steps: int) -> tuple[Any, Any] | None:
        """``(validate(path) -> metadata, open_update(row, path) -> Update)`` for uploads that are not the spec's
        dense tensors (FedKSeed's seed pairs); None: dense uploads, checked by fedllm.wire."""
        return None

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

    def absorb_discarded(self, state: Mapping[str, torch.Tensor], updates: Sequence[Update]) -> Tensors:
        """The state after folding in ``updates``: accepted (the clients committed the state they carry) but
        discarded from the model's aggregate (an aborted round). Only algorithms with client-side state that
        the server state mirrors (SCAFFOLD's c = (1/N) Σ c_i) change anything; the default returns ``state``."""
        return dict(state)

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
        """Return the new global adapter and state given Δ̄.

        ``mean_delta`` is built for this call alone: an implementation may reuse its tensors for the
        result (FedOpt writes the new global into them, to hold one adapter less).
        """


class ClippedUpdate:
    """An :class:`Update` whose delta is clipped to L2 norm ``max_norm``: Δ_i ← Δ_i · min(1, C / ‖Δ_i‖).

    ‖Δ_i‖ is taken over all adapter tensors together -- ``control.`` and any other extra tensors
    are neither counted nor scaled -- and computed lazily, in one pass over the update reading one
    tensor at a time, at the first ``get`` of an adapter tensor. Updates within the norm are
    passed through unchanged.
    """

    def __init__(self, update: Update, adapter_names: Iterable[str], max_norm: float):
        self.update = update
        self.client_id = update.client_id
        self.num_samples = update.num_samples
        self._adapter_names = dict.fromkeys(adapter_names)  # ordered, with O(1) membership
        self._max_norm = max_norm
        self._scale: float | None = None

    def norm(self) -> float:
        """‖Δ_i‖ over the adapter tensors, one tensor at a time."""
        return math.sqrt(sum(float(torch.linalg.vector_norm(self.update.get(n))) ** 2 for n in self._adapter_names))

    def scale(self) -> float:
        if self._scale is None:
            norm = self.norm()
            self._scale = self._max_norm / norm if norm > self._max_norm else 1.0
        return self._scale

    def get(self, name: str) -> torch.Tensor:
        tensor = self.update.get(name)
        if name not in self._adapter_names:
            return tensor
        scale = self.scale()
        return tensor if scale == 1.0 else tensor.mul(scale)

    def names(self) -> Iterable[str]:
        return self.update.names()


def run_aggregation(
    algorithm: FedAlgorithm,
    global_params: Mapping[str, torch.Tensor],
    updates: Sequence[Update],
    state: Mapping[str, torch.Tensor],
) -> tuple[Tensors, Tensors]:
    """Aggregate one round: the single entry point used by the HTTP server and the simulation.

    With ``--max_update_norm`` > 0 every client delta is first clipped to that L2 norm
    (see :class:`ClippedUpdate`), so every algorithm sees the clipped deltas.
    """
    max_norm = algorithm.hparams.max_update_norm
    if max_norm > 0:
        updates = [ClippedUpdate(u, global_params.keys(), max_norm) for u in updates]
    with torch_threads(1):  # memory-bound elementwise work: one thread never waits for a second core
        return algorithm.aggregate(global_params, updates, state)
