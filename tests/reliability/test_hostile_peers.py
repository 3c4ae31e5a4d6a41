"""Hostile peers through the Flask app: uploads that try to poison shared state, clients that try to see each
other, bodies and rows without bounds, cleartext tokens. Each refusal is a JSON error that changes nothing."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedllm.config import FederationArguments, ServerArguments
from fedllm.server import rounds
from fedllm.server.auth import TokenRegistry, add_token, revoke_token
from fedllm.server.federation import Federation
from fedllm.server.store import StateDirInUse, Store, lock_state_dir
from fedllm.wire import encode, parse_metrics

from ..test_api import CLIENTS, Api, assert_error, make_api, snapshot
from .conftest import copy_joined, issue_tokens, secured_api

pytestmark = pytest.mark.reliability


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, as a browser's JSON.parse does."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def secured(prepared: Path, tmp_path: Path) -> Iterator[tuple[Api, dict[str, str], str]]:
    state_dir = copy_joined(prepared, tmp_path / "state")
    tokens, admin = issue_tokens(tmp_path / "tokens.json")
    api = secured_api(state_dir, tmp_path / "tokens.json")
    yield api, tokens, admin
    api.federation.store.close()


def push(api: Api, client: str, token: str, body: bytes, num_samples: int | None = None):
    return api.upload(client, body, num_samples=str(num_samples or CLIENTS[client]), headers=bearer(token))


# ------------------------------------------------------------------------------------- uploads cannot poison
def test_sample_count_over_the_joined_one_is_refused(secured) -> None:
    api, tokens, _ = secured
    client = api.sampled()[0]
    before = snapshot(api.state_dir)
    body = assert_error(push(api, client, tokens[client], api.delta(), num_samples=10**12), 422, "too many samples")
    assert "re-join" in body["detail"] or "join again" in body["detail"]
    assert snapshot(api.state_dir) == before
    # Re-joining with the new count is allowed, and on the record.
    assert api.join(client, {"num_samples": 10**12}, headers=bearer(tokens[client])).status_code == 200
    assert push(api, client, tokens[client], api.delta(), num_samples=10**12).status_code == 202
    assert any(e["action"] == "rejoin" and e["actor"] == client for e in api.federation.events())


def test_metrics_are_normalised_on_arrival(api: Api) -> None:
    """NaN, Infinity, thousands of extra keys, huge values: dropped; /v1/history stays strict JSON. (10^6 keys do
    not fit the upload limit: refused with 413 unread.)"""
    tensors = {k: torch.zeros(s) for k, s in api.federation.upload_spec.items()}
    million = encode(tensors, "float32", metadata={f"k{i}": "1.0" for i in range(10**6)})
    assert_error(api.upload(api.sampled()[0], million), 413, "upload too large")
    metadata = {f"k{i}": "1.0" for i in range(20_000)}
    metadata.update({f"user_{i:02d}": str(i) for i in range(40)})
    metadata.update({"train_loss": "Infinity", "eval_loss": "nan", "steps": "1e300", "seconds": "2.5",
                     "eval_samples": "-inf"})
    body = encode(tensors, "float32", metadata=metadata)
    for client in api.sampled():
        assert api.upload(client, body).status_code == 202
    assert api.federation.tick() is True
    history = strict_json(api.get("/v1/history").get_data(as_text=True))
    (recorded,) = {json.dumps(m, sort_keys=True) for m in history[0]["metrics"].values()}
    kept = json.loads(recorded)
    assert kept["seconds"] == 2.5 and "train_loss" not in kept and "eval_loss" not in kept and "steps" not in kept
    assert sorted(k for k in kept if k.startswith("user_")) == [f"user_{i:02d}" for i in range(16)]
    assert not any(k.startswith("k") for k in kept)
    assert history[0]["train_loss"] is None
    assert parse_metrics({"train_loss": "1e16"}) == {} and parse_metrics({"train_loss": "2"}) == {"train_loss": 2.0}


def test_responses_are_never_nan(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN that reached a record would be refused by the encoder (500), never sent as invalid JSON."""
    monkeypatch.setattr(api.federation, "history", lambda: [{"round": 1, "train_loss": math.nan}])
    response = api.get("/v1/history")
    assert response.status_code == 500 and "NaN" not in response.get_data(as_text=True)


def test_non_finite_aggregate_aborts_the_round(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new global is checked finite before commit: a NaN aggregate starts the round over, with an event."""
    served = api.federation.latest_global()
    for client in api.sampled():
        assert api.upload(client, api.delta()).status_code == 202
    real = rounds.run_aggregation

    def poisoned(*args: Any, **kwargs: Any):
        adapter, state = real(*args, **kwargs)
        next(iter(adapter.values()))[0] = float("nan")
        return adapter, state

    monkeypatch.setattr(rounds, "run_aggregation", poisoned)
    assert api.federation.tick() is False
    status = api.federation.status()
    assert status["phase"] == "training" and status["received"] == [] and status["round"] == 1
    assert api.federation.latest_global().sha256 == served.sha256 and api.federation.history() == []
    event = api.federation.events()[0]
    assert event["action"] == "round_aborted" and "NaN" in event["detail"]["reason"]


def test_scaffold_control_updates_are_norm_bounded(prepared: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    config = FederationArguments(model_name_or_path=str(tiny_model_dir), num_clients=3, sample_clients=2,
                                 num_rounds=2, peft_lora_r=4, round_timeout=0, save_model_freq=0, fed_alg="scaffold",
                                 max_control_norm=10.0)
    Federation.initialize(config, tmp_path / "fresh")
    from ..conftest import joined_copy

    api = make_api(joined_copy(tmp_path / "fresh", tmp_path / "state", CLIENTS))
    client = api.sampled()[0]
    controls = {k: torch.full(s, 100.0) for k, s in api.federation.upload_spec.items() if k.startswith("control.")}
    before = snapshot(api.state_dir)
    body = assert_error(api.upload(client, api.delta(**controls)), 422, "invalid update")
    assert "--max_control_norm" in body["detail"]
    assert snapshot(api.state_dir) == before
    small = {k: torch.full(t.shape, 1e-3) for k, t in controls.items()}
    assert api.upload(client, api.delta(**small)).status_code == 202
    api.federation.store.close()


# ------------------------------------------------------------------------------------- clients kept apart
def test_a_client_sees_only_its_own_rows(secured) -> None:
    api, tokens, admin = secured
    first, second = api.sampled()
    for client in (first, second):
        assert push(api, client, tokens[client], api.delta()).status_code == 202
    assert api.federation.tick() is True
    as_first = bearer(tokens[first])
    history = api.get("/v1/history", first, headers=as_first).get_json()
    assert list(history[0]["metrics"]) == [first] and history[0]["num_participants"] == 2
    assert "participants" not in history[0] and "sampled" not in history[0]
    assert history[0]["train_loss"] == pytest.approx(1.5)  # the aggregates stay visible
    clients = api.get("/v1/clients", first, headers=as_first).get_json()["clients"]
    assert [c["client_id"] for c in clients] == [first]
    status = api.get("/v1/round", first, headers=as_first).get_json()
    assert "sampled" not in status and "received" not in status and status["num_sampled"] == 2
    assert api.get("/v1/config", first, headers=as_first).get_json()["federation"]["seed"] is None
    # The viewer and the admin see everything.
    viewer = add_token(api.state_dir.parent / "tokens.json", None, "viewer")
    for token in (viewer, admin):
        full = api.get("/v1/history", "dashboard", headers=bearer(token)).get_json()
        assert sorted(full[0]["participants"]) == sorted([first, second])
        assert len(api.get("/v1/clients", "dashboard", headers=bearer(token)).get_json()["clients"]) == 3
        assert api.get("/v1/config", "dashboard", headers=bearer(token)).get_json()["federation"]["seed"] is not None
    # ... and the viewer changes nothing.
    assert_error(api.join("dashboard", {"num_samples": 1}, headers=bearer(viewer)), 403, "forbidden")
    assert_error(api.http.post("/v1/admin/pause", headers={"X-FedLLM-Client": "x", **bearer(viewer)}), 403)


def test_revoked_and_removed_tokens_stop_at_once_in_every_worker(prepared: Path, tmp_path: Path) -> None:
    state_dir = copy_joined(prepared, tmp_path / "state")
    tokens, admin = issue_tokens(tmp_path / "tokens.json")
    workers = [make_api(state_dir, TokenRegistry(tmp_path / "tokens.json")) for _ in range(2)]
    for api in workers:
        assert api.get("/v1/round", "alice", headers=bearer(tokens["alice"])).status_code == 200
    assert revoke_token(tmp_path / "tokens.json", "alice") is True
    for api in workers:
        assert_error(api.get("/v1/round", "alice", headers=bearer(tokens["alice"])), 401, "unauthorized")
    removed = workers[0].http.post("/v1/admin/remove_client", json={"client_id": "bob"},
                                   headers={"X-FedLLM-Client": "operator", **bearer(admin)})
    assert removed.status_code == 200
    for api in workers:
        assert_error(api.get("/v1/global", "bob", headers=bearer(tokens["bob"])), 403, "client removed")
    for api in workers:
        api.federation.store.close()


# ------------------------------------------------------------------------------------- bounded everything
def test_json_bodies_are_bounded(api: Api) -> None:
    before = snapshot(api.state_dir)
    body = json.dumps({"num_samples": 5, "pad": "x" * (10 << 20)})
    assert_error(api.join("alice", body), 413)
    assert snapshot(api.state_dir) == before


def test_received_bytes_count_what_was_read(api: Api) -> None:
    """An upload refused from its Content-Length adds nothing to fedllm_http_received_bytes_total."""
    def counted() -> float:
        # The Prometheus registry is process-wide: earlier tests' uploads are in it, so compare before and after.
        scrape = api.http.get("/metrics").get_data(as_text=True)
        return sum(float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines()
                   if line.startswith('fedllm_http_received_bytes_total{endpoint="/v1/update"}'))

    before = counted()
    huge = api.federation.max_upload_bytes + 1
    response = api.http.post("/v1/update?round=1", data=b"x" * huge,
                             headers={"X-FedLLM-Client": api.sampled()[0], "X-FedLLM-Num-Samples": "1"})
    assert response.status_code == 413
    assert counted() == before  # nothing was read, so nothing is counted


# ------------------------------------------------------------------------------------- one server, no cleartext
def test_one_server_per_state_dir(tmp_path: Path) -> None:
    fd = lock_state_dir(tmp_path / "state")
    with pytest.raises(StateDirInUse, match=r"is in use by pid \d+"):
        lock_state_dir(tmp_path / "state")
    import os

    os.close(fd)
    os.close(lock_state_dir(tmp_path / "state"))  # free again once its holder is gone


@pytest.mark.parametrize(("host", "extra", "refused"), [
    ("0.0.0.0", {}, True), ("10.1.2.3", {}, True), ("server.example", {}, True),
    ("0.0.0.0", {"allow_insecure_http": True}, False), ("0.0.0.0", {"certfile": "c.pem", "keyfile": "k.pem"}, False),
    ("127.0.0.1", {}, False), ("localhost", {}, False), ("::1", {}, False),
])
def test_tokens_over_non_loopback_http_need_the_flag(host: str, extra: dict, refused: bool) -> None:
    import server_http

    server = ServerArguments(host=host, auth_tokens="tokens.json", **extra)
    if refused:
        with pytest.raises(ValueError, match="--allow_insecure_http"):
            server_http.check_transport(server)
    else:
        server_http.check_transport(server)
    server_http.check_transport(ServerArguments(host="0.0.0.0"))  # no tokens, nothing to leak


def test_a_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    config = FederationArguments(model_name_or_path=str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="--model_name_or_path .*no such directory"):
        Federation.initialize(config, tmp_path / "state")
    assert not (tmp_path / "state" / "state.db").exists() or Store(tmp_path / "state").get_meta(
        Store(tmp_path / "state").read(), "federation") is None
