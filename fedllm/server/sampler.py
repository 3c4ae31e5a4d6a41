"""The one place clients are chosen for a round (as Flower's ``ClientManager.sample``).

Round start, a re-sample at the deadline, an operator's abort and a removal that empties a round all
draw here, so they agree on the rules: a draw never asks for more clients than are eligible (joined
and not removed), and every draw is seeded by the federation's seed and a key naming the draw, so
a restart or a simulation of the same federation draws the same clients.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable


class ClientSampler:
    """Seeded draws of up to ``sample_size`` clients out of the eligible ones.

    With ``poisson_rate`` q a new round instead includes each eligible client independently with probability q
    (``--client_sampling poisson``, what the DP accountant's Poisson analysis assumes); such a round may be empty.
    """

    def __init__(self, seed: int, sample_size: int, poisson_rate: float | None = None):
        self.seed = seed
        self.sample_size = sample_size
        self.poisson_rate = poisson_rate

    def _draw(self, candidates: Iterable[str], k: int, key: str) -> list[str]:
        pool = sorted(set(candidates))
        return sorted(random.Random(f"{self.seed}:{key}").sample(pool, min(k, len(pool))))

    def size(self, eligible: Collection[str]) -> int:
        """How many clients a round samples: ``--sample_clients``, or every eligible client when fewer are left."""
        return min(self.sample_size, len(eligible))

    def sample(self, eligible: Collection[str], round_number: int) -> list[str]:
        """The clients of a new round."""
        if self.poisson_rate is not None:
            rng = random.Random(f"{self.seed}:{round_number}:poisson")
            return [c for c in sorted(set(eligible)) if rng.random() < self.poisson_rate]
        return self._draw(eligible, self.size(eligible), str(round_number))

    def redraw(self, eligible: Collection[str], round_number: int, attempt: int) -> list[str]:
        """A fresh sample for a round that starts over (an operator's abort, or a sample emptied by removals)."""
        return self._draw(eligible, self.size(eligible), f"{round_number}:redraw{attempt}")

    def replace_stragglers(self, eligible: Collection[str], sampled: Collection[str], submitted: Collection[str],
                           round_number: int, attempt: int) -> list[str]:
        """Keep the clients that submitted; replace the others by eligible clients not sampled yet.

        With too few fresh clients, stragglers that are still eligible keep their places.
        """
        eligible = set(eligible)
        kept = sorted(set(submitted) & eligible)
        needed = max(self.size(eligible) - len(kept), 0)
        fresh = self._draw(eligible - set(sampled), needed, f"{round_number}:resample{attempt}")
        stragglers = sorted((set(sampled) & eligible) - set(kept))
        return sorted(kept + fresh + stragglers[: needed - len(fresh)])
