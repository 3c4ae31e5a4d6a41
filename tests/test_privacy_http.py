"""DP over the real stack: gunicorn with real TRL clients in both placements, and DP-SGD's per-example
clipping inside TRL's trainer."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import requests
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedllm.config import ClientArguments, FederationArguments
from fedllm.data import write_demo_data
from fedllm.privacy.accountant import ClientLevelAccountant
from fedllm.privacy.dp_sgd import DPSGDLedger

from .conftest import run_client_process
from .test_integration import server_args

pytestmark = pytest.mark.integration


def run(tiny_model_dir: Path, tmp_path: Path, start_server, client_flags: list[str] = (), **overrides):
    settings = dict(num_clients=2, sample_clients=2, num_rounds=2, max_steps=2, dp_noise_multiplier=0.5)
    settings.update(overrides)
    server = start_server(server_args(tiny_model_dir, tmp_path / "state", **settings))
    data = write_demo_data(tmp_path / "data", num_clients=2, rows_per_client=8, seed=3)
    procs = [run_client_process(
        ["--server_url", server.url, "--client_id", f"client{i}", "--dataset_name", str(data[i]), "--batch_size", "4",
         "--output_dir", str(tmp_path / f"client{i}"), "--quiet", "true", "--poll_interval", "0.2",
         "--max_poll_interval", "1", *client_flags],
        tmp_path / f"client{i}.log", env={"OMP_NUM_THREADS": "1"}) for i in range(2)]
    for i, proc in enumerate(procs):
        assert proc.wait(timeout=300) == 0, (tmp_path / f"client{i}.log").read_text()[-3000:] + server.log()[-3000:]
    return server


@pytest.mark.parametrize(("placement", "clip"), [("server", "1.0"), ("client", "auto")])
def test_dp_federation_finishes_and_its_adapter_loads(placement: str, clip: str, tiny_model_dir: Path,
                                                      tmp_path: Path, start_server) -> None:
    server = run(tiny_model_dir, tmp_path, start_server, dp=placement, dp_clip_norm=clip,
                 dp_clipped_count_stddev=1.5)
    headers = {"X-FedLLM-Client": "observer"}
    status = requests.get(server.url + "/v1/round", headers=headers, timeout=30).json()
    history = requests.get(server.url + "/v1/history", headers=headers, timeout=30).json()
    expected = ClientLevelAccountant(2, 2, 0.5, 1 / 2 ** 1.1).epsilon(2)
    assert status["phase"] == "finished" and status["dp"]["epsilon"] == pytest.approx(expected)
    assert [h["dp_epsilon"] for h in history][-1] == pytest.approx(expected)
    assert all(h["dp_clip_norm"] > 0 for h in history)
    if clip == "auto":  # the clip norm moved from its initial 0.1
        assert status["dp"]["clip_norm"] != pytest.approx(0.1)
    final = tmp_path / "state" / "adapters" / "final"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
    assert model(torch.tensor([[1, 5, 9]])).logits.isfinite().all()
    assert "fedllm_dp_epsilon" in requests.get(server.url + "/metrics", timeout=30).text


def test_dp_sgd_clients_account_their_own_epsilon(tiny_model_dir: Path, tmp_path: Path, start_server) -> None:
    server = run(tiny_model_dir, tmp_path, start_server, client_flags=["--dp_sgd", "true",
                 "--dp_sgd_noise_multiplier", "1.0", "--dp_sgd_clip_norm", "0.5"])
    history = requests.get(server.url + "/v1/history", headers={"X-FedLLM-Client": "o"}, timeout=30).json()
    for i in range(2):
        ledger = DPSGDLedger.open(tmp_path / f"client{i}", **{k: v for k, v in __import__("json").loads(
            (tmp_path / f"client{i}" / "dp_sgd.json").read_text()).items() if k != "steps"})
        assert ledger.steps == 4  # 2 rounds × 2 steps
        reported = history[-1]["metrics"][f"client{i}"]["dp_sgd_epsilon"]
        assert reported == pytest.approx(ledger.epsilon()) and reported > 0


def test_dp_sgd_clips_each_example_and_adds_the_stated_noise(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One DP-SGD step of TRL's trainer: with σ = 0 the gradient is the mean of the per-example gradients each
    clipped to C (so its norm is at most C); with σ > 0 what is added is N(0, (σC/B)²)."""
    from fedllm.client.trainer import LocalTrainer
    from fedllm.server.federation import Federation
    from fedllm.server.store import Store

    Federation.initialize(FederationArguments(model_name_or_path=str(tiny_model_dir), num_clients=1,
                                              sample_clients=1, peft_lora_r=4, seq_length=64, peft_lora_dropout=0.0),
                          tmp_path / "state")  # no dropout: the two computations see the same function
    federation = Federation(Store(tmp_path / "state"))
    data = write_demo_data(tmp_path / "data", num_clients=1, rows_per_client=8, seed=1)[0]
    args = ClientArguments(dataset_name=str(data), output_dir=str(tmp_path / "out"), batch_size=4, quiet=True,
                           dp_sgd=True, dp_sgd_clip_norm=0.05, dp_sgd_noise_multiplier=0.0)
    local = LocalTrainer(federation.client_config(), args)
    clip = 0.05

    def step(noise: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        local.args = dataclasses.replace(args, dp_sgd_noise_multiplier=noise)
        trainer = local._new_trainer(1, 1e-3, 1)
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        params = list(local.params.values())
        expected = [torch.zeros_like(p) for p in params]
        for j in range(4):
            example = {k: v[j:j + 1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == 4 else v
                       for k, v in inputs.items()}
            grads = torch.autograd.grad(trainer.compute_loss(local.model, example), params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
            norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
            for e, g in zip(expected, grads, strict=True):
                e.add_(g * min(1.0, clip / norm) / 4)
        for p in params:
            p.grad = None
        trainer.training_step(local.model, inputs)
        return [p.grad.clone() for p in params], expected

    got, expected = step(0.0)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    assert math.sqrt(sum(float(g.pow(2).sum()) for g in got)) <= clip + 1e-6
    got, expected = step(2.0)
    noise = torch.cat([(g - e).flatten() for g, e in zip(got, expected, strict=True)])
    assert float(noise.std()) == pytest.approx(2.0 * clip / 4, rel=0.05)
    federation.store.close()


def test_kill_9_keeps_the_spent_budget(tiny_model_dir: Path, tmp_path: Path, start_server) -> None:
    """kill -9 of the whole server after a DP round: the restarted one reports the same ε, and the next round
    spends exactly the accountant's ε(2)."""
    from .test_integration import _delta_body, _wait_for

    args = server_args(tiny_model_dir, tmp_path / "state", num_clients=2, sample_clients=2, num_rounds=3,
                       dp="server", dp_clip_norm="auto", dp_noise_multiplier=1.0)
    server = start_server(args)

    def call(method: str, path: str, client: str, **kwargs):
        return requests.request(method, server.url + path, headers={"X-FedLLM-Client": client,
                                                                    **kwargs.pop("headers", {})}, timeout=30, **kwargs)

    for client in ("alice", "bob"):
        assert call("POST", "/v1/join", client, json={"num_samples": 10}).status_code == 200
    config = call("GET", "/v1/config", "alice").json()

    def play(round_number: int) -> None:
        for i, client in enumerate(("alice", "bob")):
            body = _delta_body(config, 0.01 * (i + 1), 1.0)
            response = call("POST", f"/v1/update?round={round_number}", client, data=body,
                            headers={"X-FedLLM-Num-Samples": "10"})
            assert response.status_code == 202, response.text
        _wait_for(lambda: call("GET", "/v1/history", "alice").json(), lambda h: len(h) == round_number)

    play(1)
    before = call("GET", "/v1/round", "alice").json()["dp"]
    server.kill()
    server = start_server(args)
    after = call("GET", "/v1/round", "alice").json()["dp"]
    assert after == before and after["epsilon"] == pytest.approx(ClientLevelAccountant(2, 2, 1.0, 1 / 2 ** 1.1)
                                                                 .epsilon(1))
    play(2)
    spent = call("GET", "/v1/round", "alice").json()["dp"]["epsilon"]
    assert spent == pytest.approx(ClientLevelAccountant(2, 2, 1.0, 1 / 2 ** 1.1).epsilon(2))
