"""The REST API v1 through Flask's test client: statuses, JSON errors, and that a rejected request changes nothing."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from flask.testing import FlaskClient
from safetensors.torch import save
from werkzeug.test import EnvironBuilder, TestResponse
from werkzeug.wrappers import Request

from fedllm.config import FederationArguments
from fedllm.server.app import create_app
from fedllm.server.auth import TokenRegistry, add_token, hash_token
from fedllm.server.federation import Federation
from fedllm.server.store import Store
from fedllm.wire import encode

from .conftest import joined_copy

CLIENTS = {"alice": 10, "bob": 30, "carol": 60}


@pytest.fixture(scope="module")
def prepared(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fresh`` (initialised) and ``joined`` (all clients joined, round 1 open) state dirs, built once."""
    root = tmp_path_factory.mktemp("api")
    config = FederationArguments(model_name_or_path=str(tiny_model_dir), num_clients=3, sample_clients=2,
                                 num_rounds=3, peft_lora_r=4, round_timeout=0, save_model_freq=0)
    Federation.initialize(config, root / "fresh")
    joined_copy(root / "fresh", root / "joined", CLIENTS)
    return root


@dataclass
class Api:
    federation: Federation
    http: FlaskClient

    @property
    def state_dir(self) -> Path:
        return self.federation.store.root

    def sampled(self) -> list[str]:
        return self.federation.status()["sampled"]

    def not_sampled(self) -> str:
        return next(c for c in CLIENTS if c not in self.sampled())

    def get(self, path: str, client: str | None = "alice", headers: dict[str, str] | None = None) -> TestResponse:
        return self.http.get(path, headers={**({"X-FedLLM-Client": client} if client else {}), **(headers or {})})

    def join(self, client: str, body: Any, headers: dict[str, str] | None = None) -> TestResponse:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return self.http.post("/v1/join", data=data, content_type="application/json",
                              headers={"X-FedLLM-Client": client, **(headers or {})})

    def upload(self, client: str | None, body: bytes, *, query: str | None = "round=1", num_samples: str | None = "10",
               headers: dict[str, str] | None = None) -> TestResponse:
        sent = {"Content-Type": "application/octet-stream"}
        if client is not None:
            sent["X-FedLLM-Client"] = client
        if num_samples is not None:
            sent["X-FedLLM-Num-Samples"] = num_samples
        sent.update(headers or {})
        path = "/v1/update" + (f"?{query}" if query is not None else "")
        return self.http.post(path, data=body, headers=sent)

    def delta(self, seed: int = 0, **overrides: torch.Tensor) -> bytes:
        generator = torch.Generator().manual_seed(seed)
        tensors = {k: torch.randn(s, generator=generator) * 0.01 for k, s in self.federation.upload_spec.items()}
        tensors.update(overrides)
        return encode(tensors, "float32", metadata={"train_loss": "1.5"})


def make_api(state_dir: Path, tokens: TokenRegistry | None = None, **federation_kwargs: Any) -> Api:
    federation = Federation(Store(state_dir), **federation_kwargs)
    return Api(federation, create_app(federation, tokens, start_ticker=False).test_client())


@pytest.fixture
def api(prepared: Path, tmp_path: Path) -> Iterator[Api]:
    state_dir = tmp_path / "state"
    shutil.copytree(prepared / "joined", state_dir)
    api = make_api(state_dir)
    yield api
    api.federation.store.close()


def snapshot(state_dir: Path) -> tuple[dict[str, list[tuple]], list[str]]:
    """Every row of every table (but the bookkeeping of what was served: ``presence``, when clients last polled, and
    ``downloads``, the global adapters sent), and every file but the database's own (and any incoming/ leftover)."""
    db = sqlite3.connect(state_dir / "state.db")
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                  if r[0] not in ("presence", "downloads")]
        rows = {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}
    finally:
        db.close()
    files = sorted(str(p.relative_to(state_dir)) for p in state_dir.rglob("*")
                   if p.is_file() and not p.name.startswith("state.db") and p.parent.name != "incoming")
    return rows, files


def assert_error(response: TestResponse, status: int, error: str | None = None) -> dict[str, str]:
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True))
    assert response.is_json, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error", "detail"} and isinstance(body["detail"], str)
    if error is not None:
        assert body["error"] == error, body
    return body


@pytest.fixture
def unchanged(api: Api) -> Iterator[Callable[[], None]]:
    """Snapshot the state now; the returned check asserts nothing changed and incoming/ is empty."""
    before = snapshot(api.state_dir)

    def check() -> None:
        assert snapshot(api.state_dir) == before
        assert list((api.state_dir / "incoming").iterdir()) == []

    return check


# ---------------------------------------------------------------- reads
def test_healthz_needs_nothing(api: Api) -> None:
    response = api.http.get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_round_status(api: Api) -> None:
    first = api.sampled()[0]
    body = api.get("/v1/round", first).get_json()
    for key in ("round", "num_rounds", "phase", "fed_alg", "task", "global_version", "global_sha256", "sampled",
                "received", "deadline"):
        assert key in body
    assert body["round"] == 1 and body["phase"] == "training" and body["num_rounds"] == 3
    assert body["fed_alg"] == "fedavg" and body["task"] == "sft" and body["global_version"] == 0
    assert body["selected"] is True and body["submitted"] is False
    assert api.get("/v1/round", api.not_sampled()).get_json()["selected"] is False
    assert api.upload(first, api.delta(), num_samples=str(CLIENTS[first])).status_code == 202
    body = api.get("/v1/round", first).get_json()
    assert body["submitted"] is True and body["received"] == [first]


def test_config(api: Api) -> None:
    body = api.get("/v1/config").get_json()
    assert {"federation", "model_fingerprint", "adapter", "round_config"} <= set(body)
    assert body["federation"]["num_clients"] == 3 and body["federation"]["peft_lora_r"] == 4
    assert body["adapter"] == {k: list(v) for k, v in api.federation.spec.items()}
    assert body["round_config"]["round"] == 1 and body["round_config"]["max_steps"] >= 1
    assert len(body["model_fingerprint"]) == 64


def test_global_etag_and_304(api: Api) -> None:
    response = api.get("/v1/global")
    assert response.status_code == 200
    data = response.get_data()
    etag = response.headers["ETag"].strip('"')
    assert hashlib.sha256(data).hexdigest() == etag == api.get("/v1/round").get_json()["global_sha256"]
    assert response.headers["X-FedLLM-Version"] == "0"
    for header in (f'"{etag}"', f'W/"{etag}"', f'"other", "{etag}"'):
        cached = api.get("/v1/global", headers={"If-None-Match": header})
        assert cached.status_code == 304 and cached.get_data() == b""
        assert cached.headers["ETag"].strip('"') == etag and cached.headers["X-FedLLM-Version"] == "0"
    assert api.get("/v1/global", headers={"If-None-Match": '"other"'}).status_code == 200


def test_full_round_over_http(api: Api) -> None:
    old_etag = api.get("/v1/global").headers["ETag"]
    round1 = api.sampled()
    for i, client in enumerate(round1):
        body = api.delta(i)
        response = api.upload(client, body, num_samples=str(CLIENTS[client]),
                              headers={"X-Content-SHA256": hashlib.sha256(body).hexdigest()})
        assert response.status_code == 202, response.get_json()
        assert response.get_json() == {"accepted": True, "duplicate": False, "round": 1,
                                       "sha256": hashlib.sha256(body).hexdigest()}
        retry = api.upload(client, body, num_samples=str(CLIENTS[client]))
        assert retry.status_code == 202 and retry.get_json()["duplicate"] is True
    assert api.get("/v1/round").get_json()["phase"] == "aggregating"
    assert api.federation.tick() is True
    history = api.get("/v1/history").get_json()
    assert len(history) == 1 and history[0]["round"] == 1 and history[0]["train_loss"] == pytest.approx(1.5)
    assert history[0]["participants"] == round1 and history[0]["num_samples"] == sum(CLIENTS[c] for c in round1)
    response = api.get("/v1/global", headers={"If-None-Match": old_etag})
    assert response.status_code == 200 and response.headers["X-FedLLM-Version"] == "1"
    assert hashlib.sha256(response.get_data()).hexdigest() == response.headers["ETag"].strip('"')
    assert api.get("/v1/round").get_json()["round"] == 2


# ---------------------------------------------------------------- request errors
def test_missing_client_header(api: Api) -> None:
    for path in ("/v1/round", "/v1/config", "/v1/global", "/v1/history"):
        assert_error(api.get(path, client=None), 400, "missing header")


@pytest.mark.parametrize("client_id", ["../x", "a/b", "x\x01y", "", "-x", ".hidden", "a" * 65, "a b", "é"])
def test_invalid_client_id(api: Api, unchanged, client_id: str) -> None:
    assert_error(api.get("/v1/round", client=client_id) if client_id else
                 api.http.get("/v1/round", headers={"X-FedLLM-Client": ""}), 400, "invalid client id")
    assert_error(api.join(client_id, {"num_samples": 5}), 400, "invalid client id")
    assert_error(api.upload(client_id, api.delta()), 400, "invalid client id")
    unchanged()


def test_unknown_path_and_method(api: Api) -> None:
    assert_error(api.get("/v1/nothing"), 404)
    assert_error(api.get("/v2/round"), 404)  # GET / is the dashboard (tests/test_dashboard.py)
    assert_error(api.http.post("/v1/round", headers={"X-FedLLM-Client": "alice"}), 405)
    assert_error(api.get("/v1/update"), 405)


@pytest.mark.parametrize("body", [
    b"not json", b"[1, 2]", b'"text"', b"{}", {"num_samples": -1}, {"num_samples": 0}, {"num_samples": "5"},
    {"num_samples": 2.5}, {"num_samples": True}, {"num_samples": None}, {"num_samples": 10**20},
])
def test_join_bad_json(api: Api, unchanged, body: Any) -> None:
    assert_error(api.join("alice", body), 400)
    unchanged()


def test_join(prepared: Path, tmp_path: Path) -> None:
    shutil.copytree(prepared / "fresh", tmp_path / "state")
    api = make_api(tmp_path / "state")
    response = api.join("alice", {"num_samples": 5})
    assert response.status_code == 200 and response.get_json()["clients_joined"] == 1
    assert api.get("/v1/round").get_json()["phase"] == "waiting"
    assert_error(api.upload("alice", api.delta(), num_samples="5"), 409)  # no round yet
    api.federation.store.close()


def test_join_when_full(api: Api, unchanged) -> None:
    assert_error(api.join("dave", {"num_samples": 5}), 403)
    unchanged()
    assert api.join("alice", {"num_samples": 12}).status_code == 200  # a member may re-join


# ---------------------------------------------------------------- rejected uploads change nothing
def _header_case(**headers: str) -> Callable[[Api], TestResponse]:
    return lambda api: api.upload(api.sampled()[0], api.delta(), headers=headers)


def _num_samples_case(value: str | None) -> Callable[[Api], TestResponse]:
    return lambda api: api.upload(api.sampled()[0], api.delta(), num_samples=value)


def _round_case(query: str | None) -> Callable[[Api], TestResponse]:
    return lambda api: api.upload(api.sampled()[0], api.delta(), query=query)


def _tensors_case(mutate: Callable[[dict[str, torch.Tensor]], None], dtype: torch.dtype = torch.float32):
    def case(api: Api) -> TestResponse:
        tensors = {k: torch.zeros(s) for k, s in api.federation.upload_spec.items()}
        mutate(tensors)
        return api.upload(api.sampled()[0], save({k: v.to(dtype) for k, v in tensors.items()}))
    return case


def _first(tensors: dict[str, torch.Tensor]) -> str:
    return sorted(tensors)[0]


REJECTED_UPLOADS: dict[str, tuple[Callable[[Api], TestResponse], int]] = {
    "not safetensors": (lambda api: api.upload(api.sampled()[0], b"hello, this is not a tensor file"), 400),
    "empty body": (lambda api: api.upload(api.sampled()[0], b""), 400),
    "header length past body": (lambda api: api.upload(api.sampled()[0], (10**6).to_bytes(8, "little") + b"{}"), 400),
    "missing num samples": (_num_samples_case(None), 400),
    "negative num samples": (_num_samples_case("-5"), 400),
    "zero num samples": (_num_samples_case("0"), 400),
    "non-numeric num samples": (_num_samples_case("ten"), 400),
    "fractional num samples": (_num_samples_case("1.5"), 400),
    "superscript num samples": (_num_samples_case("²"), 400),
    "huge num samples": (_num_samples_case("9" * 5000), 400),
    "missing round": (_round_case(None), 400),
    "empty round": (_round_case("round="), 400),
    "non-numeric round": (_round_case("round=one"), 400),
    "negative round": (_round_case("round=-1"), 400),
    "superscript round": (_round_case("round=%C2%B2"), 400),
    "huge round": (_round_case("round=" + "9" * 5000), 400),
    "sha256 mismatch": (_header_case(**{"X-Content-SHA256": "0" * 64}), 400),
    "sha256 malformed": (_header_case(**{"X-Content-SHA256": "xyz"}), 400),
    "not joined": (lambda api: api.upload("zed", api.delta()), 403),
    "wrong round": (_round_case("round=2"), 409),
    "old round": (_round_case("round=0"), 409),
    "not sampled": (lambda api: api.upload(api.not_sampled(), api.delta()), 409),
    "missing tensor": (_tensors_case(lambda t: t.pop(_first(t))), 422),
    "extra tensor": (_tensors_case(lambda t: t.update(extra=torch.zeros(2))), 422),
    "renamed tensor": (_tensors_case(lambda t: t.update(renamed=t.pop(_first(t)))), 422),
    "wrong shape": (_tensors_case(lambda t: t.update({_first(t): t[_first(t)].t().contiguous()})), 422),
    "zero-size tensor": (_tensors_case(lambda t: t.update({_first(t): torch.zeros(0)})), 422),
    "float64": (_tensors_case(lambda t: None, torch.float64), 422),
    "bfloat16": (_tensors_case(lambda t: None, torch.bfloat16), 422),
    "nan": (_tensors_case(lambda t: t[_first(t)].view(-1).__setitem__(3, float("nan"))), 422),
    "inf": (_tensors_case(lambda t: t[_first(t)].view(-1).__setitem__(0, float("-inf"))), 422),
}


@pytest.mark.parametrize("case", list(REJECTED_UPLOADS))
def test_rejected_upload_changes_nothing(api: Api, unchanged, case: str) -> None:
    make_request, status = REJECTED_UPLOADS[case]
    assert_error(make_request(api), status)
    unchanged()
    assert api.get("/v1/round").get_json()["received"] == []


def test_different_second_update_conflicts(api: Api) -> None:
    first = api.sampled()[0]
    assert api.upload(first, api.delta(1)).status_code == 202
    before = snapshot(api.state_dir)
    assert_error(api.upload(first, api.delta(2)), 409, "already submitted")
    assert snapshot(api.state_dir) == before
    assert api.upload(first, api.delta(1)).get_json()["duplicate"] is True
    assert snapshot(api.state_dir) == before


def test_upload_over_limit(prepared: Path, tmp_path: Path) -> None:
    shutil.copytree(prepared / "joined", tmp_path / "state")
    api = make_api(tmp_path / "state", max_upload_bytes=1000)
    body = api.delta()
    assert len(body) > 1000
    before = snapshot(api.state_dir)
    client = api.sampled()[0]
    assert_error(api.upload(client, body), 413)

    def unsized(content_length: str | None) -> TestResponse:
        """A request whose body is not (truthfully) announced by Content-Length, as chunked uploads are."""
        environ = EnvironBuilder(path="/v1/update", query_string="round=1", method="POST",
                                 input_stream=io.BytesIO(body),
                                 headers={"X-FedLLM-Client": client, "X-FedLLM-Num-Samples": "10"}).get_environ()
        environ.pop("CONTENT_LENGTH", None)
        if content_length is not None:
            environ["CONTENT_LENGTH"] = content_length
        environ["wsgi.input_terminated"] = True
        return api.http.open(Request(environ))

    assert_error(unsized(None), 413)  # grows past the limit while streaming
    assert_error(unsized("500"), 413)  # claims less than it sends
    assert snapshot(api.state_dir) == before
    assert list((api.state_dir / "incoming").iterdir()) == []
    api.federation.store.close()

    roomy = make_api(tmp_path / "state")
    environ = EnvironBuilder(path="/v1/update", query_string="round=1", method="POST", input_stream=io.BytesIO(body),
                             headers={"X-FedLLM-Client": client, "X-FedLLM-Num-Samples": "10"}).get_environ()
    environ["CONTENT_LENGTH"] = str(len(body) + 100)
    environ["wsgi.input_terminated"] = True
    assert_error(roomy.http.open(Request(environ)), 400, "truncated body")
    assert snapshot(roomy.state_dir) == before
    del environ["CONTENT_LENGTH"]
    environ["wsgi.input"] = io.BytesIO(body)
    assert roomy.http.open(Request(environ)).status_code == 202  # a chunked upload within the limit is fine
    roomy.federation.store.close()


# ---------------------------------------------------------------- auth
@pytest.fixture
def secured(prepared: Path, tmp_path: Path) -> Iterator[tuple[Api, dict[str, str], Path]]:
    shutil.copytree(prepared / "joined", tmp_path / "state")
    tokens_path = tmp_path / "tokens.json"
    tokens = {client: add_token(tokens_path, client) for client in CLIENTS}
    api = make_api(tmp_path / "state", TokenRegistry(tokens_path))
    yield api, tokens, tokens_path
    api.federation.store.close()


def test_tokens_file_keeps_only_hashes(secured) -> None:
    _api, tokens, tokens_path = secured
    text = tokens_path.read_text()
    for client, token in tokens.items():
        assert token not in text
        assert json.loads(text)["clients"][client] == hash_token(token)
    assert stat.S_IMODE(tokens_path.stat().st_mode) == 0o600


def test_auth(secured) -> None:
    api, tokens, _ = secured
    assert api.http.get("/healthz").status_code == 200
    assert_error(api.get("/v1/round"), 401)
    assert_error(api.get("/v1/round", headers={"Authorization": "Bearer not-a-token"}), 401)
    assert_error(api.get("/v1/round", headers={"Authorization": f"Basic {tokens['alice']}"}), 401)
    assert_error(api.get("/v1/round", headers={"Authorization": "Bearer "}), 401)
    assert_error(api.get("/v1/round", "alice", headers={"Authorization": f"Bearer {tokens['bob']}"}), 403)
    assert api.get("/v1/round", "alice", headers={"Authorization": f"Bearer {tokens['alice']}"}).status_code == 200
    response = api.get("/v1/global", "bob", headers={"Authorization": f"Bearer {tokens['bob']}"})
    assert response.status_code == 200


def test_auth_rejections_change_nothing(secured) -> None:
    api, tokens, tokens_path = secured
    first = api.sampled()[0]
    other = next(c for c in CLIENTS if c != first)
    before = snapshot(api.state_dir)
    assert_error(api.upload(first, api.delta()), 401)
    assert_error(api.upload(first, api.delta(), headers={"Authorization": "Bearer nope"}), 401)
    assert_error(api.upload(first, api.delta(), headers={"Authorization": f"Bearer {tokens[other]}"}), 403)
    assert_error(api.join("alice", {"num_samples": 5}), 401)
    assert_error(api.join("alice", {"num_samples": 5}, headers={"Authorization": f"Bearer {tokens['bob']}"}), 403)
    dave = add_token(tokens_path, "dave")  # has a token, but the federation is full
    assert_error(api.join("dave", {"num_samples": 5}, headers={"Authorization": f"Bearer {dave}"}), 403)
    assert snapshot(api.state_dir) == before
    ok = api.upload(first, api.delta(), headers={"Authorization": f"Bearer {tokens[first]}"})
    assert ok.status_code == 202


def test_polling_updates_last_seen(api: Api) -> None:
    joined = api.federation.store.clients(api.federation.store.read())["alice"]["last_seen"]
    time.sleep(0.01)
    assert api.get("/v1/round").status_code == 200
    assert api.federation.store.clients(api.federation.store.read())["alice"]["last_seen"] > joined


def test_admin_token_cannot_act_as_a_client(prepared: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    shutil.copytree(prepared / "joined", state_dir)
    admin = add_token(tmp_path / "tokens.json", None)
    api = make_api(state_dir, TokenRegistry(tmp_path / "tokens.json"))
    headers = {"Authorization": f"Bearer {admin}"}
    assert api.get("/v1/round", headers=headers).status_code == 200  # reads are allowed
    assert_error(api.join("alice", {"num_samples": 1}, headers=headers), 403, "forbidden")
    assert_error(api.upload("alice", api.delta(), headers=headers), 403, "forbidden")
