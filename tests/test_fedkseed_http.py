"""FedKSeed over gunicorn with real clients: full-parameter (the final model loads with from_pretrained) and the
LoRA-only variant (the final adapter loads with PeftModel), side by side; under 20 KB per client per round."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedllm.data import write_demo_data

from .conftest import run_client_process
from .test_integration import server_args

pytestmark = pytest.mark.integration


def test_fedkseed_federations_finish_and_their_models_load(tiny_model_dir: Path, tmp_path: Path,
                                                           start_server) -> None:
    data = write_demo_data(tmp_path / "data", num_clients=2, rows_per_client=4, seed=3)
    runs = {"full": 2, "lora": 1}  # variant -> clients
    servers, clients = {}, []
    for variant, n in runs.items():
        servers[variant] = start_server(server_args(
            tiny_model_dir, tmp_path / variant / "state", num_clients=n, sample_clients=n, num_rounds=2, max_steps=2,
            workers=1, fed_alg="fedkseed", learning_rate=1e-3, kseed_lora=variant == "lora",
            kseed_pro=variant == "lora"))
    for variant, n in runs.items():
        for i in range(n):
            log = tmp_path / f"{variant}-{i}.log"
            clients.append((log, servers[variant], run_client_process(
                ["--server_url", servers[variant].url, "--client_id", f"client{i}", "--dataset_name", str(data[i]),
                 "--batch_size", "2", "--output_dir", str(tmp_path / variant / f"client{i}"), "--quiet", "true",
                 "--poll_interval", "0.2", "--max_poll_interval", "1"], log, env={"OMP_NUM_THREADS": "1"})))
    for log, server, proc in clients:
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:] + server.log()[-3000:]

    headers = {"X-FedLLM-Client": "observer"}
    for variant, server in servers.items():
        status = requests.get(server.url + "/v1/round", headers=headers, timeout=30).json()
        history = requests.get(server.url + "/v1/history", headers=headers, timeout=30).json()
        assert status["phase"] == "finished" and len(history) == 2
        for record in history:
            per_client = (record["bytes_received"] + record["bytes_sent"]) / len(record["participants"])
            limit = 20_000 if variant == "full" else 40_000  # Pro serves the K probabilities too
            assert 0 < per_client < limit, record
        assert all(record["train_loss"] > 0 for record in history)
        assert (tmp_path / variant / "state" / "adapters" / "final" / "global.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "client0" / "final_model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model(torch.tensor([[1, 5, 9]])).logits.isfinite().all()
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed  # full-parameter: the base weights moved
    # Both clients rebuilt the same final model from w0 and the K scalars.
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "client1" / "final_model")
    assert all(torch.equal(p, other.state_dict()[n]) for n, p in model.state_dict().items())
    adapter = PeftModel.from_pretrained(base, tmp_path / "lora" / "client0" / "final_model")
    assert adapter(torch.tensor([[1, 5, 9]])).logits.isfinite().all()
