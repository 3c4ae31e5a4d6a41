"""Secure aggregation rounds (``--secure_aggregation secagg+``): the stages of a round, stored, and the secure sum.

A SecAgg+ round is ``training`` in the round engine while its attempt runs the stages of
:mod:`fedllm.secagg.protocol` (advertise → share → masked → unmask); once the unmasking is complete the round is
``closed`` and the aggregation step reads the survivors' masked inputs one at a time, removes the masks and
hands the mean delta to the algorithm. What is on disk, under ``state_dir/secagg/rNNNNNN/aAA/``::

    state.json                    the attempt: its setup and ServerRound state (public keys, share ciphertexts the
                                  server cannot open, masked-input digests, revealed unmasking shares)
    masked/<client>.<sha>.safetensors   a masked input y_u: uniformly random on its own

Every message is written (atomically, fsynced) before it is acknowledged, under an ``flock`` shared by the
gunicorn workers; a restart re-reads ``state.json`` and continues the stage. No plaintext update is ever
written: the mean exists in memory only, on its way into the new global. A round's directory is deleted once
the round is aggregated. A stage that is past its deadline (``--round_timeout``, per stage) closes with whoever
answered; an attempt that falls below the threshold re-runs the round with the clients that remain.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..algorithms import InMemoryUpdate, run_aggregation
from ..config import FederationArguments
from ..faults import fault_point
from ..fsutil import atomic_write_bytes, fsync_dir
from ..secagg.encoding import encoded_order
from ..secagg.graph import auto_neighbours
from ..secagg.protocol import (
    AlreadySent,
    NotInStage,
    ProtocolError,
    RoundSetup,
    ServerRound,
    StageMismatch,
    unmask_sum,
    validate_masked,
)
from ..secagg.wire import parse_masked
from .errors import NoOpenRound, SecAggInvalid, SecAggStage, UploadTooLarge
from .store import RoundRow, Store, storage_errors

log = logging.getLogger("fedllm.server")

ACTOR = "federation"


def setup_for(config: FederationArguments, federation_id: str, round_number: int, attempt: int,
              clients: Mapping[str, int], length: int) -> RoundSetup:
    """The attempt's setup: ``clients`` -> the samples each joined with (the weights p_i; equal with --dp)."""
    total = sum(clients.values())
    weights = {c: (1 / len(clients) if config.dp_enabled else n / total) for c, n in sorted(clients.items())}
    neighbours = config.secagg_neighbours or auto_neighbours(len(clients))
    return RoundSetup(context=federation_id, round=round_number, attempt=attempt, clients=tuple(sorted(clients)),
                      weights=weights, neighbours=neighbours, threshold_spec=config.secagg_threshold,
                      bits=config.secagg_bits, clip=config.secagg_clip, length=length)


class SecureRounds:
    """The SecAgg+ stages of the rounds of one federation (one instance per worker process)."""

    def __init__(self, store: Store, config: FederationArguments, federation_id: str,
                 adapter_spec: Mapping[str, tuple[int, ...]], set_sampled: Callable[[Any, int, list[str]], list[str]],
                 summed: Iterable[str] = ()):
        self.store = store
        self.config = config
        self.federation_id = federation_id
        # ``summed``: the upload extras (SCAFFOLD's Δc_i) whose plain sum the algorithm needs, not their weighted mean
        self.names, self.summed_from = encoded_order(adapter_spec, summed)  # the order of an encoded update's coordinates
        self.shapes = {n: tuple(adapter_spec[n]) for n in self.names}
        self.length = sum(int(np.prod(s)) for s in self.shapes.values()) + 1
        self.set_sampled = set_sampled  # (db, round, clients) -> the clients a re-run uses (the round engine's)
        self.root = store.root / "secagg"
        self.root.mkdir(exist_ok=True)
        self.clock: Callable[[], float] = time.time  # the stages' deadlines are read on it (tests move it on)

    # ------------------------------------------------------------------ files
    def _round_dir(self, round_number: int) -> Path:
        return self.root / f"r{round_number:06d}"

    def _attempt_dir(self, round_number: int, attempt: int) -> Path:
        return self._round_dir(round_number) / f"a{attempt:02d}"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / "secagg.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def load(self, round_number: int) -> ServerRound | None:
        """The newest attempt of ``round_number``, or None before it started."""
        directory = self._round_dir(round_number)
        attempts = list(directory.glob("a*/state.json")) if directory.exists() else []
        if not attempts:
            return None
        data = json.loads(max(attempts, key=lambda p: int(p.parent.name[1:])).read_text())
        return ServerRound(RoundSetup.from_json(data["setup"]), data["state"])

    def _save(self, server: ServerRound) -> None:
        setup = server.setup
        body = json.dumps({"setup": setup.to_json(), "state": server.state})
        with storage_errors():
            directory = self._attempt_dir(setup.round, setup.attempt)
            if not directory.exists():
                directory.mkdir(parents=True)
                fsync_dir(directory.parent)
                fsync_dir(self.root)
            atomic_write_bytes(directory / "state.json", body.encode())

    def _deadline(self, server: ServerRound) -> float | None:
        return server.state.get("deadline")

    def _start_stage_clock(self, server: ServerRound) -> None:
        timeout = self.config.round_timeout
        server.state["deadline"] = self.clock() + timeout if timeout > 0 else None

    # ------------------------------------------------------------------ the open attempt
    def _open(self, current: RoundRow | None) -> ServerRound:
        """The open attempt of the current round, starting attempt 0 when the round has none yet."""
        if current is None or current.status != "training" or not current.sampled:
            raise NoOpenRound("no round is running its secure-aggregation stages")
        if len(current.sampled) < 3:  # operator removals can shrink a sample: two would learn each other's update
            raise NoOpenRound(f"round {current.round} has {len(current.sampled)} clients; secure aggregation needs "
                              "3 (abort the round to draw again)")
        server = self.load(current.round)
        if server is not None and server.state.get("extensions") == current.extensions and server.stage != "failed":
            return server
        # A new round, or the round engine drew the round again: a fresh attempt with its sample.
        attempt = server.setup.attempt + 1 if server is not None else 0
        joined = self.store.clients(self.store.read())
        setup = setup_for(self.config, self.federation_id, current.round, attempt,
                          {c: joined[c]["num_samples"] for c in current.sampled if c in joined}, self.length)
        fresh = ServerRound(setup)
        fresh.state["extensions"] = current.extensions  # a re-draw of the round (re-run, abort, removal) changes it
        self._start_stage_clock(fresh)
        self._save(fresh)
        log.info("round %d attempt %d: secure aggregation over %d clients (k %d, t %d)", current.round, attempt,
                 len(setup.clients), min(setup.neighbours, len(setup.clients) - 1), setup.threshold)
        return fresh

    def status(self, current: RoundRow | None) -> dict[str, Any] | None:
        """``GET /v1/round``'s ``secagg``: the stage, the clients it waits for, the dropped ones by stage."""
        if current is None:
            return None
        server = self.load(current.round)
        if server is None or (current.status == "training" and server.state.get("extensions") != current.extensions):
            return {"stage": "advertise" if current.status == "training" else None, "attempt": None,
                    "clients_in_stage": len(current.sampled) if current.status == "training" else 0,
                    "answered": 0, "dropped": {}}
        return server.status()

    def submitted(self, current: RoundRow | None, client_id: str) -> bool:
        """Whether ``client_id``'s masked input is in the current attempt of the round."""
        server = self.load(current.round) if current is not None else None
        return bool(server is not None and server.state.get("extensions") == current.extensions
                    and client_id in server.state["masked"])

    def accepts_newcomers(self, current: RoundRow) -> bool:
        """Whether the round's current attempt is still in (or before) its first stage, where a client joins."""
        server = self.load(current.round)
        return server is None or server.state.get("extensions") != current.extensions or server.stage == "advertise"

    def view(self, client_id: str) -> dict[str, Any]:
        """``GET /v1/secagg``: what ``client_id`` needs for the open stage."""
        current = self.store.current_round(self.store.read())
        if current is None or current.status != "training":
            return {"round": current.round if current else 0, "stage": None}
        with self._locked():
            server = self._open(current)
        view = server.view(client_id)
        return {"round": current.round, "attempt": server.setup.attempt, "deadline": self._deadline(server), **view}

    # ------------------------------------------------------------------ messages
    def _message(self, client_id: str, round_number: int, attempt: int,
                 apply: Callable[[ServerRound], bool]) -> dict[str, Any]:
        with self._locked():
            current = self.store.current_round(self.store.read())
            if current is None or current.round != round_number or current.status != "training":
                raise SecAggStage(f"round {round_number} is not running its secure-aggregation stages")
            server = self._open(current)
            try:
                new = apply(server)
            except (StageMismatch, AlreadySent, NotInStage) as exc:
                raise SecAggStage(str(exc)) from None
            except ProtocolError as exc:
                raise SecAggInvalid(str(exc)) from None
            if new:
                if server.complete():
                    self._close_stage(server)
                self._save(server)
                fault_point("secagg.stored")
        self._after_change(server)
        return {"accepted": True, "duplicate": not new, "round": round_number, "attempt": attempt,
                "stage": server.stage}

    def receive_keys(self, client_id: str, round_number: int, attempt: int, body: Any) -> dict[str, Any]:
        return self._message(client_id, round_number, attempt,
                             lambda s: s.receive_keys(client_id, round_number, attempt, body))

    def receive_shares(self, client_id: str, round_number: int, attempt: int, body: Any) -> dict[str, Any]:
        return self._message(client_id, round_number, attempt,
                             lambda s: s.receive_shares(client_id, round_number, attempt, body))

    def receive_unmask(self, client_id: str, round_number: int, attempt: int, body: Any) -> dict[str, Any]:
        return self._message(client_id, round_number, attempt,
                             lambda s: s.receive_unmask(client_id, round_number, attempt, body))

    def max_masked_bytes(self) -> int:
        return self.length * 8 + (64 << 10)

    def receive_masked(self, client_id: str, round_number: int, attempt: int, read: Callable[[int], bytes],
                       content_length: int | None) -> dict[str, Any]:
        """A masked input: read whole (it is one adapter of ring elements), validated, stored, then recorded."""
        limit = self.max_masked_bytes()
        if content_length is not None and content_length > limit:
            raise UploadTooLarge(f"{content_length} bytes; a masked input is at most {limit}")
        chunks, size = [], 0
        while chunk := read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise UploadTooLarge(f"more than {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        digest = hashlib.sha256(body).hexdigest()
        try:
            vector, excluded = parse_masked(body)
        except ProtocolError as exc:
            raise SecAggInvalid(str(exc)) from None
        server = self.load(round_number)
        if server is None:
            raise SecAggStage(f"round {round_number} has no secure-aggregation attempt")
        try:
            validate_masked(vector, server.setup)
        except ProtocolError as exc:
            raise SecAggInvalid(str(exc)) from None
        path = self._attempt_dir(round_number, attempt) / "masked" / f"{client_id}.{digest[:16]}.safetensors"
        if server.setup.attempt == attempt and server.stage == "masked" and client_id in server.expected() \
                and client_id not in server.state["masked"]:
            with storage_errors():  # the file is durable before the message that names it
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, body)
        try:
            return self._message(client_id, round_number, attempt,
                                 lambda s: s.receive_masked(client_id, round_number, attempt, digest, excluded))
        except Exception:
            recorded = self.load(round_number)
            if recorded is None or recorded.state["masked"].get(client_id, {}).get("sha256") != digest:
                path.unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ stage transitions
    def _close_stage(self, server: ServerRound) -> None:
        stage = server.stage
        new = server.close_stage()
        self._start_stage_clock(server)
        log.info("round %d attempt %d: stage %s closed (%s dropped) -> %s", server.setup.round, server.setup.attempt,
                 stage, len(server.state["dropped"].get(stage, [])), new)

    def _after_change(self, server: ServerRound) -> None:
        """A finished attempt closes the round for aggregation; a failed one re-runs it (both idempotent)."""
        if server.stage not in ("done", "failed"):
            return
        with self.store.transaction() as db:
            current = self.store.current_round(db)
            if current is None or current.round != server.setup.round or current.status != "training" \
                    or server.state.get("extensions") != current.extensions:
                return
            if server.stage == "done":
                self.store.set_round_status(db, current.round, "closed")
                return
            failure = server.state["failure"]
            remaining = failure["remaining"] if len(failure["remaining"]) >= 3 else []
            sampled = self.set_sampled(db, current.round, remaining)
            self.store.add_event(db, ACTOR, "secagg_rerun", {"round": current.round, "attempt": server.setup.attempt,
                                                             **failure, "sampled": sampled})
        log.warning("round %d attempt %d failed in stage %s (%s); re-running with %s", server.setup.round,
                    server.setup.attempt, failure["stage"], failure["reason"], sampled)

    def tick(self, current: RoundRow) -> None:
        """Close a stage past its deadline; finish what a crash interrupted; delete aggregated rounds' files."""
        for directory in self.root.glob("r*"):
            if directory.is_dir() and int(directory.name[1:]) < current.round:
                shutil.rmtree(directory, ignore_errors=True)
        if current.status != "training" or not current.sampled:
            return
        with self._locked():
            server = self._open(current)
            deadline = self._deadline(server)
            if server.stage in ("advertise", "share", "masked", "unmask") and (
                    server.complete() or (deadline is not None and self.clock() > deadline)):
                self._close_stage(server)
                self._save(server)
        self._after_change(server)

    def _fail_closed_round(self, server: ServerRound, reason: str) -> None:
        """A closed round whose unmasking cannot be trusted: back to training, re-run with all of its clients."""
        with self._locked():
            server.state.update(stage="failed", failure={"stage": "unmask", "reason": reason,
                                                         "remaining": list(server.setup.clients)})
            self._save(server)
        with self.store.transaction() as db:
            current = self.store.current_round(db)
            if current is None or current.round != server.setup.round or current.status != "closed":
                return
            self.store.set_round_status(db, current.round, "training")
            sampled = self.set_sampled(db, current.round, list(server.setup.clients))
            self.store.add_event(db, ACTOR, "secagg_rerun", {"round": current.round, "attempt": server.setup.attempt,
                                                             **server.state["failure"], "sampled": sampled})
        log.error("round %d attempt %d: the unmasking failed (%s); re-running the round", server.setup.round,
                  server.setup.attempt, reason)

    def forget(self, round_number: int) -> None:
        """Delete an aggregated round's masked inputs and messages."""
        shutil.rmtree(self._round_dir(round_number), ignore_errors=True)

    # ------------------------------------------------------------------ the secure sum
    def mean_delta(self, round_number: int) -> tuple[dict[str, torch.Tensor], list[str], float] | None:
        """The unmasked weighted mean delta of the round (and the plain sums Σ_U3 of the summed extras, SCAFFOLD's
        Σ Δc_i, which the algorithm's step on this one "update" then adds as the plain path adds each client's),
        its contributors U3 and their weight fraction P; None when
        the revealed shares do not rebuild the secrets (inconsistent, or a key that does not match its public
        key): the attempt fails and the round re-runs with all its clients."""
        server = self.load(round_number)
        if server is None or server.stage != "done":
            raise RuntimeError(f"round {round_number} has not finished its unmasking")
        try:
            corrections = server.corrections()
        except ProtocolError as exc:
            self._fail_closed_round(server, str(exc))
            return None
        setup = server.setup
        directory = self._attempt_dir(round_number, setup.attempt) / "masked"

        def vectors() -> Iterator[np.ndarray]:
            for client in server.state["u3"]:
                digest = server.state["masked"][client]["sha256"]
                body = (directory / f"{client}.{digest[:16]}.safetensors").read_bytes()
                if hashlib.sha256(body).hexdigest() != digest:
                    raise RuntimeError(f"the stored masked input of {client} does not match its digest")
                yield parse_masked(body)[0]

        total = unmask_sum(vectors(), corrections, setup.fixed_point, setup.length)
        flat, weight = setup.fixed_point.decode_mean(total, self.summed_from, len(setup.clients))
        mean, offset = {}, 0
        for name in self.names:
            size = int(np.prod(self.shapes[name]))
            mean[name] = torch.from_numpy(flat[offset:offset + size].copy()).reshape(self.shapes[name])
            offset += size
        return mean, list(server.state["u3"]), weight


def aggregate_secure_mean(algorithm: Any, config: FederationArguments, global_params: Mapping[str, torch.Tensor],
                          mean: dict[str, torch.Tensor], participants: int, state: Mapping[str, torch.Tensor]):
    """The algorithm's server step on the secure mean Δ̄: through :func:`run_aggregation` as the one update it
    averages (FedAvg, FedProx, FedAvgM, FedOpt; SCAFFOLD, whose ``control.`` entries of ``mean`` are the plain sum
    Σ_U Δc_i, so its c ← c + (1/N)·Σ_U Δc_i as in the plain path); with ``--dp client`` DP-FedAvg's Gaussian noise
    N(0, (σ·C/m)²) is added to the mean first (the clients clipped to C; m = the unmasked participants)."""
    if not config.dp_enabled:
        return run_aggregation(algorithm, global_params, [InMemoryUpdate("secure-sum", 1, mean)], state)
    algorithm.add_noise(mean, algorithm.clip_norm(state), algorithm.denominator(participants))
    return run_aggregation(algorithm.inner, global_params, [InMemoryUpdate("secure-sum", 1, mean)], state)
