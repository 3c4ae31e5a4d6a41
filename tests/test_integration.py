"""Real federations: run_server.sh (gunicorn, 2 workers) on loopback and real client processes."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
import requests
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedllm.data import write_demo_data
from fedllm.server.auth import add_token
from fedllm.wire import encode

from .conftest import run_client_process

pytestmark = pytest.mark.integration


def server_args(model_dir, state_dir, **overrides) -> list[str]:
    settings = {
        "model_name_or_path": str(model_dir), "state_dir": str(state_dir), "num_clients": 3, "sample_clients": 2,
        "num_rounds": 3, "max_steps": 4, "learning_rate": 0.05, "peft_lora_r": 4, "peft_lora_alpha": 8,
        "seq_length": 128, "workers": 2, "threads": 4, "seed": 7,
        # Every client of these federations polls from 127.0.0.1, and an open server's rate limit is per peer
        # address: off here (tests/reliability/test_auth_limits.py tests the limit itself).
        "rate_limit": 0,
    }
    settings.update(overrides)
    return [arg for key, value in settings.items() for arg in (f"--{key}", str(value))]


def test_three_client_federation_with_auth(tiny_model_dir, tmp_path, start_server):
    tokens_file = tmp_path / "tokens.json"
    tokens = {f"client{i}": add_token(tokens_file, f"client{i}") for i in range(3)}
    server = start_server(server_args(tiny_model_dir, tmp_path / "state", auth_tokens=tokens_file))
    data = write_demo_data(tmp_path / "data", num_clients=3, rows_per_client=24, seed=1)

    # Without a token the API is closed; /healthz stays open.
    assert requests.get(server.url + "/v1/round", headers={"X-FedLLM-Client": "client0"}).status_code == 401
    assert requests.get(server.url + "/healthz").json() == {"status": "ok"}

    clients = [
        run_client_process(
            ["--server_url", server.url, "--client_id", name, "--dataset_name", str(path), "--batch_size", "4",
             "--output_dir", str(tmp_path / name), "--quiet", "true", "--poll_interval", "0.2", "--max_poll_interval", "1"],
            tmp_path / f"{name}.log", env={"FEDLLM_TOKEN": tokens[name], "OMP_NUM_THREADS": "1"},
        )
        for name, path in zip(tokens, data, strict=True)
    ]
    for name, proc in zip(tokens, clients, strict=True):
        try:
            assert proc.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}\n{server.log()[-3000:]}")

    headers = {"X-FedLLM-Client": "client0", "Authorization": f"Bearer {tokens['client0']}"}
    status = requests.get(server.url + "/v1/round", headers=headers).json()
    assert status["phase"] == "finished" and status["round"] == 3
    history = requests.get(server.url + "/v1/history", headers=headers).json()
    assert [h["round"] for h in history] == [1, 2, 3]
    # A client sees the aggregates and the participant counts, and only its own metrics.
    assert all(h["num_participants"] == 2 and h["train_loss"] is not None for h in history)
    assert all(set(h["metrics"]) <= {"client0"} and "participants" not in h for h in history)

    # Every client saved the same final adapter the server wrote, and it loads with PEFT and changes the logits.
    final = tmp_path / "state" / "adapters" / "final"
    server_bytes = (final / "adapter_model.safetensors").read_bytes()
    for name in tokens:
        assert (tmp_path / name / "final_adapter" / "adapter_model.safetensors").read_bytes() == server_bytes
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
        tuned_logits = tuned(ids).logits
    assert not torch.allclose(base_logits, tuned_logits)


def _delta_body(config: dict, scale: float, loss: float) -> bytes:
    tensors = {name: torch.full(shape, scale) for name, shape in config["upload_tensors"].items()}
    return encode(tensors, config["federation"]["wire_dtype"], metadata={"train_loss": str(loss)})


def test_kill_9_between_two_accepted_updates_then_restart(tiny_model_dir, tmp_path, start_server):
    args = server_args(tiny_model_dir, tmp_path / "state", num_clients=2, sample_clients=2, num_rounds=2)
    server = start_server(args)

    def call(method, path, client, **kwargs):
        return requests.request(method, server.url + path, headers={"X-FedLLM-Client": client, **kwargs.pop("headers", {})},
                                timeout=30, **kwargs)

    for client, n in (("alice", 10), ("bob", 30)):
        assert call("POST", "/v1/join", client, json={"num_samples": n}).status_code == 200
    config = call("GET", "/v1/config", "alice").json()
    global_before = call("GET", "/v1/global", "alice").content
    alice_body = _delta_body(config, 1.0, 2.0)
    accepted = call("POST", "/v1/update?round=1", "alice", data=alice_body, headers={"X-FedLLM-Num-Samples": "10"})
    assert accepted.status_code == 202, accepted.text

    server.kill()  # kill -9 of the master and workers, right after an accepted update
    server = start_server(args)
    status = call("GET", "/v1/round", "bob").json()
    assert (status["round"], status["phase"], status["received"]) == (1, "training", ["alice"])
    # A retry of alice's accepted upload is still idempotent after the restart.
    retry = call("POST", "/v1/update?round=1", "alice", data=alice_body, headers={"X-FedLLM-Num-Samples": "10"})
    assert retry.status_code == 202 and retry.json()["duplicate"] is True
    bob = call("POST", "/v1/update?round=1", "bob", data=_delta_body(config, 3.0, 4.0), headers={"X-FedLLM-Num-Samples": "30"})
    assert bob.status_code == 202, bob.text

    history = _wait_for(lambda: call("GET", "/v1/history", "bob").json(), lambda h: len(h) == 1)
    assert history[0]["participants"] == ["alice", "bob"]
    assert history[0]["train_loss"] == pytest.approx((2.0 * 10 + 4.0 * 30) / 40)
    # FedAvg: every tensor moved by the sample-weighted mean delta (10·1 + 30·3) / 40 = 2.5.
    from safetensors.torch import load

    before = load(global_before)
    after = load(call("GET", "/v1/global", "bob").content)
    for name in before:
        torch.testing.assert_close(after[name], before[name] + 2.5)


def _wait_for(fetch, done, timeout: float = 30.0):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fetch()
        if done(value):
            return value
        time.sleep(0.2)
    raise AssertionError(f"condition not reached; last value: {json.dumps(value)[:500]}")


def _self_signed_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def test_tls_with_self_signed_certificate(tiny_model_dir, tmp_path, start_server):
    from fedllm.client.http import FederationClient

    cert, key = _self_signed_certificate(tmp_path)
    args = server_args(tiny_model_dir, tmp_path / "state", certfile=cert, keyfile=key)
    server = start_server(args, scheme="https", verify=str(cert))
    client = FederationClient(server.url, "alice", ca_bundle=str(cert), max_retries=0)
    assert client.round_status()["phase"] == "waiting"
    path, version, sha = client.download_global(tmp_path / "cache")
    assert version == 0 and hashlib.sha256(path.read_bytes()).hexdigest() == sha
    # A client that does not trust the certificate refuses to talk.
    with pytest.raises(requests.exceptions.SSLError):
        FederationClient(server.url, "alice", max_retries=0).round_status()


def test_operator_removes_a_client_mid_round(tiny_model_dir, tmp_path, start_server):
    """--sample_clients = --num_clients = 3 and the operator removes one client while round 1 trains: every
    round aggregates only the eligible clients' updates and the federation runs to its end."""
    tokens_file = tmp_path / "tokens.json"
    tokens = {f"client{i}": add_token(tokens_file, f"client{i}") for i in range(3)}
    admin = add_token(tokens_file, None)
    server = start_server(server_args(tiny_model_dir, tmp_path / "state", sample_clients=3,
                                      auth_tokens=tokens_file))
    data = write_demo_data(tmp_path / "data", num_clients=3, rows_per_client=24, seed=1)
    clients = {
        name: run_client_process(
            ["--server_url", server.url, "--client_id", name, "--dataset_name", str(path), "--batch_size", "4",
             "--output_dir", str(tmp_path / name), "--quiet", "true", "--poll_interval", "0.2", "--max_poll_interval", "1"],
            tmp_path / f"{name}.log", env={"FEDLLM_TOKEN": tokens[name], "OMP_NUM_THREADS": "1"},
        )
        for name, path in zip(tokens, data, strict=True)
    }
    as_admin = {"X-FedLLM-Client": "operator", "Authorization": f"Bearer {admin}"}
    _wait_for(lambda: requests.get(server.url + "/v1/round", headers=as_admin, timeout=10).json(),
              lambda s: s["phase"] == "training", timeout=120)
    removed = requests.post(server.url + "/v1/admin/remove_client", json={"client_id": "client2"}, headers=as_admin,
                            timeout=10)
    assert removed.status_code == 200, removed.text
    assert removed.json()["sampled"] == ["client0", "client1"]

    for name in ("client0", "client1"):
        try:
            assert clients[name].wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}\n{server.log()[-3000:]}")
    clients["client2"].wait(timeout=120)  # refused from then on: it stops, whatever it was doing
    history = requests.get(server.url + "/v1/history", headers=as_admin, timeout=10).json()
    assert [h["round"] for h in history] == [1, 2, 3]
    assert all(h["participants"] == ["client0", "client1"] for h in history)
    assert requests.get(server.url + "/v1/round", headers=as_admin, timeout=10).json()["phase"] == "finished"
    assert (tmp_path / "state" / "adapters" / "final" / "adapter_model.safetensors").is_file()
