"""A client that trusts nothing it receives: a malicious server or a man in the middle cannot make it write or
delete files outside its output directory, read an unbounded body, train with settings beyond its own bounds,
follow a redirect with its token, or send its token in cleartext. Every refusal is one line and exit 2.

The man in the middle is :class:`HeaderRewritingProxy`, a real HTTP proxy on 127.0.0.1 in front of the
server's own Flask app (or of ``run_server.sh`` in the integration test), rewriting the answers' headers.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import torch
from flask import Flask, Response, redirect, request
from werkzeug.serving import make_server

import client_http
from fedllm.client import http as client_http_module
from fedllm.client.http import FederationClient, ServerError
from fedllm.client.runner import Poller, wait_for_server
from fedllm.client.trust import (
    InsecureTransportError,
    UntrustedServerError,
    check_round_config,
    check_round_status,
    check_server_config,
    check_token_transport,
    download_limit,
    is_loopback,
)
from fedllm.config import ClientArguments, FederationArguments
from fedllm.data import write_demo_data
from fedllm.server.app import create_app
from fedllm.server.federation import Federation
from fedllm.server.store import Store
from fedllm.wire import encode

from .conftest import run_client_process

# The served federation's round settings, above the bounds the refusal tests give the client.
SERVED = dict(max_steps=50, learning_rate=1e-2, peft_lora_r=4)
TRAVERSING_ETAGS = ['"../../../../x/model"', "../../../../x/model", '"/../../../x/model"',
                    '"' + "0" * 64 + '/../../../../x/model"']
MALFORMED_ETAGS = ['"' + "A" * 64 + '"', '"' + "0" * 63 + '"', 'W/"' + "0" * 64 + '"', '"' + "0" * 65 + '"', None]
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length",
                        "server", "date"})


def new_federation(state_dir: Path, model_dir: Path, **overrides) -> Federation:
    settings = dict(model_name_or_path=str(model_dir), num_clients=1, sample_clients=1, num_rounds=1,
                    peft_lora_alpha=8, seq_length=64, **SERVED)
    settings.update(overrides)
    Federation.initialize(FederationArguments(**settings), state_dir)
    return Federation(Store(state_dir))


@contextmanager
def serving(app: Flask) -> Iterator[str]:
    """``app`` on a loopback port, in a thread."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def federation(tiny_model_dir, tmp_path_factory) -> Federation:
    return new_federation(tmp_path_factory.mktemp("trust-state"), tiny_model_dir)


@pytest.fixture(scope="module")
def server_url(federation) -> Iterator[str]:
    with serving(create_app(federation)) as url:
        yield url


class HeaderRewritingProxy:
    """A man in the middle on 127.0.0.1: forwards every request to ``upstream_port`` and lets ``rewrite`` change
    the answer's headers (a dict) before passing it on."""

    def __init__(self, upstream_port: int, rewrite: Callable[[dict[str, str]], None]):
        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._forward()

            def do_POST(self) -> None:
                self._forward()

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                out = {k: v for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP}
                rewrite(out)
                self.send_response(answer.status)
                for key, value in out.items():
                    self.send_header(key, value)
                if answer.status != 304:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def setting(name: str, value: str | None) -> Callable[[dict[str, str]], None]:
    """A rewrite that sets header ``name`` to ``value`` (None: removes it)."""

    def rewrite(headers: dict[str, str]) -> None:
        for key in [k for k in headers if k.lower() == name.lower()]:
            del headers[key]
        if value is not None:
            headers[name] = value

    return rewrite


@contextmanager
def proxy(url: str, rewrite: Callable[[dict[str, str]], None]) -> Iterator[str]:
    man_in_the_middle = HeaderRewritingProxy(int(url.rsplit(":", 1)[1]), rewrite)
    try:
        yield man_in_the_middle.url
    finally:
        man_in_the_middle.close()


def traversal_target(cache_dir: Path, etag: str | None) -> Path:
    """Where a client that named its file after the ETag would have written (and then deleted) it."""
    text = (etag or "").strip().strip('"')
    return Path(os.path.normpath(cache_dir / f"global-v000000-{text}.safetensors"))


def files_outside(root: Path, inside: Path) -> dict[Path, bytes]:
    """Every file below ``root`` but not below ``inside``, with its bytes."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and inside not in p.parents}



# ------------------------------------------------------------------------------------------ ETag and version headers
@pytest.mark.parametrize("etag", TRAVERSING_ETAGS + MALFORMED_ETAGS)
def test_an_etag_that_is_not_a_sha256_is_refused_and_nothing_outside_the_output_dir_changes(etag, server_url, tmp_path):
    output_dir = tmp_path / "home" / "client"
    cache_dir = output_dir / "cache"
    target = traversal_target(cache_dir, etag)
    if output_dir not in target.parents:  # the file the traversal aims at exists and must stay as it is
        assert tmp_path in target.parents
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"the data owner's own file")
    before = files_outside(tmp_path, output_dir)
    with proxy(server_url, setting("ETag", etag)) as url:
        client = FederationClient(url, "alice", max_retries=1, quiet=True)
        with pytest.raises(UntrustedServerError, match="ETag .* is not a sha256"):
            client.download_global(cache_dir)
    assert files_outside(tmp_path, output_dir) == before
    assert not [p for p in output_dir.rglob("*") if p.is_file()]
    assert client.bytes_down == 0


@pytest.mark.parametrize("version", ["../1", "-1", "1e3", "", "0x1", "1234567890", None])
def test_a_version_that_is_not_a_small_integer_is_refused(version, server_url, tmp_path):
    with proxy(server_url, setting("X-FedLLM-Version", version)) as url:
        client = FederationClient(url, "alice", max_retries=1, quiet=True)
        with pytest.raises(UntrustedServerError, match="X-FedLLM-Version"):
            client.download_global(tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_a_verified_download_is_cached_under_the_clients_own_name_and_revalidated(federation, server_url, tmp_path):
    with proxy(server_url, lambda headers: None) as url:
        client = FederationClient(url, "alice", max_retries=1, quiet=True)
        path, version, sha = client.download_global(tmp_path / "cache")
        assert (path.parent, path.name) == (tmp_path / "cache", f"global-v000000-{sha}.safetensors")
        assert sha == federation.latest_global().sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert client.download_global(tmp_path / "cache") == (path, version, sha)  # a 304: not downloaded again
    assert client.bytes_down == path.stat().st_size


# ------------------------------------------------------------------------------------------ the size of a download
def test_the_download_limit_covers_the_served_global_with_its_extras(federation, tiny_model_dir, tmp_path):
    scaffold = new_federation(tmp_path / "scaffold", tiny_model_dir, fed_alg="scaffold")
    for served in (federation, scaffold):
        config = served.client_config()
        size = Path(served.latest_global().path).stat().st_size
        assert size <= download_limit(config) < size + (2 << 20)
    assert len(scaffold.client_config()["upload_tensors"]) == 2 * len(scaffold.client_config()["adapter"])


def global_app(body: Callable[[], bytes | Iterator[bytes]], etag: str) -> Flask:
    """A server whose /v1/global serves ``body()`` as version 0 with ETag ``etag``."""
    app = Flask("oversize")

    @app.get("/v1/global")
    def serve():
        return Response(body(), headers={"ETag": f'"{etag}"', "X-FedLLM-Version": "0"})

    return app


def test_a_body_announced_over_the_limit_is_refused_unread(tmp_path):
    body = encode({"w": torch.ones(4096)})
    with serving(global_app(lambda: body, hashlib.sha256(body).hexdigest())) as url:
        client = FederationClient(url, "alice", max_retries=1, quiet=True)
        with pytest.raises(UntrustedServerError, match=rf"larger than the 1000 bytes .*Content-Length {len(body)}"):
            client.download_global(tmp_path / "cache", max_bytes=1000)
    assert not list((tmp_path / "cache").iterdir()) and client.bytes_down == 0


def test_a_streamed_body_is_cut_off_at_the_limit(tmp_path):
    produced = []

    def endless() -> Iterator[bytes]:
        for _ in range(256):  # 256 MiB, without a Content-Length
            produced.append(1)
            yield b"\0" * (1 << 20)

    with serving(global_app(endless, "0" * 64)) as url:
        client = FederationClient(url, "alice", max_retries=1, quiet=True)
        with pytest.raises(UntrustedServerError, match=r"cut off at 2097152 bytes"):
            client.download_global(tmp_path / "cache", max_bytes=2 << 20)
    assert not list((tmp_path / "cache").iterdir()) and client.bytes_down == 0
    assert len(produced) < 256


def test_a_json_answer_over_its_limit_or_not_json_is_refused(monkeypatch):
    app = Flask("json")

    @app.get("/v1/round")
    def big():
        return Response('{"round": 1, "pad": "' + "x" * 1000 + '"}', mimetype="application/json")

    @app.get("/v1/config")
    def not_json():
        return Response("<html>hello</html>", mimetype="text/html")

    monkeypatch.setattr(client_http_module, "MAX_JSON_BYTES", 100)
    with serving(app) as url:
        client = FederationClient(url, "alice", max_retries=0, quiet=True)
        with pytest.raises(UntrustedServerError, match="GET /v1/round passes 100 bytes"):
            client.round_status()
        with pytest.raises(UntrustedServerError, match="GET /v1/config is not JSON"):
            client.config()


# ------------------------------------------------------------------------------------------ 304 without a copy
def test_a_304_for_a_copy_the_client_does_not_hold_downloads_afresh(tmp_path):
    body = encode({"w": torch.ones(8)})
    sha = hashlib.sha256(body).hexdigest()
    asked: list[str | None] = []
    app = Flask("not-modified")

    @app.get("/v1/global")
    def lying():
        asked.append(request.headers.get("If-None-Match"))
        status = 304 if len(asked) == 1 else 200  # "not modified", to a client that holds nothing (or another copy)
        return Response(body if status == 200 else b"", status=status,
                        headers={"ETag": f'"{sha}"', "X-FedLLM-Version": "3"})

    cache = tmp_path / "cache"
    with serving(app) as url:
        client = FederationClient(url, "alice", max_retries=2, quiet=True)
        path, version, served_sha = client.download_global(cache, max_bytes=len(body))
        assert (version, served_sha, path.read_bytes()) == (3, sha, body)
        assert asked == [None, None]
        # A cached copy of another sha256, and a 304 that names this one: downloaded again, without a condition.
        path.rename(cache / f"global-v000002-{'1' * 64}.safetensors")
        asked.clear()
        path, _version, _sha = client.download_global(cache, max_bytes=len(body))
        assert asked == [f'"{"1" * 64}"', None] and path.read_bytes() == body
        assert [p.name for p in cache.iterdir()] == [path.name]


# ------------------------------------------------------------------------------------------ bounds on served settings
def args(**overrides) -> ClientArguments:
    return ClientArguments(client_id="alice", **overrides)


@pytest.mark.parametrize(("round_config", "bounds", "message"), [
    ({"max_steps": 10001, "learning_rate": 1e-4}, {}, "--max_local_steps 10000"),
    ({"max_steps": 20, "learning_rate": 1e-4}, {"max_local_steps": 10}, "asks for 20 local steps"),
    ({"max_steps": 0, "learning_rate": 1e-4}, {}, "--max_local_steps"),
    ({"max_steps": True, "learning_rate": 1e-4}, {}, "--max_local_steps"),
    ({"max_steps": "10", "learning_rate": 1e-4}, {}, "--max_local_steps"),
    ({"max_steps": 10, "learning_rate": 2.0}, {}, "--max_learning_rate 1"),
    ({"max_steps": 10, "learning_rate": 1e-2}, {"max_learning_rate": 1e-3}, "learning rate 0.01"),
    ({"max_steps": 10, "learning_rate": float("nan")}, {}, "finite"),
    ({"max_steps": 10, "learning_rate": float("inf")}, {}, "finite"),
    ({"max_steps": 10, "learning_rate": 0}, {}, "above 0"),
    ({"max_steps": 10, "learning_rate": -1e-4}, {}, "above 0"),
    ({"max_steps": 10, "learning_rate": "1e-4"}, {}, "--max_learning_rate"),
])
def test_served_round_settings_beyond_the_clients_bounds_are_refused(round_config, bounds, message):
    with pytest.raises(UntrustedServerError, match=message):
        check_round_config({"round_config": round_config}, args(**bounds))


def test_served_round_settings_within_the_bounds_are_taken():
    assert check_round_config({"round_config": {"max_steps": 10000, "learning_rate": 1}}, args()) == (1.0, 10000)
    assert check_round_config({"round_config": {"max_steps": 3, "learning_rate": 5e-5}}, args()) == (5e-5, 3)


def test_a_malformed_or_oversized_server_config_is_refused(federation):
    good = federation.client_config()
    check_server_config(good, args())
    adapter = good["adapter"]
    name = next(iter(adapter))

    def changed(**parts) -> dict:
        return {**good, **parts}

    cases = [
        (changed(lora_config={**good["lora_config"], "r": 4096}), "LoRA rank 4096 .* --max_lora_rank 1024"),
        (changed(lora_config={**good["lora_config"], "r": "4"}), "LoRA rank"),
        (changed(adapter={**adapter, name: [-1, 4]}), "invalid tensor"),
        (changed(adapter={**adapter, name: [2] * 5}), "invalid tensor"),
        (changed(adapter={}), "no tensors"),
        (changed(upload_tensors={**good["upload_tensors"], name: [1, 1]}), "do not include its adapter"),
        (changed(upload_tensors={**good["upload_tensors"], "control.x": [99999, 99999]}), "do not mirror"),
        (changed(federation={**good["federation"], "no_such_option": 1}), "options this client does not know"),
        (changed(federation={**good["federation"], "num_rounds": 0}), "num_rounds"),
        (changed(federation={**good["federation"], "model_name_or_path": ""}), "no base model"),
        (changed(round_config=[]), "round_config"),
        (changed(federation_id=None), "federation_id"),
        ([], "not a JSON object"),
    ]
    for config, message in cases:
        with pytest.raises(UntrustedServerError, match=message):
            check_server_config(config, args())
    with pytest.raises(UntrustedServerError, match="LoRA rank 4 "):
        check_server_config(good, args(max_lora_rank=2))


@pytest.mark.parametrize("status", [
    {"round": "../x", "phase": "training", "selected": True, "submitted": False},
    {"round": -1, "phase": "training", "selected": True, "submitted": False},
    {"round": 1, "phase": "anything", "selected": True, "submitted": False},
    {"round": 1, "phase": "training", "selected": "yes", "submitted": False},
    {"round": 1, "phase": "training"},
    ["round", 1],
])
def test_a_malformed_round_status_is_refused(status):
    with pytest.raises(UntrustedServerError):
        check_round_status(status)


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    code = client_http.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--max_local_steps", "10"], "the server asks for 50 local steps; this client takes an integer from 1 to "
                                  "--max_local_steps 10"),
    (["--max_learning_rate", "1e-3"], "the server asks for learning rate 0.01; this client takes a finite one above 0 "
                                      "and at most --max_learning_rate 0.001"),
    (["--max_lora_rank", "2"], "the server's LoRA rank 4 is not an integer from 1 to --max_lora_rank 2"),
])
def test_the_client_exits_2_with_one_line_on_settings_beyond_its_bounds(flags, message, federation, server_url,
                                                                        tmp_path, capsys, restore_logging):
    code, err = run_main(["--server_url", server_url, "--client_id", "alice", "--output_dir", str(tmp_path),
                          "--quiet", "true", *flags], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert federation.status()["clients_joined"] == 0  # refused before it loaded anything or joined


def test_a_missing_local_model_is_one_line_and_exit_2(federation, server_url, tmp_path, capsys, restore_logging):
    code, err = run_main(["--server_url", server_url, "--client_id", "alice", "--output_dir", str(tmp_path / "out"),
                          "--model_name_or_path", str(tmp_path / "no-model"), "--quiet", "true"], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"--model_name_or_path {str(tmp_path / 'no-model')!r}: no such directory" in err
    assert federation.status()["clients_joined"] == 0


# ------------------------------------------------------------------------------------------ transport and address
def test_a_token_is_never_sent_in_cleartext_to_another_machine():
    for url in ("http://10.0.0.5:8080", "http://example.org", "http://localhost.example.org:8080",
                "http://127.0.0.1.example.org", "http://[2001:db8::1]:8080"):
        with pytest.raises(InsecureTransportError, match="--allow_insecure_http"):
            check_token_transport(url, True, False)
        with pytest.raises(InsecureTransportError, match="in cleartext"):
            FederationClient(url, "alice", token="secret")
        check_token_transport(url, True, True)  # the data owner allowed it
        check_token_transport(url, False, False)  # no token to leak
        check_token_transport(url.replace("http://", "https://"), True, False)
    for url in ("http://127.0.0.1:8080", "http://127.5.6.7", "http://localhost:8080", "http://LOCALHOST.",
                "http://[::1]:8080"):
        check_token_transport(url, True, False)
    assert not is_loopback("0.0.0.0") and is_loopback("::1") and is_loopback("127.255.255.254")


def test_the_client_refuses_cleartext_before_any_request(tmp_path, capsys, monkeypatch, restore_logging):
    def no_traffic(*args: object, **kwargs: object) -> None:
        raise AssertionError("the client sent a request")

    monkeypatch.setattr(requests.Session, "request", no_traffic)
    code, err = run_main(["--server_url", "http://10.0.0.5:8080", "--client_id", "alice", "--token", "secret",
                          "--output_dir", str(tmp_path), "--quiet", "true"], capsys)
    assert code == 2 and "--allow_insecure_http" in err and "secret" not in err and "Traceback" not in err


@pytest.mark.parametrize(("url", "message"), [
    ("127.0.0.1:8080", "did you mean http://127.0.0.1:8080?"),
    ("localhost:8080", "did you mean http://localhost:8080?"),
    ("ftp://127.0.0.1:8080", "is not an http:// or https:// URL"),
    ("http://", "is not an http:// or https:// URL"),
])
def test_a_server_url_without_an_http_scheme_is_a_clear_error(url, message, tmp_path, capsys, restore_logging):
    with pytest.raises(ValueError, match=message):
        FederationClient(url, "alice")
    code, err = run_main(["--server_url", url, "--client_id", "alice", "--output_dir", str(tmp_path),
                          "--quiet", "true"], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_a_redirect_is_not_followed_with_the_token():
    seen: list[str | None] = []
    elsewhere = Flask("elsewhere")

    @elsewhere.get("/v1/round")
    def record():
        seen.append(request.headers.get("Authorization"))
        return {"round": 0}

    with serving(elsewhere) as other_url:
        app = Flask("redirecting")

        @app.get("/v1/round")
        def away():
            return redirect(other_url + "/v1/round", 302)

        with serving(app) as url:
            client = FederationClient(url, "alice", token="secret", max_retries=0, quiet=True)
            with pytest.raises(ServerError, match="HTTP 302: redirect not followed"):
                client.round_status()
    assert seen == []


def test_waiting_for_an_unreachable_server_ends_after_server_wait_timeout(caplog):
    with socket.socket() as sock:  # a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = FederationClient(f"http://127.0.0.1:{port}", "alice", max_retries=8, quiet=True)
    with caplog.at_level(logging.INFO, logger="fedllm.client"):
        with pytest.raises(ConnectionError, match=r"did not answer within --server_wait_timeout 0\.5 s"):
            wait_for_server(client, Poller(0.05, 0.1), 0.5)
    assert "--server_wait_timeout 0.5" in caplog.text


# ------------------------------------------------------------------------------------------ end to end, a real client
@pytest.mark.integration
def test_a_client_process_behind_an_etag_rewriting_proxy_exits_2_and_touches_nothing(tiny_model_dir, tmp_path,
                                                                                    start_server):
    from .test_integration import server_args

    server = start_server(server_args(tiny_model_dir, tmp_path / "state", num_clients=1, sample_clients=1,
                                      num_rounds=1, max_steps=1, seq_length=64))
    data = write_demo_data(tmp_path / "data", num_clients=1, rows_per_client=8)[0]
    output_dir = tmp_path / "home" / "client"
    etag = TRAVERSING_ETAGS[0]
    target = traversal_target(output_dir / "cache", etag)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"the data owner's own file")
    before = files_outside(tmp_path / "home", output_dir)
    with proxy(server.url, setting("ETag", etag)) as url:
        client = run_client_process(["--server_url", url, "--client_id", "alice", "--dataset_name", str(data),
                                     "--batch_size", "4", "--output_dir", str(output_dir), "--quiet", "true",
                                     "--poll_interval", "0.2", "--max_poll_interval", "1"], tmp_path / "alice.log")
        code = client.wait(timeout=180)
    log = (tmp_path / "alice.log").read_text()
    assert code == 2, log[-3000:]
    assert "the server's ETag '\"../../../../x/model\"' is not a sha256" in log and "Traceback" not in log
    assert files_outside(tmp_path / "home", output_dir) == before
    assert not list((output_dir / "cache").iterdir())
