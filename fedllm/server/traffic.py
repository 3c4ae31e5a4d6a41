"""Communication accounting: bytes each client sent and received, the run's total, and ``--communication_budget_mb``.

Received bytes are the accepted upload bodies (the ``updates`` rows, as ``/v1/history``'s ``bytes_received``);
sent bytes are the global adapters served to joined clients (``GET /v1/global`` answered with a body, at the size of
the file sent: the quantized one for ``?encoding=compressed``; a 304 is free), each counted in the round open when
it was served. The budget covers both: at 80% the federation warns
once (event ``communication_budget_warning``), and a round does not start once the total reached the budget
(the federation finishes early, as when the privacy budget is spent).
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from ..compression.config import BUDGET_WARNING_FRACTION
from ..config import FederationArguments
from .store import Store

log = logging.getLogger("fedllm.server")

WARNED_KEY = "communication_budget_warned"  # meta: the round at which the 80% warning was given


class TrafficLedger:
    """The bytes of one federation's run, and its budget."""

    def __init__(self, store: Store, config: FederationArguments):
        self.store = store
        self.budget = config.budget_bytes()

    def record_download(self, client_id: str, size: int) -> None:
        """Count a served global adapter of ``size`` bytes, as sent (bookkeeping only: a failure is logged, never
        fails the download)."""
        try:
            with self.store.transaction() as db:
                if client_id not in self.store.clients(db):
                    return  # only joined clients: made-up ids leave no rows
                current = self.store.current_round(db)
                self.store.add_download(db, current.round if current else 0, client_id, size)
        except Exception as exc:
            log.warning("could not count a download by %s: %s", client_id, exc)

    def status(self, db: sqlite3.Connection) -> dict[str, Any]:
        """``GET /v1/round``'s ``communication``: totals of the run, and the budget's state."""
        traffic = self.store.traffic(db)
        sent = sum(t["sent"] for t in traffic.values())
        received = sum(t["received"] for t in traffic.values())
        total = sent + received
        used = total / self.budget if self.budget else None
        state = "unlimited" if used is None else "exhausted" if used >= 1 else \
            "warning" if used >= BUDGET_WARNING_FRACTION else "ok"
        return {"bytes_sent": sent, "bytes_received": received, "total_bytes": total, "budget_bytes": self.budget,
                "budget_used": used, "budget_state": state}

    def allows_round(self, db: sqlite3.Connection, round_number: int) -> str | None:
        """None when round ``round_number`` may start; else why not. Warns once when 80% of the budget is spent."""
        if not self.budget:
            return None
        status = self.status(db)
        if status["budget_state"] == "exhausted":
            return (f"the communication budget --communication_budget_mb {self.budget / 1e6:g} is spent "
                    f"({status['total_bytes']} bytes sent and received)")
        if status["budget_state"] == "warning" and self.store.get_meta(db, WARNED_KEY) is None:
            self.store.set_meta(db, WARNED_KEY, round_number)
            self.store.add_event(db, "federation", "communication_budget_warning",
                                 {"round": round_number, "total_bytes": status["total_bytes"],
                                  "budget_bytes": self.budget})
            log.warning("%.0f%% of the communication budget (%d of %d bytes) is spent before round %d",
                        100 * status["budget_used"], status["total_bytes"], self.budget, round_number)
        return None
