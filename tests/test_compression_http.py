"""Compressed federations over gunicorn with real TRL clients: each codec, its accounting, the adapter loads.

With a quantizer the clients also download the global compressed (``?encoding=compressed``): each round's
``bytes_sent`` is the quantized file, and the final adapter (downloaded dense) is the server's export exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedllm.compression.updates import RESIDUAL_PREFIX
from fedllm.data import write_demo_data

from .conftest import run_client_process
from .test_integration import server_args

pytestmark = pytest.mark.integration


CODECS = ("int8", "nf4", "fp4", "topk")
# Tensor bytes of the compressed global per float32 byte at --compression_block_size 64: codes plus a float32 scale
# per block (the safetensors header, two part names per tensor, comes on top).
DATA_RATIO = {"int8": (1 + 4 / 64) / 4, "nf4": (0.5 + 4 / 64) / 4, "fp4": (0.5 + 4 / 64) / 4}


def test_compressed_federations_finish_and_their_adapters_load(tiny_model_dir: Path, tmp_path: Path,
                                                               start_server) -> None:
    """One federation per codec, run side by side (one client, two rounds of one step each): the second round's
    upload carries the first one's residual; the accounting adds up; the final adapter loads with PeftModel."""
    data = write_demo_data(tmp_path / "data", num_clients=1, rows_per_client=4, seed=3)
    servers, clients = {}, {}
    for codec in CODECS:
        servers[codec] = start_server(server_args(
            tiny_model_dir, tmp_path / codec / "state", num_clients=1, sample_clients=1, num_rounds=2, max_steps=1,
            workers=1, update_compression=codec, compression_block_size=64, topk_fraction=0.1,
            communication_budget_mb=100))
    for codec, server in servers.items():
        clients[codec] = run_client_process(
            ["--server_url", server.url, "--client_id", "client0", "--dataset_name", str(data[0]), "--batch_size",
             "2", "--output_dir", str(tmp_path / codec / "client0"), "--quiet", "true", "--poll_interval", "0.2",
             "--max_poll_interval", "1"], tmp_path / f"{codec}.log", env={"OMP_NUM_THREADS": "1"})
    for codec, client in clients.items():
        assert client.wait(timeout=300) == 0, (tmp_path / f"{codec}.log").read_text()[-3000:] + \
            servers[codec].log()[-3000:]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for codec, server in servers.items():
        check_federation(codec, server.url, tmp_path / codec, base)


def check_federation(codec: str, url: str, folder: Path, base) -> None:
    headers = {"X-FedLLM-Client": "observer"}
    status = requests.get(url + "/v1/round", headers=headers, timeout=30).json()
    history = requests.get(url + "/v1/history", headers=headers, timeout=30).json()
    config = requests.get(url + "/v1/config", headers=headers, timeout=30).json()
    assert status["phase"] == "finished" and len(history) == 2
    assert config["federation"]["update_compression"] == codec
    dense = sum(4 * torch.Size(s).numel() for s in config["upload_tensors"].values())
    assert all(0 < h["bytes_received"] < dense for h in history), codec  # smaller than the float32 tensors alone
    assert all(h["bytes_sent"] > 0 for h in history)
    communication = status["communication"]
    assert communication["total_bytes"] >= sum(h["bytes_sent"] + h["bytes_received"] for h in history)
    assert communication["budget_state"] == "ok"
    # Error feedback: the committed client state holds a residual per adapter tensor, bound to the federation.
    state = load_file(folder / "client0" / "client_state.safetensors")
    assert {k.removeprefix(RESIDUAL_PREFIX) for k in state} == set(config["adapter"])
    metrics = requests.get(url + "/metrics", timeout=30).text
    assert 'fedllm_client_bytes_received{client="client0"}' in metrics and "fedllm_communication_budget_bytes" in metrics
    # The download: the quantized global for the quantizers (once a round: a 304 is free), the dense one for topk.
    dense = folder / "state" / "globals" / "v000002.safetensors"
    served = dense.with_suffix(".compressed.safetensors") if codec in DATA_RATIO else dense
    assert all(h["bytes_sent"] == served.stat().st_size for h in history), codec
    if codec in DATA_RATIO:
        assert tensor_bytes(served) <= DATA_RATIO[codec] * tensor_bytes(dense) * 1.01, codec
    # The client's final adapter is the dense global: the server's export, bit for bit.
    exported = load_file(folder / "state" / "adapters" / "final" / "adapter_model.safetensors")
    final = load_file(folder / "client0" / "final_adapter" / "adapter_model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in exported)
    model = PeftModel.from_pretrained(base, folder / "state" / "adapters" / "final")
    assert model(torch.tensor([[1, 5, 9]])).logits.isfinite().all()
    model.unload()


def tensor_bytes(path: Path) -> int:
    """A safetensors file's size less its header (8 bytes of length, then the JSON)."""
    with open(path, "rb") as f:
        return path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")
