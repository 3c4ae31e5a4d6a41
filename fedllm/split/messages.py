"""The split-learning messages on the wire: safetensors bodies, checked before use on both sides.

* forward request  (client → server): ``hidden`` [B, T, H] in the wire dtype, ``starts`` [B], ``lengths`` [B] and
  ``position_ids`` [B, T] as int64. No token id, no label, no text.
* forward answer   (server → client): ``hidden`` [B, T, H] (h_B).
* backward request (client → server): ``grad`` [B, T, H] (∂loss/∂h_B), of the forward's shape.
* backward answer  (server → client): ``grad`` [B, T, H] (∂loss/∂h_A).

With ``--split_sequence_chunk`` each of them travels cut along T (:mod:`fedllm.split.chunks`), and is this message
again once assembled.

Nothing is unpickled: safetensors' own parser reads the bytes, then every name, dtype, shape, range and value is
checked against what the federation serves (``hidden_size``, ``--seq_length``, the model's positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..wire import DTYPE_CODE, WIRE_DTYPES, all_finite
from .model import MaskInfo

MAX_ROWS = 64  # rows per message; with --seq_length, what bounds a message's size
HEADER_SLACK = 1 << 16
FORWARD_NAMES = frozenset({"hidden", "starts", "lengths", "position_ids"})


class MessageError(ValueError):
    """A split message that is not acceptable; ``malformed`` when it is not even the right tensors."""

    def __init__(self, message: str, *, malformed: bool = False):
        super().__init__(message)
        self.malformed = malformed


@dataclass(frozen=True)
class MessageShape:
    """What the federation allows: the model's hidden size and positions, the longest sequence, the wire dtype."""

    hidden_size: int
    max_positions: int
    seq_length: int
    wire_dtype: str

    @property
    def dtype(self) -> torch.dtype:
        return WIRE_DTYPES[DTYPE_CODE[self.wire_dtype]][0]

    def max_bytes(self, tokens: int | None = None) -> int:
        """The largest acceptable body: MAX_ROWS rows of ``tokens`` (default ``--seq_length``) hidden states and
        positions."""
        element = WIRE_DTYPES[DTYPE_CODE[self.wire_dtype]][1]
        tokens = self.seq_length if tokens is None else tokens
        return MAX_ROWS * tokens * (self.hidden_size * element + 8) + MAX_ROWS * 16 + HEADER_SLACK


def _parse(body: bytes, names: frozenset[str]) -> dict[str, torch.Tensor]:
    try:
        tensors = load_bytes(body)
    except (SafetensorError, ValueError, OverflowError) as exc:
        raise MessageError(f"not a valid safetensors body: {exc}", malformed=True) from None
    if set(tensors) != names:
        raise MessageError(f"expected the tensors {sorted(names)}, got {sorted(tensors)[:8]}", malformed=True)
    return tensors


def _check_hidden(name: str, tensor: torch.Tensor, shape: MessageShape, expected: tuple[int, ...] | None) -> None:
    if tensor.dtype != shape.dtype:
        raise MessageError(f"{name} has dtype {tensor.dtype}, the federation's wire dtype is {shape.wire_dtype}")
    if expected is not None:
        if tuple(tensor.shape) != expected:
            raise MessageError(f"{name} has shape {list(tensor.shape)}, expected {list(expected)}")
    elif tensor.dim() != 3 or not (1 <= tensor.shape[0] <= MAX_ROWS and 1 <= tensor.shape[1] <= shape.seq_length
                                   and tensor.shape[2] == shape.hidden_size):
        raise MessageError(f"{name} has shape {list(tensor.shape)}, expected [B <= {MAX_ROWS}, "
                           f"T <= --seq_length {shape.seq_length}, hidden_size {shape.hidden_size}]")
    if not all_finite(tensor):
        raise MessageError(f"{name} has NaN or infinite values")


def encode_forward(hidden: torch.Tensor, mask: MaskInfo, wire_dtype: str) -> bytes:
    dtype = WIRE_DTYPES[DTYPE_CODE[wire_dtype]][0]
    return save_bytes({"hidden": hidden.detach().to("cpu", dtype).contiguous(),
                       **{k: v.to("cpu", torch.int64).contiguous() for k, v in mask.tensors().items()}})


def decode_forward(body: bytes, shape: MessageShape, cached: int = 0) -> tuple[torch.Tensor, MaskInfo]:
    """h_A and its mask info from a forward request, every value checked. In generation the receiver's KV cache
    holds ``cached`` earlier tokens, so each row's span lies within those and the message's T."""
    tensors = _parse(body, FORWARD_NAMES)
    hidden = tensors["hidden"]
    _check_hidden("hidden", hidden, shape, None)
    batch, seq_len = hidden.shape[:2]
    key_length = cached + seq_len
    for name, expected in (("starts", (batch,)), ("lengths", (batch,)), ("position_ids", (batch, seq_len))):
        tensor = tensors[name]
        if tensor.dtype != torch.int64 or tuple(tensor.shape) != expected:
            raise MessageError(f"{name} must be int64 of shape {list(expected)}, got {tensor.dtype} "
                               f"{list(tensor.shape)}")
    starts, lengths, positions = tensors["starts"], tensors["lengths"], tensors["position_ids"]
    if bool((lengths < 1).any()) or bool((starts < 0).any()) or bool((starts + lengths > key_length).any()):
        raise MessageError(f"each row's span [start, start + length) must be non-empty and within "
                           f"{key_length} tokens")
    if bool((positions < 0).any()) or bool((positions >= shape.max_positions).any()):
        raise MessageError(f"position_ids must be in [0, {shape.max_positions})")
    return hidden, MaskInfo(starts, lengths, positions)


def encode_tensor(name: str, tensor: torch.Tensor, wire_dtype: str) -> bytes:
    dtype = WIRE_DTYPES[DTYPE_CODE[wire_dtype]][0]
    return save_bytes({name: tensor.detach().to("cpu", dtype).contiguous()})


def decode_tensor(body: bytes, name: str, shape: MessageShape, expected: tuple[int, ...]) -> torch.Tensor:
    """The one tensor ``name`` of ``expected`` shape from a backward request or an answer, checked."""
    tensor = _parse(body, frozenset({name}))[name]
    _check_hidden(name, tensor, shape, expected)
    return tensor
