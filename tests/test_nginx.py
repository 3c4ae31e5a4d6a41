"""deploy/nginx.conf with Debian's real nginx in front of run_server.sh: TLS, JSON errors, bounded bodies, and
200 slow connections that never reach gunicorn while a normal client is served."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from fedllm.localserver import ROOT, free_port
from fedllm.server.auth import add_token

from .test_integration import _self_signed_certificate, server_args

pytestmark = [pytest.mark.integration, pytest.mark.reliability,
              pytest.mark.skipif(shutil.which("nginx") is None,
                                 reason="nginx is not installed (.ci/run installs Debian's nginx-light)")]

SLOW = 200


def nginx_conf(tmp_path: Path, port: int, upstream: int, cert: Path, key: Path, body_limit: int) -> Path:
    """deploy/nginx.conf with its EDIT lines set for this test (paths under tmp_path, loopback ports)."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    replacements = {
        r"pid [^;]+;": f"pid {tmp_path}/nginx.pid;",
        r"error_log [^;]+;": f"error_log {tmp_path}/error.log warn;",
        r"access_log [^;]+;": f"access_log {tmp_path}/access.log;",
        r"client_body_temp_path [^;]+;": f"client_body_temp_path {tmp_path}/body;",
        r"proxy_temp_path [^;]+;": f"proxy_temp_path {tmp_path}/proxy;",
        r"client_max_body_size [^;]+;": f"client_max_body_size {body_limit};",
        r"server 127\.0\.0\.1:8080;": f"server 127.0.0.1:{upstream};",
        r"listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
        r"ssl_certificate /etc/fedllm/cert\.pem;": f"ssl_certificate {cert};",
        r"ssl_certificate_key /etc/fedllm/key\.pem;": f"ssl_certificate_key {key};",
        r"worker_processes auto;": "worker_processes 1;",
    }
    for pattern, value in replacements.items():
        text, count = re.subn(pattern, value, text)
        assert count == 1, pattern  # the file still has the line the deployment instructions name
    path = tmp_path / "nginx.conf"
    path.write_text(text)
    return path


@pytest.fixture
def front(tiny_model_dir: Path, tmp_path: Path, start_server):
    tokens_file = tmp_path / "tokens.json"
    token = add_token(tokens_file, "alice")
    server = start_server(server_args(tiny_model_dir, tmp_path / "state", auth_tokens=tokens_file, num_clients=1,
                                      sample_clients=1))
    limit = requests.get(server.url + "/v1/config", timeout=30,
                         headers={"X-FedLLM-Client": "alice", "Authorization": f"Bearer {token}"}).json()["max_upload_bytes"]
    cert, key = _self_signed_certificate(tmp_path)
    port = free_port()
    conf = nginx_conf(tmp_path, port, server.port, cert, key, limit)
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp_path), "-g", "daemon off; user root;"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            requests.get(url + "/healthz", verify=str(cert), timeout=2)
            break
        except requests.RequestException:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"nginx did not start: {proc.stdout.read().decode()}") from None
            time.sleep(0.2)
    yield url, port, cert, token, limit
    proc.terminate()
    proc.wait(timeout=30)


def test_the_front_serves_the_api_over_tls(front) -> None:
    url, _, cert, token, limit = front
    headers = {"X-FedLLM-Client": "alice", "Authorization": f"Bearer {token}"}
    assert requests.get(url + "/v1/round", headers=headers, verify=str(cert), timeout=30).json()["phase"] == "waiting"
    # nginx's own refusals are fedllm's JSON errors: a body over the server's limit, a huge header.
    too_big = requests.post(url + "/v1/update?round=1", data=b"x" * (limit + 1), verify=str(cert), timeout=60,
                            headers={**headers, "X-FedLLM-Num-Samples": "1"})
    assert too_big.status_code == 413 and too_big.json()["error"] == "upload too large"
    huge = requests.get(url + "/v1/round", headers={**headers, "X-Pad": "x" * 20000}, verify=str(cert), timeout=30)
    assert huge.status_code in (400, 431) and "error" in huge.json()
    # An unknown token still gets the server's own 401 JSON through the front.
    assert requests.get(url + "/v1/round", headers={"X-FedLLM-Client": "alice", "Authorization": "Bearer nope"},
                        verify=str(cert), timeout=30).status_code == 401


def _tls(port: int, cert: Path) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(cert))
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="127.0.0.1")


def test_slow_connections_stay_in_nginx(front) -> None:
    """200 TLS connections trickling their headers or body at 1 byte/s: every /healthz and /v1/round through the
    front answers within 2 s; header trickles are cut at client_header_timeout."""
    url, port, cert, token, _ = front
    headers_only, bodies = [], []
    for i in range(SLOW):
        s = _tls(port, cert)
        if i % 2 == 0:
            s.sendall(b"GET /v1/round HTTP/1.1\r\nHost: x\r\n")
            headers_only.append(s)
        else:
            s.sendall(b"POST /v1/update?round=1 HTTP/1.1\r\nHost: x\r\nX-FedLLM-Client: alice\r\n"
                      b"Content-Length: 100000\r\n\r\n")
            bodies.append(s)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(1.0):
            for s in headers_only + bodies:
                try:
                    s.send(b"X")
                except OSError:
                    pass

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    auth = {"X-FedLLM-Client": "alice", "Authorization": f"Bearer {token}"}
    try:
        started = time.monotonic()
        while time.monotonic() - started < 14:
            assert requests.get(url + "/healthz", verify=str(cert), timeout=2).json()["status"] == "ok"
            assert requests.get(url + "/v1/round", headers=auth, verify=str(cert), timeout=2).status_code == 200
            time.sleep(0.2)
        cut = 0
        for s in headers_only:
            s.settimeout(5)
            try:
                data = s.recv(4096)
            except (OSError, ssl.SSLError):
                data = b""
            cut += data == b"" or data.startswith(b"HTTP/1.1 408")
        assert cut == len(headers_only)  # closed (or answered 408) at the 10 s header deadline
    finally:
        stop.set()
        for s in headers_only + bodies:
            s.close()
