"""The algorithms end to end over HTTP: run_server.sh (gunicorn) and real training clients.

Every algorithm runs ten simulated clients through the same Federation, LocalTrainer and PEFT export in
tests/test_simulation.py, which also proves the simulation bit-identical to this HTTP federation. Here, over the
wire, run the algorithms whose HTTP path differs: FedAvg (the baseline), FedProx and SCAFFOLD (client-side terms;
SCAFFOLD's control variates travel in both directions), FedAdam (server optimizer state written by one gunicorn
worker and read by another, as for FedAvgM and the rest of the FedOpt family) and Krum (three clients per round).
"""

from __future__ import annotations

import time

import pytest
import requests
import torch
from peft import PeftModel
from safetensors.torch import load, load_file
from transformers import AutoModelForCausalLM

from fedllm.data import write_demo_data
from fedllm.wire import encode

from .conftest import run_client_process
from .test_integration import server_args

pytestmark = pytest.mark.integration

# FedKSeed's global is no LoRA adapter: tests/test_fedkseed_http.py. The robust rules: test_one_poisoned_client.
ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedadam", "krum")


def run_federation(tiny_model_dir, tmp_path, start_server, fed_alg: str, clients: int = 2, **overrides):
    """``clients`` clients (all sampled), two rounds, real TRL training; returns (server, client output dirs)."""
    settings = dict(num_clients=clients, sample_clients=clients, num_rounds=2, max_steps=2, fed_alg=fed_alg,
                    krum_malicious=0)
    settings.update(overrides)
    server = start_server(server_args(tiny_model_dir, tmp_path / "state", **settings))
    data = write_demo_data(tmp_path / "data", num_clients=clients, rows_per_client=8, seed=3)
    outputs = [tmp_path / f"client{i}" for i in range(clients)]
    procs = [
        run_client_process(
            ["--server_url", server.url, "--client_id", f"client{i}", "--dataset_name", str(data[i]), "--batch_size", "4",
             "--output_dir", str(outputs[i]), "--quiet", "true", "--poll_interval", "0.2", "--max_poll_interval", "1"],
            tmp_path / f"client{i}.log", env={"OMP_NUM_THREADS": "1"},
        )
        for i in range(clients)
    ]
    for i, proc in enumerate(procs):
        assert proc.wait(timeout=300) == 0, (tmp_path / f"client{i}.log").read_text()[-3000:] + server.log()[-3000:]
    return server, outputs


@pytest.mark.parametrize("fed_alg", ALGORITHMS)
def test_two_round_federation_produces_a_loadable_adapter(fed_alg, tiny_model_dir, tmp_path, start_server):
    # Krum needs sample_clients > 2f + 2: three clients with f = 0.
    server, outputs = run_federation(tiny_model_dir, tmp_path, start_server, fed_alg,
                                     clients=3 if fed_alg == "krum" else 2)
    history = requests.get(server.url + "/v1/history", headers={"X-FedLLM-Client": "t"}).json()
    assert [h["round"] for h in history] == [1, 2]
    final = tmp_path / "state" / "adapters" / "final"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
    weights = load_file(final / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # training moved the adapter
    assert model(torch.tensor([[1, 5, 9]])).logits.shape[-1] == model.config.vocab_size
    if fed_alg == "scaffold":  # the same run checks the control variates (a second federation would cost ~20 s)
        assert_scaffold_controls_round_trip(server.url, outputs)


def assert_scaffold_controls_round_trip(url: str, outputs: list) -> None:
    """Both clients take part in every round, so the server's c equals the mean of the clients' c_i."""
    served = load(requests.get(url + "/v1/global", headers={"X-FedLLM-Client": "t"}).content)
    controls = {k: v for k, v in served.items() if k.startswith("control.")}
    adapter_names = {k for k in served if not k.startswith("control.")}
    assert {k.removeprefix("control.") for k in controls} == adapter_names
    client_states = [load_file(out / "client_state.safetensors") for out in outputs]
    for name, c in controls.items():
        expected = (client_states[0][name] + client_states[1][name]) / 2  # c = (1/N) Σ_rounds Σ_i Δc_i
        torch.testing.assert_close(c, expected, atol=1e-5, rtol=1e-4)
    assert any(c.abs().sum() > 0 for c in controls.values())


@pytest.mark.parametrize("fed_alg", ["fedavg", "fedmedian", "fedtrimmedavg", "krum"])
def test_one_poisoned_client(fed_alg, tiny_model_dir, tmp_path, start_server):
    """Four honest clients push deltas near 1.0, one pushes ×100: robust rules stay near the honest mean."""
    args = server_args(tiny_model_dir, tmp_path / "state", num_clients=5, sample_clients=5, num_rounds=1,
                       fed_alg=fed_alg, trim_ratio=0.2, krum_malicious=1, krum_keep=1)
    server = start_server(args)

    def call(method, path, client, **kwargs):
        headers = {"X-FedLLM-Client": client, **kwargs.pop("headers", {})}
        return requests.request(method, server.url + path, headers=headers, timeout=30, **kwargs)

    clients = [f"c{i}" for i in range(5)]
    for client in clients:
        assert call("POST", "/v1/join", client, json={"num_samples": 10}).status_code == 200
    spec = call("GET", "/v1/config", "c0").json()["upload_tensors"]
    before = load(call("GET", "/v1/global", "c0").content)
    generator = torch.Generator().manual_seed(0)
    honest_mean = {k: torch.ones(shape) for k, shape in spec.items()}
    for i, client in enumerate(clients):
        scale = 100.0 if i == 4 else 1.0
        delta = {k: scale * (torch.ones(shape) + 0.01 * torch.randn(shape, generator=generator))
                 for k, shape in spec.items()}
        reply = call("POST", "/v1/update?round=1", client, data=encode(delta), headers={"X-FedLLM-Num-Samples": "10"})
        assert reply.status_code == 202, reply.text
    for _ in range(150):
        if call("GET", "/v1/round", "c0").json()["phase"] == "finished":
            break
        time.sleep(0.2)
    after = load(call("GET", "/v1/global", "c0").content)
    error = max(((after[k] - before[k]) - honest_mean[k]).abs().max().item() for k in before)
    if fed_alg == "fedavg":
        assert error > 10  # the poisoned delta drags the mean to about 20.8
    else:
        assert error < 0.1
