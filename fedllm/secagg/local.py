"""One attempt of SecAgg+ run in memory, every party in this process: the tests and bench/secagg.py use it.

The same :class:`~.protocol.ClientRound` and :class:`~.protocol.ServerRound` the HTTP server and client run;
``drop`` names the clients that vanish *after* a stage (they answer it, then never again).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .protocol import ClientRound, RoundSetup, ServerRound, unmask_sum

DROP_POINTS = ("advertise", "share", "masked")


def run_attempt(setup: RoundSetup, encoded: Mapping[str, np.ndarray],
                drop: Mapping[str, list[str]] | None = None) -> tuple[ServerRound, np.ndarray | None, dict]:
    """Run one attempt; returns the server's round, the unmasked sum (None if the attempt failed) and the
    messages the server stored ({"masked": {client: vector}, ...})."""
    drop = drop or {}
    server = ServerRound(setup)
    clients = {c: ClientRound(c, setup) for c in setup.clients}
    alive = set(setup.clients)
    stored: dict[str, dict] = {"masked": {}}
    r, a = setup.round, setup.attempt
    for c in sorted(alive):
        server.receive_keys(c, r, a, clients[c].advertise())
    alive -= set(drop.get("advertise", []))
    server.close_stage()
    if server.stage == "failed":
        return server, None, stored
    for c in sorted(alive):
        view = server.view(c)
        server.receive_shares(c, r, a, clients[c].share(view["keys"]))
    alive -= set(drop.get("share", []))
    server.close_stage()
    if server.stage == "failed":
        return server, None, stored
    for c in sorted(alive):
        view = server.view(c)
        masked, excluded = clients[c].masked_input(view["u2"], view["shares"], encoded[c])
        stored["masked"][c] = masked
        server.receive_masked(c, r, a, f"{c}-digest", excluded)
    alive -= set(drop.get("masked", []))
    server.close_stage()
    if server.stage == "failed":
        return server, None, stored
    for c in sorted(alive & set(server.expected())):
        server.receive_unmask(c, r, a, clients[c].unmask(server.view(c)["u3"]))
    server.close_stage()
    if server.stage != "done":
        return server, None, stored
    total = unmask_sum((stored["masked"][c] for c in server.state["u3"]), server.corrections(),
                       setup.fixed_point, setup.length)
    return server, total, stored
