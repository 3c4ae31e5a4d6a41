"""Sequence-level streaming of split messages (``--split_sequence_chunk C``): a message cut along the sequence.

A message's tensors of shape [B, T, ...] (``hidden``, ``grad``, ``position_ids``) are cut into n = ⌈T / C⌉ chunks of
columns [kC, min((k+1)C, T)); its per-row tensors [B] (``starts``, ``lengths``) travel whole in every chunk. Chunk k
is its own safetensors body whose metadata binds it to ``(kind, client, round, step, chunk k, chunks n)``. The
server checks each chunk as it arrives (the binding against the request, its names, dtype, shape, finite values,
its per-row tensors equal to chunk 0's) and keeps one message being received per client and kind; chunk 0 starts
it (after the same step checks the whole message gets, so a replayed chunk 0 changes nothing), chunk k must be the
next, an identical resend of a received chunk is acknowledged again and changes nothing, any other is refused
(:class:`~fedllm.split.errors.ChunkOutOfOrder`). The last chunk completes the message, which is the concatenation
of the chunks along T -- the very message an unchunked client sends -- and goes through the same checks and the
same step; its answer [B, T, H] comes back cut the same way, as n frames (8-byte little-endian length, then a
safetensors body bound to ``(kind answer, client, round, step, k, n)``) in that last request's response.

Exact by construction: concatenation along T inverts the cut bit for bit (every chunk is in the wire dtype the
whole body would have), so a chunked run computes what an unchunked one does.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..wire import DTYPE_CODE, WIRE_DTYPES
from .errors import ChunkOutOfOrder
from .messages import FORWARD_NAMES, MessageError, MessageShape, _check_hidden, _parse, decode_tensor

FRAME = struct.Struct("<Q")
BINDING_KEYS = ("kind", "client", "round", "step", "chunk", "chunks")
WIRE_NAMES = frozenset({"hidden", "grad"})  # in the wire dtype; the others are int64
NAMES = {"forward": FORWARD_NAMES, "backward": frozenset({"grad"})}


@dataclass(frozen=True)
class Binding:
    """What a chunk belongs to: chunk ``chunk`` of ``chunks`` of ``kind`` (forward, backward, or their answers)."""

    kind: str
    client: str
    round: int
    step: int
    chunk: int
    chunks: int

    def metadata(self) -> dict[str, str]:
        return {key: str(getattr(self, key)) for key in BINDING_KEYS}

    def describe(self) -> str:
        return f"chunk {self.chunk} of {self.chunks} of {self.client}'s {self.kind} of step {self.step} of round " \
               f"{self.round}"


def chunk_count(tokens: int, size: int) -> int:
    return max(1, math.ceil(tokens / size))


def read_binding(body: bytes) -> Binding | None:
    """The chunk binding in a safetensors body's metadata; None when it has none. Only the header is read here
    (bounded); safetensors' own parser reads the rest."""
    if len(body) < FRAME.size:
        raise MessageError("not a valid safetensors body: shorter than its header length", malformed=True)
    (length,) = FRAME.unpack_from(body)
    if length > min(len(body) - FRAME.size, 1 << 20):
        raise MessageError("not a valid safetensors body: its header length passes the body", malformed=True)
    try:
        header = json.loads(body[FRAME.size:FRAME.size + length])
    except (ValueError, RecursionError):
        raise MessageError("not a valid safetensors body: its header is not JSON", malformed=True) from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not any(key in metadata for key in BINDING_KEYS):
        return None
    try:
        values = {key: metadata[key] for key in BINDING_KEYS}
        numbers = {key: int(values[key]) for key in ("round", "step", "chunk", "chunks")}
    except (KeyError, TypeError, ValueError):
        raise MessageError(f"a chunk's metadata must carry {list(BINDING_KEYS)} (the numbers as integers)",
                           malformed=True) from None
    if not all(isinstance(values[key], str) and len(values[key]) <= 64 for key in ("kind", "client")):
        raise MessageError("a chunk's kind and client must be strings of at most 64 characters", malformed=True)
    return Binding(values["kind"], values["client"], **numbers)


def cut(tensors: Mapping[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """A message's tensors cut along the sequence (dim 1) into pieces of ``size`` columns; 1-D ones in each."""
    tokens = next(t.shape[1] for t in tensors.values() if t.dim() >= 2)
    return [{name: (t[:, start:start + size] if t.dim() >= 2 else t) for name, t in tensors.items()}
            for start in range(0, tokens, size)]


def join(pieces: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`cut` (the 1-D tensors are chunk 0's; the receiver checked the others equal them)."""
    return {name: (torch.cat([p[name] for p in pieces], dim=1) if t.dim() >= 2 else t)
            for name, t in pieces[0].items()}


def encode_chunks(tensors: Mapping[str, torch.Tensor], size: int, wire_dtype: str, kind: str, client: str,
                  round_number: int, step: int) -> list[bytes]:
    """A message as its chunks' bodies: hidden states and gradients in the wire dtype, the rest int64."""
    dtype = WIRE_DTYPES[DTYPE_CODE[wire_dtype]][0]
    prepared = {name: t.detach().to("cpu", dtype if name in WIRE_NAMES else torch.int64)
                for name, t in tensors.items()}
    pieces = cut(prepared, size)
    return [save_bytes({name: t.contiguous() for name, t in piece.items()},
                       metadata=Binding(kind, client, round_number, step, index, len(pieces)).metadata())
            for index, piece in enumerate(pieces)]


def frame(bodies: list[bytes]) -> bytes:
    return b"".join(FRAME.pack(len(body)) + body for body in bodies)


def unframe(data: bytes, count: int, limit: int) -> list[bytes]:
    """``count`` length-prefixed bodies of at most ``limit`` bytes each, and nothing after them."""
    bodies, offset = [], 0
    for index in range(count):
        if offset + FRAME.size > len(data):
            raise MessageError(f"the answer has {index} chunk frames, expected {count}", malformed=True)
        (length,) = FRAME.unpack_from(data, offset)
        offset += FRAME.size
        if length > limit or offset + length > len(data):
            raise MessageError(f"answer chunk {index} announces {length} bytes (at most {limit}, "
                               f"{len(data) - offset} left)", malformed=True)
        bodies.append(data[offset:offset + length])
        offset += length
    if offset != len(data):
        raise MessageError(f"{len(data) - offset} bytes after the answer's {count} chunk frames", malformed=True)
    return bodies


def check_binding(found: Binding | None, expected: Binding) -> None:
    if found != expected:
        raise ChunkOutOfOrder(f"expected {expected.describe()}, got " +
                              (found.describe() if found is not None else "a body without a chunk binding"))


def decode_answer(data: bytes, name: str, shape: MessageShape, size: int, expected: tuple[int, int, int],
                  kind: str, client: str, round_number: int, step: int) -> torch.Tensor:
    """The client's side: the server's framed answer chunks of ``name`` [B, T, H], each bound and checked."""
    rows, tokens, hidden = expected
    count = chunk_count(tokens, size)
    pieces = []
    for index, body in enumerate(unframe(data, count, shape.max_bytes(size))):
        try:
            check_binding(read_binding(body), Binding(f"{kind} answer", client, round_number, step, index, count))
        except ChunkOutOfOrder as exc:
            raise MessageError(str(exc)) from None
        width = min(size, tokens - index * size)
        pieces.append(decode_tensor(body, name, shape, (rows, width, hidden)))
    return torch.cat(pieces, dim=1)


def encode_answer(body: bytes, name: str, size: int, wire_dtype: str, kind: str, client: str, round_number: int,
                  step: int) -> bytes:
    """The server's side: its answer body (one safetensors ``name``), cut and framed."""
    return frame(encode_chunks({name: load_bytes(body)[name]}, size, wire_dtype, f"{kind} answer", client,
                               round_number, step))


@dataclass
class _Assembly:
    """One client's chunked message being received."""

    binding: Binding  # of its chunk 0
    pieces: list[dict[str, torch.Tensor]] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    touched: float = 0.0


class ChunkAssembler:
    """The server's receiving side: at most one message per (client, kind), every chunk checked on arrival."""

    def __init__(self, shape: MessageShape, size: int, timeout: float,
                 check_step: Callable[[str, str, int, int], None]):
        self.shape, self.size, self.timeout, self.check_step = shape, size, timeout, check_step
        self.chunk_shape = replace(shape, seq_length=size)
        self.max_chunks = chunk_count(shape.seq_length, size)
        self.receiving: dict[tuple[str, str], _Assembly] = {}
        self.lock = threading.Lock()

    def accept(self, kind: str, client: str, round_number: int, step: int,
               body: bytes) -> tuple[Binding, bytes | None]:
        """Take one chunk: its binding, and the whole message's body once this chunk completed it (else None).
        A refused chunk raises (MessageError or a FederationError) and changes nothing."""
        binding = read_binding(body)
        if binding is None:
            raise MessageError(f"this federation sends split messages in chunks of at most {self.size} tokens "
                               "(--split_sequence_chunk, served by /v1/config); the body has no chunk binding",
                               malformed=True)
        if (binding.kind, binding.client, binding.round, binding.step) != (kind, client, round_number, step):
            raise ChunkOutOfOrder(f"{binding.describe()} was sent as {client}'s {kind} of step {step} of round "
                                  f"{round_number}")
        if not (1 <= binding.chunks <= self.max_chunks and 0 <= binding.chunk < binding.chunks):
            raise MessageError(f"chunk {binding.chunk} of {binding.chunks}: a message has 1 to {self.max_chunks} "
                               f"chunks (--seq_length {self.shape.seq_length} / --split_sequence_chunk {self.size})")
        piece = self._check(kind, binding, body)
        digest = hashlib.sha256(body).hexdigest()
        key = (client, kind)
        with self.lock:
            now = time.monotonic()
            for stale in [k for k, a in self.receiving.items() if now - a.touched > self.timeout]:
                del self.receiving[stale]
            if binding.chunk == 0:
                self.check_step(kind, client, round_number, step)  # a replayed chunk 0 is refused here
                assembly = _Assembly(binding)
            else:
                assembly = self._continuing(key, binding, digest)
                if assembly is None:
                    return binding, None  # an identical resend: acknowledged again, nothing changed
                self._same_rows(assembly, binding, piece)
            assembly.pieces.append(piece)
            assembly.digests.append(digest)
            assembly.touched = now
            if len(assembly.pieces) < binding.chunks:
                self.receiving[key] = assembly
                return binding, None
            self.receiving.pop(key, None)
        return binding, save_bytes({name: t.contiguous() for name, t in join(assembly.pieces).items()})

    def _check(self, kind: str, binding: Binding, body: bytes) -> dict[str, torch.Tensor]:
        """The chunk's own checks: names, dtypes, shapes (C columns but the last), finite values."""
        tensors = _parse(body, NAMES[kind])
        name = "hidden" if kind == "forward" else "grad"
        wire = tensors[name]
        _check_hidden(name, wire, self.chunk_shape, None)
        rows, width = wire.shape[:2]
        if binding.chunk < binding.chunks - 1 and width != self.size:
            raise MessageError(f"{name} of chunk {binding.chunk} of {binding.chunks} has {width} tokens; every chunk "
                               f"but the last has --split_sequence_chunk {self.size}")
        for other, expected in (("starts", (rows,)), ("lengths", (rows,)), ("position_ids", (rows, width))):
            if other in tensors and (tensors[other].dtype != torch.int64 or tuple(tensors[other].shape) != expected):
                raise MessageError(f"{other} must be int64 of shape {list(expected)}, got {tensors[other].dtype} "
                                   f"{list(tensors[other].shape)}")
        return tensors

    def _continuing(self, key: tuple[str, str], binding: Binding, digest: str) -> _Assembly | None:
        assembly = self.receiving.get(key)
        first = assembly.binding if assembly is not None else None
        if first is None or (first.round, first.step, first.chunks) != (binding.round, binding.step, binding.chunks):
            raise ChunkOutOfOrder(f"{binding.describe()}: no message of {binding.chunks} chunks of that step is being "
                                  "received; send its chunk 0 first")
        received = len(assembly.pieces)
        if binding.chunk < received:
            if assembly.digests[binding.chunk] == digest:
                return None
            raise ChunkOutOfOrder(f"{binding.describe()} was already received with another body")
        if binding.chunk > received:
            raise ChunkOutOfOrder(f"{binding.describe()} came before chunk {received}; send the chunks in order")
        return assembly

    @staticmethod
    def _same_rows(assembly: _Assembly, binding: Binding, piece: Mapping[str, torch.Tensor]) -> None:
        first = assembly.pieces[0]
        for name, tensor in piece.items():
            if tensor.shape[0] != first[name].shape[0] or (tensor.dim() == 1 and not torch.equal(tensor, first[name])):
                raise MessageError(f"{name} of {binding.describe()} differs from chunk 0's (rows, or the per-row "
                                   "spans)")
