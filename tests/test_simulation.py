"""The simulation: every algorithm runs; it equals the HTTP federation; resume after a crash; baselines; splits."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from werkzeug.serving import make_server

import simulate
from fedllm.algorithms import BUILTIN
from fedllm.client.runner import run_client
from fedllm.client.trainer import LocalTrainer
from fedllm.config import ClientArguments, FederationArguments, SimulatedClientArguments, SimulationArguments
from fedllm.data import write_demo_data
from fedllm.server.app import create_app
from fedllm.server.federation import Federation
from fedllm.server.store import Store
from fedllm.simulation import SimulatedClients, client_files, run_simulation


@pytest.fixture(scope="module")
def ten_clients(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ten-clients")
    write_demo_data(folder, num_clients=10, rows_per_client=8, seed=3)
    return folder


@pytest.fixture(scope="module")
def three_clients(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("three-clients")
    write_demo_data(folder, num_clients=3, rows_per_client=12, seed=1)
    return folder


def federation_args(model_dir: Path, **overrides) -> FederationArguments:
    settings = dict(model_name_or_path=str(model_dir), num_clients=10, sample_clients=2, num_rounds=3, max_steps=1,
                    learning_rate=0.01, peft_lora_r=4, peft_lora_alpha=8, seq_length=64, seed=5, save_model_freq=2,
                    round_timeout=0.0)
    settings.update(overrides)
    return FederationArguments(**settings)


CLIENT = SimulatedClientArguments(batch_size=4, quiet=True)
CLIENT_WITH_EVAL = dataclasses.replace(CLIENT, local_eval_fraction=0.25)


def simulate_run(model_dir: Path, data: Path, output_dir: Path, mode: str = "federated", client=CLIENT, **overrides):
    sim = SimulationArguments(client_data=str(data), output_dir=str(output_dir), mode=mode)
    return run_simulation(federation_args(model_dir, **overrides), client, sim, on_round=None)


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_client_files_are_taken_in_numeric_order(tmp_path):
    for name in ("local_training_10.json", "local_training_9.json", "local_training_0.json", "global_test.json"):
        (tmp_path / name).write_text("[]")
    assert [p.name for p in client_files(tmp_path)] == ["local_training_0.json", "local_training_9.json",
                                                       "local_training_10.json"]


@pytest.mark.integration
@pytest.mark.parametrize("fed_alg", sorted(set(BUILTIN) - {"fedkseed"}))  # no LoRA export: bench.compression runs it
def test_every_algorithm_runs_ten_clients_three_rounds(fed_alg, tiny_model_dir, ten_clients, tmp_path):
    # Krum needs sample_clients > 2f + 2: three sampled clients with f = 0.
    sampling = dict(sample_clients=3, krum_malicious=0) if fed_alg == "krum" else {}
    result = simulate_run(tiny_model_dir, ten_clients, tmp_path, fed_alg=fed_alg, **sampling)
    history = result.history["global"]
    assert [h["round"] for h in history] == [1, 2, 3]
    assert all(len(h["participants"]) == sampling.get("sample_clients", 2) and h["train_loss"] > 0 for h in history)
    # The server's state_dir layout: PEFT directories every save_model_freq rounds and the final one.
    state = tmp_path / "state"
    assert (state / "adapters" / "round_2" / "adapter_config.json").is_file()
    assert result.adapters["global"] == state / "adapters" / "final"
    final = adapter_tensors(result.adapters["global"])
    assert all(torch.isfinite(t).all() for t in final.values())
    assert json.loads((tmp_path / "history.json").read_text()) == history
    if fed_alg == "scaffold":  # each sampled client keeps its own c_i
        sampled = {c for h in history for c in h["participants"]}
        assert {p.name for p in (tmp_path / "clients").iterdir()} == sampled


@pytest.mark.integration
def test_simulation_equals_the_http_federation(tiny_model_dir, three_clients, tmp_path, monkeypatch):
    """Same settings, data and seeds: the simulation's final adapter (and every client's held-out loss) is the
    HTTP federation's, bit for bit."""
    overrides = dict(num_clients=3, sample_clients=2, max_steps=2, fed_alg="scaffold", save_model_freq=0)
    sim = simulate_run(tiny_model_dir, three_clients, tmp_path / "sim", client=CLIENT_WITH_EVAL, **overrides)

    # The HTTP deployment: the Flask app on a loopback port and three real client loops (run_client).
    config = federation_args(tiny_model_dir, **overrides)
    Federation.initialize(config, tmp_path / "http")
    server = make_server("127.0.0.1", 0, create_app(Federation(Store(tmp_path / "http"))), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # Clients run as threads of this process; one trains at a time, so torch's global RNG (seeded by
    # every TRL trainer) is not shared between two trainings, as between separate client processes.
    lock, train_round = threading.Lock(), LocalTrainer.train_round

    def one_at_a_time(self, *args, **kwargs):
        with lock:
            return train_round(self, *args, **kwargs)

    monkeypatch.setattr(LocalTrainer, "train_round", one_at_a_time)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            run_client(ClientArguments(
                server_url=f"http://127.0.0.1:{server.server_port}", client_id=f"client_{i}",
                dataset_name=str(three_clients / f"client_{i}.jsonl"), batch_size=CLIENT.batch_size, quiet=True,
                local_eval_fraction=CLIENT_WITH_EVAL.local_eval_fraction,
                output_dir=str(tmp_path / f"client_{i}"), poll_interval=0.05, max_poll_interval=0.2,
                seed=SimulationArguments.client_seed))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        server.shutdown()
    assert not errors, errors
    http_history = Store(tmp_path / "http").history(Store(tmp_path / "http").read())
    assert [h["participants"] for h in http_history] == [h["participants"] for h in sim.history["global"]]
    assert [h["train_loss"] for h in http_history] == [h["train_loss"] for h in sim.history["global"]]
    for http_round, sim_round in zip(http_history, sim.history["global"], strict=True):  # each client's own held-out loss
        for client, metrics in sim_round["metrics"].items():
            assert metrics["eval_loss"] == http_round["metrics"][client]["eval_loss"]
    http_final = adapter_tensors(tmp_path / "http" / "adapters" / "final")
    sim_final = adapter_tensors(sim.adapters["global"])
    assert http_final.keys() == sim_final.keys()
    for name, tensor in http_final.items():
        assert torch.equal(tensor, sim_final[name]), name
    assert any(t.abs().sum() > 0 for n, t in sim_final.items() if "lora_B" in n)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, ten_clients, tmp_path_factory):
    return simulate_run(tiny_model_dir, ten_clients, tmp_path_factory.mktemp("uninterrupted"), fed_alg="scaffold",
                        max_steps=2)


@pytest.mark.integration
@pytest.mark.parametrize("crash", ["before_accept", "after_accept"])
def test_resume_after_a_crash_mid_round(crash, tiny_model_dir, ten_clients, uninterrupted, tmp_path, monkeypatch):
    """Killed in round 2 (its first update trained, then the crash before or after the server took it): a rerun
    with the same arguments continues there and ends with the uninterrupted run's adapter."""
    receive, calls = Federation.receive_update, []

    def crashing(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3 and crash == "before_accept":
            raise KeyboardInterrupt
        answer = receive(self, *args, **kwargs)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return answer

    with monkeypatch.context() as patch:
        patch.setattr(Federation, "receive_update", crashing)
        with pytest.raises(KeyboardInterrupt):
            simulate_run(tiny_model_dir, ten_clients, tmp_path, fed_alg="scaffold", max_steps=2)
    crashed_client = calls[-1]
    pending = list((tmp_path / "clients" / crashed_client / "pending").glob("round-000002"))
    assert len(pending) == 1  # the update and the hook state it leaves: not the client's state yet
    assert [h["round"] for h in json.loads((tmp_path / "history.json").read_text())] == [1]

    resumed = simulate_run(tiny_model_dir, ten_clients, tmp_path, fed_alg="scaffold", max_steps=2)
    assert resumed.history["global"][1]["participants"] == uninterrupted.history["global"][1]["participants"]
    assert not list((tmp_path / "clients").glob("*/pending/*"))  # re-sent on resume, then committed
    expected = adapter_tensors(uninterrupted.adapters["global"])
    for name, tensor in adapter_tensors(resumed.adapters["global"]).items():
        assert torch.equal(tensor, expected[name]), name
    for client in (tmp_path / "clients").iterdir():  # and every client's c_i is the uninterrupted one
        state = load_file(str(client / "client_state.safetensors"))
        reference = load_file(str(uninterrupted.output_dir / "clients" / client.name / "client_state.safetensors"))
        assert all(torch.equal(state[k], reference[k]) for k in reference)


@pytest.mark.integration
def test_resume_refuses_other_settings(tiny_model_dir, three_clients, tmp_path):
    simulate_run(tiny_model_dir, three_clients, tmp_path, num_clients=3, num_rounds=1)
    with pytest.raises(ValueError, match="--fed_alg 'fedprox'"):
        simulate_run(tiny_model_dir, three_clients, tmp_path, num_clients=3, num_rounds=1, fed_alg="fedprox")
    sim = SimulationArguments(client_data=str(three_clients), output_dir=str(tmp_path), resume=False)
    with pytest.raises(ValueError, match="--resume true"):
        run_simulation(federation_args(tiny_model_dir, num_clients=3, num_rounds=1), CLIENT, sim, on_round=None)


@pytest.mark.integration
def test_local_and_central_baselines(tiny_model_dir, three_clients, tmp_path):
    local = simulate_run(tiny_model_dir, three_clients, tmp_path / "local", mode="local", num_clients=3, num_rounds=2)
    assert sorted(local.adapters) == ["client_0", "client_1", "client_2"]
    for client, history in local.history.items():  # each client alone, every round, --max_steps each
        assert [h["participants"] for h in history] == [[client], [client]]
        assert all(h["metrics"][client]["steps"] == 1 for h in history)
        assert local.adapters[client] == tmp_path / "local" / "local" / client / "state" / "adapters" / "final"
    central = simulate_run(tiny_model_dir, three_clients, tmp_path / "central", mode="central", num_clients=3,
                           num_rounds=2)
    history = central.history["central"]
    assert [h["participants"] for h in history] == [["central"], ["central"]]
    assert history[0]["num_samples"] == 3 * 12  # every client's data, pooled
    assert history[0]["metrics"]["central"]["steps"] == 2  # --max_steps x --sample_clients: one round's compute


@pytest.mark.integration
def test_cli_splits_one_dataset_on_the_fly(tiny_model_dir, three_clients, tmp_path, capsys):
    pooled = tmp_path / "pooled.jsonl"
    pooled.write_text("".join((three_clients / f"client_{i}.jsonl").read_text() for i in range(3)))
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(pooled), "--split_strategy", "by_field",
            "--split_field", "category", "--num_clients", "3", "--sample_clients", "3", "--num_rounds", "1",
            "--max_steps", "1", "--peft_lora_r", "4", "--seq_length", "64", "--batch_size", "4", "--quiet", "true",
            "--output_dir", str(tmp_path / "run")]
    assert simulate.main(argv) == 0
    out = capsys.readouterr().out
    assert "final adapter (global)" in out and "    1        3" in out
    split = sorted((tmp_path / "run" / "client_data").glob("client_*.jsonl"))
    categories = [{json.loads(line)["category"] for line in p.read_text().splitlines()} for p in split]
    assert len(split) == 3 and all(len(c) == 1 for c in categories)  # by_field: one task family per client
    assert simulate.main([*argv, "--resume", "false"]) == 2  # an existing run is never overwritten


@pytest.mark.integration
def test_simulated_clients_keep_their_own_data(tiny_model_dir, three_clients, tmp_path):
    Federation.initialize(federation_args(tiny_model_dir, num_clients=3), tmp_path / "state")
    federation = Federation(Store(tmp_path / "state"))
    sources = {f"client_{i}": str(three_clients / f"client_{i}.jsonl") for i in range(3)}
    args = ClientArguments(**{**dataclasses.asdict(CLIENT), "local_eval_fraction": 0.25}, output_dir=str(tmp_path))
    clients = SimulatedClients.load(federation.client_config(), args, sources, tmp_path / "clients")
    held_out = {cid: clients.datasets[cid][1][0]["prompt"] for cid in sources}
    assert len(set(held_out.values())) == 3  # every client holds out its own examples
    clients.use_client("client_2", federation)
    assert clients.trainer.eval_dataset[0]["prompt"] == held_out["client_2"]
    assert clients.trainer.num_samples == len(clients.trainer.train_dataset) == 9
