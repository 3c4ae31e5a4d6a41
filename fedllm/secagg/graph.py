"""SecAgg+'s neighbour graph (Bell et al. 2020): each client masks with and shares its secrets among k neighbours.

The clients are placed on a ring in an order no one chooses (sorted by SHA-256 of the round's context and the
id) and each is joined to the k/2 nearest on either side: a k-regular circulant graph (k even; an odd k is
rounded up). k ≥ n - 1 is the complete graph, i.e. SecAgg (Bonawitz et al. 2017). Client i's shares go to its
*holders* H(i) = {i} ∪ N(i), of which any t reconstruct its secrets.
"""

from __future__ import annotations

import hashlib
import math


def auto_neighbours(num_clients: int) -> int:
    """``--secagg_neighbours 0``: the complete graph up to 10 clients, then k = 2·⌈2·log2 n⌉ (SecAgg+'s
    O(log n); the constant is ours, chosen so that a neighbourhood keeps ≥ 2 survivors with high probability
    under the dropout rates of the tests, not derived from Bell et al.'s bound)."""
    if num_clients <= 10:
        return max(num_clients - 1, 0)
    return min(num_clients - 1, 2 * math.ceil(2 * math.log2(num_clients)))


def neighbour_graph(clients: list[str], k: int, context: bytes) -> dict[str, list[str]]:
    """Each client's neighbours (sorted), in the k-regular graph described above."""
    n = len(clients)
    if k >= n - 1:
        return {c: sorted(set(clients) - {c}) for c in clients}
    half = (k + 1) // 2
    ring = sorted(clients, key=lambda c: hashlib.sha256(context + b"/" + c.encode()).digest())
    return {c: sorted({ring[(i + d) % n] for d in range(-half, half + 1) if d} - {c}) for i, c in enumerate(ring)}


def threshold_for(spec: float, holders: int) -> int:
    """t from ``--secagg_threshold``: a fraction f in (0, 1) means more than f of the holders,
    t = max(2, ⌊f·|H|⌋ + 1); a whole number ≥ 2 is t itself. Never more than |H|."""
    t = int(spec) if spec >= 1 else max(2, math.floor(spec * holders) + 1)
    return min(t, holders)
