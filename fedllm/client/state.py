"""A client's algorithm state and its pending update, bound to one federation.

SCAFFOLD's server keeps ``c = (1/N) Σ_i c_i`` only if every client's c_i moves exactly when the
server adds its Δc_i, that is when the server accepts the upload. So a round's new hook state is
*pending* until then: it is written together with the update, becomes the client's state when the
server answers 202 (a new or an identical-duplicate update) and is dropped with the update when the
server refuses it (409: the round closed, was aborted or re-sampled without this client).

The files, in a client's folder (``--output_dir``; ``OUTPUT_DIR/clients/<id>`` in the simulation)::

    client_state.safetensors        the committed hook state (SCAFFOLD's c_i), absent while it is the initial one
    pending/round-NNNNNN/           at most one trained update the server has not been seen to accept:
        update.safetensors          the upload body, byte for byte what is (re-)sent
        client_state.safetensors    the hook state the round leaves (c_i⁺), when the algorithm keeps one
        pending.json                the round, the number of examples trained on, the federation binding

Crash safety: a pending directory is filled under a temporary name and renamed into place, so it
holds all its files or does not exist. A commit first deletes ``update.safetensors`` (the durable
mark "accepted"), then moves the state over the committed one, then deletes the directory; opening
the folder finishes an interrupted commit. A discard renames the directory away before deleting
it. After a restart the client re-sends a pending update and commits or discards it by the answer.

Every state file carries the federation id and the base model's fingerprint in its safetensors
metadata (``pending.json`` carries them too); files of another federation or base model are
refused with :class:`ClientStateMismatchError` instead of being used.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..algorithms.base import Tensors
from ..fsutil import fsync_dir
from ..wire import parse_metrics

STATE_FILE = "client_state.safetensors"
PENDING_DIR = "pending"
UPDATE_FILE = "update.safetensors"
MANIFEST_FILE = "pending.json"
_PENDING_PREFIX = "round-"


class ClientStateMismatchError(ValueError):
    """A client state file or pending update belongs to another federation or base model."""


@dataclass(frozen=True)
class FederationBinding:
    """What a client's state belongs to: one federation (its id) on one base model (its config fingerprint)."""

    federation_id: str
    model_fingerprint: str

    @classmethod
    def of(cls, server_config: Mapping[str, Any]) -> FederationBinding:
        """The binding of the federation whose ``GET /v1/config`` answer is ``server_config``."""
        if not server_config.get("federation_id"):
            raise ValueError("the server's /v1/config has no federation_id: the server is older than this client")
        return cls(str(server_config["federation_id"]), str(server_config["model_fingerprint"]))

    def metadata(self) -> dict[str, str]:
        return {"federation_id": self.federation_id, "model_fingerprint": self.model_fingerprint}

    def check(self, found: Mapping[str, str], path: Path) -> None:
        """Refuse ``path``, whose binding is ``found``, unless it is this one."""
        if all(found.get(key) == value for key, value in self.metadata().items()):
            return
        raise ClientStateMismatchError(
            f"{path} belongs to another federation (federation id {found.get('federation_id', 'none')}, model "
            f"fingerprint {found.get('model_fingerprint', 'none')[:12]}), not to this one (federation id "
            f"{self.federation_id}, model fingerprint {self.model_fingerprint[:12]}); refusing to use its algorithm "
            "state. Give this federation its own output directory (or move the file away to start afresh)."
        )


@dataclass(frozen=True)
class PendingUpdate:
    """A trained update the server has not been seen to accept, and the hook state it leaves."""

    folder: Path
    round: int
    num_samples: int  # the examples actually trained on, as the upload reports them

    @property
    def update_path(self) -> Path:
        return self.folder / UPDATE_FILE

    @property
    def state_path(self) -> Path:
        return self.folder / STATE_FILE

    def metrics(self) -> dict[str, float]:
        """The round's metrics, as the upload carries them."""
        with safe_open(str(self.update_path), framework="pt") as f:
            return parse_metrics(f.metadata() or {})


class ClientState:
    """One client's folder: its committed hook state and at most one pending update (see the module docstring).

    Opening it checks that everything in it belongs to ``binding`` and finishes what a crash interrupted.
    """

    def __init__(self, folder: Path, binding: FederationBinding):
        self.folder = Path(folder)
        self.binding = binding
        self.committed_path = self.folder / STATE_FILE
        self.pending_dir = self.folder / PENDING_DIR
        if self.committed_path.exists():
            self._check_state_file(self.committed_path)
        for leftover in self._pending_dirs(temporary=True):  # an unfinished write or discard
            shutil.rmtree(leftover)
        pending = self.pending()
        if pending is not None and not pending.update_path.exists():  # accepted: the commit was interrupted
            self._finish_commit(pending)

    def committed(self) -> Tensors:
        """The hook state the server's aggregate knows of ({}: the initial state)."""
        return load_file(str(self.committed_path)) if self.committed_path.exists() else {}

    def pending(self) -> PendingUpdate | None:
        folders = self._pending_dirs(temporary=False)
        if not folders:
            return None
        if len(folders) > 1:
            raise RuntimeError(f"{self.pending_dir} holds {len(folders)} pending updates; a client has at most one")
        manifest_path = folders[0] / MANIFEST_FILE
        manifest = json.loads(manifest_path.read_text())
        self.binding.check(manifest, manifest_path)
        pending = PendingUpdate(folders[0], int(manifest["round"]), int(manifest["num_samples"]))
        if pending.state_path.exists():
            self._check_state_file(pending.state_path)
        return pending

    def write_pending(self, round_number: int, body: bytes, num_samples: int, state: Mapping[str, torch.Tensor]
                      ) -> PendingUpdate:
        """Keep a trained update (the upload ``body``) and the hook ``state`` it leaves, both or neither."""
        if self.pending() is not None:
            raise RuntimeError(f"{self.pending_dir} already holds a pending update; deliver it first")
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        final = self.pending_dir / f"{_PENDING_PREFIX}{round_number:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.pending_dir))
        _write_synced(tmp / UPDATE_FILE, body)
        if state:
            _write_synced(tmp / STATE_FILE, self._state_bytes(state))
        manifest = {"round": round_number, "num_samples": num_samples, **self.binding.metadata()}
        _write_synced(tmp / MANIFEST_FILE, json.dumps(manifest).encode())
        fsync_dir(tmp)
        os.replace(tmp, final)
        fsync_dir(self.pending_dir)
        return PendingUpdate(final, round_number, num_samples)

    def deliver(self, pending: PendingUpdate, send: Callable[[PendingUpdate], bool]) -> bool:
        """``send(pending)`` returns whether the server accepted it (and raises when that is unknown).

        Accepted: the pending state is committed. Refused: the update and its state are dropped, and the
        committed state stays. Unknown: both stay pending, for a re-send. Returns whether it was accepted.
        """
        if send(pending):
            self.commit(pending)
            return True
        self.discard(pending)
        return False

    def commit(self, pending: PendingUpdate) -> None:
        """The server accepted ``pending``: its hook state becomes the client's."""
        pending.update_path.unlink()
        fsync_dir(pending.folder)  # from here on a restart knows the update was accepted
        self._finish_commit(pending)

    def discard(self, pending: PendingUpdate) -> None:
        """The server refused ``pending``: drop it and its hook state."""
        self._remove(pending.folder)

    def _finish_commit(self, pending: PendingUpdate) -> None:
        if pending.state_path.exists():
            os.replace(pending.state_path, self.committed_path)
            fsync_dir(self.folder)
        self._remove(pending.folder)

    def _remove(self, folder: Path) -> None:
        """Delete ``folder`` after renaming it to a temporary name: a crash midway never leaves a partial pending."""
        doomed = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        os.replace(folder, doomed)
        fsync_dir(folder.parent)
        shutil.rmtree(doomed)

    def _pending_dirs(self, *, temporary: bool) -> list[Path]:
        if not self.pending_dir.is_dir():
            return []
        prefix = "." if temporary else _PENDING_PREFIX
        return sorted(p for p in self.pending_dir.iterdir() if p.is_dir() and p.name.startswith(prefix))

    def _state_bytes(self, state: Mapping[str, torch.Tensor]) -> bytes:
        return save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=self.binding.metadata())

    def _check_state_file(self, path: Path) -> None:
        with safe_open(str(path), framework="pt") as f:
            self.binding.check(f.metadata() or {}, path)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
