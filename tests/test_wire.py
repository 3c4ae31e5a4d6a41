"""The wire format: safetensors encode/decode, and strict validation of untrusted uploads.

Malformed files are written by hand: an 8-byte little-endian header length, the JSON header,
then the raw data bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save

from fedllm.wire import (
    MAX_HEADER_BYTES,
    TensorFile,
    WireError,
    decode_file,
    encode,
    parse_header,
    read_metadata,
    sha256_file,
    validate_tensors_file,
)

EXPECTED = {"a": (2, 3), "b": (4,)}


def raw_file(header: dict[str, Any] | bytes | str, data: bytes = b"", header_len: int | None = None) -> bytes:
    """Bytes of a (possibly malformed) safetensors file."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    length = len(header) if header_len is None else header_len
    return struct.pack("<Q", length) + header + data


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def valid_header() -> dict[str, Any]:
    return {
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]},
    }


VALID_DATA = f32(*range(6)) + f32(*range(4))


@pytest.fixture
def write(tmp_path: Path):
    """Write bytes to a fresh file and return its path."""
    counter = iter(range(10**6))

    def _write(body: bytes) -> Path:
        path = tmp_path / f"upload-{next(counter)}.safetensors"
        path.write_bytes(body)
        return path

    return _write


def reject(path: Path, status: int, expected: dict[str, tuple[int, ...]] | None = None,
           wire_dtype: str = "float32", parse_too: bool = True) -> WireError:
    """Assert validation rejects ``path`` with ``status``; parse_header must agree on 400s."""
    with pytest.raises(WireError) as info:
        validate_tensors_file(path, EXPECTED if expected is None else expected, wire_dtype)
    assert info.value.status == status, str(info.value)
    if status == 400 and parse_too:
        with pytest.raises(WireError) as again:
            parse_header(path)
        assert again.value.status == 400
    return info.value


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize(("wire_dtype", "code", "tol"), [
    ("float32", "F32", 0.0), ("bfloat16", "BF16", 1e-2), ("float16", "F16", 1e-3),
])
def test_round_trip(write, wire_dtype: str, code: str, tol: float) -> None:
    torch.manual_seed(0)
    tensors = {"a": torch.randn(2, 3), "b": torch.randn(4, dtype=torch.float64)}
    body = encode(tensors, wire_dtype, metadata={"train_loss": "1.5", "steps": "3"})
    path = write(body)
    header, metadata = parse_header(path)
    assert {k: v["dtype"] for k, v in header.items()} == {"a": code, "b": code}
    assert metadata == {"train_loss": "1.5", "steps": "3"}
    assert validate_tensors_file(path, EXPECTED, wire_dtype) == metadata
    assert read_metadata(path) == metadata
    decoded = decode_file(path)
    assert set(decoded) == {"a", "b"}
    for name, tensor in tensors.items():
        assert decoded[name].dtype == torch.float32
        assert decoded[name].shape == tensor.shape
        torch.testing.assert_close(decoded[name], tensor.float(), rtol=tol, atol=tol)
    assert sha256_file(path) == hashlib.sha256(body).hexdigest()


def test_encode_without_metadata_and_noncontiguous(write) -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(3, 2).t()  # not contiguous
    path = write(encode({"a": t, "b": torch.zeros(4)}))
    assert validate_tensors_file(path, EXPECTED, "float32") == {}
    assert torch.equal(decode_file(path)["a"], t)


def test_a_range_reads_only_its_slice_of_a_tensor(write) -> None:
    """TensorFile.get_range: entries [begin, end) of the flattened tensor, at its own offset; out of range is 400."""
    a, b = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.arange(4, dtype=torch.int64) * 7
    with TensorFile(write(save({"a": a, "b": b}))) as f:
        assert torch.equal(f.get_range("a", 1, 5), a.reshape(-1)[1:5]) and torch.equal(f.get_range("b", 3, 4), b[3:])
        assert f.get_range("a", 6, 6).numel() == 0
        for begin, end in [(-1, 2), (2, 1), (0, 7)]:
            with pytest.raises(WireError, match="outside") as info:
                f.get_range("a", begin, end)
            assert info.value.status == 400


def test_hand_written_valid_file_passes(write) -> None:
    path = write(raw_file(valid_header(), VALID_DATA))
    assert validate_tensors_file(path, EXPECTED, "float32") == {}
    meta = {**valid_header(), "__metadata__": {"train_loss": "2.0"}}
    assert validate_tensors_file(write(raw_file(meta, VALID_DATA)), EXPECTED, "float32") == {"train_loss": "2.0"}
    # Header padding with spaces (as the safetensors writer does) is fine.
    assert validate_tensors_file(write(raw_file(json.dumps(valid_header()) + "     ", VALID_DATA)), EXPECTED,
                                 "float32") == {}


# ---------------------------------------------------------------- 400: structure
def test_shorter_than_length_prefix(write) -> None:
    for body in (b"", b"\x01", b"1234567"):
        reject(write(body), 400)


def test_header_length_larger_than_body(write) -> None:
    header = json.dumps(valid_header()).encode()
    reject(write(raw_file(header, VALID_DATA, header_len=len(header) + len(VALID_DATA) + 1)), 400)
    reject(write(struct.pack("<Q", 100) + b"{}"), 400)


def test_gigantic_header_length(write) -> None:
    reject(write(struct.pack("<Q", 2**64 - 1) + b"{}"), 400)
    reject(write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}"), 400)


@pytest.mark.parametrize("header", [
    b"not json at all", b'{"a": ', b"\xff\xfe{}", b"\xef\xbb\xbf{}", b'{"a": 1} trailing', b"[" * 100_000,
])
def test_header_not_json_or_not_utf8(write, header: bytes) -> None:
    reject(write(raw_file(header)), 400)


@pytest.mark.parametrize("header", ["[]", "1", '"str"', "null"])
def test_header_not_an_object(write, header: str) -> None:
    reject(write(raw_file(header)), 400)


def test_duplicate_tensor_names(write) -> None:
    entry = '{"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}'
    reject(write(raw_file(f'{{"b": {entry}, "b": {entry}}}', f32(0, 1, 2, 3))), 400)


def test_unknown_dtype(write) -> None:
    header = valid_header()
    header["b"]["dtype"] = "F128"
    reject(write(raw_file(header, VALID_DATA)), 400)
    header["b"]["dtype"] = 4
    reject(write(raw_file(header, VALID_DATA)), 400)


@pytest.mark.parametrize("shape", [[-4], [4.0], ["4"], [True, 4], 4, None, [2**62, 2**62]])
def test_bad_shape(write, shape: Any) -> None:
    header = valid_header()
    header["b"]["shape"] = shape
    reject(write(raw_file(header, VALID_DATA)), 400)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [4]},  # no offsets
    {"dtype": "F32", "shape": [4], "data_offsets": [24, 40], "extra": 1},
    "not an object",
])
def test_bad_entry_keys(write, entry: Any) -> None:
    header = valid_header()
    header["b"] = entry
    reject(write(raw_file(header, VALID_DATA)), 400)


@pytest.mark.parametrize("offsets", [
    [24, 41],  # past the end of the data
    [-1, 15],
    [40, 24],  # reversed
    [24],
    [24.0, 40.0],
    "24-40",
])
def test_offsets_out_of_range_or_malformed(write, offsets: Any) -> None:
    header = valid_header()
    header["b"]["data_offsets"] = offsets
    reject(write(raw_file(header, VALID_DATA)), 400)


def test_offsets_overlap(write) -> None:
    header = valid_header()
    header["b"]["data_offsets"] = [8, 24]  # inside a's bytes, right size for [4] F32
    reject(write(raw_file(header, VALID_DATA[:24])), 400)


def test_offsets_leave_gap(write) -> None:
    header = valid_header()
    header["b"]["data_offsets"] = [28, 44]
    reject(write(raw_file(header, VALID_DATA + b"\0" * 4)), 400)


def test_trailing_bytes(write) -> None:
    reject(write(raw_file(valid_header(), VALID_DATA + b"\0" * 4)), 400)


def test_offsets_do_not_match_shape(write) -> None:
    header = valid_header()
    header["b"]["shape"] = [3]  # 12 bytes, but the span is 16
    reject(write(raw_file(header, VALID_DATA)), 400)
    header = valid_header()
    header["b"]["dtype"] = "F16"  # 8 bytes, but the span is 16
    reject(write(raw_file(header, VALID_DATA)), 400)


@pytest.mark.parametrize("metadata", [[], "", 0, False, ["a"], {"k": 1}, {"k": None}, {"k": ["v"]}])
def test_bad_metadata(write, metadata: Any) -> None:
    header = {**valid_header(), "__metadata__": metadata}
    reject(write(raw_file(header, VALID_DATA)), 400)


def test_null_metadata_is_no_metadata(write) -> None:
    header = {**valid_header(), "__metadata__": None}
    assert validate_tensors_file(write(raw_file(header, VALID_DATA)), EXPECTED, "float32") == {}


def test_what_the_library_refuses_is_400_not_500(write) -> None:
    """A lone surrogate passes Python's JSON parser but not the safetensors library's."""
    header = json.dumps(valid_header())[:-1] + ', "__metadata__": {"x": "\\ud800"}}'
    reject(write(raw_file(header, VALID_DATA)), 400, parse_too=False)


# ---------------------------------------------------------------- 422: content
def test_missing_and_extra_names(write) -> None:
    only_a = {"a": valid_header()["a"]}
    assert "missing ['b']" in str(reject(write(raw_file(only_a, VALID_DATA[:24])), 422))
    extra = {**valid_header(), "c": {"dtype": "F32", "shape": [1], "data_offsets": [40, 44]}}
    assert "unexpected ['c']" in str(reject(write(raw_file(extra, VALID_DATA + f32(1))), 422))
    renamed = write(encode({"a": torch.zeros(2, 3), "B": torch.zeros(4)}))
    reject(renamed, 422)


def test_wrong_shape(write) -> None:
    reject(write(encode({"a": torch.zeros(3, 2), "b": torch.zeros(4)})), 422)
    reject(write(encode({"a": torch.zeros(6), "b": torch.zeros(4)})), 422)
    reject(write(encode({"a": torch.zeros(2, 3), "b": torch.zeros(4, 1)})), 422)


def test_zero_size_tensor_where_nonzero_expected(write) -> None:
    header = valid_header()
    header["b"] = {"dtype": "F32", "shape": [0], "data_offsets": [24, 24]}
    reject(write(raw_file(header, VALID_DATA[:24])), 422)
    reject(write(encode({"a": torch.zeros(2, 0), "b": torch.zeros(4)})), 422)


def test_wrong_dtype(write) -> None:
    tensors = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    f64 = {k: v.double() for k, v in tensors.items()}
    reject(write(save(f64)), 422)
    reject(write(encode(tensors, "bfloat16")), 422)
    reject(write(encode(tensors, "float16")), 422)
    reject(write(encode(tensors, "float32")), 422, wire_dtype="bfloat16")
    ints = {"a": torch.zeros(2, 3, dtype=torch.int32), "b": torch.zeros(4, dtype=torch.int32)}
    reject(write(save(ints)), 422)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16", "float16"])
def test_non_finite(write, bad: float, wire_dtype: str) -> None:
    b = torch.zeros(4)
    b[2] = bad
    error = reject(write(encode({"a": torch.zeros(2, 3), "b": b}, wire_dtype)), 422, wire_dtype=wire_dtype)
    assert "'b'" in str(error)


def test_float16_overflow_is_not_finite(write) -> None:
    """A value beyond float16's range becomes inf on the wire, and is refused."""
    path = write(encode({"a": torch.full((2, 3), 1e6), "b": torch.zeros(4)}, "float16"))
    reject(path, 422, wire_dtype="float16")
