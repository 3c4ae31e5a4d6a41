"""Compressed updates as files: the client's encoder with error feedback, the server's validator and reader.

A compressed upload is an ordinary safetensors file whose tensors are the codec's parts
(``"<adapter tensor>::<part>"``, :mod:`.codecs`) and whose metadata carries the client's metrics plus
``compression`` (the codec and its settings, :meth:`~.codecs.Codec.tag`). The server checks it as strictly
as a dense upload (:func:`validate_compressed_file`): the exact part names, dtypes and shapes (so block
counts and lengths match), then each tensor's parts for what no encoder writes (non-finite or negative
scales, indices out of range, repeated or unordered), one tensor at a time. Aggregation reads it through
:class:`CompressedFileUpdate`, which decodes one tensor of one update at a time: the dense form of an
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
from ..wire import TensorFile, WireError, parse_header
from .codecs import PART_SEPARATOR, Codec, Layout, part_name

COMPRESSION_METADATA = "compression"
RESIDUAL_PREFIX = "residual."  # error-feedback residuals in the client's state file


def expected_parts(codec: Codec, spec: Mapping[str, tuple[int, ...]], wire_dtype: str) -> dict[str, Layout]:
    """tensor -> its parts' (dtype code, shape) for an update of ``spec``'s tensors."""
    return {name: codec.layout(math.prod(shape), wire_dtype) for name, shape in spec.items()}


def encode_parts(codec: Codec, tensors: Mapping[str, torch.Tensor], wire_dtype: str) -> Tensors:
    """Every tensor's parts, under their wire names."""
    return {part_name(name, part): value for name, tensor in tensors.items()
            for part, value in codec.encode(tensor, wire_dtype).items()}


def compress_with_feedback(codec: Codec, delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor],
                           wire_dtype: str) -> tuple[Tensors, Tensors]:
    """``(parts of C(Δ + e), e' = (Δ + e) − D(C(Δ + e)))`` tensor by tensor; a tensor without residual has e = 0."""
    parts: Tensors = {}
    new_residual: Tensors = {}
    for name, tensor in delta.items():
        corrected = tensor.detach().to("cpu", torch.float32)
        if name in residual:
            corrected = corrected + residual[name].to(torch.float32)
        encoded = codec.encode(corrected, wire_dtype)
        new_residual[name] = corrected - codec.decode(encoded, tuple(corrected.shape))
        parts.update({part_name(name, part): value for part, value in encoded.items()})
    return parts, new_residual


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

    400 for a malformed file; 422 for a codec tag, part names, dtypes or shapes that do not match, or parts
    that no encoder writes (:meth:`Codec.check`).
    """
    header, metadata = parse_header(path)
    if metadata.get(COMPRESSION_METADATA) != codec.tag():
        raise WireError(422, f"the file's compression is {metadata.get(COMPRESSION_METADATA)!r}; this federation's "
                             f"is {codec.tag()!r} (--update_compression, served by /v1/config)")
    layouts = expected_parts(codec, spec, wire_dtype)
    expected = {part_name(name, part): info for name, layout in layouts.items() for part, info in layout.items()}
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise WireError(422, f"compressed tensor parts do not match the global adapter: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}" + (" ..." if len(missing) > 5 or len(extra) > 5 else ""))
    for name, (code, shape) in expected.items():
        info = header[name]
        if info["dtype"] != code:
            raise WireError(422, f"part {name!r} has dtype {info['dtype']}, {codec.name} writes {code}")
        if info["shape"] != shape:
            raise WireError(422, f"part {name!r} has shape {info['shape']}, expected {shape} "
                                 f"({codec.tag()} of {list(spec[name.split(PART_SEPARATOR)[0]])})")
    try:
        with safe_open(str(path), framework="pt"):
            pass  # the library's own header checks, beyond the ones above
    except SafetensorError as exc:
        raise WireError(400, f"not a valid safetensors file: {exc}") from None
    with TensorFile(path) as f, torch_threads(1):
        for name, layout in layouts.items():
            codec.check(name, {part: f.get(part_name(name, part)) for part in layout}, math.prod(spec[name]))
    return metadata


def decode_tensor(file: TensorFile, codec: Codec, parts: Iterable[str], name: str,
                  shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor ``name`` of a validated compressed file, decoded from its parts."""
    return codec.decode({part: file.get(part_name(name, part)) for part in parts}, shape)


def encode_global(codec: Codec, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The served global ``C(g)``: every tensor's parts, ``compression`` the file's only metadata key (safetensors
    writes its metadata map in hash order, so a second key would change the bytes, and the ETag, between writes)."""
    return encode_body(codec, encode_parts(codec, tensors, "float32"), {})


def read_compressed_global(path: str | Path, codec: Codec, spec: Mapping[str, tuple[int, ...]]) -> Tensors:
    """``ĝ = D(C(g))`` from a served compressed global, once :func:`validate_compressed_file` accepted it (the
    server's check of an upload: a client trusts a server no more than a server trusts a client)."""
    validate_compressed_file(path, codec, spec, "float32")
    names = list(codec.layout(1, "float32"))
    with TensorFile(path) as f, torch_threads(1):
        return {name: decode_tensor(f, codec, names, name, tuple(shape)) for name, shape in spec.items()}


class CompressedFileUpdate:
    """An accepted compressed update, decoded lazily: one tensor of one update in memory at a time.

    The same interface as :class:`fedllm.server.versions.FileUpdate` (an :class:`~fedllm.algorithms.base.Update`).
    """

    def __init__(self, client_id: str, num_samples: int, metrics: Mapping[str, float], path: str | Path,
                 codec: Codec, spec: Mapping[str, tuple[int, ...]]):
        self.client_id = client_id
        self.num_samples = num_samples
        self.metrics = metrics
        self.codec = codec
        self.spec = spec
        self._file = TensorFile(path)
        self._parts = list(codec.layout(1, "float32"))  # the part names; they do not depend on the size

    def get(self, name: str) -> torch.Tensor:
        return decode_tensor(self._file, self.codec, self._parts, name, tuple(self.spec[name]))

    def names(self) -> Iterable[str]:
        return self.spec.keys()


def compressed_validator(codec: Codec, spec: Mapping[str, tuple[int, ...]], wire_dtype: str):
    """The server's check of one upload file (:class:`fedllm.server.ingest.UploadIngestor`'s ``validate``)."""
    return lambda path: validate_compressed_file(path, codec, spec, wire_dtype)


def compressed_reader(codec: Codec, spec: Mapping[str, tuple[int, ...]]):
    """How the server opens an accepted update row for aggregation (the round engine's ``open_update``)."""
    return lambda row, path: CompressedFileUpdate(row.client_id, row.num_samples, row.metrics, path, codec, spec)
