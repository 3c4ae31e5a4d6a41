"""Per-client request rate limit: a token bucket per client id in each worker process.

Each of W gunicorn workers gets ``rate / W`` of the budget, so the whole server allows about
``rate`` requests per second per client without sharing state between processes.
"""

from __future__ import annotations

import threading
import time


class RateLimiter:
    def __init__(self, rate: float, workers: int = 1):
        self.rate = rate / max(1, workers)
        self.burst = max(2.0 * self.rate, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)
        self._lock = threading.Lock()

    def allow(self, client_id: str) -> float:
        """0 if the request may go ahead, else the seconds to wait before retrying."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[client_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[client_id] = (tokens, now)
            return (1.0 - tokens) / self.rate
