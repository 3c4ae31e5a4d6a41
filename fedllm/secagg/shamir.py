"""Shamir's t-of-n secret sharing over the prime field GF(p), p = 2^521 - 1 (a Mersenne prime).

A secret s < 2^256 (a 32-byte key or seed) is the constant term of a random polynomial f of degree t - 1
over GF(p); holder j gets (x_j, f(x_j)) with distinct x_j ≠ 0. Any t shares give s = f(0) by Lagrange
interpolation; any t - 1 shares are uniformly distributed whatever s is (information-theoretic secrecy).
p > 2^256 so every 32-byte string is a field element.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: bytes, xs: list[int], threshold: int) -> dict[int, bytes]:
    """Shares of ``secret`` for the evaluation points ``xs`` (distinct, 1 <= x < p), any ``threshold`` of which
    reconstruct it."""
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise ValueError(f"need distinct points in [1, p) and 1 <= threshold <= {len(xs)}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in xs}


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for c in reversed(coefficients):  # Horner
        value = (value * x + c) % PRIME
    return value


def combine(shares: Mapping[int, bytes], threshold: int, length: int = 32) -> bytes:
    """The secret from at least ``threshold`` shares {x: f(x)}. Shares beyond the threshold are checked to lie on
    the same polynomial: ValueError when they do not (a corrupted or inconsistent share)."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, {threshold} needed")
    points = {x: int.from_bytes(y, "big") for x, y in shares.items()}
    if any(not 0 < x < PRIME or y >= PRIME for x, y in points.items()):
        raise ValueError("a share is not a field element")
    basis = dict(sorted(points.items())[:threshold])
    for x, y in points.items():
        if x not in basis and _interpolate(basis, x) != y:
            raise ValueError(f"the share at x={x} is inconsistent with the others")
    secret = _interpolate(basis, 0)
    if secret >= 1 << (8 * length):
        raise ValueError("the shares do not encode a secret of this length")
    return secret.to_bytes(length, "big")


def _interpolate(points: Mapping[int, int], at: int) -> int:
    """f(at) for the polynomial of degree len(points) - 1 through ``points`` (Lagrange)."""
    total = 0
    for xj, yj in points.items():
        numerator, denominator = 1, 1
        for xm in points:
            if xm != xj:
                numerator = numerator * (at - xm) % PRIME
                denominator = denominator * (xj - xm) % PRIME
        total = (total + yj * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total
