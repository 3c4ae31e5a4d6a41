"""``--backend ray``: the in-process run's final adapter, client states and run folder; a worker killed mid-round
is survived. Ray runs on a local instance bound to 127.0.0.1 (fedllm.ray_backend.start_ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import simulate
from fedllm.config import FederationArguments, SimulatedClientArguments, SimulationArguments
from fedllm.data import write_demo_data
from fedllm.ray_backend import start_ray, worker_count
from fedllm.simulation import SimulationResult, run_simulation

pytest.importorskip("ray")

# SCAFFOLD, so that every client's c_i (pending until accepted, then committed) must come out the same too.
FEDERATION = dict(num_clients=3, sample_clients=3, num_rounds=2, max_steps=1, learning_rate=0.01, peft_lora_r=4,
                  peft_lora_alpha=8, seq_length=64, seed=5, save_model_freq=0, fed_alg="scaffold")
CLIENT = dict(batch_size=4, quiet=True)
THREADS = 1  # both backends train every client on one torch thread: the same sums, the same bits


@pytest.fixture(scope="module")
def three_clients(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("three-clients")
    write_demo_data(folder, num_clients=3, rows_per_client=12, seed=1)
    return folder


def simulation(model_dir: Path, data: Path, output_dir: Path, **sim) -> SimulationResult:
    return run_simulation(FederationArguments(model_name_or_path=str(model_dir), **FEDERATION),
                          SimulatedClientArguments(**CLIENT),
                          SimulationArguments(client_data=str(data), output_dir=str(output_dir),
                                              num_cpus_per_client=THREADS, **sim), on_round=None)


@pytest.fixture(scope="module")
def in_process(tiny_model_dir, three_clients, tmp_path_factory) -> SimulationResult:
    return simulation(tiny_model_dir, three_clients, tmp_path_factory.mktemp("in-process"))


def files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()}


def assert_same_run(ray_run: SimulationResult, in_process: SimulationResult) -> None:
    history, expected = ray_run.history["global"], in_process.history["global"]
    assert [h["participants"] for h in history] == [h["participants"] for h in expected]
    assert [h["train_loss"] for h in history] == [h["train_loss"] for h in expected]
    final, reference = (load_file(str(r.adapters["global"] / "adapter_model.safetensors")) for r in (ray_run, in_process))
    assert final.keys() == reference.keys()
    for name, tensor in final.items():
        assert torch.equal(tensor, reference[name]), name
    for client in ("client_0", "client_1", "client_2"):  # every client's committed c_i
        path = Path("clients") / client / "client_state.safetensors"
        state, reference = (load_file(str(r.output_dir / path)) for r in (ray_run, in_process))
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


@pytest.mark.integration
def test_ray_backend_equals_in_process(in_process, tiny_model_dir, three_clients, tmp_path):
    """simulate.py --backend ray on a local Ray instance: 3 clients in parallel on 2 workers, bit for bit the
    in-process run, in the same run folder layout."""
    argv = [item for key, value in {**FEDERATION, **CLIENT}.items() for item in (f"--{key}", str(value))]
    argv += ["--model_name_or_path", str(tiny_model_dir), "--client_data", str(three_clients),
             "--output_dir", str(tmp_path), "--backend", "ray", "--num_cpus_per_client", str(THREADS)]
    assert simulate.main(argv) == 0
    ray_run = SimulationResult("federated", tmp_path, {"global": tmp_path / "state" / "adapters" / "final"},
                               {"global": json.loads((tmp_path / "history.json").read_text())})
    assert_same_run(ray_run, in_process)
    assert files(tmp_path).keys() == files(in_process.output_dir).keys()


@pytest.mark.integration
def test_a_ray_worker_killed_mid_round_is_survived(in_process, tiny_model_dir, three_clients, tmp_path):
    """A worker's process dies (SIGKILL) right after keeping a client's update: Ray restarts it and retries the
    client, which hands over the kept update; the run ends with the in-process adapter."""
    killed = tmp_path / "killed"

    def die_once_after_keeping_an_update() -> None:  # run in every Ray worker process as it starts
        import os
        import signal

        from fedllm.client.state import ClientState

        write_pending = ClientState.write_pending

        def write_then_die(self, round_number, *args, **kwargs):
            pending = write_pending(self, round_number, *args, **kwargs)
            try:
                marker = os.open(killed, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # one worker, once
            except FileExistsError:
                return pending
            os.write(marker, f"{self.folder.name} round {round_number}".encode())
            os.close(marker)
            os.kill(os.getpid(), signal.SIGKILL)

        ClientState.write_pending = write_then_die

    assert start_ray(runtime_env={"worker_process_setup_hook": die_once_after_keeping_an_update})
    import ray

    try:
        ray_run = simulation(tiny_model_dir, three_clients, tmp_path / "run", backend="ray")
    finally:
        ray.shutdown()
    assert killed.read_text().endswith("round 1")
    assert_same_run(ray_run, in_process)
    assert not list((tmp_path / "run" / "clients").glob("*/pending/*"))


def test_backend_options_are_checked_before_anything_runs(tiny_model_dir, tmp_path):
    def run(**sim):
        settings = dict(client_data=str(tmp_path), output_dir=str(tmp_path / "out"), **sim)
        run_simulation(FederationArguments(model_name_or_path=str(tiny_model_dir), **FEDERATION),
                       SimulatedClientArguments(**CLIENT), SimulationArguments(**settings), on_round=None)

    with pytest.raises(ValueError, match="--mode local trains one client per round"):
        run(backend="ray", mode="local")
    with pytest.raises(ValueError, match="--ray_address apply to --backend ray only"):
        run(ray_address="auto")
    with pytest.raises(ValueError, match="--num_cpus_per_client must be at least 1"):
        run(backend="ray", num_cpus_per_client=0)
    assert not (tmp_path / "out").exists()


def test_workers_fit_the_cluster():
    assert worker_count({"CPU": 2.0}, cpus=1, gpus=0, wanted=4) == 2
    assert worker_count({"CPU": 64.0, "GPU": 8.0}, cpus=4, gpus=1, wanted=100) == 8
    assert worker_count({"CPU": 16.0, "GPU": 1.0}, cpus=1, gpus=0.1, wanted=100) == 10
    assert worker_count({"CPU": 16.0}, cpus=1, gpus=0, wanted=3) == 3
    with pytest.raises(ValueError, match="not enough for one client"):
        worker_count({"CPU": 16.0}, cpus=1, gpus=1, wanted=3)
