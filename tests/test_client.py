"""The client: base-model checks, local training, verified downloads, restarts, option parsing."""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import time

import pytest
import requests
import torch
from flask import Flask, Response
from werkzeug.serving import make_server

from fedllm.adapter import get_adapter_tensors
from fedllm.client.http import FederationClient
from fedllm.client.runner import GlobalAdapterError, verify_global
from fedllm.client.trainer import LocalTrainer, ModelMismatchError
from fedllm.config import ClientArguments, FederationArguments, ServerArguments, parse_args
from fedllm.data import write_demo_data
from fedllm.server.federation import Federation
from fedllm.server.store import Store
from fedllm.wire import decode_file, encode

from .conftest import run_client_process


@pytest.fixture(scope="module")
def federation(tiny_model_dir, tmp_path_factory) -> Federation:
    state = tmp_path_factory.mktemp("client-state")
    config = FederationArguments(model_name_or_path=str(tiny_model_dir), num_clients=1, sample_clients=1,
                                 peft_lora_r=4, seq_length=64, learning_rate=1e-2)
    Federation.initialize(config, state)
    return Federation(Store(state))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("data"), num_clients=1, rows_per_client=16)[0]


def client_args(data_file, tmp_path, **overrides) -> ClientArguments:
    return ClientArguments(dataset_name=str(data_file), batch_size=4, output_dir=str(tmp_path), quiet=True, **overrides)


def test_client_refuses_another_base_model(federation, tiny_model_dir, data_file, tmp_path):
    other = shutil.copytree(tiny_model_dir, tmp_path / "other-model")
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3  # same weights layout, a different model
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelMismatchError, match="does not match the federation"):
        LocalTrainer(federation.client_config(), client_args(data_file, tmp_path, model_name_or_path=str(other)))


@pytest.mark.integration
def test_train_round_returns_a_delta_of_the_adapter(federation, data_file, tmp_path):
    trainer = LocalTrainer(federation.client_config(), client_args(data_file, tmp_path))
    assert trainer.num_samples == 16
    global_tensors = decode_file(federation.latest_global().path)
    result = trainer.train_round(global_tensors, 1, 1e-2, 3)
    assert set(result.tensors) == set(federation.upload_spec)
    assert any(t.abs().sum() > 0 for t in result.tensors.values())
    assert result.metrics["steps"] == 3 and result.metrics["train_loss"] > 0
    # Each round starts from the global adapter, not from the last local weights.
    trainer.train_round(global_tensors, 2, 1e-12, 1)
    local = get_adapter_tensors(trainer.model)
    for name, tensor in global_tensors.items():
        torch.testing.assert_close(local[name], tensor, atol=1e-6, rtol=0)


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_4bit_base_model_trains_on_cpu(federation, data_file, tmp_path):
    trainer = LocalTrainer(federation.client_config(), client_args(data_file, tmp_path, load_in_4bit=True))
    q_proj = trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == "Linear4bit"
    result = trainer.train_round(decode_file(federation.latest_global().path), 1, 1e-2, 2)
    assert set(result.tensors) == set(federation.upload_spec)
    assert all(torch.isfinite(t).all() for t in result.tensors.values())


def test_verify_global_refuses_bad_adapters(federation):
    expected = {k: list(v) for k, v in federation.spec.items()}
    good = decode_file(federation.latest_global().path)
    verify_global(good, expected, expected)
    name = next(iter(good))
    with pytest.raises(GlobalAdapterError, match="NaN"):
        verify_global({**good, name: torch.full_like(good[name], float("nan"))}, expected, expected)
    with pytest.raises(GlobalAdapterError, match="shape"):
        verify_global({**good, name: torch.zeros(1)}, expected, expected)
    with pytest.raises(GlobalAdapterError, match="lacks"):
        verify_global({k: v for k, v in good.items() if k != name}, expected, expected)
    with pytest.raises(GlobalAdapterError, match="unexpected tensors"):
        verify_global({**good, "control." + name: good[name]}, expected, expected)
    verify_global({**good, "control." + name: good[name]}, expected, {**expected, "control." + name: expected[name]})


def test_download_refuses_a_body_that_does_not_match_its_etag(tmp_path):
    body = encode({"w": torch.ones(4)})
    app = Flask("tampering")
    served = []

    @app.get("/v1/global")
    def tampered():
        served.append(1)
        return Response(body[:-4] + b"\x00\x00\x80\x7f", headers={"ETag": '"' + "0" * 64 + '"', "X-FedLLM-Version": "0"})

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = FederationClient(f"http://127.0.0.1:{server.server_port}", "alice", max_retries=2, quiet=True)
        with pytest.raises(ConnectionError, match="intact"):
            client.download_global(tmp_path, max_bytes=len(body))
        assert len(served) == 3 and not list(tmp_path.glob("*.safetensors"))
    finally:
        server.shutdown()


@pytest.mark.integration
def test_restarted_client_continues_without_uploading_twice(tiny_model_dir, tmp_path, start_server):
    from .test_integration import server_args

    server = start_server(server_args(tiny_model_dir, tmp_path / "state", num_clients=2, sample_clients=2, num_rounds=2))
    data = write_demo_data(tmp_path / "data", num_clients=1, rows_per_client=16)[0]

    def call(method, path, **kwargs):
        return requests.request(method, server.url + path, headers={"X-FedLLM-Client": "bob", **kwargs.pop("headers", {})},
                                timeout=30, **kwargs)

    assert call("POST", "/v1/join", json={"num_samples": 5}).status_code == 200
    args = ["--server_url", server.url, "--client_id", "alice", "--dataset_name", str(data), "--batch_size", "4",
            "--output_dir", str(tmp_path / "alice"), "--quiet", "true", "--poll_interval", "0.2", "--max_poll_interval", "1"]
    first = run_client_process(args, tmp_path / "alice-1.log")
    deadline = time.time() + 120
    pending = tmp_path / "alice" / "pending"
    # Accepted, and the client saw it accepted (nothing pending any more).
    while "alice" not in call("GET", "/v1/round").json()["received"] or any(pending.glob("*")):
        assert time.time() < deadline and first.poll() is None, (tmp_path / "alice-1.log").read_text()[-2000:]
        time.sleep(0.2)
    first.kill()  # killed after its round-1 update was accepted, while it waits for round 2
    first.wait()

    second = run_client_process(args, tmp_path / "alice-2.log")
    config = call("GET", "/v1/config").json()

    def bob_pushes(round_number: int) -> None:
        while call("GET", "/v1/round").json()["round"] < round_number:
            time.sleep(0.2)
        body = encode({k: torch.zeros(v) for k, v in config["upload_tensors"].items()})
        assert call("POST", f"/v1/update?round={round_number}", data=body,
                    headers={"X-FedLLM-Num-Samples": "5"}).status_code == 202

    bob_pushes(1)
    bob_pushes(2)
    assert second.wait(timeout=120) == 0, (tmp_path / "alice-2.log").read_text()[-3000:]
    second_log = (tmp_path / "alice-2.log").read_text()
    assert "round 1" not in second_log  # it neither trained nor uploaded round 1 again
    assert "round 2 of 2: selected" in second_log and "round 2: loss" in second_log
    assert server.log().count("round 1: accepted update from alice") == 1
    history = call("GET", "/v1/history").json()
    assert [h["participants"] for h in history] == [["alice", "bob"], ["alice", "bob"]]


def test_options_from_a_yaml_file_and_flags(tmp_path, monkeypatch):
    config_file = tmp_path / "fed.yaml"
    config_file.write_text("model_name_or_path: some/model\nnum_rounds: 7\nfed_alg: fedprox\nport: 9000\n")
    monkeypatch.setenv("WEB_CONCURRENCY", "5")
    federation, server = parse_args((FederationArguments, ServerArguments),
                                    ["--config", str(config_file), "--num_rounds", "9"])
    assert (federation.model_name_or_path, federation.fed_alg, federation.num_rounds) == ("some/model", "fedprox", 9)
    assert (server.port, server.workers) == (9000, 5)
    config_file.write_text("no_such_option: 1\n")
    with pytest.raises(SystemExit, match="no_such_option"):
        parse_args((FederationArguments, ServerArguments), ["--config", str(config_file)])


@pytest.mark.integration
def test_num_samples_counts_only_examples_that_fit(federation, tmp_path):
    """Examples whose prompt alone fills seq_length are dropped by TRL; FedAvg must not weigh them."""
    rows = [{"instruction": "Name a fruit.", "input": "", "output": "apple"}] * 6
    rows += [{"instruction": "word " * 200, "input": "", "output": "apple"}] * 4  # beyond seq_length 64
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = LocalTrainer(federation.client_config(), client_args(data, tmp_path))
    assert trainer.num_samples == 10
    trainer.train_round(decode_file(federation.latest_global().path), 1, 1e-2, 1)
    assert trainer.num_samples == 6
