"""Update codecs: a dense float32 tensor ↔ a few named 1-D parts, and the checks a server runs on them.

Every codec maps one tensor ``x`` (``n`` entries, flattened) to named *parts* with dtypes and lengths fixed by
``n`` and the federation's settings (:meth:`Codec.layout`), so the server knows each part's exact size before it
reads a byte. In a file, each part name is one safetensors tensor: every adapter tensor's part concatenated in
sorted name order (:mod:`.updates`).

Blockwise absmax quantization (``int8``, ``nf4``, ``fp4``; bitsandbytes' ``quantize_blockwise`` /
``quantize_4bit`` layout): ``x`` is cut into ``B = --compression_block_size`` consecutive values (the
last block may be short); block ``b`` keeps ``s_b = max_j |x_j|`` as float32 (part ``absmax``, ``⌈n/B⌉``
values) and each value as the index of the code nearest to ``x_j / s_b`` in a table ``T ⊂ [−1, 1]``.
Decoding is ``x̂_j = T[q_j] · s_b``, so ``|x_j − x̂_j| ≤ ε_T · s_b`` with ``ε_T`` half the widest gap
between neighbouring codes (:attr:`BlockwiseCodec.error_per_absmax`):

* ``int8``: the linear code ``T = {k/127 : k = −127..127}`` stored as int8 (part ``q``, ``n`` bytes),
  ``ε = 1/254``;
* ``nf4``: bitsandbytes' NormalFloat4 table (QLoRA; quantiles of N(0, 1)), ``ε = (1 − 0.69619)/2 ≈ 0.1519``;
* ``fp4``: bitsandbytes' FP4 table (1 sign, 2 exponent, 1 mantissa bit; ``{0, 0.0625, 2, 3, 4, 6, 8, 12}/12``
  and their negatives), ``ε = (12 − 8)/24 = 1/6``;

the 4-bit codes packed two per byte, the first value in the high nibble (bitsandbytes' packing), ``⌈n/2⌉``
bytes (part ``q``). ``topk``: the ``k = max(1, ⌈f·n⌉)`` entries of largest magnitude, ``f = --topk_fraction``,
as strictly increasing int32 indices (part ``idx``; int64 for a tensor past 2³¹ − 1 entries) and their
values in the wire dtype (part ``val``); the others decode to 0, so ``‖x − x̂‖² ≤ (1 − k/n)·‖x‖²`` (a contraction, which bounds error feedback's residual).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..wire import DTYPE_CODE, WIRE_DTYPES, WireError, all_finite

# bitsandbytes.functional.get_4bit_type("nf4"): the NormalFloat4 table, in code order.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes.functional.get_4bit_type("fp4"): bit patterns 0b0000..0b1111 (sign bit first), divided by 12.
FP4_CODE = tuple(v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                    -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0))

Parts = dict[str, torch.Tensor]
Layout = dict[str, tuple[str, list[int]]]  # part -> (safetensors dtype code, shape)


class Codec(ABC):
    """How one tensor travels compressed. Subclasses are pure torch; nothing here reads files."""

    name: str

    @abstractmethod
    def layout(self, numel: int, wire_dtype: str) -> Layout:
        """The parts of a tensor of ``numel`` entries: their dtype codes and shapes, exactly."""

    @abstractmethod
    def encode(self, x: torch.Tensor, wire_dtype: str) -> Parts:
        """The parts of ``x`` (any shape; read flattened, as float32)."""

    @abstractmethod
    def decode(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """The float32 tensor of ``shape`` the parts stand for (they are :meth:`check`-ed)."""

    @abstractmethod
    def check(self, tensor: str, parts: Mapping[str, torch.Tensor], numel: int) -> None:
        """Raise :class:`~fedllm.wire.WireError` (422) for parts the layout allows but no encoder writes."""

    def tag(self) -> str:
        """What an upload's ``compression`` metadata must say: the codec and its settings."""
        return self.name


class BlockwiseCodec(Codec):
    """Blockwise absmax quantization to the codes of ``table`` (see the module docstring)."""

    def __init__(self, name: str, table: tuple[float, ...], block_size: int):
        self.name = name
        self.block_size = int(block_size)
        self.table = torch.tensor(table, dtype=torch.float32)
        ordered = sorted(set(table))
        self.error_per_absmax = max(b - a for a, b in zip(ordered, ordered[1:], strict=False)) / 2
        # Nearest code by bucketing x/s between the midpoints of the sorted distinct values; -0 maps to code of 0.
        self._sorted = torch.tensor(ordered, dtype=torch.float32)
        self._midpoints = (self._sorted[1:] + self._sorted[:-1]) / 2
        self._code_of_sorted = torch.tensor([table.index(v) for v in ordered], dtype=torch.uint8)

    def tag(self) -> str:
        return f"{self.name}/{self.block_size}"

    def blocks(self, numel: int) -> int:
        return math.ceil(numel / self.block_size)

    def layout(self, numel: int, wire_dtype: str) -> Layout:
        return {"q": ("U8", [math.ceil(numel / 2)]), "absmax": ("F32", [self.blocks(numel)])}

    def _blocked(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` zero-padded to whole blocks, as rows of ``block_size``."""
        pad = self.blocks(flat.numel()) * self.block_size - flat.numel()
        return F.pad(flat, (0, pad)).view(-1, self.block_size)

    def _absmax(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.abs().amax(dim=1) if blocks.numel() else torch.zeros(0)

    def encode(self, x: torch.Tensor, wire_dtype: str) -> Parts:
        flat = x.detach().reshape(-1).to("cpu", torch.float32)
        numel = flat.numel()
        blocks = self._blocked(flat)
        absmax = self._absmax(blocks)
        inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
        normalized = (blocks * inverse[:, None]).clamp_(-1, 1).reshape(-1)[:numel]
        codes = self._code_of_sorted[torch.bucketize(normalized, self._midpoints)]
        if numel % 2:
            codes = torch.cat([codes, self._code_of_sorted[torch.bucketize(torch.zeros(1), self._midpoints)]])
        packed = (codes[0::2] << 4) | codes[1::2]
        return {"q": packed.contiguous(), "absmax": absmax.contiguous()}

    def codes(self, parts: Mapping[str, torch.Tensor], numel: int) -> torch.Tensor:
        packed = parts["q"]
        return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:numel]

    def decode(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        values = self.table[self.codes(parts, numel).long()]
        scaled = self._blocked(values).mul_(parts["absmax"].to(torch.float32)[:, None])
        return scaled.reshape(-1)[:numel].reshape(shape)

    def check(self, tensor: str, parts: Mapping[str, torch.Tensor], numel: int) -> None:
        absmax = parts["absmax"]
        if not all_finite(absmax):
            raise WireError(422, f"tensor {tensor!r}: {self.name} absmax scales are NaN or infinite")
        if absmax.numel() and float(absmax.min()) < 0:
            raise WireError(422, f"tensor {tensor!r}: {self.name} absmax scales are negative")


class Int8Codec(BlockwiseCodec):
    """Linear blockwise int8: ``q = round(127·x/s)`` in [−127, 127]."""

    def __init__(self, block_size: int):
        super().__init__("int8", tuple(k / 127 for k in range(-127, 128)), block_size)

    def layout(self, numel: int, wire_dtype: str) -> Layout:
        return {"q": ("I8", [numel]), "absmax": ("F32", [self.blocks(numel)])}

    def encode(self, x: torch.Tensor, wire_dtype: str) -> Parts:
        flat = x.detach().reshape(-1).to("cpu", torch.float32)
        blocks = self._blocked(flat)
        absmax = self._absmax(blocks)
        scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
        q = blocks.mul(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8).reshape(-1)[:flat.numel()]
        return {"q": q.contiguous(), "absmax": absmax.contiguous()}

    def decode(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        scaled = self._blocked(parts["q"].to(torch.float32)).mul_((parts["absmax"].to(torch.float32) / 127.0)[:, None])
        return scaled.reshape(-1)[:numel].reshape(shape)

    def check(self, tensor: str, parts: Mapping[str, torch.Tensor], numel: int) -> None:
        super().check(tensor, parts, numel)
        if parts["q"].numel() and int(parts["q"].min()) == -128:
            raise WireError(422, f"tensor {tensor!r}: int8 code -128 is outside the code range [-127, 127]")


class TopKCodec(Codec):
    """The ``k`` largest-magnitude entries as (strictly increasing index, value) pairs."""

    name = "topk"

    def __init__(self, fraction: float):
        self.fraction = float(fraction)

    def tag(self) -> str:
        return f"topk/{self.fraction!r}"

    def kept(self, numel: int) -> int:
        return min(numel, max(1, math.ceil(self.fraction * numel))) if numel else 0

    @staticmethod
    def index_code(numel: int) -> str:
        return "I32" if numel <= 2**31 - 1 else "I64"

    def layout(self, numel: int, wire_dtype: str) -> Layout:
        k = self.kept(numel)
        return {"idx": (self.index_code(numel), [k]), "val": (DTYPE_CODE[wire_dtype], [k])}

    def encode(self, x: torch.Tensor, wire_dtype: str) -> Parts:
        flat = x.detach().reshape(-1).to("cpu", torch.float32)
        k = self.kept(flat.numel())
        index = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        dtype = WIRE_DTYPES[DTYPE_CODE[wire_dtype]][0]
        index_dtype = torch.int32 if self.index_code(flat.numel()) == "I32" else torch.int64
        return {"idx": index.to(index_dtype).contiguous(), "val": flat[index].to(dtype).contiguous()}

    def decode(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.zeros(math.prod(shape), dtype=torch.float32)
        out[parts["idx"].long()] = parts["val"].to(torch.float32)
        return out.reshape(shape)

    def check(self, tensor: str, parts: Mapping[str, torch.Tensor], numel: int) -> None:
        index = parts["idx"].long()
        if index.numel():
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= numel:
                raise WireError(422, f"tensor {tensor!r}: topk index {low if low < 0 else high} is outside "
                                     f"[0, {numel})")
            steps = index[1:] - index[:-1]
            if steps.numel() and bool((steps == 0).any()):
                raise WireError(422, f"tensor {tensor!r}: topk indices repeat")
            if steps.numel() and bool((steps < 0).any()):
                raise WireError(422, f"tensor {tensor!r}: topk indices must be strictly increasing")
        if not all_finite(parts["val"]):
            raise WireError(422, f"tensor {tensor!r}: topk values are NaN or infinite")


def get_codec(config) -> Codec | None:
    """The codec ``config.update_compression`` names (None for ``none``); ``config`` has the compression options."""
    name = config.update_compression
    if name == "none":
        return None
    if name == "int8":
        return Int8Codec(config.compression_block_size)
    if name == "nf4":
        return BlockwiseCodec("nf4", NF4_CODE, config.compression_block_size)
    if name == "fp4":
        return BlockwiseCodec("fp4", FP4_CODE, config.compression_block_size)
    if name == "topk":
        return TopKCodec(config.topk_fraction)
    raise ValueError(f"unknown --update_compression {name!r}")


def global_codec(config) -> BlockwiseCodec | None:
    """The codec ``GET /v1/global?encoding=compressed`` quantizes the served global with: the federation's quantizer
    (int8, nf4, fp4), or None (``none``; ``topk``, whose global stays dense: keeping the k largest entries of the
    *model* drops ``‖x − x̂‖² ≤ (1 − k/n)·‖x‖²``, nearly all of it, and a download has no error feedback to
    deliver the rest later)."""
    codec = get_codec(config)
    return codec if isinstance(codec, BlockwiseCodec) else None
