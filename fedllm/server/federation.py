"""The federation's round logic on top of the durable :class:`~fedllm.server.store.Store`.

No Flask here: the HTTP layer (``app.py``) parses requests and calls these methods, which
raise :class:`~fedllm.server.errors.ApiError` for anything a client did wrong. Several gunicorn
workers run this code against the same ``state_dir``; SQLite transactions serialise state
changes and an ``flock`` elects the one process that aggregates a closed round.

Round life cycle: ``training`` (accepting updates from the sampled clients) → ``closed`` (all
sampled clients pushed, or the deadline passed with at least ``min_fit_clients``) →
``aggregated`` (new global version committed, next round started in the same transaction).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import os
import random
import shutil
import sqlite3
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..adapter import (
    adapter_spec,
    build_lora_config,
    initial_adapter,
    load_model_config,
    model_fingerprint,
    save_peft_adapter,
)
from ..algorithms import get_algorithm, round_learning_rate, run_aggregation
from ..algorithms.base import Tensors
from ..config import FederationArguments
from ..faults import fault_point
from ..fsutil import atomic_write, fsync_dir
from ..wire import DTYPE_CODE, WIRE_DTYPES, TensorFile, WireError, sha256_file, validate_tensors_file
from .errors import ApiError
from .store import GlobalRow, RoundRow, Store, UpdateRow

log = logging.getLogger("fedllm.server")

STATE_GLOBAL_PREFIX = "global."  # fp32 master copy of the adapter inside the state file
STATE_ALGO_PREFIX = "algo."
BODY_CHUNK = 1 << 20
SEEN_INTERVAL = 15.0  # seconds between last_seen writes for a polling client


class FileUpdate:
    """An accepted update read lazily from its safetensors file (one tensor at a time).

    Positioned reads, not a memory map: a tensor is freed once the algorithm drops it, so the
    server's resident memory does not grow with the number of updates in a round.
    """

    def __init__(self, row: UpdateRow, path: str | Path | None = None):
        self.client_id = row.client_id
        self.num_samples = row.num_samples
        self._file = TensorFile(path or row.path)

    def get(self, name: str) -> torch.Tensor:
        return self._file.get(name).to(torch.float32)

    def read_into(self, name: str, out: torch.Tensor | None) -> torch.Tensor:
        """``get(name)``, read into ``out`` (a float32 buffer of its shape) when the file holds float32."""
        return self._file.get(name, out=out).to(torch.float32)

    def names(self):
        return self._file.keys()


def sample_clients(client_ids: list[str], k: int, seed: int, round_number: int) -> list[str]:
    """Seeded, reproducible choice of the round's clients."""
    rng = random.Random(f"{seed}:{round_number}")
    return sorted(rng.sample(sorted(client_ids), k))


class Federation:
    """One federation, bound to a state_dir."""

    def __init__(self, store: Store, *, output_dir: str | Path | None = None, max_upload_bytes: int = 0):
        self.store = store
        db = store.read()
        stored = store.get_meta(db, "federation")
        if stored is None:
            raise RuntimeError(f"{store.root} is not initialised; run the server once with the federation's settings")
        self.config = FederationArguments(**stored)
        self.spec: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in store.get_meta(db, "spec").items()}
        self.fingerprint: str = store.get_meta(db, "fingerprint")
        self.lora_config_dict: dict[str, Any] = store.get_meta(db, "lora_config")
        self.algorithm = get_algorithm(self.config.fed_alg, self.config)
        self.upload_spec = dict(self.spec)
        for extra, like in self.algorithm.upload_extras(self.spec).items():
            self.upload_spec[extra] = self.spec[like]
        self.output_dir = Path(output_dir) if output_dir else store.root / "adapters"
        adapter_bytes = sum(int(torch.Size(s).numel()) for s in self.upload_spec.values()) * WIRE_DTYPES[
            DTYPE_CODE[self.config.wire_dtype]][1]
        self.max_upload_bytes = max_upload_bytes or 2 * adapter_bytes + (1 << 20)
        self._last_seen: dict[str, float] = {}
        self._after_aggregation: list[Callable[[int], None]] = []

    # ------------------------------------------------------------------ setup
    @staticmethod
    def initialize(config: FederationArguments, state_dir: str | Path) -> FederationArguments:
        """Create the federation in ``state_dir``, or check that it is the one already there.

        Returns the settings in force (the stored ones when resuming).
        """
        config.validate()
        store = Store(state_dir)
        # Runs before any worker exists: bodies that were streaming when the server died are garbage.
        for partial in store.incoming_dir.glob("*.part"):
            partial.unlink()
        try:
            with store.transaction() as db:
                stored = store.get_meta(db, "federation")
            if stored is not None:
                current = dataclasses.asdict(config)
                diff = {k: (stored.get(k), v) for k, v in current.items() if stored.get(k) != v}
                if diff:
                    details = ", ".join(f"--{k} {new!r} (state_dir has {old!r})" for k, (old, new) in sorted(diff.items()))
                    raise ValueError(
                        f"{store.root} holds a federation with other settings: {details}. "
                        "Restart with the same settings to resume, or use a new --state_dir."
                    )
                return config
            Federation._create(config, store)
            return config
        finally:
            store.close()

    @staticmethod
    def _create(config: FederationArguments, store: Store) -> None:
        model_config = load_model_config(config.model_name_or_path)
        lora = build_lora_config(
            model_config,
            r=config.peft_lora_r,
            alpha=config.peft_lora_alpha,
            dropout=config.peft_lora_dropout,
            target_modules=config.target_module_list(),
            base_model_name_or_path=config.model_name_or_path,
        )
        spec = adapter_spec(model_config, lora)
        adapter = initial_adapter(spec, config.seed)
        algorithm = get_algorithm(config.fed_alg, config)
        state = algorithm.init_state(adapter)
        lora_dict = lora.to_dict()
        lora_dict["target_modules"] = sorted(lora_dict["target_modules"]) if lora_dict.get("target_modules") else None
        lora_dict["peft_type"] = str(getattr(lora.peft_type, "value", lora.peft_type))
        lora_dict["task_type"] = str(getattr(lora.task_type, "value", lora.task_type))
        row = Federation._write_version(store, config, algorithm, 0, adapter, state)
        with store.transaction() as db:
            if store.get_meta(db, "federation") is not None:
                return  # another process won the race; its files are identical
            store.set_meta(db, "federation", dataclasses.asdict(config))
            store.set_meta(db, "spec", {k: list(v) for k, v in spec.items()})
            store.set_meta(db, "fingerprint", model_fingerprint(model_config))
            store.set_meta(db, "lora_config", lora_dict)
            store.insert_global(db, row)
        log.info("initialised federation in %s: %d adapter tensors, %s", store.root, len(spec), config.fed_alg)

    @staticmethod
    def _write_version(store: Store, config: FederationArguments, algorithm, version: int,
                       adapter: Tensors, state: Tensors) -> GlobalRow:
        """Write the served global and the state file of ``version`` (atomically, idempotently)."""
        wire_dtype = WIRE_DTYPES[DTYPE_CODE[config.wire_dtype]][0]
        served = {k: v.to(wire_dtype).contiguous() for k, v in adapter.items()}
        served.update({k: v.to(wire_dtype).contiguous() for k, v in algorithm.global_extras(state).items()})
        # One metadata key only: safetensors writes a metadata map in hash order, so two keys would make the
        # bytes (and the sha256 served as ETag) differ between two writes of the same version.
        metadata = {"format": "pt"}
        gpath = atomic_write(store.global_path(version), lambda tmp: save_file(served, tmp, metadata=metadata))
        fault_point("aggregate.global_written")
        state_tensors = {STATE_GLOBAL_PREFIX + k: v.contiguous() for k, v in adapter.items()}
        state_tensors.update({STATE_ALGO_PREFIX + k: v.contiguous() for k, v in state.items()})
        spath = atomic_write(store.state_path(version), lambda tmp: save_file(state_tensors, tmp))
        digest = sha256_file(gpath)  # in chunks: never a second copy of the adapter in memory
        return GlobalRow(version, digest, store.relative(gpath), store.relative(spath), gpath.stat().st_size,
                         time.time())

    # ------------------------------------------------------------------ reads
    def phase(self, db, current: RoundRow | None) -> str:
        if current is None:
            return "waiting"
        if current.status == "training":
            return "training"
        if current.status == "closed":
            return "aggregating"
        return "finished" if current.round >= self.config.num_rounds else "training"

    def status(self, client_id: str | None = None) -> dict[str, Any]:
        db = self.store.read()
        current = self.store.current_round(db)
        latest = self.store.latest_global(db)
        received = [u.client_id for u in self.store.updates(db, current.round)] if current else []
        clients = self.store.clients(db)
        status: dict[str, Any] = {
            "round": current.round if current else 0,
            "num_rounds": self.config.num_rounds,
            "phase": self.phase(db, current),
            "fed_alg": self.config.fed_alg,
            "task": self.config.task,
            "global_version": latest.version,
            "global_sha256": latest.sha256,
            "sampled": current.sampled if current else [],
            "received": received,
            "deadline": current.deadline if current else None,
            "deadline_extensions": current.extensions if current else 0,
            "clients_joined": len(clients),
            "num_clients": self.config.num_clients,
            "paused": bool(self.store.get_meta(db, "paused")),
        }
        if client_id is not None:
            # A paused federation starts no training; an update already under way is still accepted.
            status["selected"] = bool(current and current.status == "training" and client_id in current.sampled
                                      and not status["paused"])
            status["submitted"] = client_id in received
            status["joined"] = client_id in clients
        return status

    def round_training_config(self, round_number: int) -> dict[str, Any]:
        return {
            "round": round_number,
            "learning_rate": round_learning_rate(self.config, max(round_number, 1)),
            "max_steps": self.config.max_steps,
        }

    def client_config(self) -> dict[str, Any]:
        db = self.store.read()
        current = self.store.current_round(db)
        return {
            "federation": dataclasses.asdict(self.config),
            "model_fingerprint": self.fingerprint,
            "lora_config": self.lora_config_dict,
            "adapter": {k: list(v) for k, v in self.spec.items()},
            "upload_tensors": {k: list(v) for k, v in self.upload_spec.items()},
            "max_upload_bytes": self.max_upload_bytes,
            "round_config": self.round_training_config(current.round if current else 1),
        }

    def latest_global(self) -> GlobalRow:
        """The newest global version, with its file paths resolved against ``state_dir``."""
        row = self.store.latest_global(self.store.read())
        return dataclasses.replace(row, path=str(self.store.resolve(row.path)),
                                   state_path=str(self.store.resolve(row.state_path)))

    def history(self) -> list[dict[str, Any]]:
        return self.store.history(self.store.read())

    def seen(self, client_id: str) -> None:
        """Record that a client polled; at most one durable write per client per SEEN_INTERVAL per process."""
        now = time.time()
        if now - self._last_seen.get(client_id, 0.0) < SEEN_INTERVAL:
            return
        self._last_seen[client_id] = now
        try:
            with self.store.transaction() as db:
                self.store.record_presence(db, client_id)
        except (sqlite3.Error, OSError) as exc:  # bookkeeping only: a full or read-only disk must not fail a poll
            log.warning("could not record that %s polled: %s", client_id, exc)

    # ------------------------------------------------------------------ writes
    def join(self, client_id: str, num_samples: int) -> dict[str, Any]:
        with self.store.transaction() as db:
            if self.store.is_removed(db, client_id):
                raise ApiError(403, "client removed", f"the operator removed {client_id!r} from the federation")
            clients = self.store.clients(db)
            if client_id not in clients and len(clients) >= self.config.num_clients:
                raise ApiError(403, "federation is full",
                               f"all {self.config.num_clients} client places are taken; {client_id!r} is not one of them")
            self.store.upsert_client(db, client_id, num_samples)
            joined = len(clients) + (client_id not in clients)
            if self.store.current_round(db) is None and joined >= self.config.num_clients:
                self._start_round(db, 1)
        log.info("client %s joined (%d samples)", client_id, num_samples)
        return {"client_id": client_id, "clients_joined": joined, "num_clients": self.config.num_clients}

    def _start_round(self, db, round_number: int) -> None:
        ids = list(self.store.clients(db))
        sampled = sample_clients(ids, self.config.sample_clients, self.config.seed, round_number)
        deadline = time.time() + self.config.round_timeout if self.config.round_timeout > 0 else None
        self.store.insert_round(db, round_number, sampled, deadline)
        log.info("round %d started: sampled %s", round_number, sampled)

    def _check_can_submit(self, current: RoundRow | None, client_id: str, round_number: int) -> None:
        if current is None:
            raise ApiError(409, "no round is open", "the federation is waiting for clients to join")
        if round_number != current.round:
            raise ApiError(409, "wrong round", f"round {round_number} is not open; the current round is {current.round}")
        if client_id not in current.sampled:
            raise ApiError(409, "not sampled", f"client {client_id!r} was not sampled for round {current.round}")
        if current.status != "training":
            raise ApiError(409, "round closed", f"round {current.round} no longer accepts updates")

    def receive_update(
        self,
        client_id: str,
        round_number: int,
        num_samples: int,
        read: Callable[[int], bytes],
        content_length: int | None,
        claimed_sha256: str | None,
    ) -> dict[str, Any]:
        """Stream an upload to disk, validate it, and accept it exactly once.

        A rejected upload changes nothing: its bytes stay in ``incoming/`` until deleted.
        """
        if content_length is not None and content_length > self.max_upload_bytes:
            raise ApiError(413, "upload too large", f"{content_length} bytes; the limit is {self.max_upload_bytes}")
        db = self.store.read()
        if client_id not in self.store.clients(db):
            raise ApiError(403, "client has not joined", f"POST /v1/join first as {client_id!r}")
        if self.store.get_update(db, round_number, client_id) is None:  # a retry is answered once its digest is known
            self._check_can_submit(self.store.current_round(db), client_id, round_number)

        incoming = self.store.incoming_dir / f"{client_id}.{os.getpid()}.{time.time_ns()}.part"
        try:
            digest, size = self._stream_to_file(read, incoming, content_length)
            if claimed_sha256 is not None and claimed_sha256.lower() != digest:
                raise ApiError(400, "checksum mismatch", f"X-Content-SHA256 is {claimed_sha256}, the body's is {digest}")
            existing = self.store.get_update(self.store.read(), round_number, client_id)
            if existing is not None:  # a retry (even after the round closed) or a conflicting second update
                return self._answer_resubmission(existing, client_id, round_number, digest)
            try:
                metadata = validate_tensors_file(incoming, self.upload_spec, self.config.wire_dtype)
            except WireError as exc:
                raise ApiError(exc.status, "invalid update" if exc.status == 422 else "malformed update", str(exc)) from None
            metrics = _parse_metrics(metadata)
            final = self.store.update_dir(round_number) / f"{client_id}.{digest[:16]}.safetensors"
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(incoming, final)
            fsync_dir(final.parent)
            fault_point("upload.stored")
        finally:
            incoming.unlink(missing_ok=True)

        recorded = self.store.relative(final)
        existing = None
        try:
            with self.store.transaction() as db:
                current = self.store.current_round(db)
                existing = self.store.get_update(db, round_number, client_id)
                if existing is not None:  # a concurrent upload from the same client won
                    return self._answer_resubmission(existing, client_id, round_number, digest)
                self._check_can_submit(current, client_id, round_number)
                self.store.insert_update(db, UpdateRow(round_number, client_id, digest, num_samples, recorded, metrics,
                                                       size, time.time()))
                self.store.touch_client(db, client_id)
                received = len(self.store.updates(db, round_number))
                if received >= len(current.sampled):
                    self.store.set_round_status(db, round_number, "closed")
        except Exception:
            # A rejected upload, or one the disk had no room to record, leaves no file behind, unless the row of a
            # concurrent identical upload points to it (if even that cannot be read, the unused file stays).
            with suppress(Exception):
                existing = self.store.get_update(self.store.read(), round_number, client_id)
                if existing is None or existing.path != recorded:
                    final.unlink(missing_ok=True)
            raise
        fault_point("upload.committed")
        log.info("round %d: accepted update from %s (%d bytes, %d samples)", round_number, client_id, size, num_samples)
        return {"accepted": True, "duplicate": False, "round": round_number, "sha256": digest}

    @staticmethod
    def _answer_resubmission(existing: UpdateRow, client_id: str, round_number: int, digest: str) -> dict[str, Any]:
        if existing.sha256 == digest:
            return {"accepted": True, "duplicate": True, "round": round_number, "sha256": digest}
        raise ApiError(409, "already submitted",
                       f"client {client_id!r} already sent a different update for round {round_number}")

    def _stream_to_file(self, read: Callable[[int], bytes], path: Path, content_length: int | None) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        with open(path, "wb") as f:
            while True:
                chunk = read(BODY_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_upload_bytes:
                    raise ApiError(413, "upload too large", f"more than {self.max_upload_bytes} bytes")
                digest.update(chunk)
                f.write(chunk)
                fault_point("upload.streaming")
            f.flush()
            os.fsync(f.fileno())
        if content_length is not None and size != content_length:
            raise ApiError(400, "truncated body", f"received {size} of {content_length} bytes")
        return digest.hexdigest(), size

    # ------------------------------------------------------------------ operator actions
    def pause(self, actor: str) -> dict[str, Any]:
        with self.store.transaction() as db:
            if not self.store.get_meta(db, "paused"):
                self.store.set_meta(db, "paused", time.time())
                self.store.add_event(db, actor, "pause", {})
        log.warning("federation paused by %s", actor)
        return self.status()

    def resume(self, actor: str) -> dict[str, Any]:
        with self.store.transaction() as db:
            paused_at = self.store.get_meta(db, "paused")
            if paused_at:
                current = self.store.current_round(db)
                if current and current.status == "training" and current.deadline is not None:
                    # The round's clock stopped while paused.
                    db.execute("UPDATE rounds SET deadline = ? WHERE round = ?",
                               (current.deadline + time.time() - paused_at, current.round))
                self.store.set_meta(db, "paused", None)
                self.store.add_event(db, actor, "resume", {"paused_seconds": time.time() - paused_at})
        log.warning("federation resumed by %s", actor)
        return self.status()

    def abort_round(self, actor: str) -> dict[str, Any]:
        """Discard the current round's updates and restart it with a new sample."""
        with self.store.transaction() as db:
            current = self.store.current_round(db)
            if current is None or current.status != "training":
                raise ApiError(409, "no round to abort", "only a round that is still training can be aborted")
            paths = self.store.delete_updates(db, current.round)
            ids = list(self.store.clients(db))
            sampled = sample_clients(ids, min(self.config.sample_clients, len(ids)), self.config.seed,
                                     current.round * 1000 + current.extensions + 1)
            deadline = time.time() + self.config.round_timeout if self.config.round_timeout > 0 else None
            self.store.set_sampled(db, current.round, sampled, deadline)
            self.store.add_event(db, actor, "abort_round", {"round": current.round, "discarded": len(paths),
                                                            "sampled": sampled})
        for path in paths:
            self.store.resolve(path).unlink(missing_ok=True)
        log.warning("round %d aborted by %s: %d updates discarded, re-sampled %s", current.round, actor, len(paths),
                    sampled)
        return self.status()

    def remove_client(self, actor: str, client_id: str) -> dict[str, Any]:
        """Remove a client: it can no longer join or push; a round waiting for it closes without it."""
        with self.store.transaction() as db:
            if client_id not in self.store.clients(db):
                raise ApiError(404, "unknown client", f"no client {client_id!r} has joined")
            self.store.remove_client(db, client_id)
            current = self.store.current_round(db)
            if current and current.status == "training" and client_id in current.sampled:
                sampled = [c for c in current.sampled if c != client_id]
                self.store.set_sampled(db, current.round, sampled, current.deadline)
                received = {u.client_id for u in self.store.updates(db, current.round)}
                if sampled and set(sampled) <= received:
                    self.store.set_round_status(db, current.round, "closed")
            self.store.add_event(db, actor, "remove_client", {"client_id": client_id})
        log.warning("client %s removed by %s", client_id, actor)
        return self.status()

    def events(self) -> list[dict[str, Any]]:
        return self.store.events(self.store.read())

    # ------------------------------------------------------------------ progress
    def tick(self) -> bool:
        """Close a round whose deadline passed, and aggregate a closed round. Returns True if it aggregated."""
        db = self.store.read()
        current = self.store.current_round(db)
        if current is None or self.store.get_meta(db, "paused"):
            return False
        if current.status == "training" and current.deadline is not None and time.time() > current.deadline:
            self._close_at_deadline(current.round)
            current = self.store.current_round(db)
        if current.status == "closed":
            return self.aggregate_if_needed()
        return False

    def _close_at_deadline(self, round_number: int) -> None:
        with self.store.transaction() as db:
            current = self.store.current_round(db)
            if current.round != round_number or current.status != "training" or time.time() <= (current.deadline or 0):
                return
            received = len(self.store.updates(db, round_number))
            if received >= self.config.min_fit_clients:
                self.store.set_round_status(db, round_number, "closed")
                log.warning("round %d: deadline passed; closing with %d of %d updates",
                            round_number, received, len(current.sampled))
            elif self.config.on_insufficient == "resample":
                sampled = self._resample(db, current)
                self.store.set_sampled(db, round_number, sampled, time.time() + self.config.round_timeout)
                log.warning("round %d: deadline passed with %d updates (< --min_fit_clients %d); re-sampled %s",
                            round_number, received, self.config.min_fit_clients, sampled)
            else:
                self.store.extend_deadline(db, round_number, time.time() + self.config.round_timeout)
                log.warning("round %d: deadline passed with %d updates (< --min_fit_clients %d); extended",
                            round_number, received, self.config.min_fit_clients)

    def _resample(self, db, current: RoundRow) -> list[str]:
        """Keep the clients that submitted; replace the stragglers by clients not yet sampled (seeded)."""
        submitted = [u.client_id for u in self.store.updates(db, current.round)]
        stragglers = [c for c in current.sampled if c not in submitted]
        fresh = sorted(set(self.store.clients(db)) - set(current.sampled))
        rng = random.Random(f"{self.config.seed}:{current.round}:resample{current.extensions}")
        needed = len(current.sampled) - len(submitted)
        replacements = rng.sample(fresh, min(needed, len(fresh)))
        # Too few fresh clients: the stragglers keep their places.
        replacements += stragglers[: needed - len(replacements)]
        return sorted(submitted + replacements)

    @contextmanager
    def _aggregation_lock(self):
        with open(self.store.aggregate_lock_path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def aggregate_if_needed(self) -> bool:
        """Aggregate the current round if it is closed. Exactly one process does it per round.

        Files are written first (idempotently, atomically); one transaction then commits the new
        global version, the history record and the next round. A crash before the commit leaves
        the round closed, and the next tick in any worker redoes it.
        """
        with self._aggregation_lock() as acquired:
            if not acquired:
                return False
            db = self.store.read()
            current = self.store.current_round(db)
            if current is None or current.status != "closed":
                return False
            started = time.time()
            rows = self.store.updates(db, current.round)
            previous = self.store.latest_global(db)
            adapter, state = self._load_state(str(self.store.resolve(previous.state_path)))
            updates = [FileUpdate(r, self.store.resolve(r.path)) for r in rows]
            new_adapter, new_state = run_aggregation(self.algorithm, adapter, updates, state)
            fault_point("aggregate.loaded")
            version = current.round
            row = self._write_version(self.store, self.config, self.algorithm, version, new_adapter, new_state)
            is_final = version >= self.config.num_rounds
            if is_final or (self.config.save_model_freq > 0 and version % self.config.save_model_freq == 0):
                self._save_adapter_dir(new_adapter, "final" if is_final else f"round_{version}")
                if is_final and self.config.save_model_freq > 0 and version % self.config.save_model_freq == 0:
                    self._save_adapter_dir(new_adapter, f"round_{version}")
            fault_point("aggregate.files_written")
            record = self._history_record(current, rows, row, time.time() - started)
            with self.store.transaction() as db:
                self.store.insert_global(db, row)
                self.store.insert_history(db, version, record)
                self.store.set_round_status(db, version, "aggregated")
                if not is_final:
                    self._start_round(db, version + 1)
            fault_point("aggregate.committed")
            log.info("round %d aggregated: %d updates, train_loss %s, %.2fs", version, len(rows),
                     record["train_loss"], record["aggregation_seconds"])
        self._cleanup(version)
        for hook in self._after_aggregation:  # metrics, TensorBoard (fedllm.server.metrics)
            hook(version)
        return True

    def _load_state(self, state_path: str) -> tuple[Tensors, Tensors]:
        adapter: Tensors = {}
        state: Tensors = {}
        with safe_open(state_path, framework="pt") as f:
            for key in f.keys():
                if key.startswith(STATE_GLOBAL_PREFIX):
                    adapter[key[len(STATE_GLOBAL_PREFIX):]] = f.get_tensor(key)
                else:
                    state[key[len(STATE_ALGO_PREFIX):]] = f.get_tensor(key)
        return adapter, state

    def _save_adapter_dir(self, adapter: Mapping[str, torch.Tensor], name: str) -> Path:
        from peft import LoraConfig

        settings = {k: v for k, v in self.lora_config_dict.items() if k in {
            "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type", "base_model_name_or_path"}}
        target = self.output_dir / name
        tmp = self.output_dir / f".{name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_peft_adapter(tmp, adapter, LoraConfig(**settings))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        fsync_dir(self.output_dir)
        return target

    def _history_record(self, current: RoundRow, rows: list[UpdateRow], row: GlobalRow, seconds: float) -> dict[str, Any]:
        total = sum(r.num_samples for r in rows)
        train_loss = _weighted_metric(rows, "train_loss", "num_samples")
        # The global model's loss on the clients' held-out splits, weighted by their sizes.
        eval_loss = _weighted_metric(rows, "eval_loss", "eval_samples")
        return {
            "round": current.round,
            "participants": [r.client_id for r in rows],
            "sampled": current.sampled,
            "num_samples": total,
            "train_loss": train_loss,
            "eval_loss": eval_loss,
            "seconds": time.time() - current.started_at,
            "aggregation_seconds": seconds,
            "bytes_received": sum(r.size for r in rows),
            "global_version": row.version,
            "global_sha256": row.sha256,
            "metrics": {r.client_id: r.metrics for r in rows},
        }

    def _cleanup(self, version: int) -> None:
        """Drop the consumed updates and global versions no client can still need."""
        shutil.rmtree(self.store.update_dir(version), ignore_errors=True)
        for old in range(max(0, version - 4), version - 1):
            self.store.global_path(old).unlink(missing_ok=True)
            self.store.state_path(old).unlink(missing_ok=True)


def _weighted_metric(rows: list[UpdateRow], metric: str, weight: str) -> float | None:
    """Σ w_i·m_i / Σ w_i over the updates that report ``metric`` (weight: a metric, else num_samples)."""
    pairs = [(r.metrics[metric], r.metrics.get(weight, r.num_samples)) for r in rows
             if isinstance(r.metrics.get(metric), (int, float))]
    total = sum(w for _, w in pairs)
    return sum(m * w for m, w in pairs) / total if pairs and total > 0 else None


def _parse_metrics(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Client metrics travel as safetensors metadata strings; keep the numeric ones."""
    metrics: dict[str, Any] = {}
    for key, value in metadata.items():
        if key == "format" or len(key) > 64:
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        if number == number and abs(number) != float("inf"):
            metrics[key] = number
    return metrics
