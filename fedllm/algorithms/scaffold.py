"""SCAFFOLD (Karimireddy et al., 2020), with the control-variate update of option II.

Server, with c the server control variate (0 at first) and N = ``--num_clients``::

    w ← w + Δ̄
    c ← c + (1/N) · Σ_{i∈S} Δc_i

Client i keeps its own control variate c_i (0 at first) between rounds. With x the global
adapter it starts from, y its local adapter, K the round's optimizer steps and η their learning
rate, it corrects every optimizer step by ``y ← y − η·(c − c_i)`` and at the end of the round sets
``c_i⁺ = c_i − c + (x − y)/(K·η)`` and uploads ``Δc_i = c_i⁺ − c_i``.

c = (1/N) Σ_i c_i holds only if c_i becomes c_i⁺ exactly when the server adds Δc_i: the client
keeps c_i⁺ pending until the server accepts the upload and drops it when the upload is refused
(``fedllm.client.state``); the client trainer loads the committed c_i into :class:`ScaffoldHook` before
every round.

On the wire (and in the server state) a control-variate tensor is named like its adapter tensor
with the prefix ``control.``: the server serves c with the global adapter and requires Δc_i in
every upload.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .base import CONTROL_PREFIX, ClientHook, Tensors
from .fedavg import FedAvg


class ScaffoldHook(ClientHook):
    """Client side of SCAFFOLD: the step correction and the c_i update."""

    def __init__(self) -> None:
        self._c_i: Tensors = {}  # the committed c_i (load_state_dict); after end_round, c_i⁺
        self._x: Tensors = {}
        self._c: Tensors = {}
        self._correction: Tensors = {}  # c − c_i, fixed for the round

    def begin_round(self, params: Mapping[str, torch.nn.Parameter], global_tensors: Mapping[str, torch.Tensor]) -> None:
        # x as loaded into the params, on their device, in float32.
        self._x = {name: p.detach().to(torch.float32, copy=True) for name, p in params.items()}
        self._c = {name: self._on(x, global_tensors.get(CONTROL_PREFIX + name)) for name, x in self._x.items()}
        self._c_i = {name: self._on(x, self._c_i.get(name)) for name, x in self._x.items()}
        self._correction = {name: self._c[name] - self._c_i[name] for name in self._x}

    @staticmethod
    def _on(like: torch.Tensor, tensor: torch.Tensor | None) -> torch.Tensor:
        """``tensor`` as float32 on ``like``'s device, or zeros like ``like`` when absent."""
        if tensor is None:
            return torch.zeros_like(like)
        return tensor.to(device=like.device, dtype=torch.float32)

    def after_optimizer_step(self, params: Mapping[str, torch.nn.Parameter], lr: float) -> None:
        with torch.no_grad():
            for name, p in params.items():
                p.sub_((lr * self._correction[name]).to(p.dtype))

    def end_round(self, params: Mapping[str, torch.nn.Parameter], num_steps: int, lr: float) -> Tensors:
        if num_steps < 1 or lr <= 0:
            raise ValueError(f"SCAFFOLD needs num_steps >= 1 and lr > 0, got {num_steps} and {lr}")
        uploads: Tensors = {}
        with torch.no_grad():
            for name, p in params.items():
                c_i = self._c_i[name]
                c_i_new = c_i - self._c[name] + (self._x[name] - p.to(torch.float32)) / (num_steps * lr)
                uploads[CONTROL_PREFIX + name] = (c_i_new - c_i).cpu()
                self._c_i[name] = c_i_new
        return uploads

    def state_dict(self) -> Tensors:
        return {CONTROL_PREFIX + name: c_i.cpu() for name, c_i in self._c_i.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._c_i = {
            k[len(CONTROL_PREFIX):]: t.to(torch.float32) for k, t in state.items() if k.startswith(CONTROL_PREFIX)
        }


class Scaffold(FedAvg):
    """Server side of SCAFFOLD; the state holds c as ``control.<name>`` tensors."""

    name = "scaffold"

    def init_state(self, global_params):
        return {CONTROL_PREFIX + k: torch.zeros_like(t, dtype=torch.float32) for k, t in global_params.items()}

    def aggregate(self, global_params, updates, state):
        new_global, _ = super().aggregate(global_params, updates, state)  # Δ̄ over the adapter names only
        return new_global, self._add_controls(state, updates)

    def absorb_discarded(self, state, updates):
        """A discarded update's client already moved c_i by Δc_i: c moves by Δc_i / N too, so c = (1/N) Σ c_i."""
        return self._add_controls(state, updates)

    def _add_controls(self, state, updates) -> dict[str, torch.Tensor]:
        """c + (1/N) Σ_i Δc_i."""
        weight = 1.0 / self.config.num_clients
        new_c = {k: t.to(torch.float32, copy=True) for k, t in state.items() if k.startswith(CONTROL_PREFIX)}
        for update in updates:
            for key, c in new_c.items():
                c.add_(update.get(key), alpha=weight)
        return new_c

    def global_extras(self, state):
        return {k: t for k, t in state.items() if k.startswith(CONTROL_PREFIX)}

    def upload_extras(self, adapter_names: Iterable[str]) -> dict[str, str]:
        return {CONTROL_PREFIX + name: name for name in adapter_names}

    def client_hook(self) -> ClientHook:
        return ScaffoldHook()
