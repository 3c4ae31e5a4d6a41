"""Guards of the real server process (run_server.sh, gunicorn with fedllm's worker): errors gunicorn itself writes
are JSON, one server per state_dir, a revoked token stops at once on every worker, no tokens in cleartext."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from fedllm.localserver import ROOT
from fedllm.server.auth import add_token
from fedllm.wire import encode

from ..test_integration import server_args

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


def raw(port: int, data: bytes) -> tuple[int, dict]:
    """Send ``data`` as-is; the status and JSON body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert b"application/json" in head.lower(), head
    return status, json.loads(body)


def test_errors_of_the_http_layer_are_json(tiny_model_dir: Path, tmp_path: Path, start_server) -> None:
    server = start_server(server_args(tiny_model_dir, tmp_path / "state"))
    cases = [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /v1/round HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * 9000 + b"\r\n\r\n", 431),
        (b"GET /v1/round HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 4000)
                                                            for i in range(20)) + b"\r\n", 431),
        (b"GET /v1/round HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", 431),
        (b"\x16\x03\x01 not http at all\r\n\r\n", 400),
        (b"POST /v1/join HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
    ]
    for request, expected in cases:
        status, body = raw(server.port, request)
        assert status == expected and set(body) == {"error", "detail"}, (request[:40], status, body)


def test_a_second_server_on_a_live_state_dir_changes_nothing(tiny_model_dir: Path, tmp_path: Path,
                                                             start_server) -> None:
    """While an upload streams in at a healthy 128 KiB/s, a second server on the same state_dir exits at once
    naming the first one's pid; the upload is unharmed (202) and the metrics folder untouched."""
    state_dir = tmp_path / "state"
    args = server_args(tiny_model_dir, state_dir, num_clients=1, sample_clients=1, num_rounds=1, max_upload_mb=8)
    server = start_server(args)
    requests.post(server.url + "/v1/join", json={"num_samples": 5}, headers={"X-FedLLM-Client": "alice"},
                  timeout=30).raise_for_status()
    spec = requests.get(server.url + "/v1/config", headers={"X-FedLLM-Client": "alice"}, timeout=30).json()
    body = encode({n: torch.full(s, 0.01) for n, s in spec["upload_tensors"].items()},
                  metadata={"train_loss": "1", "pad": "x" * (3 << 20)})  # ~25 s in flight at 128 KiB/s
    head = (f"POST /v1/update?round=1 HTTP/1.1\r\nHost: x\r\nX-FedLLM-Client: alice\r\nX-FedLLM-Num-Samples: 5\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    prometheus_before = sorted(p.name for p in (state_dir / "prometheus").iterdir())
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as live:
        live.sendall(head)
        streaming = threading.Thread(target=_send_at_rate, args=(live, body, 128 * 1024), daemon=True)
        streaming.start()
        second = subprocess.run(["bash", str(ROOT / "run_server.sh"), *args, "--host", "127.0.0.1", "--port", "1"],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert streaming.is_alive()  # the second server came and went while the upload was in flight
        assert second.returncode != 0
        assert f"is in use by pid {server.proc.pid}" in second.stderr, second.stderr[-2000:]
        assert set(prometheus_before) <= {p.name for p in (state_dir / "prometheus").iterdir()}  # not wiped
        streaming.join(timeout=120)
        answer = b""
        while chunk := live.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 202"), answer[:300]


def _send_at_rate(sock: socket.socket, data: bytes, rate: int) -> None:
    step = rate // 8
    for start in range(0, len(data), step):
        sock.sendall(data[start:start + step])
        time.sleep(0.125)


def test_a_revoked_token_stops_at_once_on_every_worker(tiny_model_dir: Path, tmp_path: Path, start_server) -> None:
    tokens_file = tmp_path / "tokens.json"
    token = add_token(tokens_file, "alice")
    server = start_server(server_args(tiny_model_dir, tmp_path / "state", auth_tokens=tokens_file, workers=3))
    headers = {"X-FedLLM-Client": "alice", "Authorization": f"Bearer {token}"}
    assert all(requests.get(server.url + "/v1/round", headers=headers, timeout=30).status_code == 200
               for _ in range(12))
    revoked = subprocess.run(["bash", str(ROOT / "run_server.sh"), "revoke", "--auth_tokens", str(tokens_file),
                              "--client_id", "alice"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert revoked.returncode == 0, revoked.stderr
    # New connections each time, so that all three workers answer some: every one refuses at once.
    statuses = [requests.get(server.url + "/v1/round", headers=headers, timeout=30).status_code for _ in range(30)]
    assert statuses == [401] * 30
    assert len(set(server.workers())) == 3


def test_tokens_over_plain_http_on_a_public_bind_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.json"
    add_token(tokens_file, "alice")
    refused = subprocess.run([sys.executable, str(ROOT / "server_http.py"), "--model_name_or_path", str(tiny_model_dir),
                              "--state_dir", str(tmp_path / "state"), "--auth_tokens", str(tokens_file),
                              "--host", "0.0.0.0", "--port", "1"],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert refused.returncode != 0 and "--allow_insecure_http" in refused.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was touched
