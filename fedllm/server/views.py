"""What each caller may see: clients are kept apart.

A client token sees the federation's aggregates and counts, and only its own rows: in ``/v1/round``
whether *it* is selected and how many are, not who; in ``/v1/history`` the aggregates, the number of
participants and its own metrics; in ``/v1/clients`` its own row; ``/v1/config`` without the sampling
seed (it would let a client predict future samples). The viewer and admin tokens see everything; so
does everyone on a server started without ``--auth_tokens`` (the demo's open mode, which warns at start).
"""

from __future__ import annotations

from typing import Any


def round_view(status: dict[str, Any], client_id: str | None) -> dict[str, Any]:
    view = {k: v for k, v in status.items() if k not in ("sampled", "received")}
    view["num_sampled"] = len(status["sampled"])
    view["num_received"] = len(status["received"])
    return view


def history_view(history: list[dict[str, Any]], client_id: str | None) -> list[dict[str, Any]]:
    records = []
    for record in history:
        view = {k: v for k, v in record.items() if k not in ("participants", "sampled", "metrics")}
        view["num_participants"] = len(record.get("participants") or [])
        view["num_sampled"] = len(record.get("sampled") or [])
        view["participated"] = client_id in (record.get("participants") or [])  # its own only (secagg+ SCAFFOLD)
        own = (record.get("metrics") or {}).get(client_id)
        view["metrics"] = {client_id: own} if own is not None else {}
        records.append(view)
    return records


def clients_view(states: dict[str, Any], client_id: str | None) -> dict[str, Any]:
    return {**states, "clients": [c for c in states["clients"] if c["client_id"] == client_id]}


def config_view(config: dict[str, Any]) -> dict[str, Any]:
    return {**config, "federation": {**config["federation"], "seed": None}}
