"""REST API v1 against its OpenAPI 3.1 document (fedllm.server.openapi): the document validates, it has every URL
rule and every error status where it can occur, real responses of every role conform to it, and Schemathesis
finds nothing against a live gunicorn server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
import torch
from flask.testing import FlaskClient
from openapi_spec_validator import validate
from werkzeug.test import TestResponse

from fedllm.config import FederationArguments
from fedllm.server.app import ERROR_STATUS, create_app
from fedllm.server.auth import ADMIN, VIEWER, TokenRegistry, add_token
from fedllm.server.federation import Federation
from fedllm.server.openapi import openapi_document
from fedllm.server.store import Store
from fedllm.wire import encode

from .test_dashboard import live_server_args

SPEC = openapi_document()
METHODS = frozenset({"get", "post", "put", "patch", "delete"})
# Schemathesis: examples per operation and phase, and the seed, so a CI run is repeatable; the cases it ran in all
# (both roles) are in the README's Reliability table.
SCHEMATHESIS_MAX_EXAMPLES = 50
SCHEMATHESIS_SEED = 20261201


def spec_path(flask_rule: str) -> str:
    """``/dashboard/static/<path:filename>`` -> ``/dashboard/static/{filename}``."""
    return re.sub(r"<(?:[a-z]+:)?(\w+)>", r"{\1}", flask_rule)


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def test_the_document_is_valid_openapi_3_1() -> None:
    assert SPEC["openapi"].startswith("3.1")
    validate(SPEC)  # openapi-spec-validator: raises on any error


def test_every_url_rule_of_the_app_is_documented_and_nothing_else(fresh_state: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(fresh_state, state)
    app = create_app(Federation(Store(state)), start_ticker=False)
    served = {(spec_path(rule.rule), method.lower()): rule.endpoint
              for rule in app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(path, method): operation["operationId"] for path, method, operation in operations()}
    assert served == documented


def test_every_error_type_is_documented_under_its_status() -> None:
    documented: dict[int, str] = {}
    for _path, _method, operation in operations():
        for status, response in operation["responses"].items():
            documented[int(status)] = documented.get(int(status), "") + response["description"]
    for error_type, status in ERROR_STATUS.items():
        assert f"`{error_type.error}`" in documented.get(status, ""), (error_type, status)
    # And the statuses the README's errors table lists, besides 404/405 (said once, in the description).
    assert {400, 401, 403, 408, 409, 411, 413, 414, 422, 429, 431, 503} <= set(documented)
    assert "404" in SPEC["info"]["description"] and "405" in SPEC["info"]["description"]


def test_every_identified_operation_says_its_auth_errors() -> None:
    for path, method, operation in operations():
        if operation["security"]:  # every operation but the public ones
            assert {"401", "403", "503"} <= set(operation["responses"]), (method, path)
        if path.startswith("/v1/") and operation["security"]:
            assert {"400", "429"} <= set(operation["responses"]), (method, path)


# ------------------------------------------------------------------------- real responses against the document
@pytest.fixture(scope="module")
def fresh_state(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openapi")
    config = FederationArguments(model_name_or_path=str(tiny_model_dir), num_clients=2, sample_clients=2,
                                 num_rounds=3, peft_lora_r=4, round_timeout=0, save_model_freq=0)
    Federation.initialize(config, root / "fresh")
    return root / "fresh"


class Checked:
    """A Flask test client whose every response is checked against the document's operation and status."""

    def __init__(self, http: FlaskClient, tokens: dict[str, str]):
        self.http = http
        self.tokens = tokens
        self.checked: set[tuple[str, str, int]] = set()

    def call(self, method: str, path: str, who: str | None, client: str | None = None, *, template: str | None = None,
             **kwargs: Any) -> TestResponse:
        """``who``'s token (None: none) and ``client`` as X-FedLLM-Client (default: a client token's own id, the
        dashboard's for the viewer and admin tokens); ``template``: the document's path of a templated one."""
        headers = dict(kwargs.pop("headers", {}))
        if who is not None:
            headers["Authorization"] = f"Bearer {self.tokens[who]}"
            client = client or ("dashboard" if who in (ADMIN, VIEWER) else who)
        if client is not None:
            headers["X-FedLLM-Client"] = client
        response = self.http.open(path, method=method, headers=headers, **kwargs)
        self.check(method.lower(), template or path.split("?")[0], response)
        return response

    def check(self, method: str, path: str, response: TestResponse) -> None:
        operation = SPEC["paths"][path][method]
        status = str(response.status_code)
        assert status in operation["responses"], (method, path, status, response.get_data(as_text=True))
        documented = operation["responses"][status]
        for header in documented.get("headers", {}):
            assert header in response.headers, (method, path, status, header)
        content = documented.get("content", {})
        if not content:
            assert response.get_data() == b"", (method, path, status)
            return
        assert response.mimetype in content, (method, path, status, response.mimetype)
        if response.mimetype == "application/json":
            schema = {**content[response.mimetype]["schema"], "components": SPEC["components"]}
            jsonschema.Draft202012Validator(schema).validate(response.get_json())
        self.checked.add((method, path, response.status_code))


@pytest.fixture
def checked(fresh_state: Path, tmp_path: Path) -> Iterator[tuple[Checked, Federation]]:
    state = tmp_path / "state"
    shutil.copytree(fresh_state, state)
    tokens_file = tmp_path / "tokens.json"
    tokens = {name: add_token(tokens_file, name) for name in ("alice", "bob")}
    tokens[ADMIN] = add_token(tokens_file, None, ADMIN)
    tokens[VIEWER] = add_token(tokens_file, None, VIEWER)
    federation = Federation(Store(state))
    yield Checked(create_app(federation, TokenRegistry(tokens_file), start_ticker=False).test_client(), tokens), \
        federation
    federation.store.close()


def zero_update(federation: Federation, train_loss: str) -> bytes:
    tensors = {name: torch.zeros(shape) for name, shape in federation.upload_spec.items()}
    return encode(tensors, "float32", metadata={"train_loss": train_loss, "steps": "2"})


def test_responses_of_every_role_conform_to_the_document(checked: tuple[Checked, Federation]) -> None:
    api, federation = checked
    reads = ["/v1/round", "/v1/config", "/v1/history", "/v1/clients"]
    for who in ("alice", VIEWER):  # before any round
        for path in reads:
            assert api.call("GET", path, who).status_code == 200
    assert api.call("POST", "/v1/join", "alice", json={"num_samples": 10}).status_code == 200
    assert api.call("POST", "/v1/join", "bob", json={"num_samples": 30.0}).status_code == 200  # JSON's 30.0 is 30
    body = zero_update(federation, "1.5")
    for client in ("alice", "bob"):
        accepted = api.call("POST", "/v1/update?round=1", client, data=body, template="/v1/update",
                            headers={"X-FedLLM-Num-Samples": "10", "Content-Type": "application/octet-stream"})
        assert accepted.status_code == 202, accepted.get_json()
    assert federation.tick()  # round 1 aggregated: history, metrics, round 2 open
    for who in ("alice", "bob", VIEWER, ADMIN):
        for path in reads:
            assert api.call("GET", path, who).status_code == 200
        latest = api.call("GET", "/v1/global", who)
        assert latest.status_code == 200
        assert api.call("GET", "/v1/global", who, headers={"If-None-Match": latest.headers["ETag"]}).status_code == 304
    for path in ("/healthz", "/readyz", "/v1/openapi.json", "/"):
        assert api.call("GET", path, None).status_code == 200
    assert api.call("GET", "/dashboard/static/dashboard.js", None, template="/dashboard/static/{filename}") \
        .status_code == 200
    assert api.call("GET", "/metrics", ADMIN).status_code == 200
    for action in ("pause", "resume", "abort_round"):
        assert api.call("POST", f"/v1/admin/{action}", ADMIN).status_code == 200
    assert api.call("GET", "/v1/admin/events", ADMIN).status_code == 200
    # A LoRA federation's split endpoints answer 409 (tests/test_split_http.py runs them in a split federation).
    assert api.call("GET", "/v1/split/step?round=2", "alice", template="/v1/split/step").status_code == 409
    for step in ("forward", "backward"):
        assert api.call("POST", f"/v1/split/{step}?round=2&step=1", "alice", data=b"x",
                        template=f"/v1/split/{step}").status_code == 409

    # Refusals: each with its documented status and the JSON error body.
    refused = [
        api.call("GET", "/v1/round", None, client="alice"),  # no token: 401
        api.call("GET", "/v1/round", "alice", client="bob"),  # another client's token: 403
        api.call("GET", "/v1/round", "alice", client="../etc"),  # 400
        api.call("GET", "/metrics", "alice"),  # 403: a client token
        api.call("POST", "/v1/admin/pause", "alice"),  # 403: admin only
        api.call("POST", "/v1/join", ADMIN, json={"num_samples": 1}),  # 403: the admin never joins
        api.call("POST", "/v1/join", "alice", data="{", content_type="application/json"),  # 400
        api.call("POST", "/v1/join", "alice", json={"pad": "x" * 70_000}),  # 413: JSON over 64 KiB
        api.call("POST", "/v1/update?round=1", "alice", data=zero_update(federation, "2.5"), template="/v1/update",
                 headers={"X-FedLLM-Num-Samples": "10"}),  # 409: wrong round (an identical retry would be 202)
        api.call("POST", "/v1/update?round=2", "alice", data=b"not safetensors", template="/v1/update",
                 headers={"X-FedLLM-Num-Samples": "10"}),  # 400
        api.call("POST", "/v1/update?round=2", "alice", data=body, template="/v1/update",
                 headers={"X-FedLLM-Num-Samples": "11"}),  # 422: more samples than joined with
        api.call("POST", "/v1/admin/remove_client", ADMIN, json={"client_id": "zed"}),  # 404
        api.call("GET", "/dashboard/static/nope.js", None, template="/dashboard/static/{filename}"),  # 404
    ]
    assert [r.status_code for r in refused] == [401, 403, 400, 403, 403, 403, 400, 413, 409, 400, 422, 404, 404]
    assert all(r.is_json and set(r.get_json()) == {"error", "detail"} for r in refused)
    not_allowed = api.http.delete("/v1/round", headers={"Authorization": f"Bearer {api.tokens['alice']}",
                                                        "X-FedLLM-Client": "alice"})
    assert not_allowed.status_code == 405 and "GET" in not_allowed.headers["Allow"]
    assert api.call("POST", "/v1/admin/remove_client", ADMIN, json={"client_id": "bob"}).status_code == 200
    assert api.call("GET", "/v1/round", "bob").status_code == 403  # removed
    # The secure-aggregation stages (tests/test_secagg_http.py) answer 409 on a federation without them.
    secagg = [api.call("GET", "/v1/secagg", "alice"),
              api.call("POST", "/v1/secagg/masked?round=1&attempt=0", "alice", data=b"x", template="/v1/secagg/masked")]
    secagg += [api.call("POST", f"/v1/secagg/{stage}?round=1&attempt=0", "alice", json={},
                        template=f"/v1/secagg/{stage}") for stage in ("keys", "shares", "unmask")]
    assert [r.status_code for r in secagg] == [409] * 5
    assert len({path for _method, path, _status in api.checked}) == len(SPEC["paths"])  # every path was exercised


def test_the_document_is_served_without_auth(checked: tuple[Checked, Federation]) -> None:
    api, _federation = checked
    served = api.http.get("/v1/openapi.json")  # no token, no client header, on a server with --auth_tokens
    assert served.status_code == 200 and served.get_json() == json.loads(json.dumps(SPEC))
    assert list(served.get_json()["paths"]) == list(SPEC["paths"])  # in the document's own order


# ------------------------------------------------------------------------------------------------- Schemathesis
def schemathesis_run(url: str, token: str, client_id: str, report_dir: Path) -> dict[str, Any]:
    """One ``schemathesis run`` over every operation, every phase; returns its JSON report."""
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/v1/openapi.json",
        # Every check but positive_data_acceptance: a schema-valid body is not yet a delta of this federation's
        # adapter (that takes the tensors' names, shapes and values, which no schema states).
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", str(SCHEMATHESIS_MAX_EXAMPLES), "--seed", str(SCHEMATHESIS_SEED), "--workers", "1",
        "--generation-database", "none", "--request-timeout", "30", "--no-color",
        "-H", f"Authorization: Bearer {token}", "-H", f"X-FedLLM-Client: {client_id}",
        "--report", "json", "--report-dir", str(report_dir),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=report_dir.parent)
    (report,) = report_dir.glob("*.json")
    result = json.loads(report.read_text())
    assert done.returncode == 0 and result["failures"] == [] and result["errors"] == [], done.stdout[-8000:]
    return result


# The secure-aggregation stages a client posts (the admin, who never acts as a client, is refused them).
SECAGG_POSTS = [f"POST /v1/secagg/{stage}" for stage in ("keys", "masked", "shares", "unmask")]


@pytest.mark.integration
def test_schemathesis_finds_nothing_against_a_live_gunicorn_server(tiny_model_dir: Path, tmp_path: Path,
                                                                   start_server, capsys) -> None:
    tokens_file = tmp_path / "tokens.json"
    tokens = {name: add_token(tokens_file, name) for name in ("alice", "bob")}
    admin = add_token(tokens_file, None, ADMIN)
    server = start_server(live_server_args(tiny_model_dir, tmp_path / "state", num_clients=2, sample_clients=2,
                                           auth_tokens=tokens_file))
    for client, token in tokens.items():  # round 1 opens: uploads meet a real round
        joined = requests.post(server.url + "/v1/join", json={"num_samples": 100}, timeout=30,
                               headers={"Authorization": f"Bearer {token}", "X-FedLLM-Client": client})
        assert joined.status_code == 200, joined.text
    admin_only = ["GET /metrics", "GET /v1/admin/events", "POST /v1/admin/abort_round", "POST /v1/admin/pause",
                  "POST /v1/admin/remove_client", "POST /v1/admin/resume"]
    cases = 0
    # A client first (it may join and push), then the admin (full views, operator actions; it may remove clients).
    # Each role's refused operations are exactly those it may not call (Schemathesis warns of "missing auth").
    for role, token, client_id, refused in (("client", tokens["alice"], "alice", admin_only),
                                            ("admin", admin, "dashboard", ["POST /v1/join", *SECAGG_POSTS,
                                                                           "POST /v1/split/backward",
                                                                           "POST /v1/split/forward", "POST /v1/update"])):
        report = schemathesis_run(server.url, token, client_id, tmp_path / f"schemathesis-{role}")
        assert report["warnings"]["missing_auth"] == refused
        # Every operation but GET /v1/openapi.json, which Schemathesis leaves out as the document it read.
        assert report["operations"]["tested"] == report["operations"]["total"] == len(list(operations())) - 1
        assert {name: phase["status"] for name, phase in report["phases"].items()} == {
            "examples": "skip", "coverage": "success", "fuzzing": "success", "stateful": "success"}
        cases += report["test_cases"]["generated"]
    with capsys.disabled():
        print(f"\nschemathesis: {cases} cases, 0 failures")
    assert "Traceback" not in server.log()
