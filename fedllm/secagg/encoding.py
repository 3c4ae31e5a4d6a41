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

Summed coordinates (SCAFFOLD's control-variate deltas Δc_i, ``summed_from`` on): the server needs their plain sum
Σ_U Δc_i (its c moves by (1/N)·Σ_U Δc_i, whatever the sample weights), so the coordinates from ``summed_from`` on are
premultiplied by the public weight 1/n (n = the attempt's clients) instead of p_i::

    e_i = round(s · x_i / n) mod 2^bits,   Σ̂ = n · Σ_U e_i / s

|Σ_U e_i| ≤ s·c·m/n + m/2 < 2^(bits-1) again, and each of the m roundings is at most 1/2, so per coordinate::

    |Σ̂ - Σ_U x_i| ≤ n·m/(2s) = n·m·c / 2^(bits-1)

(≤ 1.2e-8 for 5 clients at the defaults; SCAFFOLD's c then errs by that / N).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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

    def encode(self, values: np.ndarray, weight: float, chunk: int = 1 << 16, summed_from: int | None = None,
               clients: int = 1) -> tuple[np.ndarray, int]:
        """[e_i..., w_i] for the flat float ``values`` and weight p_i; also how many coordinates were clipped.

        The coordinates from ``summed_from`` on are premultiplied by 1/``clients`` instead (their sum is wanted).
        In float64 (s·p_i·x needs up to 2^(bits-2) exact), a cache-sized chunk at a time.
        """
        if not 0 < weight <= 1:
            raise ValueError(f"the weight p_i must be in (0, 1], got {weight}")
        flat = np.asarray(values).ravel()
        if summed_from is not None:
            weighted, summed = self.encode(flat[:summed_from], weight, chunk)
            tail, clipped = self.encode(flat[summed_from:], 1 / clients, chunk)
            return np.concatenate([weighted[:-1], tail[:-1], weighted[-1:]]), summed + clipped
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

    def decode_mean(self, total: np.ndarray, summed_from: int | None = None,
                    clients: int = 1) -> tuple[np.ndarray, float]:
        """(μ̂ as float32, P = Σ_U p_i) from the unmasked sum of the survivors' vectors; with ``summed_from``, the
        coordinates from there on are the plain sums Σ̂ = n·Σ_U e_i / s (n = ``clients``)."""
        values = self.signed(total)
        weight = float(values[-1]) / self.weight_scale
        if weight <= 0:
            raise ValueError("the summed weight is not positive: the sum did not unmask")
        decoded = values[:-1].astype(np.float64) / (self.scale * weight)
        if summed_from is not None:
            decoded[summed_from:] = values[summed_from:-1] * (clients / self.scale)
        return decoded.astype(np.float32), weight

    def error_bound(self, participants: int, weight: float) -> float:
        """The bound m·c / (2^(bits-2)·P - m/2) on |μ̂ - μ| per coordinate."""
        return participants * self.clip / (self.weight_scale * weight - participants / 2)

    def sum_error_bound(self, participants: int, clients: int) -> float:
        """The bound n·m·c / 2^(bits-1) on |Σ̂ - Σ_U x_i| per summed coordinate."""
        return clients * participants * self.clip / 2 ** (self.bits - 1)


def encoded_order(spec: Mapping[str, Any], summed: Iterable[str]) -> tuple[list[str], int | None]:
    """The tensors of an encoded update in order (the weighted ones sorted, then the summed ones sorted) and the
    coordinate where the summed ones start (None without any); the client and the server both use it."""
    summed = set(summed)
    weighted = sorted(set(spec) - summed)
    if not summed:
        return weighted, None
    return weighted + sorted(summed), sum(int(np.prod(spec[n])) for n in weighted)
