"""One client on two processes (torchrun, DDP over gloo on CPU): the delta of one process with the same global batch,
and one upload per round."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file

from fedllm.config import FederationArguments, SimulatedClientArguments, SimulationArguments
from fedllm.data import write_demo_data
from fedllm.localserver import free_port
from fedllm.simulation import run_simulation

from .conftest import ROOT
from .test_integration import server_args

# SCAFFOLD, so that the hook state rank 0 commits after round 1 must reach the other rank for round 2. No LoRA
# dropout: two processes draw other dropout masks than one.
FEDERATION = dict(num_clients=1, sample_clients=1, num_rounds=2, max_steps=2, learning_rate=0.05, peft_lora_r=4,
                  peft_lora_alpha=8, peft_lora_dropout=0.0, seq_length=64, seed=7, fed_alg="scaffold")
GLOBAL_BATCH = 4


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.integration
def test_two_processes_upload_the_delta_of_one(tiny_model_dir, tmp_path, start_server):
    data = write_demo_data(tmp_path / "data", num_clients=1, rows_per_client=16, seed=1)[0]
    # One process, batch 4: the in-process simulation, whose adapter is the HTTP federation's bit for bit
    # (tests/test_simulation.py), with the client's default seed.
    single = run_simulation(
        FederationArguments(model_name_or_path=str(tiny_model_dir), **FEDERATION, save_model_freq=0),
        SimulatedClientArguments(batch_size=GLOBAL_BATCH, quiet=True, device="cpu"),
        SimulationArguments(client_data=str(data.parent), output_dir=str(tmp_path / "single")), on_round=None)

    # Two processes, batch 2 each: the Trainer hands rank r the batches r, r + 2, ... of the same seeded order, so
    # every optimizer step sees the same 4 examples as one process with batch 4.
    server = start_server(server_args(tiny_model_dir, tmp_path / "state", workers=1, threads=2, **FEDERATION))
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "client_http.py"),
               "--server_url", server.url, "--client_id", "alice", "--dataset_name", str(data),
               "--batch_size", str(GLOBAL_BATCH // 2), "--device", "cpu", "--output_dir", str(tmp_path / "alice"),
               "--quiet", "true", "--poll_interval", "0.2", "--max_poll_interval", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # Every rank returns the client's report; only rank 0 wrote the client's files.
    assert done.stdout.count(f"final adapter: {tmp_path / 'alice' / 'final_adapter'}") == 2
    assert not list((tmp_path / "alice").glob(".replica-*"))

    headers = {"X-FedLLM-Client": "alice"}
    history = requests.get(server.url + "/v1/history", headers=headers, timeout=10).json()
    assert [h["participants"] for h in history] == [["alice"], ["alice"]]
    clients = requests.get(server.url + "/v1/clients", headers=headers, timeout=10).json()["clients"]
    assert [c["client_id"] for c in clients] == ["alice"]  # only rank 0 joined
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    counts = {name: float(value) for name, value in
              re.findall(r"^fedllm_updates_(accepted|duplicate)_total (\S+)$", metrics, re.MULTILINE)}
    assert counts == {"accepted": 2.0, "duplicate": 0.0}  # one upload per round, none sent twice

    expected = adapter(single.adapters["global"])
    federated = adapter(tmp_path / "state" / "adapters" / "final")
    assert federated.keys() == expected.keys()
    for name, tensor in federated.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(t.abs().sum() > 0 for n, t in federated.items() if "lora_B" in n)


def test_one_process_has_no_group_and_sharded_launches_are_refused(monkeypatch):
    from fedllm.client.distributed import join_process_group

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert join_process_group("cpu") is None  # a plain client: no process group, nothing broadcast
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP and DeepSpeed are not supported"):
        join_process_group("cpu")
