"""Guarantee 2: with 4 gunicorn workers and 24 clients pushing at once, exactly one aggregation per
round, no update lost or counted twice, and no reader ever sees a half-written global adapter."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from safetensors.torch import load

from ..test_integration import server_args
from .driver import HttpFederationDriver

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

NUM_CLIENTS = 24


def test_simultaneous_pushes_and_reads(tiny_model_dir, tmp_path, start_server):
    state_dir = tmp_path / "state"
    args = server_args(tiny_model_dir, state_dir, num_clients=NUM_CLIENTS, sample_clients=NUM_CLIENTS, num_rounds=3,
                       workers=4, threads=8, peft_lora_r=32, rate_limit=0)
    server = start_server(args)
    clients = {f"client{i:02d}": 10 + i for i in range(NUM_CLIENTS)}
    driver = HttpFederationDriver(clients)
    driver.join_all(server.url)  # round 1 opens
    torn: list[str] = []
    stop = threading.Event()

    def read_globals() -> int:
        """Hammer GET /v1/global while rounds close; every body must hash to its ETag."""
        session, reads = requests.Session(), 0
        while not stop.is_set():
            reply = session.get(server.url + "/v1/global", headers={"X-FedLLM-Client": "reader"}, timeout=30)
            if hashlib.sha256(reply.content).hexdigest() != reply.headers["ETag"].strip('"'):
                torn.append(reply.headers["X-FedLLM-Version"])
            reads += 1
        return reads

    def push(client: str, round_number: int, barrier: threading.Barrier) -> int:
        body = driver.body(client, round_number)
        barrier.wait()
        reply = requests.post(f"{server.url}/v1/update?round={round_number}", data=body, timeout=60,
                              headers={"X-FedLLM-Client": client, "X-FedLLM-Num-Samples": str(clients[client])})
        if reply.status_code == 202:
            driver.accepted[round_number].add(client)
        return reply.status_code

    with ThreadPoolExecutor(max_workers=NUM_CLIENTS + 4) as pool:
        readers = [pool.submit(read_globals) for _ in range(4)]
        try:
            for round_number in (1, 2, 3):
                _wait_for_round(server.url, round_number)
                barrier = threading.Barrier(NUM_CLIENTS, timeout=60)
                codes = list(pool.map(lambda c, r=round_number, b=barrier: push(c, r, b), clients))
                assert codes == [202] * NUM_CLIENTS
            _wait_for_round(server.url, None)
        finally:
            stop.set()
        total_reads = sum(r.result() for r in readers)

    assert not torn and total_reads > 0
    history = requests.get(server.url + "/v1/history", headers={"X-FedLLM-Client": "reader"}).json()
    assert [h["round"] for h in history] == [1, 2, 3]
    for record in history:
        assert sorted(record["participants"]) == sorted(clients)  # none lost
        assert record["num_samples"] == sum(clients.values())  # none counted twice
    with sqlite3.connect(state_dir / "state.db") as db:
        assert [v for (v,) in db.execute("SELECT version FROM globals ORDER BY version")] == [0, 1, 2, 3]
    assert server.log().count("aggregated:") == 3  # one aggregation per round, across 4 workers
    final = load(requests.get(server.url + "/v1/global", headers={"X-FedLLM-Client": "reader"}).content)
    for name, tensor in driver.expected_final(history).items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-6)


def _wait_for_round(url: str, round_number: int | None, timeout: float = 60.0) -> None:
    """Until round ``round_number`` is open for training (None: until finished)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = requests.get(url + "/v1/round", headers={"X-FedLLM-Client": "reader"}, timeout=30).json()
        if round_number is None and status["phase"] == "finished":
            return
        if status["round"] == round_number and status["phase"] == "training":
            return
        time.sleep(0.05)
    raise TimeoutError(f"round {round_number} did not open")
