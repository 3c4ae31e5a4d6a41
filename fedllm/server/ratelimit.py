"""Request rate limit: one token bucket per identity, shared by every worker process of the server.

The key is the authenticated identity (a client id, the viewer or the admin) or, on a server without
``--auth_tokens``, the peer's address -- never a client id a request merely claims, which an attacker
could rotate. The buckets live in ``STATE_DIR/ratelimit.db`` (SQLite, no fsync: a crash only forgets
recent requests), so W workers together allow ``rate`` requests per second per key, with bursts of
twice that; rows of keys idle for an hour are pruned.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

PRUNE_EVERY = 1000  # requests between deletions of idle buckets
IDLE_SECONDS = 3600.0


class RateLimiter:
    def __init__(self, path: str | Path, rate: float):
        self.path = Path(path)
        self.rate = rate
        self.burst = max(2.0 * rate, 1.0)
        self._local = threading.local()
        self._count = 0
        if rate > 0:
            self._db().execute("CREATE TABLE IF NOT EXISTS buckets (key TEXT PRIMARY KEY, tokens REAL NOT NULL, "
                               "at REAL NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")
            self._local.db = db
        return db

    def allow(self, key: str) -> float:
        """0 if the request may go ahead, else the seconds to wait before retrying."""
        if self.rate <= 0:
            return 0.0
        db = self._db()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT tokens, at FROM buckets WHERE key = ?", (key,)).fetchone()
            tokens, at = row if row else (self.burst, now)
            tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            db.execute("INSERT OR REPLACE INTO buckets (key, tokens, at) VALUES (?, ?, ?)",
                       (key, tokens - 1.0 if wait == 0.0 else tokens, now))
            self._count += 1
            if self._count % PRUNE_EVERY == 0:
                db.execute("DELETE FROM buckets WHERE at < ?", (now - IDLE_SECONDS,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return wait
