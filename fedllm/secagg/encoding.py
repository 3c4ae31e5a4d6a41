"""Fixed-point encoding of a weight-premultiplied update into the ring Z_{2^bits}, and its error bound.

Client i with weight p_i (its share of the round's samples, Σ_i p_i = 1 over the sampled clients) and delta
x_i, every coordinate clipped to [-c, c] (c = ``--secagg_clip``), sends the integers::

    e_i = round(s · p_i · x_i) mod 2^bits,   s = 2^(bits-2) / c     (one per coordinate)
    w_i = round(s_w · p_i)     mod 2^bits,   s_w = 2^(bits-2)        (the weight, one more coordinate)

The server adds the survivors' vectors U mod 2^bits and reads the sums as signed integers: since
|Σ_U e_i| ≤ s·c·P + m/2 = 2^(bits-2)·P + m/2 < 2^(bits-1) (P = Σ_U p_i ≤ 1, m = |U| < 2^(bits-2)) and the same
for Σ w_i, no sum wraps. The mean is μ̂ = (Σ e_i / s) / (Σ w_i / s_w). Each rounding is at most 1/2, so with μ the
exact weighted mean Σ_U p_i x_i / P::

    |μ̂ - μ| ≤ (m/(2s) + c·m/(2s_w)) / (P - m/(2s_w)) = m·c / (2^(bits-2)·P - m/2)

per coordinate. With the defaults (bits 32, c = 1) that is ≤ 1e-6 whenever m/P ≤ 1073: e.g. any round of up to
1,000 clients with no dropout, or 100 clients of which those answering hold ≥ 10% of the weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FixedPoint:
    """The ring Z_{2^bits} (stored as uint32 for bits ≤ 32, else uint64) and the scales of the encoding."""

    bits: int
    clip: float

    def __post_init__(self):
        if not 8 <= self.bits <= 62:
            raise ValueError(f"--secagg_bits must be in [8, 62], got {self.bits}")
        if not self.clip > 0:
            raise ValueError(f"--secagg_clip must be > 0, got {self.clip}")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32) if self.bits <= 32 else np.dtype(np.uint64)

    @property
    def modulus_mask(self) -> int:
        return (1 << self.bits) - 1

    @property
    def weight_scale(self) -> float:
        return float(2 ** (self.bits - 2))

    @property
    def scale(self) -> float:
        return self.weight_scale / self.clip

    def reduce(self, vector: np.ndarray) -> np.ndarray:
        """``vector`` mod 2^bits in place (a no-op when the ring fills the storage width)."""
        if self.bits not in (32, 64):
            np.bitwise_and(vector, self.dtype.type(self.modulus_mask), out=vector)
        return vector

    def encode(self, values: np.ndarray, weight: float, chunk: int = 1 << 16) -> tuple[np.ndarray, int]:
        """[e_i..., w_i] for the flat float ``values`` and weight p_i; also how many coordinates were clipped.

        In float64 (s·p_i·x needs up to 2^(bits-2) exact), a cache-sized chunk at a time.
        """
        if not 0 < weight <= 1:
            raise ValueError(f"the weight p_i must be in (0, 1], got {weight}")
        flat = np.asarray(values).ravel()
        out = np.empty(flat.size + 1, dtype=self.dtype)
        scaled = np.empty(chunk, dtype=np.float64)
        integers = np.empty(chunk, dtype=np.int64)
        clipped = 0
        for start in range(0, flat.size, chunk):
            part = flat[start:start + chunk]
            f, i = scaled[:part.size], integers[:part.size]
            np.copyto(f, part)
            clipped += int(np.count_nonzero(np.abs(f) > self.clip))
            np.clip(f, -self.clip, self.clip, out=f)
            f *= self.scale * weight
            np.rint(f, out=f)
            np.copyto(i, f, casting="unsafe")  # exact: |f| ≤ 2^(bits-2)
            np.copyto(out[start:start + part.size], i, casting="unsafe")  # two's complement: i mod 2^width
        out[-1] = round(self.weight_scale * weight)
        return self.reduce(out), clipped

    def signed(self, total: np.ndarray) -> np.ndarray:
        """Ring elements as the signed integers in [-2^(bits-1), 2^(bits-1))."""
        values = total.astype(np.int64)
        values[values >= 1 << (self.bits - 1)] -= 1 << self.bits
        return values

    def decode_mean(self, total: np.ndarray) -> tuple[np.ndarray, float]:
        """(μ̂ as float32, P = Σ_U p_i) from the unmasked sum of the survivors' vectors."""
        values = self.signed(total)
        weight = float(values[-1]) / self.weight_scale
        if weight <= 0:
            raise ValueError("the summed weight is not positive: the sum did not unmask")
        return (values[:-1].astype(np.float64) / (self.scale * weight)).astype(np.float32), weight

    def error_bound(self, participants: int, weight: float) -> float:
        """The bound m·c / (2^(bits-2)·P - m/2) on |μ̂ - μ| per coordinate."""
        return participants * self.clip / (self.weight_scale * weight - participants / 2)
