"""Guarantee 3: stragglers, dropouts and network cuts.

A round closes at its deadline with at least --min_fit_clients updates (else it is extended or
re-sampled, and /v1/round says so); a late update gets 409; an upload cut mid-body never becomes
an update and the client retries; a client killed mid-training resumes without double-submitting.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from fedllm.client.http import FederationClient
from fedllm.data import write_demo_data

from ..conftest import run_client_process
from ..test_integration import server_args
from .driver import HttpFederationDriver

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


def status(url: str, client: str = "observer") -> dict:
    return requests.get(url + "/v1/round", headers={"X-FedLLM-Client": client}, timeout=30).json()


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not reached")


def push(url: str, driver: HttpFederationDriver, client: str, round_number: int) -> requests.Response:
    return requests.post(f"{url}/v1/update?round={round_number}", data=driver.body(client, round_number), timeout=30,
                         headers={"X-FedLLM-Client": client, "X-FedLLM-Num-Samples": str(driver.clients[client])})


def test_deadline_closes_with_min_fit_clients_and_late_update_is_refused(tiny_model_dir, tmp_path, start_server):
    server = start_server(server_args(tiny_model_dir, tmp_path / "state", num_clients=3, sample_clients=3,
                                      num_rounds=2, round_timeout=2, min_fit_clients=1))
    driver = HttpFederationDriver({"a": 1, "b": 1, "c": 1})
    driver.join_all(server.url)
    assert push(server.url, driver, "a", 1).status_code == 202
    wait_until(lambda: status(server.url)["round"] == 2, timeout=20)
    late = push(server.url, driver, "b", 1)
    assert late.status_code == 409 and late.json()["error"] == "wrong round"
    history = requests.get(server.url + "/v1/history", headers={"X-FedLLM-Client": "a"}).json()
    assert history[0]["participants"] == ["a"] and history[0]["sampled"] == ["a", "b", "c"]


def test_deadline_without_enough_updates_is_extended(tiny_model_dir, tmp_path, start_server):
    server = start_server(server_args(tiny_model_dir, tmp_path / "state", num_clients=2, sample_clients=2,
                                      num_rounds=1, round_timeout=1, min_fit_clients=1))
    driver = HttpFederationDriver({"a": 1, "b": 1})
    first_deadline = driver.join_all(server.url)["deadline"]
    extended = wait_until(lambda: (s := status(server.url))["deadline_extensions"] >= 1 and s, timeout=20)
    assert extended["phase"] == "training" and extended["deadline"] > first_deadline
    assert push(server.url, driver, "b", 1).status_code == 202  # the round is still open
    wait_until(lambda: status(server.url)["phase"] == "finished", timeout=20)


def test_deadline_resamples_stragglers(tiny_model_dir, tmp_path, start_server):
    server = start_server(server_args(tiny_model_dir, tmp_path / "state", num_clients=4, sample_clients=2,
                                      num_rounds=1, round_timeout=1.5, min_fit_clients=2, on_insufficient="resample"))
    driver = HttpFederationDriver({"a": 1, "b": 1, "c": 1, "d": 1})
    first = driver.join_all(server.url)
    submitter, straggler = first["sampled"]
    assert push(server.url, driver, submitter, 1).status_code == 202
    resampled = wait_until(lambda: (s := status(server.url))["deadline_extensions"] >= 1 and s, timeout=20)
    assert submitter in resampled["sampled"] and straggler not in resampled["sampled"]
    assert not status(server.url, straggler)["selected"]
    refused = push(server.url, driver, straggler, 1)
    assert refused.status_code == 409 and refused.json()["error"] == "not sampled"
    replacement = next(c for c in resampled["sampled"] if c != submitter)
    assert status(server.url, replacement)["selected"]
    assert push(server.url, driver, replacement, 1).status_code == 202
    wait_until(lambda: status(server.url)["phase"] == "finished", timeout=20)


class CuttingProxy:
    """A TCP proxy to the server that cuts the first ``cuts`` connections after ``after_bytes`` request bytes."""

    def __init__(self, target_port: int, cuts: int, after_bytes: int):
        self.target_port = target_port
        self.cuts = cuts
        self.after_bytes = after_bytes
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            limit = self.after_bytes if self.connections <= self.cuts else None
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(downstream, upstream, limit), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, downstream, None), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if limit is not None and sent + len(data) >= limit:
                    sink.sendall(data[: limit - sent])
                    break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (source, sink):  # a cut: both sides see the connection drop
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()


def test_upload_cut_mid_body_never_becomes_an_update(tiny_model_dir, tmp_path, start_server):
    state_dir = tmp_path / "state"
    server = start_server(server_args(tiny_model_dir, state_dir, num_clients=1, sample_clients=1, num_rounds=1,
                                      peft_lora_r=64))
    driver = HttpFederationDriver({"alice": 5})
    driver.join_all(server.url)
    body = tmp_path / "delta.safetensors"
    body.write_bytes(driver.body("alice", 1))
    proxy = CuttingProxy(server.port, cuts=3, after_bytes=body.stat().st_size // 2)
    try:
        client = FederationClient(f"http://127.0.0.1:{proxy.port}", "alice", max_retries=0, quiet=True)
        with pytest.raises(ConnectionError):
            client.upload_update(1, body, 5)
        time.sleep(0.5)
        assert status(server.url)["received"] == []  # the partial body is not an update
        assert not list((state_dir / "incoming").iterdir()) and not list((state_dir / "updates").rglob("*.safetensors"))
        # With retries, the client gets through once the network recovers (after two more cuts).
        client = FederationClient(f"http://127.0.0.1:{proxy.port}", "alice", max_retries=4, quiet=True)
        assert client.upload_update(1, body, 5) == {"accepted": True, "duplicate": False, "round": 1,
                                                     "sha256": client_sha(body)}
        assert proxy.connections == 4
    finally:
        proxy.close()
    wait_until(lambda: status(server.url)["phase"] == "finished")
    history = requests.get(server.url + "/v1/history", headers={"X-FedLLM-Client": "alice"}).json()
    assert history[0]["participants"] == ["alice"] and history[0]["num_samples"] == 5


def client_sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_client_killed_mid_training_resumes_without_double_submit(tiny_model_dir, tmp_path, start_server):
    server = start_server(server_args(tiny_model_dir, tmp_path / "state", num_clients=1, sample_clients=1,
                                      num_rounds=1, max_steps=400))
    data = write_demo_data(tmp_path / "data", num_clients=1, rows_per_client=16)[0]
    args = ["--server_url", server.url, "--client_id", "alice", "--dataset_name", str(data), "--batch_size", "2",
            "--output_dir", str(tmp_path / "alice"), "--quiet", "true", "--poll_interval", "0.2"]
    first = run_client_process(args, tmp_path / "alice-1.log", env={"OMP_NUM_THREADS": "1"})
    wait_until(lambda: list((tmp_path / "alice" / "cache").glob("global-*")), timeout=120)  # training has begun
    time.sleep(2)
    first.kill()
    first.wait()
    assert status(server.url)["received"] == []
    second = run_client_process(args, tmp_path / "alice-2.log", env={"OMP_NUM_THREADS": "1"})
    assert second.wait(timeout=300) == 0, (tmp_path / "alice-2.log").read_text()[-3000:]
    assert server.log().count("accepted update from alice") == 1
    history = requests.get(server.url + "/v1/history", headers={"X-FedLLM-Client": "alice"}).json()
    assert [h["participants"] for h in history] == [["alice"]]
