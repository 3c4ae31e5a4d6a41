"""Operator actions, authentication and per-client limits, through the Flask app.

The upload size limit (413 from Content-Length, and while streaming) is proved in
tests/test_api.py::test_upload_over_limit and fuzzed in test_fuzz.py; it is not repeated here.
"""

from __future__ import annotations

import hmac
import sqlite3
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import TestResponse

from fedllm.config import FederationArguments
from fedllm.server import admin, auth, ingest, rounds
from fedllm.server import federation as federation_module
from fedllm.server import ratelimit as ratelimit_module
from fedllm.server.app import create_app
from fedllm.server.auth import TokenRegistry, hash_token
from fedllm.server.federation import Federation
from fedllm.server.ratelimit import RateLimiter
from fedllm.server.store import Store

from ..test_api import CLIENTS, Api, assert_error, snapshot
from .conftest import copy_joined, issue_tokens, secured_api

pytestmark = pytest.mark.reliability

OPERATOR = "operator"  # the X-FedLLM-Client the admin sends (any valid id)
ADMIN_ACTIONS = [("POST", "pause"), ("POST", "resume"), ("POST", "abort_round"), ("POST", "remove_client"),
                 ("GET", "events")]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Secured:
    """A federation whose round 1 is open, served with --auth_tokens (a token per client and the admin's)."""

    api: Api
    tokens: dict[str, str]
    admin: str
    tokens_path: Path

    def admin_call(self, action: str, body: Any = None, method: str = "POST") -> TestResponse:
        return self.api.http.open(f"/v1/admin/{action}", method=method, json=body,
                                  headers={"X-FedLLM-Client": OPERATOR, **bearer(self.admin)})

    def status(self, client: str) -> dict[str, Any]:
        response = self.api.get("/v1/round", client, headers=bearer(self.tokens[client]))
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    def history(self) -> list[dict[str, Any]]:
        """/v1/history as the admin sees it (participant ids included)."""
        return self.api.get("/v1/history", OPERATOR, headers=bearer(self.admin)).get_json()

    def push(self, client: str, seed: int = 0) -> TestResponse:
        return self.api.upload(client, self.api.delta(seed), num_samples=str(CLIENTS[client]),
                               headers=bearer(self.tokens[client]))


def _secured(state_root: Path, tmp_path: Path) -> Iterator[Secured]:
    state_dir = copy_joined(state_root, tmp_path / "secured-state")
    tokens, admin = issue_tokens(tmp_path / "tokens.json")
    api = secured_api(state_dir, tmp_path / "tokens.json")
    yield Secured(api, tokens, admin, tmp_path / "tokens.json")
    api.federation.store.close()


@pytest.fixture
def secured(prepared: Path, tmp_path: Path) -> Iterator[Secured]:
    yield from _secured(prepared, tmp_path)


@pytest.fixture(scope="module")
def timed_prepared(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``prepared``, with a 60 s round deadline."""
    root = tmp_path_factory.mktemp("timed")
    config = FederationArguments(model_name_or_path=str(tiny_model_dir), num_clients=3, sample_clients=2,
                                 num_rounds=3, peft_lora_r=4, round_timeout=60, save_model_freq=0)
    Federation.initialize(config, root / "joined")
    federation = Federation(Store(root / "joined"))
    for client, n in CLIENTS.items():
        federation.join(client, n)
    federation.store.close()
    return root


@pytest.fixture
def timed(timed_prepared: Path, tmp_path: Path) -> Iterator[Secured]:
    yield from _secured(timed_prepared, tmp_path)


class Clock:
    """Replaces the server's wall clock, so deadlines move only when the test says so."""

    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock(time.time())
    for module in (federation_module, rounds, admin, ingest):
        monkeypatch.setattr(module, "time", types.SimpleNamespace(time=fake.time, time_ns=time.time_ns))
    return fake


# ------------------------------------------------------------------------------------------------ operator actions
def test_pause_stops_selection_and_aggregation(secured: Secured) -> None:
    """While paused no client is selected and a closed round is not aggregated; resume aggregates it once."""
    first, second = secured.api.sampled()
    assert secured.status(first)["selected"] is True
    response = secured.admin_call("pause")
    assert response.status_code == 200 and response.get_json()["paused"] is True
    status = secured.status(first)
    assert status["paused"] is True and status["selected"] is False and status["phase"] == "training"
    # Updates already under way are still taken; the round closes but is not aggregated.
    assert secured.push(first).status_code == 202 and secured.push(second, 1).status_code == 202
    assert secured.status(first)["phase"] == "aggregating"
    assert secured.api.federation.tick() is False and secured.api.federation.tick() is False
    status = secured.status(first)
    assert status["phase"] == "aggregating" and status["global_version"] == 0
    assert secured.api.get("/v1/history", first, headers=bearer(secured.tokens[first])).get_json() == []

    assert secured.admin_call("resume").get_json()["paused"] is False
    assert secured.api.federation.tick() is True and secured.api.federation.tick() is False
    status = secured.status(first)
    assert status["round"] == 2 and status["global_version"] == 1 and status["paused"] is False


def test_pause_freezes_the_deadline(timed: Secured, clock: Clock) -> None:
    """A deadline that passes while paused closes nothing; resume moves it by the time spent paused."""
    first, second = timed.api.sampled()
    deadline = timed.status(first)["deadline"]
    clock.now = deadline - 50
    assert timed.push(first).status_code == 202  # enough (--min_fit_clients 1) to close at the deadline
    timed.admin_call("pause")
    clock.now = deadline + 100
    assert timed.api.federation.tick() is False
    status = timed.status(second)
    assert status["phase"] == "training" and status["deadline"] == deadline and status["deadline_extensions"] == 0

    timed.admin_call("resume")
    status = timed.status(second)
    assert status["selected"] is True and status["deadline"] == pytest.approx(deadline + 150)
    clock.now = deadline + 149
    assert timed.api.federation.tick() is False and timed.status(second)["phase"] == "training"
    clock.now = deadline + 151
    assert timed.api.federation.tick() is True  # closed with the one update and aggregated
    history = timed.api.get("/v1/history", first, headers=bearer(timed.tokens[first])).get_json()
    assert [(h["num_participants"], list(h["metrics"])) for h in history] == [(1, [first])]


def test_abort_round_discards_updates_and_resamples(secured: Secured) -> None:
    """abort_round drops the round's updates (rows and files) and draws a new sample; a discarded client may
    push again, and nothing of the discarded update reaches aggregation."""
    first, _ = secured.api.sampled()
    assert secured.push(first).status_code == 202
    updates = secured.api.state_dir / "updates"
    assert [p.name for p in updates.rglob("*.safetensors")]
    response = secured.admin_call("abort_round")
    assert response.status_code == 200
    status = response.get_json()
    assert status["received"] == [] and status["round"] == 1 and status["phase"] == "training"
    assert status["deadline_extensions"] == 1 and len(status["sampled"]) == 2 and set(status["sampled"]) <= set(CLIENTS)
    assert list(updates.rglob("*.safetensors")) == []
    event = secured.admin_call("events", method="GET").get_json()[0]
    assert event["action"] == "abort_round" and event["detail"]["discarded"] == 1
    assert event["detail"]["sampled"] == status["sampled"]
    # The new sample pushes (a client discarded and drawn again may send a different delta), then aggregation.
    for i, client in enumerate(status["sampled"]):
        assert secured.push(client, 10 + i).status_code == 202
    assert secured.api.federation.tick() is True
    assert secured.history()[0]["participants"] == status["sampled"]


def test_abort_needs_a_training_round(secured: Secured) -> None:
    """A round that already closed cannot be aborted (its updates are being aggregated)."""
    for i, client in enumerate(secured.api.sampled()):
        secured.push(client, i)
    before = snapshot(secured.api.state_dir)
    assert_error(secured.admin_call("abort_round"), 409)
    assert snapshot(secured.api.state_dir) == before


def test_remove_client(secured: Secured) -> None:
    """A removed client is refused (403 on join and push), and a round that waited for it closes without it."""
    first, second = secured.api.sampled()
    assert secured.push(first).status_code == 202
    status = secured.admin_call("remove_client", {"client_id": second}).get_json()
    assert status["phase"] == "aggregating" and status["sampled"] == [first] and status["clients_joined"] == 2
    assert_error(secured.api.join(second, {"num_samples": 5}, headers=bearer(secured.tokens[second])), 403,
                 "client removed")
    assert_error(secured.push(second), 403)
    # Its token stops working at once for everything, reads included.
    assert_error(secured.api.get("/v1/round", second, headers=bearer(secured.tokens[second])), 403, "client removed")
    assert secured.api.federation.tick() is True
    assert secured.history()[0]["participants"] == [first]
    assert secured.status(first)["num_sampled"] == 2 and "sampled" not in secured.status(first)
    assert_error(secured.admin_call("remove_client", {"client_id": "zed"}), 404)
    assert_error(secured.admin_call("remove_client", {"client": second}), 400)


def test_events_list_every_action_with_actor(secured: Secured) -> None:
    """GET /v1/admin/events lists each operator action, newest first, with who did it."""
    other = secured.api.not_sampled()
    for action, body in (("pause", None), ("resume", None), ("abort_round", None),
                         ("remove_client", {"client_id": other})):
        assert secured.admin_call(action, body).status_code == 200, action
    events = secured.admin_call("events", method="GET").get_json()
    assert [e["action"] for e in events] == ["remove_client", "abort_round", "resume", "pause"]
    assert all(e["actor"] == "admin@127.0.0.1" and isinstance(e["time"], float) for e in events)
    assert events[0]["detail"] == {"client_id": other, "discarded": 0}


# ------------------------------------------------------------------------------------------------ who may do what
@pytest.mark.parametrize(("method", "action"), ADMIN_ACTIONS)
def test_admin_endpoints_refuse_everyone_else(secured: Secured, api: Api, method: str, action: str) -> None:
    """Operator actions: a client's token gets 403, no or an unknown token 401, and a server without
    --auth_tokens refuses them to everyone (403); none of it changes anything."""
    body = {"client_id": "alice"} if action == "remove_client" else None
    path = f"/v1/admin/{action}"
    before = snapshot(secured.api.state_dir)
    for client, token in secured.tokens.items():
        assert_error(secured.api.http.open(path, method=method, json=body,
                                           headers={"X-FedLLM-Client": client, **bearer(token)}), 403, "admin only")
    assert_error(secured.api.http.open(path, method=method, json=body, headers={"X-FedLLM-Client": OPERATOR}), 401)
    assert_error(secured.api.http.open(path, method=method, json=body,
                                       headers={"X-FedLLM-Client": OPERATOR, **bearer(secured.admin + "x")}), 401)
    assert snapshot(secured.api.state_dir) == before
    open_before = snapshot(api.state_dir)
    assert_error(api.http.open(path, method=method, json=body, headers={"X-FedLLM-Client": OPERATOR}), 403,
                 "admin only")
    assert_error(api.http.open(path, method=method, json=body,
                               headers={"X-FedLLM-Client": OPERATOR, **bearer(secured.admin)}), 403, "admin only")
    assert snapshot(api.state_dir) == open_before


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/round"), ("GET", "/v1/config"), ("GET", "/v1/global"),
                                              ("GET", "/v1/history"), ("GET", "/v1/clients"), ("POST", "/v1/join"),
                                              ("POST", "/v1/update?round=1")])
def test_no_client_acts_as_another(secured: Secured, method: str, path: str) -> None:
    """A client's token under another client's name is refused (403) on every endpoint, read or write."""
    victim = secured.api.sampled()[0]
    thief = next(c for c in CLIENTS if c != victim)
    before = snapshot(secured.api.state_dir)
    kwargs: dict[str, Any] = {}
    if path == "/v1/join":
        kwargs["json"] = {"num_samples": 5}
    elif path.startswith("/v1/update"):
        kwargs.update(data=secured.api.delta(), content_type="application/octet-stream")
    response = secured.api.http.open(path, method=method, headers={
        "X-FedLLM-Client": victim, "X-FedLLM-Num-Samples": "10", **bearer(secured.tokens[thief])}, **kwargs)
    assert_error(response, 403, "forbidden")
    assert snapshot(secured.api.state_dir) == before


def test_admin_token_never_pushes_or_joins(secured: Secured) -> None:
    """The admin token reads everything but is no client: it cannot join or push as one (403)."""
    victim = secured.api.sampled()[0]
    assert secured.api.get("/v1/round", victim, headers=bearer(secured.admin)).status_code == 200
    before = snapshot(secured.api.state_dir)
    assert_error(secured.api.join(victim, {"num_samples": 5}, headers=bearer(secured.admin)), 403, "forbidden")
    assert_error(secured.api.upload(victim, secured.api.delta(), headers=bearer(secured.admin)), 403, "forbidden")
    assert snapshot(secured.api.state_dir) == before


def test_tokens_file_holds_only_hashes(secured: Secured) -> None:
    """Neither a client's nor the admin's token is in the tokens file, only their sha256."""
    text = secured.tokens_path.read_text()
    for token in [*secured.tokens.values(), secured.admin]:
        assert token not in text and hash_token(token) in text


def test_tokens_compared_in_constant_time(secured: Secured, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stored hash is compared with hmac.compare_digest, whatever the token (no early exit, no ==)."""
    calls: list[tuple[str, str]] = []
    compare = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    stored = {hash_token(t) for t in [*secured.tokens.values(), secured.admin]}
    for token, status in ((secured.tokens["alice"], 200), ("not-a-token", 401), (secured.admin, 200)):
        calls.clear()
        response = secured.api.get("/v1/round", "alice", headers=bearer(token))
        assert response.status_code == status
        assert {frozenset(c) for c in calls} == {frozenset((hash_token(token), s)) for s in stored}
        assert len(calls) == len(stored)


def test_rate_limit_is_per_identity_and_shared_by_workers(prepared: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst from one client's token gets 429 JSON with Retry-After; another client and /healthz are
    unaffected; two workers (two apps on one state_dir) share one budget; the client is served again once its
    bucket refills."""
    now = [1000.0]
    monkeypatch.setattr(ratelimit_module, "time", types.SimpleNamespace(time=lambda: now[0]))
    state_dir = copy_joined(prepared, tmp_path / "state")
    tokens, _ = issue_tokens(tmp_path / "tokens.json")
    registry = TokenRegistry(tmp_path / "tokens.json")
    workers = []
    for _ in range(2):
        federation = Federation(Store(state_dir))
        limiter = RateLimiter(state_dir / "ratelimit.db", rate=5)
        workers.append(Api(federation, create_app(federation, registry, start_ticker=False,
                                                  rate_limiter=limiter).test_client()))
    alice = bearer(tokens["alice"])
    statuses = [workers[i % 2].get("/v1/round", "alice", headers=alice).status_code for i in range(12)]
    assert statuses == [200] * 10 + [429] * 2  # a burst of twice the rate across both workers, then nothing
    limited = workers[0].get("/v1/config", "alice", headers=alice)
    assert_error(limited, 429, "rate limited")
    assert limited.headers["Retry-After"] == "1"
    assert workers[1].get("/v1/round", "bob", headers=bearer(tokens["bob"])).status_code == 200
    assert workers[0].http.get("/healthz").status_code == 200
    now[0] += 0.2  # one request's worth at 5 per second
    assert workers[1].get("/v1/round", "alice", headers=alice).status_code == 200
    assert workers[0].get("/v1/round", "alice", headers=alice).status_code == 429
    for api in workers:
        api.federation.store.close()


def test_open_server_rate_limit_is_keyed_on_the_peer(prepared: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Without tokens, rotating made-up client ids does not get around the limit: the key is the peer address."""
    monkeypatch.setattr(ratelimit_module, "time", types.SimpleNamespace(time=lambda: 1000.0))
    state_dir = copy_joined(prepared, tmp_path / "state")
    federation = Federation(Store(state_dir))
    limiter = RateLimiter(state_dir / "ratelimit.db", rate=5)
    api = Api(federation, create_app(federation, None, start_ticker=False, rate_limiter=limiter).test_client())
    statuses = [api.get("/v1/round", f"made-up-{i}").status_code for i in range(12)]
    assert statuses == [200] * 10 + [429] * 2
    rows = sqlite3.connect(state_dir / "ratelimit.db").execute("SELECT key FROM buckets").fetchall()
    assert rows == [("addr:127.0.0.1",)]
    # ... and none of those ids left a presence row: only joined clients are recorded.
    assert not any(k.startswith("made-up") for k in federation.store.clients(federation.store.read()))
    assert sqlite3.connect(state_dir / "state.db").execute(
        "SELECT COUNT(*) FROM presence WHERE client_id LIKE 'made-up%'").fetchone() == (0,)
    federation.store.close()
