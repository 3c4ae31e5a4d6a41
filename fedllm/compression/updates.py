"""Compressed updates as files: the client's encoder with error feedback, the server's validator and reader.

A compressed upload is an ordinary safetensors file holding one *packed* tensor per part name of the codec
(``q`` and ``absmax`` for the quantizers, ``idx`` and ``val`` for top-k; :mod:`.codecs`): each adapter tensor's
part, concatenated in the sorted order of the federation's tensor names (:func:`packed_layout`). Blocks and
indices stay per tensor -- tensor ``t`` is encoded on its own and its parts are slices ``[b_t, e_t)`` of the
packed tensors -- so each tensor decodes from its slices alone, at the cost of at most one padded block (and
one scale) per tensor. Few header entries instead of two per adapter tensor: on a small adapter the
safetensors header would otherwise outweigh the compressed data. The metadata carries the client's metrics
plus ``compression`` (the codec and its settings, :meth:`~.codecs.Codec.tag`).

The server checks an upload as strictly as a dense one (:func:`validate_compressed_file`): the exact packed
names, dtypes and total lengths (so block counts and ``k`` match for every tensor), then each tensor's slices for
what no encoder writes (non-finite or negative scales, indices out of the tensor's range, repeated or unordered),
one tensor at a time through ranged reads (:meth:`fedllm.wire.TensorFile.get_range`). Aggregation reads it
through :class:`CompressedFileUpdate`, which decodes one tensor of one update at a time: the dense form of an
update never exists whole on the server.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019, EF-SGD): a client sends ``C(Δ + e)`` and keeps
``e ← (Δ + e) − D(C(Δ + e))`` for the next round, so what quantization or sparsification drops is delayed,
not lost. ``e`` lives in the client's state (:mod:`fedllm.client.state`) under :data:`RESIDUAL_PREFIX`,
bound to the federation and committed only when the server accepted the upload that left it.

The served global, quantized (``GET /v1/global?encoding=compressed``, the quantizers only): the same file format
(:func:`encode_global`), and the client checks it with the server's own validator before decoding it
(:func:`read_compressed_global`). The server keeps the exact global ``g_t``; clients train from
``ĝ_t = D(C(g_t))`` and upload ``Δ`` relative to ``ĝ_t``; the server adds the aggregate to ``g_t``. So
``g_T = g_0 + Σ_t Δ̄_t`` exactly: a download's error ``g_t − ĝ_t`` (at most ``ε·s_b`` per block) only moves the
point round ``t`` trains from and never enters the global, where it would add up over rounds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..algorithms.base import Tensors
from ..threads import torch_threads
from ..wire import KNOWN_DTYPE_SIZES, TORCH_DTYPES, TensorFile, WireError, parse_header
from .codecs import Codec, Layout, Parts

COMPRESSION_METADATA = "compression"
# The file layout's version, recorded with each served compressed global (1: two entries per adapter tensor,
# ``"<tensor>::<part>"``; 2: the packed parts): a server finding another rewrites the file from the master copy.
COMPRESSED_FORMAT = 2
RESIDUAL_PREFIX = "residual."  # error-feedback residuals in the client's state file

Slices = dict[str, dict[str, tuple[int, int]]]  # tensor -> part -> [begin, end) in the packed part


def packed_layout(codec: Codec, spec: Mapping[str, tuple[int, ...]], wire_dtype: str) -> tuple[Layout, Slices]:
    """The packed parts of an update of ``spec``'s tensors (part -> (dtype code, [total length])) and each
    tensor's slice of every part, tensors in sorted name order. A part whose per-tensor dtype varies (top-k's
    indices: int32, or int64 for a tensor past 2³¹ − 1 entries) is packed in the widest."""
    codes: dict[str, str] = {}
    ends: dict[str, int] = {}
    slices: Slices = {}
    for name in sorted(spec):
        slices[name] = {}
        for part, (code, shape) in codec.layout(math.prod(spec[name]), wire_dtype).items():
            if part not in codes or KNOWN_DTYPE_SIZES[code] > KNOWN_DTYPE_SIZES[codes[part]]:
                codes[part] = code
            begin = ends.get(part, 0)
            ends[part] = begin + math.prod(shape)
            slices[name][part] = (begin, ends[part])
    return {part: (codes[part], [ends[part]]) for part in codes}, slices


def pack(codec: Codec, encoded: Mapping[str, Parts], spec: Mapping[str, tuple[int, ...]], wire_dtype: str) -> Tensors:
    """Each tensor's parts (``encoded``: tensor -> its :meth:`Codec.encode`; ``spec``: the tensors' shapes) as the
    packed parts of the file."""
    layout, _ = packed_layout(codec, spec, wire_dtype)
    return {part: torch.cat([encoded[name][part].reshape(-1).to(TORCH_DTYPES[code]) for name in sorted(encoded)])
            for part, (code, _) in layout.items()}


def unpack(codec: Codec, packed: Mapping[str, torch.Tensor], spec: Mapping[str, tuple[int, ...]],
           wire_dtype: str) -> Tensors:
    """The float32 tensors of in-memory packed parts (what the server reads from a file, slice by slice)."""
    _, slices = packed_layout(codec, spec, wire_dtype)
    return {name: codec.decode({part: packed[part][b:e] for part, (b, e) in slices[name].items()}, tuple(spec[name]))
            for name in spec}


def encode_parts(codec: Codec, tensors: Mapping[str, torch.Tensor], wire_dtype: str) -> Tensors:
    """The packed parts of ``tensors``."""
    return pack(codec, {name: codec.encode(tensor, wire_dtype) for name, tensor in tensors.items()},
                {name: tuple(tensor.shape) for name, tensor in tensors.items()}, wire_dtype)


def compress_with_feedback(codec: Codec, delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor],
                           wire_dtype: str) -> tuple[Tensors, Tensors]:
    """``(packed parts of C(Δ + e), e' = (Δ + e) − D(C(Δ + e)))`` tensor by tensor; a tensor without residual has
    e = 0."""
    encoded: dict[str, Parts] = {}
    new_residual: Tensors = {}
    for name, tensor in delta.items():
        corrected = tensor.detach().to("cpu", torch.float32)
        if name in residual:
            corrected = corrected + residual[name].to(torch.float32)
        encoded[name] = codec.encode(corrected, wire_dtype)
        new_residual[name] = corrected - codec.decode(encoded[name], tuple(corrected.shape))
    return pack(codec, encoded, {name: tuple(tensor.shape) for name, tensor in delta.items()}, wire_dtype), new_residual


def encode_body(codec: Codec, parts: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The upload body: the parts as they are (their dtypes are the codec's), ``compression`` in the metadata."""
    return save({k: v.contiguous() for k, v in parts.items()}, metadata={**metadata, COMPRESSION_METADATA: codec.tag()})


def split_residual(state: Mapping[str, torch.Tensor]) -> tuple[Tensors, Tensors]:
    """A client state as (the algorithm hook's part, the error-feedback residuals by tensor name)."""
    hook = {k: v for k, v in state.items() if not k.startswith(RESIDUAL_PREFIX)}
    residual = {k[len(RESIDUAL_PREFIX):]: v for k, v in state.items() if k.startswith(RESIDUAL_PREFIX)}
    return hook, residual


def residual_state(residual: Mapping[str, torch.Tensor]) -> Tensors:
    return {RESIDUAL_PREFIX + k: v for k, v in residual.items()}


def validate_compressed_file(path: str | Path, codec: Codec, spec: Mapping[str, tuple[int, ...]],
                             wire_dtype: str) -> dict[str, str]:
    """Validate a compressed file (an upload on the server, the served global on a client) against the federation's
    tensors; return its metadata.

    400 for a malformed file; 422 for a codec tag, packed part names, dtypes or lengths that do not match, or a
    tensor's slices that no encoder writes (:meth:`Codec.check`).
    """
    header, metadata = parse_header(path)
    if metadata.get(COMPRESSION_METADATA) != codec.tag():
        raise WireError(422, f"the file's compression is {metadata.get(COMPRESSION_METADATA)!r}; this federation's "
                             f"is {codec.tag()!r} (--update_compression, served by /v1/config)")
    expected, slices = packed_layout(codec, spec, wire_dtype)
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise WireError(422, f"compressed parts do not match the codec's: missing {missing}, "
                             f"unexpected {extra[:5]}" + (" ..." if len(extra) > 5 else ""))
    for part, (code, shape) in expected.items():
        info = header[part]
        if info["dtype"] != code:
            raise WireError(422, f"part {part!r} has dtype {info['dtype']}, {codec.name} writes {code}")
        if info["shape"] != shape:
            raise WireError(422, f"part {part!r} has shape {info['shape']}, expected {shape} "
                                 f"({codec.tag()} of the adapter's {len(spec)} tensors, packed)")
    try:
        with safe_open(str(path), framework="pt"):
            pass  # the library's own header checks, beyond the ones above
    except SafetensorError as exc:
        raise WireError(400, f"not a valid safetensors file: {exc}") from None
    with TensorFile(path) as f, torch_threads(1):
        for name, ranges in slices.items():
            codec.check(name, read_slices(f, ranges), math.prod(spec[name]))
    return metadata


def read_slices(file: TensorFile, ranges: Mapping[str, tuple[int, int]]) -> Parts:
    """One tensor's parts, read from their slices of a validated packed file."""
    return {part: file.get_range(part, begin, end) for part, (begin, end) in ranges.items()}


def encode_global(codec: Codec, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The served global ``C(g)``: the packed parts, ``compression`` the file's only metadata key (safetensors
    writes its metadata map in hash order, so a second key would change the bytes, and the ETag, between writes)."""
    return encode_body(codec, encode_parts(codec, tensors, "float32"), {})


def read_compressed_global(path: str | Path, codec: Codec, spec: Mapping[str, tuple[int, ...]]) -> Tensors:
    """``ĝ = D(C(g))`` from a served compressed global, once :func:`validate_compressed_file` accepted it (the
    server's check of an upload: a client trusts a server no more than a server trusts a client)."""
    validate_compressed_file(path, codec, spec, "float32")
    _, slices = packed_layout(codec, spec, "float32")
    with TensorFile(path) as f, torch_threads(1):
        return {name: codec.decode(read_slices(f, slices[name]), tuple(shape)) for name, shape in spec.items()}


class CompressedFileUpdate:
    """An accepted compressed update, decoded lazily: one tensor of one update in memory at a time.

    The same interface as :class:`fedllm.server.versions.FileUpdate` (an :class:`~fedllm.algorithms.base.Update`).
    """

    def __init__(self, client_id: str, num_samples: int, metrics: Mapping[str, float], path: str | Path,
                 codec: Codec, spec: Mapping[str, tuple[int, ...]], wire_dtype: str):
        self.client_id = client_id
        self.num_samples = num_samples
        self.metrics = metrics
        self.codec = codec
        self.spec = spec
        self._file = TensorFile(path)
        _, self._slices = packed_layout(codec, spec, wire_dtype)

    def get(self, name: str) -> torch.Tensor:
        return self.codec.decode(read_slices(self._file, self._slices[name]), tuple(self.spec[name]))

    def names(self) -> Iterable[str]:
        return self.spec.keys()


def compressed_validator(codec: Codec, spec: Mapping[str, tuple[int, ...]], wire_dtype: str):
    """The server's check of one upload file (:class:`fedllm.server.ingest.UploadIngestor`'s ``validate``)."""
    return lambda path: validate_compressed_file(path, codec, spec, wire_dtype)


def compressed_reader(codec: Codec, spec: Mapping[str, tuple[int, ...]], wire_dtype: str):
    """How the server opens an accepted update row for aggregation (the round engine's ``open_update``)."""
    return lambda row, path: CompressedFileUpdate(row.client_id, row.num_samples, row.metrics, path, codec, spec,
                                                  wire_dtype)
