"""Slow clients cannot take the server down: 200 connections trickling a byte a second against run_server.sh
with its default settings, while a normal client polls; the trickles are cut at their deadlines."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

SLOW = 200  # half trickle their headers, half their body
HEADER_TIMEOUT = 10.0  # the server's defaults
BODY_WINDOW = 10.0


def _open_trickles(port: int) -> tuple[list[socket.socket], list[socket.socket]]:
    headers, bodies = [], []
    for i in range(SLOW):
        s = socket.create_connection(("127.0.0.1", port))
        if i % 2 == 0:
            s.sendall(b"GET /v1/round HTTP/1.1\r\nHost: x\r\n")  # and then one byte a second, never the end
            headers.append(s)
        else:
            s.sendall(b"POST /v1/update?round=1 HTTP/1.1\r\nHost: x\r\nX-FedLLM-Client: slow\r\n"
                      b"X-FedLLM-Num-Samples: 1\r\nContent-Length: 100000\r\n\r\n")
            bodies.append(s)
    return headers, bodies


def _trickle(sockets: list[socket.socket], stop: threading.Event) -> None:
    while not stop.wait(1.0):
        for s in sockets:
            try:
                s.send(b"X" if s.fileno() >= 0 else b"")
            except OSError:
                pass


def _answer(s: socket.socket) -> bytes:
    s.settimeout(30)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except OSError:
        pass
    return data


def test_slow_connections_do_not_stop_other_requests(tiny_model_dir: Path, tmp_path: Path, start_server) -> None:
    server = start_server(["--model_name_or_path", str(tiny_model_dir), "--state_dir", str(tmp_path / "state"),
                           "--num_clients", "2", "--peft_lora_r", "4"])
    port = server.port
    headers, bodies = _open_trickles(port)
    stop = threading.Event()
    trickler = threading.Thread(target=_trickle, args=(headers + bodies, stop), daemon=True)
    trickler.start()
    try:
        polls = 0
        started = time.monotonic()
        while time.monotonic() - started < HEADER_TIMEOUT + 4:
            for path in ("/healthz", "/v1/round"):
                # Every answer within 2 s (the timeout raises otherwise), however many trickles are open.
                response = requests.get(server.url + path, headers={"X-FedLLM-Client": "normal"}, timeout=2)
                assert response.status_code == 200, response.text
                polls += 1
            time.sleep(0.1)
        assert polls > 50
        answers = [_answer(s) for s in headers + bodies]
    finally:
        stop.set()
        for s in headers + bodies:
            s.close()
    cut = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
    assert len(cut) == SLOW, [a[:80] for a in answers if not a.startswith(b"HTTP/1.1 408")][:5]
    body = json.loads(cut[0].split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "request timeout" and "within" in body["detail"] or "slower" in body["detail"]
    scrape = requests.get(server.url + "/metrics", timeout=10).text
    counts = dict(re.findall(r'^fedllm_connections_cut_total\{reason="(\w+)"\} (\S+)', scrape, re.M))
    assert float(counts["header_timeout"]) == SLOW / 2 and float(counts["body_too_slow"]) == SLOW / 2
    assert "cut connection from" in server.log()
