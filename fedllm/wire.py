"""The wire format shared by server and client: safetensors files, validated before use.

Nothing received over the network is unpickled or eval'd. An upload is checked structurally
here (header length, JSON, dtypes, shapes, offsets that tile the data exactly) before the
safetensors library opens it, then against the expected tensor names, shapes and dtype, and
finally for finite values, one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _save_bytes

from .threads import torch_threads

# safetensors dtype code -> (torch dtype, bytes per element); only floating types travel.
WIRE_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "BF16": (torch.bfloat16, 2),
    "F16": (torch.float16, 2),
}
# Every dtype code the safetensors format defines; other codes are malformed input.
KNOWN_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}
DTYPE_CODE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# Dtype codes TensorFile can read into torch tensors.
TORCH_DTYPES: dict[str, torch.dtype] = {
    **{code: dtype for code, (dtype, _) in WIRE_DTYPES.items()},
    "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 16 * 1024 * 1024
CHUNK = 1 << 20


class WireError(ValueError):
    """An upload that is not acceptable; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def encode(tensors: Mapping[str, torch.Tensor], wire_dtype: str = "float32", metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize ``tensors`` as safetensors bytes in ``wire_dtype``."""
    dtype = WIRE_DTYPES[DTYPE_CODE[wire_dtype]][0]
    prepared = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    return _save_bytes(prepared, metadata=dict(metadata) if metadata else None)


# The metrics a client reports with its update (safetensors metadata): the ones fedllm's trainer writes,
# plus up to MAX_USER_METRICS of the user's own named ``user_*``. Anything else is dropped on arrival, so an
# upload cannot fill the shared views (/v1/history, /metrics) with keys of its own.
KNOWN_METRICS = frozenset({
    "train_loss", "final_loss", "steps", "seconds", "eval_loss", "eval_samples",
    "reward_accuracy", "reward_margin", "final_reward_accuracy", "final_reward_margin",
    "eval_reward_accuracy", "eval_reward_margin",
    "dp_unclipped",  # --dp client: the delta was within the clip norm before clipping (adaptive clipping's bit)
    "dp_sgd_epsilon", "dp_sgd_delta",  # --dp_sgd: the client's own (ε, δ) so far
})
USER_METRIC_PREFIX = "user_"
MAX_USER_METRICS = 16
METRIC_KEY_MAX_CHARS = 64
METRIC_BOUND = 1e15  # |value| above this is no loss, count or time fedllm reports


def metrics_metadata(metrics: Mapping[str, float]) -> dict[str, str]:
    """Client metrics as safetensors metadata strings (``repr`` keeps every bit of a float)."""
    return {name: repr(float(value)) for name, value in metrics.items()}


def parse_metrics(metadata: Mapping[str, str]) -> dict[str, float]:
    """The inverse of :func:`metrics_metadata`, normalised: known names (and the first user_ ones) whose value
    is a finite number within ±METRIC_BOUND; every other key is dropped."""
    metrics: dict[str, float] = {}
    user = 0
    for key in sorted(metadata):
        if key not in KNOWN_METRICS:
            if not key.startswith(USER_METRIC_PREFIX) or len(key) > METRIC_KEY_MAX_CHARS or user >= MAX_USER_METRICS:
                continue
        try:
            number = float(metadata[key])
        except (TypeError, ValueError):
            continue
        if math.isfinite(number) and abs(number) <= METRIC_BOUND:
            metrics[key] = number
            user += key.startswith(USER_METRIC_PREFIX)
    return metrics


def decode_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a (validated) safetensors file as float32 tensors."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise WireError(400, "safetensors header has duplicate tensor names")
    return dict(pairs)


def parse_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Check the structure of a safetensors file; return ``(tensors, metadata)`` from its header.

    Raises :class:`WireError` (400) for anything that is not a well-formed safetensors file.
    """
    header, metadata, _data_start = _parse_header(path)
    return header, metadata


def _parse_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """:func:`parse_header`, plus the file offset where the tensor data starts."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise WireError(400, "body is not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise WireError(400, f"safetensors header length {header_len} exceeds the body ({size} bytes)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except WireError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WireError(400, f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError(400, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise WireError(400, "safetensors __metadata__ must map strings to strings")
    data_len = size - 8 - header_len
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WireError(400, f"tensor {name!r}: header entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in KNOWN_DTYPE_SIZES:
            raise WireError(400, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**40 for d in shape):
            raise WireError(400, f"tensor {name!r}: shape must be a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise WireError(400, f"tensor {name!r}: data_offsets {offsets!r} out of range for {data_len} data bytes")
        if offsets[1] - offsets[0] != math.prod(shape) * KNOWN_DTYPE_SIZES[dtype]:
            raise WireError(400, f"tensor {name!r}: data_offsets do not match its shape and dtype")
        spans.append((offsets[0], offsets[1], name))
    # The spans must tile the data exactly: no overlap, no hole, nothing trailing.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise WireError(400, f"tensor {name!r}: data overlaps another tensor or leaves a gap")
        position = end
    if position != data_len:
        raise WireError(400, f"safetensors data is {data_len} bytes but the tensors cover {position}")
    return header, metadata, 8 + header_len


class TensorFile:
    """The tensors of a safetensors file, read one at a time with positioned reads (no memory map).

    A memory map (``safe_open``) keeps every page it has touched resident until it is closed, so
    reading K files through maps makes a process's resident memory grow with K. Here each
    :meth:`get` copies one tensor into fresh memory, freed as soon as the tensor is dropped. The
    file's structure is checked by :func:`parse_header` when it is opened (:class:`WireError`, 400).
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.header, self.metadata, self._data_start = _parse_header(self.path)
        self._fd: int | None = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def keys(self) -> list[str]:
        """Tensor names, sorted (as ``safe_open(...).keys()`` lists them)."""
        return sorted(self.header)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The named tensor, in the file's dtype; read into ``out`` when it has that dtype and shape."""
        info = self.header[name]
        code = info["dtype"]
        if code not in TORCH_DTYPES:
            raise WireError(400, f"tensor {name!r}: dtype {code} cannot be read")
        dtype = TORCH_DTYPES[code]
        if out is not None and out.dtype == dtype and list(out.shape) == info["shape"] and out.is_contiguous():
            tensor = out
        else:
            tensor = torch.empty(info["shape"], dtype=dtype)
        begin, end = info["data_offsets"]
        if end > begin:
            self._read_into(tensor.view(-1).view(torch.uint8).numpy(), self._data_start + begin)
        return tensor

    def get_range(self, name: str, begin: int, end: int) -> torch.Tensor:
        """Entries ``[begin, end)`` of the named tensor, flattened, in the file's dtype: a slice of a packed tensor
        read without reading the rest."""
        info = self.header[name]
        code = info["dtype"]
        if code not in TORCH_DTYPES:
            raise WireError(400, f"tensor {name!r}: dtype {code} cannot be read")
        numel = math.prod(info["shape"])
        if not 0 <= begin <= end <= numel:
            raise WireError(400, f"tensor {name!r}: range [{begin}, {end}) is outside its {numel} entries")
        tensor = torch.empty(end - begin, dtype=TORCH_DTYPES[code])
        if end > begin:
            size = KNOWN_DTYPE_SIZES[code]
            self._read_into(tensor.view(torch.uint8).numpy(), self._data_start + info["data_offsets"][0] + begin * size)
        return tensor

    def _read_into(self, buffer, offset: int) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            count = os.preadv(self._fd, [view[done:]], offset + done)
            if count <= 0:
                raise WireError(400, f"{self.path} ended before its tensor data")
            done += count

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:  # also after a failed __init__
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def validate_tensors_file(
    path: str | Path, expected: Mapping[str, tuple[int, ...]], wire_dtype: str
) -> dict[str, str]:
    """Validate an upload against the expected names and shapes; return its metadata.

    400 for a malformed file; 422 for tensors that do not match (names, shapes, dtype) or are
    not finite.
    """
    header, metadata = parse_header(path)
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise WireError(422, f"tensor names do not match the global adapter: missing {missing[:5]}, unexpected {extra[:5]}"
                             + (" ..." if len(missing) > 5 or len(extra) > 5 else ""))
    code = DTYPE_CODE[wire_dtype]
    for name, info in header.items():
        if info["dtype"] != code:
            raise WireError(422, f"tensor {name!r} has dtype {info['dtype']}, the federation's wire dtype is {code}")
        if tuple(info["shape"]) != tuple(expected[name]):
            raise WireError(422, f"tensor {name!r} has shape {info['shape']}, expected {list(expected[name])}")
    try:
        with safe_open(str(path), framework="pt"):
            pass  # the library's own header checks, beyond the ones above (e.g. lone surrogates)
    except SafetensorError as exc:
        raise WireError(400, f"not a valid safetensors file: {exc}") from None
    # Read one tensor at a time (no memory map: a large upload never becomes resident all at once).
    with TensorFile(path) as f, torch_threads(1):
        for name in header:
            if not all_finite(f.get(name)):
                raise WireError(422, f"tensor {name!r} has NaN or infinite values")
    return metadata


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite: exactly when its minimum and maximum are (both propagate NaN).

    One pass with no temporary, about 4× faster than ``torch.isfinite(tensor).all()``.
    """
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
