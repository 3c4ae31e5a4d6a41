"""Upload ingestion: stream a client's update to disk, validate every byte, accept it exactly once.

An upload streams into ``incoming/`` (hashed as it arrives, cut at the size limit), is validated
against the federation's tensor names, shapes, dtype and finiteness (:mod:`fedllm.wire`), moves to
``updates/rNNNNNN/`` and only then gets its row, in the same transaction that may close the round.
A rejected upload changes nothing; an identical retry is answered as accepted and counted once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch

from ..algorithms.base import CONTROL_PREFIX
from ..faults import fault_point
from ..fsutil import fsync_dir
from ..threads import torch_threads
from ..wire import TensorFile, WireError, parse_metrics, validate_tensors_file
from .errors import (
    AlreadySubmitted,
    ChecksumMismatch,
    InvalidUpdate,
    MalformedUpdate,
    NotJoined,
    TooManySamples,
    TruncatedBody,
    UploadTooLarge,
)
from .rounds import RoundEngine
from .store import Store, UpdateRow, storage_errors

log = logging.getLogger("fedllm.server")

BODY_CHUNK = 1 << 20


class UploadIngestor:
    """Receives the updates of one federation."""

    def __init__(self, store: Store, rounds: RoundEngine, upload_spec: dict[str, tuple[int, ...]], wire_dtype: str,
                 max_upload_bytes: int, max_control_norm: float = 0.0,
                 clip_norm: Callable[[], float | None] | None = None,
                 validate: Callable[[Path], dict[str, str]] | None = None):
        self.store = store
        self.rounds = rounds
        self.upload_spec = upload_spec
        self.wire_dtype = wire_dtype
        self.max_upload_bytes = max_upload_bytes
        self.max_control_norm = max_control_norm
        self.clip_norm = clip_norm or (lambda: None)  # --dp client: the norm every delta must keep to
        # The check of one upload file, returning its metadata: dense safetensors, or a codec's (fedllm.compression).
        self.validate = validate or (lambda path: validate_tensors_file(path, self.upload_spec, self.wire_dtype))

    def receive(self, client_id: str, round_number: int, num_samples: int, read: Callable[[int], bytes],
                content_length: int | None, claimed_sha256: str | None) -> dict[str, Any]:
        """Stream an upload to disk, validate it, and accept it exactly once."""
        if content_length is not None and content_length > self.max_upload_bytes:
            raise UploadTooLarge(f"{content_length} bytes; the limit is {self.max_upload_bytes}")
        db = self.store.read()
        joined = self.store.clients(db).get(client_id)
        if joined is None:
            raise NotJoined(f"POST /v1/join first as {client_id!r}")
        if num_samples > joined["num_samples"]:
            raise TooManySamples(f"X-FedLLM-Num-Samples {num_samples} is more than the {joined['num_samples']} "
                                 f"examples {client_id!r} joined with; POST /v1/join again with the new count")
        if self.store.get_update(db, round_number, client_id) is None:  # a retry is answered once its digest is known
            self.rounds.check_can_submit(self.store.current_round(db), client_id, round_number)

        incoming = self.store.incoming_dir / f"{client_id}.{os.getpid()}.{time.time_ns()}.part"
        try:
            with storage_errors():
                digest, size = self.stream_to_file(read, incoming, content_length)
            if claimed_sha256 is not None and claimed_sha256.lower() != digest:
                raise ChecksumMismatch(f"X-Content-SHA256 is {claimed_sha256}, the body's is {digest}")
            existing = self.store.get_update(self.store.read(), round_number, client_id)
            if existing is not None:  # a retry (even after the round closed) or a conflicting second update
                return self._answer_resubmission(existing, client_id, round_number, digest)
            if self._carried(client_id, round_number, digest):  # a retry of an update an abort carried away
                return {"accepted": True, "duplicate": True, "round": round_number, "sha256": digest}
            try:
                metadata = self.validate(incoming)
            except WireError as exc:
                raise (InvalidUpdate if exc.status == 422 else MalformedUpdate)(str(exc)) from None
            self._check_control_norm(incoming)
            self._check_clip_norm(incoming)
            final = self.store.update_dir(round_number) / f"{client_id}.{digest[:16]}.safetensors"
            with storage_errors():
                if not final.parent.exists():
                    final.parent.mkdir(parents=True, exist_ok=True)
                    fsync_dir(final.parent.parent)  # the new round directory itself survives a power loss
                os.replace(incoming, final)
                fsync_dir(final.parent)
            fault_point("upload.stored")
        finally:
            incoming.unlink(missing_ok=True)

        recorded = self.store.relative(final)
        row = UpdateRow(round_number, client_id, digest, num_samples, recorded, parse_metrics(metadata), size,
                        time.time())
        try:
            with self.store.transaction() as db:
                existing = self.store.get_update(db, round_number, client_id)
                if existing is not None:  # a concurrent upload from the same client won
                    return self._answer_resubmission(existing, client_id, round_number, digest)
                self.rounds.check_can_submit(self.store.current_round(db), client_id, round_number)
                self.store.insert_update(db, row)
                self.store.touch_client(db, client_id)
                self.rounds.close_if_complete(db, round_number)
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

    def _carried(self, client_id: str, round_number: int, digest: str) -> bool:
        return any(r.client_id == client_id and r.round == round_number and r.sha256 == digest
                   for r in self.store.carried(self.store.read()))

    def _check_clip_norm(self, path: Path) -> None:
        """--dp client: a delta over the round's clip norm is refused (the DP guarantee rests on it)."""
        clip = self.clip_norm()
        if clip is None:
            return
        names = [n for n in self.upload_spec if not n.startswith(CONTROL_PREFIX)]
        norm = _l2_norm(path, names)
        # The wire dtype rounds each value: allow its relative precision (bfloat16 keeps 8 bits).
        tolerance = 1e-2 if self.wire_dtype == "bfloat16" else 1e-3 if self.wire_dtype == "float16" else 1e-5
        if norm > clip * (1 + tolerance):
            raise InvalidUpdate(f"the delta's L2 norm {norm:.6g} is over this round's --dp_clip_norm {clip:.6g}; "
                                "--dp client: clip the delta before uploading")

    def _check_control_norm(self, path: Path) -> None:
        """SCAFFOLD's Δc_i: bounded in L2 norm over all control tensors, so one upload cannot swing the server's c."""
        names = [n for n in self.upload_spec if n.startswith(CONTROL_PREFIX)]
        if not names or self.max_control_norm <= 0:
            return
        norm = _l2_norm(path, names)
        if norm > self.max_control_norm:
            raise InvalidUpdate(f"the control update's L2 norm {norm:.4g} is over --max_control_norm "
                                f"{self.max_control_norm:g}")

    @staticmethod
    def _answer_resubmission(existing: UpdateRow, client_id: str, round_number: int, digest: str) -> dict[str, Any]:
        if existing.sha256 == digest:
            return {"accepted": True, "duplicate": True, "round": round_number, "sha256": digest}
        raise AlreadySubmitted(f"client {client_id!r} already sent a different update for round {round_number}")

    def stream_to_file(self, read: Callable[[int], bytes], path: Path, content_length: int | None) -> tuple[str, int]:
        """Copy the body to ``path`` (fsynced), cut at ``max_upload_bytes``; returns (sha256, size)."""
        digest = hashlib.sha256()
        size = 0
        with open(path, "wb") as f:
            while True:
                chunk = read(BODY_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_upload_bytes:
                    raise UploadTooLarge(f"more than {self.max_upload_bytes} bytes")
                digest.update(chunk)
                f.write(chunk)
                fault_point("upload.streaming")
            f.flush()
            os.fsync(f.fileno())
        if content_length is not None and size != content_length:
            raise TruncatedBody(f"received {size} of {content_length} bytes")
        return digest.hexdigest(), size


def _l2_norm(path: Path, names: list[str]) -> float:
    """‖·‖₂ over the named tensors of a safetensors file together, read one tensor at a time."""
    with TensorFile(path) as f, torch_threads(1):
        return math.sqrt(sum(float(torch.linalg.vector_norm(f.get(n).to(torch.float32))) ** 2 for n in names))
