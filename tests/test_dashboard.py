"""The dashboard: GET / and its assets, GET /v1/clients, admin read access, and the page in a real headless Chromium.

The browser test drives a live federation (run_server.sh under gunicorn) with plain HTTP pushes of
valid deltas, loads the page with ``chromium --headless --dump-dom`` and checks what it drew, then
saves a screenshot (``tmp_path/dashboard.png``; with ``FEDLLM_UPDATE_SCREENSHOT=1`` also
``docs/dashboard.png``, the README's picture). It skips, saying why, where Chromium is not installed
(``.ci/run`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from flask.testing import FlaskClient

from fedllm.config import FederationArguments
from fedllm.server.app import create_app
from fedllm.server.auth import TokenRegistry, add_token
from fedllm.server.dashboard import STATIC
from fedllm.server.federation import Federation
from fedllm.server.store import Store
from fedllm.wire import encode

from .conftest import ROOT

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio"]
DASHBOARD = {"X-FedLLM-Client": "dashboard"}


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


requires_chromium = pytest.mark.skipif(
    find_chromium() is None,
    reason="headless Chromium is not installed (.ci/run installs Debian's 'chromium'; apt-get install chromium)")


def run_chromium(url: str, work: Path, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess:
    """One headless Chromium run with a fresh profile; ``args`` say what to do (--dump-dom, --screenshot=...)."""
    profile = work / f"chromium-profile-{time.monotonic_ns()}"
    cmd = [find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True,
                              env={**os.environ, "HOME": str(work)})
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class Dom(HTMLParser):
    """The elements of a dumped DOM as (tag, attributes) in document order, and its text."""

    def __init__(self, html: str):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str | None = None, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements
                if (tag is None or t == tag) and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def by_id(self, element_id: str) -> dict[str, str]:
        (found,) = self.find(id=element_id)
        return found


def series_points(html: str, chart: str, series: str) -> list[tuple[int, float]]:
    """(round, value) of the points (circles or bars) of one series of one chart in the dumped DOM."""
    svg = re.search(rf'<svg[^>]*id="chart-{chart}"[^>]*>(.*?)</svg>', html, re.S)
    assert svg, f"chart {chart} not in the page"
    group = re.search(rf'<g[^>]*data-series="{series}"[^>]*>(.*?)</g>', svg.group(1), re.S)
    if group is None:
        return []
    points = re.findall(r'<(?:circle|rect)[^>]*class="pt"[^>]*>', group.group(1))
    return [(int(re.search(r'data-round="(\d+)"', p).group(1)), float(re.search(r'data-value="([^"]+)"', p).group(1)))
            for p in points]


# ------------------------------------------------------------------------------------------ a live federation
class LiveFederation:
    """Drives a running server with plain HTTP: joins, pushes valid deltas, waits for rounds."""

    def __init__(self, url: str, tokens: dict[str, str] | None = None):
        self.url = url
        self.tokens = tokens or {}
        self._config: dict[str, Any] | None = None

    def call(self, method: str, path: str, client: str, **kwargs: Any) -> requests.Response:
        headers = {"X-FedLLM-Client": client, "Connection": "close", **kwargs.pop("headers", {})}
        if client in self.tokens:
            headers["Authorization"] = f"Bearer {self.tokens[client]}"
        return requests.request(method, self.url + path, headers=headers, timeout=60, **kwargs)

    def join(self, client: str, num_samples: int) -> None:
        response = self.call("POST", "/v1/join", client, json={"num_samples": num_samples})
        assert response.status_code == 200, response.text

    def config(self, client: str) -> dict[str, Any]:
        if self._config is None:
            self._config = self.call("GET", "/v1/config", client).json()
        return self._config

    def delta(self, client: str, scale: float, metrics: dict[str, float]) -> bytes:
        config = self.config(client)
        tensors = {name: torch.full(shape, scale) for name, shape in config["upload_tensors"].items()}
        return encode(tensors, config["federation"]["wire_dtype"], metadata={k: repr(v) for k, v in metrics.items()})

    def push(self, client: str, round_number: int, body: bytes, num_samples: int = 10) -> requests.Response:
        return self.call("POST", f"/v1/update?round={round_number}", client, data=body,
                         headers={"X-FedLLM-Num-Samples": str(num_samples), "Content-Type": "application/octet-stream"})

    def round(self, client: str) -> dict[str, Any]:
        return self.call("GET", "/v1/round", client).json()

    def wait_for_rounds(self, client: str, rounds: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.call("GET", "/v1/history", client).json()
            if len(history) >= rounds:
                return history
            time.sleep(0.2)
        raise AssertionError(f"{rounds} rounds not aggregated in {timeout}s: {history}")

    def play_round(self, round_number: int, losses: dict[str, float], num_samples: dict[str, int]) -> None:
        """Every sampled client pushes a valid delta with the given train (and eval) loss."""
        anyone = next(iter(num_samples))
        status = self.round(anyone)
        assert status["round"] == round_number and status["phase"] == "training", status
        for client in status["sampled"]:
            metrics = {"train_loss": losses[client], "eval_loss": losses[client] + 0.25, "steps": 4.0}
            response = self.push(client, round_number, self.delta(client, 0.01, metrics), num_samples[client])
            assert response.status_code == 202, response.text


def live_server_args(model_dir: Path, state_dir: Path, **overrides: Any) -> list[str]:
    settings: dict[str, Any] = {
        "model_name_or_path": model_dir, "state_dir": state_dir, "num_clients": 3, "sample_clients": 2,
        "num_rounds": 3, "max_steps": 4, "learning_rate": 0.05, "peft_lora_r": 4, "peft_lora_alpha": 8,
        "seq_length": 128, "workers": 2, "threads": 4, "seed": 7, "round_timeout": 0, "rate_limit": 0,
    }
    settings.update(overrides)
    return [arg for key, value in settings.items() for arg in (f"--{key}", str(value))]


# ------------------------------------------------------------------------------------------ Flask test client
@pytest.fixture(scope="module")
def fresh_state(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dashboard")
    config = FederationArguments(model_name_or_path=str(tiny_model_dir), num_clients=3, sample_clients=2,
                                 num_rounds=3, peft_lora_r=4, round_timeout=0, save_model_freq=0)
    Federation.initialize(config, root / "fresh")
    return root / "fresh"


@pytest.fixture
def app_with_auth(fresh_state: Path, tmp_path: Path) -> tuple[FlaskClient, Federation, dict[str, str]]:
    state = tmp_path / "state"
    shutil.copytree(fresh_state, state)
    tokens_file = tmp_path / "tokens.json"
    tokens = {name: add_token(tokens_file, name) for name in ("alice", "bob", "carol")}
    tokens["admin"] = add_token(tokens_file, None)
    federation = Federation(Store(state))
    app = create_app(federation, TokenRegistry(tokens_file), start_ticker=False)
    yield app.test_client(), federation, tokens
    federation.store.close()


def bearer(token: str, client: str = "dashboard") -> dict[str, str]:
    return {"X-FedLLM-Client": client, "Authorization": f"Bearer {token}"}


def test_page_and_assets_are_public_self_contained_and_hold_no_data(app_with_auth) -> None:
    http, federation, _tokens = app_with_auth
    page = http.get("/")  # no client header, no token
    assert page.status_code == 200 and page.mimetype == "text/html"
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    html = page.get_data(as_text=True)
    assert federation.config.model_name_or_path not in html  # the page is a shell; data comes from the API
    assets = re.findall(r'(?:src|href)="(/dashboard/static/[^"]+)"', html)
    assert sorted(assets) == ["/dashboard/static/dashboard.css", "/dashboard/static/dashboard.js"]
    for asset in assets:
        response = http.get(asset)
        assert response.status_code == 200, asset
        body = response.get_data(as_text=True)
        # Nothing from outside the server: no absolute URL but the SVG namespace name.
        assert re.findall(r"https?://[^\s\"')]+", body.replace("http://www.w3.org/2000/svg", "")) == [], asset
        assert "X-FedLLM-Client" in body or asset.endswith(".css")
    assert http.get("/dashboard/static/nope.js").status_code == 404
    # The files the page needs ship in the package (pyproject package-data: static/*).
    assert {p.name for p in STATIC.iterdir()} >= {"index.html", "dashboard.js", "dashboard.css"}


def test_clients_endpoint_shows_each_clients_state(app_with_auth) -> None:
    http, federation, tokens = app_with_auth
    assert http.get("/v1/clients", headers={"X-FedLLM-Client": "alice"}).status_code == 401
    empty = http.get("/v1/clients", headers=bearer(tokens["alice"], "alice")).get_json()
    assert empty["clients"] == [] and empty["phase"] == "waiting" and empty["round"] == 0
    federation.join("alice", 10)
    waiting = http.get("/v1/clients", headers=bearer(tokens["admin"])).get_json()
    assert [(c["client_id"], c["state"], c["sampled"]) for c in waiting["clients"]] == [("alice", "waiting", False)]
    federation.join("bob", 30)
    federation.join("carol", 60)
    sampled = federation.status()["sampled"]
    idle = next(c for c in ("alice", "bob", "carol") if c not in sampled)
    config = federation.client_config()
    body = encode({k: torch.zeros(v) for k, v in config["upload_tensors"].items()}, config["federation"]["wire_dtype"],
                  metadata={"train_loss": "1.5"})
    pushed = http.post("/v1/update?round=1", data=body, headers={
        **bearer(tokens[sampled[0]], sampled[0]), "X-FedLLM-Num-Samples": "10", "Content-Type": "application/octet-stream"})
    assert pushed.status_code == 202, pushed.get_json()
    data = http.get("/v1/clients", headers=bearer(tokens["admin"])).get_json()
    states = {c["client_id"]: c for c in data["clients"]}
    assert (data["round"], data["phase"]) == (1, "training")
    assert states[sampled[0]]["state"] == "submitted" and states[sampled[0]]["submitted_at"] is not None
    assert states[sampled[1]]["state"] == "training" and states[sampled[1]]["sampled"] is True
    assert states[idle]["state"] == "idle" and states[idle]["sampled"] is False
    assert {c["num_samples"] for c in data["clients"]} == {10, 30, 60}
    for c in data["clients"]:
        assert c["joined_at"] <= c["last_seen"] <= data["time"]
        assert set(c) >= {"client_id", "state", "sampled", "num_samples", "joined_at", "last_seen", "rounds_joined"}


def test_admin_token_reads_under_any_client_id_but_never_writes(app_with_auth) -> None:
    http, _federation, tokens = app_with_auth
    for path in ("/v1/round", "/v1/config", "/v1/history", "/v1/clients", "/v1/global"):
        assert http.get(path, headers=bearer(tokens["admin"], "dashboard")).status_code == 200, path
        assert http.get(path, headers=bearer(tokens["admin"], "alice")).status_code == 200, path
    # Reading as a client still needs that client's token.
    assert http.get("/v1/round", headers={"X-FedLLM-Client": "dashboard"}).status_code == 401
    assert http.get("/v1/round", headers=bearer("not-a-token")).status_code == 401
    assert http.get("/v1/round", headers=bearer(tokens["alice"], "bob")).status_code == 403
    assert http.get("/v1/round", headers=bearer(tokens["alice"], "alice")).status_code == 200
    # The admin token is for reading (and operator actions): it cannot join or push as a client.
    joined = http.post("/v1/join", json={"num_samples": 5}, headers=bearer(tokens["admin"], "alice"))
    assert joined.status_code in (401, 403), joined.get_json()
    pushed = http.post("/v1/update?round=1", data=b"x", headers={**bearer(tokens["admin"], "alice"),
                                                                  "X-FedLLM-Num-Samples": "1"})
    assert pushed.status_code in (401, 403), pushed.get_json()
    # An invalid client id is still refused, admin token or not.
    assert http.get("/v1/round", headers=bearer(tokens["admin"], "bad id!")).status_code == 400


# ------------------------------------------------------------------------------------------ headless Chromium
@pytest.mark.integration
@requires_chromium
def test_dashboard_in_headless_chromium(tiny_model_dir, tmp_path, start_server) -> None:
    server = start_server(live_server_args(tiny_model_dir, tmp_path / "state"))
    live = LiveFederation(server.url)
    samples = {"alice": 120, "bob": 80, "carol": 200}
    for client, n in samples.items():
        live.join(client, n)
    live.play_round(1, {"alice": 3.1, "bob": 3.3, "carol": 2.9}, samples)
    live.wait_for_rounds("alice", 1)
    live.play_round(2, {"alice": 2.2, "bob": 2.4, "carol": 2.0}, samples)
    history = live.wait_for_rounds("alice", 2)
    # Round 3 under way: one sampled client has pushed, the other is still training.
    status = live.round("alice")
    first = status["sampled"][0]
    assert live.push(first, 3, live.delta(first, 0.01, {"train_loss": 1.7}), samples[first]).status_code == 202

    html = run_chromium(server.url + "/", tmp_path, "--virtual-time-budget=5000", "--dump-dom").stdout
    dom = Dom(html)
    assert dom.find("body", data_loaded="true"), html[:3000]
    assert dom.by_id("round")["data-round"] == "3"
    assert dom.by_id("phase")["data-phase"] == "training"
    assert dom.by_id("login").get("hidden") is not None  # auth is off: no token asked
    assert dom.by_id("chart-loss")["data-points"] == "2"
    assert series_points(html, "loss", "train_loss") == [(r["round"], pytest.approx(r["train_loss"])) for r in history]
    if any(r.get("eval_loss") is not None for r in history):  # the federated eval loss, where the server reports it
        assert [p[0] for p in series_points(html, "loss", "eval_loss")] == [1, 2]
    assert series_points(html, "participants", "participants") == [(1, 2), (2, 2)]
    assert series_points(html, "bytes", "bytes_received") == [(r["round"], r["bytes_received"]) for r in history]
    assert [p[0] for p in series_points(html, "seconds", "seconds")] == [1, 2]
    states = {row["data-client"]: row["data-state"] for row in dom.find("tr") if "data-client" in row}
    second = status["sampled"][1]
    idle = next(c for c in samples if c not in status["sampled"])
    assert states == {first: "submitted", second: "training", idle: "idle"}
    text = " ".join(dom.text)
    assert str(tiny_model_dir) in text and "fedavg" in text

    shot = tmp_path / "dashboard.png"
    run_chromium(server.url + "/", tmp_path, "--virtual-time-budget=5000", "--window-size=1360,1040",
                 f"--screenshot={shot}")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a drawn page, not a blank one
    assert int.from_bytes(png[16:20], "big") == 1360
    if os.environ.get("FEDLLM_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "dashboard.png")


@pytest.mark.integration
def test_auth_on_the_page_asks_for_the_admin_token_and_metrics_need_it(tiny_model_dir, tmp_path, start_server) -> None:
    tokens_file = tmp_path / "tokens.json"
    alice = add_token(tokens_file, "alice")
    admin = add_token(tokens_file, None)
    server = start_server(live_server_args(tiny_model_dir, tmp_path / "state", auth_tokens=tokens_file, num_clients=1,
                                           sample_clients=1))
    LiveFederation(server.url, {"alice": alice}).join("alice", 10)
    # What the page sends once the operator typed the admin token.
    for path in ("/v1/round", "/v1/config", "/v1/history", "/v1/clients"):
        response = requests.get(server.url + path, headers=bearer(admin), timeout=30)
        assert response.status_code == 200, (path, response.text)
    clients = requests.get(server.url + "/v1/clients", headers=bearer(admin), timeout=30).json()["clients"]
    assert [c["client_id"] for c in clients] == ["alice"]
    # /metrics: the viewer or admin token, no client header; a client's token is refused.
    assert requests.get(server.url + "/metrics", timeout=30).status_code == 401
    assert requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {alice}"}, timeout=30).status_code == 403
    metrics = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {admin}"}, timeout=30)
    assert metrics.status_code == 200 and "fedllm_clients_known 1.0" in metrics.text

    if find_chromium() is None:
        pytest.skip("headless Chromium is not installed (.ci/run installs Debian's 'chromium')")
    html = run_chromium(server.url + "/", tmp_path, "--virtual-time-budget=3000", "--dump-dom").stdout
    dom = Dom(html)
    assert dom.by_id("login").get("hidden") is None and dom.by_id("main").get("hidden") is not None
    assert dom.find("input", id="token", type="password")
    assert "alice" not in html and admin not in html and alice not in html
