"""SecAgg+ over the real stack: gunicorn with real TRL clients, and kill -9 of the server in every stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch
from peft import PeftModel
from safetensors.torch import load, save_file
from transformers import AutoModelForCausalLM

from fedllm.client.http import FederationClient
from fedllm.client.secagg import SecureUploader
from fedllm.data import write_demo_data

from .conftest import run_client_process
from .test_integration import server_args

pytestmark = pytest.mark.integration

SECAGG = {"secure_aggregation": "secagg+", "num_clients": 3, "sample_clients": 3}


def test_three_trl_clients_finish_a_secure_federation_and_its_adapter_loads(tiny_model_dir: Path, tmp_path: Path,
                                                                             start_server) -> None:
    server = start_server(server_args(tiny_model_dir, tmp_path / "state", num_rounds=2, max_steps=1, **SECAGG))
    data = write_demo_data(tmp_path / "data", num_clients=3, rows_per_client=8, seed=3)
    procs = [run_client_process(
        ["--server_url", server.url, "--client_id", f"client{i}", "--dataset_name", str(data[i]), "--batch_size", "4",
         "--output_dir", str(tmp_path / f"client{i}"), "--quiet", "true", "--poll_interval", "0.2",
         "--max_poll_interval", "1"], tmp_path / f"client{i}.log", env={"OMP_NUM_THREADS": "1"}) for i in range(3)]
    for i, proc in enumerate(procs):
        assert proc.wait(timeout=300) == 0, (tmp_path / f"client{i}.log").read_text()[-3000:] + server.log()[-3000:]
    headers = {"X-FedLLM-Client": "observer"}
    history = requests.get(server.url + "/v1/history", headers=headers, timeout=30).json()
    assert [h["participants"] for h in history] == [["client0", "client1", "client2"]] * 2
    assert not list((tmp_path / "state" / "updates").rglob("*.safetensors"))  # no plaintext update on the server
    assert not list((tmp_path / "state" / "secagg").glob("r*"))  # and no masked input once aggregated
    final = tmp_path / "state" / "adapters" / "final"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
    assert model(torch.tensor([[1, 5, 9]])).logits.isfinite().all()


@dataclass
class Pending:
    round: int
    update_path: Path


def test_kill_9_in_every_stage_then_restart_completes_the_round(tiny_model_dir: Path, tmp_path: Path,
                                                                start_server) -> None:
    """Round r is killed (master and workers, SIGKILL) in stage r's middle, after one client's message was
    acknowledged; the restarted server continues the stage and the round's global is the plain FedAvg."""
    stages = ["advertise", "share", "masked", "unmask"]
    args = server_args(tiny_model_dir, tmp_path / "state", num_rounds=len(stages), round_timeout=0, workers=1, **SECAGG)
    server = start_server(args)
    samples = {"alice": 10, "bob": 30, "carol": 60}
    clients = {c: FederationClient(server.url, c, max_retries=20, quiet=True) for c in samples}
    for client, n in samples.items():
        clients[client].join(n)
    config = clients["alice"].config()
    for round_number, stage in enumerate(stages, start=1):
        before = load(requests.get(server.url + "/v1/global", headers={"X-FedLLM-Client": "alice"}, timeout=30).content)
        generator = torch.Generator().manual_seed(round_number)
        deltas, pending = {}, {}
        for client in samples:
            deltas[client] = {n: torch.randn(s, generator=generator) * 0.01 for n, s in config["adapter"].items()}
            path = tmp_path / f"{client}-r{round_number}.safetensors"
            save_file(deltas[client], str(path))
            pending[client] = Pending(round_number, path)
        uploaders = {c: SecureUploader(clients[c], config, tmp_path / c, poll_interval=0.1) for c in samples}
        done: dict[str, bool] = {}
        killed = False
        for _ in range(400):
            for client in samples:
                if client not in done and (finished := uploaders[client].step(pending[client])) is not None:
                    done[client] = finished
                status = requests.get(server.url + "/v1/round", headers={"X-FedLLM-Client": "o"}, timeout=30).json()
                if not killed and status["round"] == round_number and status["secagg"]["stage"] == stage \
                        and status["secagg"]["answered"] >= 1:
                    server.kill()  # kill -9 with one message of the stage acknowledged
                    server = start_server(args)
                    for c in samples:  # the same clients, now talking to the restarted server
                        clients[c].base = server.url
                    killed = True
            if len(done) == len(samples):
                break
        assert killed and done == dict.fromkeys(samples, True), (stage, done)
        history = _wait_for_round(server.url, round_number)
        assert history["participants"] == sorted(samples)
        after = load(requests.get(server.url + "/v1/global", headers={"X-FedLLM-Client": "alice"}, timeout=30).content)
        total = sum(samples.values())
        for name in before:
            expected = before[name] + sum(deltas[c][name] * n / total for c, n in samples.items())
            torch.testing.assert_close(after[name], expected, atol=2e-6, rtol=0)


def _wait_for_round(url: str, round_number: int) -> dict:
    import time

    for _ in range(300):
        history = requests.get(url + "/v1/history", headers={"X-FedLLM-Client": "o"}, timeout=30).json()
        if len(history) >= round_number:
            return history[round_number - 1]
        time.sleep(0.1)
    raise AssertionError(f"round {round_number} was not aggregated")
