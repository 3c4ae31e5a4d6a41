"""The federation dashboard: ``GET /`` serves a self-contained page (vanilla JS, inline SVG charts).

The page and its static files hold no data and need no auth; the page reads the same JSON
endpoints as ``curl`` (``/v1/round``, ``/v1/config``, ``/v1/history``, ``/v1/clients``) with the
header ``X-FedLLM-Client: dashboard`` and, when the server has ``--auth_tokens``, the viewer (or admin) token
the operator types in (kept in the tab's ``sessionStorage``, never displayed). Nothing is loaded
from outside the server: the Content-Security-Policy forbids it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, send_from_directory

STATIC = Path(__file__).resolve().parent / "static"
PUBLIC_ENDPOINTS = frozenset({"dashboard.index", "dashboard.static"})
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

bp = Blueprint("dashboard", __name__, static_folder=str(STATIC), static_url_path="/dashboard/static")


@bp.get("/")
def index() -> Response:
    return send_from_directory(STATIC, "index.html", max_age=0)


@bp.after_request
def _secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def client_states(federation: Any) -> dict[str, Any]:
    """Every known client with its state in the current round (the body of ``GET /v1/clients``).

    ``state`` is ``waiting`` (no round yet), ``idle`` (not sampled this round), ``training``
    (sampled, update not in yet), ``submitted``, ``late`` (sampled, no update, and the deadline
    passed or the round closed without it) or ``finished`` (the federation is over).
    """
    store = federation.store
    db = store.read()
    current = store.current_round(db)
    phase = federation.phase(db, current)
    received = {u.client_id: u.received_at for u in store.updates(db, current.round)} if current else {}
    history = store.history(db)
    rounds_joined: dict[str, int] = {}
    last_loss: dict[str, float] = {}
    for record in history:
        for client_id in record.get("participants", []):
            rounds_joined[client_id] = rounds_joined.get(client_id, 0) + 1
        for client_id, metrics in (record.get("metrics") or {}).items():
            if isinstance(metrics.get("train_loss"), (int, float)):
                last_loss[client_id] = metrics["train_loss"]
    now = time.time()
    past_deadline = bool(current and current.deadline is not None and now > current.deadline)
    clients = []
    for client_id, info in store.clients(db).items():
        sampled = bool(current and phase != "finished" and client_id in current.sampled)
        if current is None:
            state = "waiting"
        elif phase == "finished":
            state = "finished"
        elif not sampled:
            state = "idle"
        elif client_id in received:
            state = "submitted"
        elif current.status != "training" or past_deadline:
            state = "late"
        else:
            state = "training"
        clients.append({
            "client_id": client_id,
            "state": state,
            "sampled": sampled,
            "num_samples": info["num_samples"],
            "joined_at": info["joined_at"],
            "last_seen": info["last_seen"],
            "submitted_at": received.get(client_id) if sampled else None,
            "rounds_joined": rounds_joined.get(client_id, 0),
            "last_train_loss": last_loss.get(client_id),
        })
    return {"time": now, "round": current.round if current else 0, "phase": phase, "clients": clients}
