"""The masked input on the wire: a safetensors file of one ring-element tensor (nothing is unpickled)."""

from __future__ import annotations

import json

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load

from .protocol import ProtocolError

MASKED_TENSOR = "masked"
EXCLUDED_METADATA = "excluded"  # the neighbours whose shares failed authentication, comma-separated


SAFETENSORS_DTYPE = {np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64"}


def masked_file(vector: np.ndarray, excluded: list[str]) -> bytes:
    """The body of ``POST /v1/secagg/masked``: the safetensors layout (8-byte header length, JSON header padded
    to 8 bytes, little-endian data) written directly, one copy of the vector (``safetensors.numpy.save`` takes
    several)."""
    data = np.ascontiguousarray(vector, dtype=vector.dtype.newbyteorder("<"))
    header = json.dumps({"__metadata__": {EXCLUDED_METADATA: ",".join(excluded)},
                         MASKED_TENSOR: {"dtype": SAFETENSORS_DTYPE[vector.dtype], "shape": [int(data.size)],
                                         "data_offsets": [0, int(data.nbytes)]}}).encode()
    header += b" " * (-len(header) % 8)
    return b"".join([len(header).to_bytes(8, "little"), header, data.data])


def parse_masked(body: bytes) -> tuple[np.ndarray, list[str]]:
    """(the vector, the excluded neighbours) of :func:`masked_file`; ProtocolError for anything else."""
    try:
        tensors = load(body)
        header = json.loads(body[8:8 + int.from_bytes(body[:8], "little")])
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"a masked input is a safetensors file: {exc}") from None
    if set(tensors) != {MASKED_TENSOR}:
        raise ProtocolError(f"a masked input holds one tensor, {MASKED_TENSOR!r}")
    metadata = header.get("__metadata__") or {}
    excluded = [c for c in str(metadata.get(EXCLUDED_METADATA, "")).split(",") if c]
    return tensors[MASKED_TENSOR], excluded
