"""Background progress of a federation (deadlines, aggregation) and the health it reports.

Each worker process runs one :class:`BackgroundProgress` thread that calls ``Federation.tick`` every
second, and at once when an upload closed a round. A tick that fails is retried with exponential
backoff (1 s doubling to 32 s), logged with its cause, counted (``fedllm_background_failures_total``)
and recorded in the store, so that every worker -- not only the one that failed -- answers
``/healthz`` with ``degraded`` and the reason, and ``/readyz`` with 503, until a tick succeeds again.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from .store import Store

log = logging.getLogger("fedllm.server")

FAILURE_KEY = "background_failure"
MAX_BACKOFF_EXPONENT = 5
# A failure record no worker has renewed for this long is stale (its worker died or stopped failing unseen).
FAILURE_STALE_SECONDS = 3 * 2**MAX_BACKOFF_EXPONENT


class BackgroundProgress:
    """Ticks ``federation`` in a daemon thread (unless ``start`` is false); ``wake`` makes it tick now."""

    def __init__(self, federation: Any, interval: float = 1.0, *, start: bool = True):
        self.federation = federation
        self.interval = interval
        self.wake = threading.Event()
        self.failures = 0  # consecutive failed ticks of this process
        self.last_error: str | None = None
        self.on_failure: list[Callable[[str], None]] = []
        if start:
            threading.Thread(target=self._run, name="fedllm-progress", daemon=True).start()

    def _run(self) -> None:
        while True:
            self.wake.wait(timeout=self.interval * (2 ** min(self.failures, MAX_BACKOFF_EXPONENT)))
            self.wake.clear()
            self.run_once()

    def run_once(self) -> None:
        """Tick until there is nothing more to do; record how it went."""
        store: Store = self.federation.store
        try:
            while self.federation.tick():
                pass
        except Exception as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("background round progress failed (attempt %d); retrying in %ds", self.failures,
                          self.interval * 2 ** min(self.failures, MAX_BACKOFF_EXPONENT))
            for callback in self.on_failure:
                callback(self.last_error)
            _record(store, {"reason": self.last_error, "failures": self.failures, "pid": os.getpid(),
                            "updated_at": time.time()})
            return
        if self.failures:
            log.warning("background round progress recovered after %d failed attempts", self.failures)
            self.failures, self.last_error = 0, None
            _record(store, None)


def _record(store: Store, failure: dict[str, Any] | None) -> None:
    """Share the failure with the other workers; best effort (a full disk may be the failure itself)."""
    try:
        with store.transaction() as db:
            store.set_meta(db, FAILURE_KEY, failure)
    except Exception as exc:
        log.warning("could not record background progress state: %s", exc)


def health(store: Store, progress: BackgroundProgress | None) -> dict[str, Any]:
    """``{"status": "ok"}``, or ``{"status": "degraded", "reason": ..., "failures": N}``."""
    if progress is not None and progress.failures:
        return {"status": "degraded", "reason": progress.last_error, "failures": progress.failures}
    try:
        failure = store.get_meta(store.read(), FAILURE_KEY)
    except sqlite3.Error as exc:
        return {"status": "degraded", "reason": f"the state database cannot be read: {exc}", "failures": 0}
    if failure and time.time() - failure.get("updated_at", 0) < FAILURE_STALE_SECONDS:
        return {"status": "degraded", "reason": failure.get("reason"), "failures": failure.get("failures", 0)}
    return {"status": "ok"}
