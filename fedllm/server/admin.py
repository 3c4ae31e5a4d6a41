"""Operator actions (``/v1/admin/*``): pause, resume, abort the round, remove a client; each one audited.

Every action is one transaction that also appends an event (who, what, when) to the audit log that
``GET /v1/admin/events`` returns. Re-sampling and removal go through the round engine, so they obey
the same rules as a round's own life cycle.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .errors import NoRoundToAbort, UnknownClient
from .rounds import RoundEngine
from .store import Store

log = logging.getLogger("fedllm.server")


class OperatorActions:
    """What an operator holding the admin token may do to a running federation."""

    def __init__(self, store: Store, rounds: RoundEngine):
        self.store = store
        self.rounds = rounds

    def pause(self, actor: str) -> None:
        with self.store.transaction() as db:
            if not self.store.get_meta(db, "paused"):
                self.store.set_meta(db, "paused", time.time())
                self.store.add_event(db, actor, "pause", {})
        log.warning("federation paused by %s", actor)

    def resume(self, actor: str) -> None:
        with self.store.transaction() as db:
            paused_at = self.store.get_meta(db, "paused")
            if paused_at:
                current = self.store.current_round(db)
                if current and current.status == "training" and current.deadline is not None:
                    # The round's clock stopped while paused.
                    self.store.set_deadline(db, current.round, current.deadline + time.time() - paused_at)
                self.store.set_meta(db, "paused", None)
                self.store.add_event(db, actor, "resume", {"paused_seconds": time.time() - paused_at})
        log.warning("federation resumed by %s", actor)

    def abort_round(self, actor: str) -> None:
        """Discard the current round's updates and restart it with a new sample."""
        with self.store.transaction() as db:
            current = self.store.current_round(db)
            if current is None or current.status != "training" or self.rounds.phase(db, current) == "finished":
                raise NoRoundToAbort("only a round that is still training can be aborted")
            discarded = len(self.store.updates(db, current.round))
            paths = self.rounds.discard_updates(db, current.round)
            sampled = self.rounds.redraw(db, current)
            self.store.add_event(db, actor, "abort_round", {"round": current.round, "discarded": discarded,
                                                            "sampled": sampled})
        self._delete(paths)
        log.warning("round %d aborted by %s: %d updates discarded, re-sampled %s", current.round, actor, discarded,
                    sampled)

    def remove_client(self, actor: str, client_id: str) -> None:
        """Remove a client: it can no longer join or push, and it leaves the open round with its update."""
        with self.store.transaction() as db:
            if client_id not in self.store.clients(db):
                raise UnknownClient(f"no client {client_id!r} has joined")
            self.store.remove_client(db, client_id)
            paths = self.rounds.drop_client(db, client_id)
            self.store.add_event(db, actor, "remove_client", {"client_id": client_id, "discarded": len(paths)})
        self._delete(paths)
        log.warning("client %s removed by %s", client_id, actor)

    def events(self) -> list[dict[str, Any]]:
        return self.store.events(self.store.read())

    def _delete(self, recorded: list[str]) -> None:
        for path in recorded:
            self.store.resolve(path).unlink(missing_ok=True)
