"""Exact client-side algorithm state: FedProx's term per optimizer step, SCAFFOLD's c_i committed only on
acceptance (refused uploads, a client killed anywhere between training and the answer), state bound to its
federation, and the trained sample count re-sent after a restart."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load, load_file, save_file
from transformers import TrainerCallback
from werkzeug.serving import make_server

import client_http
from fedllm.adapter import set_adapter_tensors
from fedllm.algorithms.base import CONTROL_PREFIX
from fedllm.algorithms.fedprox import FedProxHook
from fedllm.client import state as state_module
from fedllm.client.http import FederationClient
from fedllm.client.runner import run_client
from fedllm.client.state import ClientState, ClientStateMismatchError, FederationBinding
from fedllm.client.trainer import LocalTrainer
from fedllm.config import ClientArguments, FederationArguments, SimulatedClientArguments, SimulationArguments
from fedllm.data import write_demo_data
from fedllm.server.app import create_app
from fedllm.server.federation import Federation
from fedllm.server.store import Store
from fedllm.simulation import run_simulation
from fedllm.wire import decode_file, encode

from .test_dpo import write_preferences

BINDING = FederationBinding("federation-a", "f" * 64)


def new_federation(state_dir: Path, model_dir: Path, **overrides) -> Federation:
    settings = dict(model_name_or_path=str(model_dir), num_clients=2, sample_clients=2, num_rounds=2, max_steps=1,
                    learning_rate=1e-2, peft_lora_r=4, peft_lora_alpha=8, seq_length=64, round_timeout=0.0)
    settings.update(overrides)
    Federation.initialize(FederationArguments(**settings), state_dir)
    return Federation(Store(state_dir))


# ------------------------------------------------------------------------------------------ the state folder
def test_pending_state_commits_on_acceptance_and_is_dropped_on_refusal(tmp_path):
    state = ClientState(tmp_path, BINDING)
    assert state.committed() == {} and state.pending() is None
    first = {"control.w": torch.full((3,), 1.0)}
    pending = state.write_pending(1, b"body-1", 6, first)
    assert state.committed() == {}  # pending: not the client's state yet
    with pytest.raises(RuntimeError, match="already holds a pending update"):
        state.write_pending(2, b"body-2", 6, first)
    reopened = ClientState(tmp_path, BINDING).pending()
    assert (reopened.round, reopened.num_samples, reopened.update_path.read_bytes()) == (1, 6, b"body-1")
    assert state.deliver(pending, lambda p: True)
    assert torch.equal(state.committed()["control.w"], first["control.w"]) and state.pending() is None

    refused = state.write_pending(2, b"body-2", 6, {"control.w": torch.full((3,), 2.0)})
    assert not state.deliver(refused, lambda p: False)
    assert torch.equal(state.committed()["control.w"], first["control.w"]) and state.pending() is None
    assert list((tmp_path / "pending").iterdir()) == []


def test_opening_the_folder_finishes_an_interrupted_commit_and_drops_partial_writes(tmp_path):
    state = ClientState(tmp_path, BINDING)
    pending = state.write_pending(1, b"body", 6, {"control.w": torch.ones(2)})
    pending.update_path.unlink()  # killed in commit() right after marking the update accepted
    (tmp_path / "pending" / ".round-000002.x1").mkdir()  # killed while writing the next pending update
    reopened = ClientState(tmp_path, BINDING)
    assert torch.equal(reopened.committed()["control.w"], torch.ones(2))
    assert reopened.pending() is None and list((tmp_path / "pending").iterdir()) == []


def test_state_of_another_federation_or_model_is_refused(tmp_path):
    state = ClientState(tmp_path / "a", BINDING)
    state.deliver(state.write_pending(1, b"body", 6, {"control.w": torch.ones(2)}), lambda p: True)
    for other in (dataclasses.replace(BINDING, federation_id="federation-b"),
                  dataclasses.replace(BINDING, model_fingerprint="0" * 64)):
        with pytest.raises(ClientStateMismatchError, match="belongs to another federation"):
            ClientState(tmp_path / "a", other)
    # A pending update (and the state it leaves) of another federation is never re-sent.
    ClientState(tmp_path / "b", BINDING).write_pending(3, b"body", 6, {})
    with pytest.raises(ClientStateMismatchError, match=r"pending\.json belongs to another federation"):
        ClientState(tmp_path / "b", dataclasses.replace(BINDING, federation_id="federation-b"))
    # A state file that names no federation (written before the binding) is not guessed to be this one's.
    (tmp_path / "c").mkdir()
    save_file({"control.w": torch.ones(2)}, tmp_path / "c" / "client_state.safetensors")
    with pytest.raises(ClientStateMismatchError, match="federation id none"):
        ClientState(tmp_path / "c", BINDING)
    with pytest.raises(ValueError, match="no federation_id"):
        FederationBinding.of({"model_fingerprint": "f" * 64})


# ------------------------------------------------------------------------------------------ FedProx
class GradientAtStep(TrainerCallback):
    """The gradient of the first optimizer step, as the optimizer sees it."""

    def __init__(self, params):
        self.params = params
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.grads:
            self.grads = {name: p.grad.detach().clone() for name, p in self.params.items()}


@pytest.fixture(scope="module")
def prox_clients(tiny_model_dir, tmp_path_factory) -> Callable[[str], tuple[LocalTrainer, dict[str, torch.Tensor]]]:
    """task -> a FedProx client of that task (made once) and the global adapter."""
    made: dict[str, tuple[LocalTrainer, dict[str, torch.Tensor]]] = {}

    def client(task: str) -> tuple[LocalTrainer, dict[str, torch.Tensor]]:
        if task not in made:
            root = tmp_path_factory.mktemp(f"prox-{task}")
            # No dropout: identical batches give identical data gradients.
            federation = new_federation(root / "state", tiny_model_dir, num_clients=1, sample_clients=1,
                                        fed_alg="fedprox", peft_lora_dropout=0.0, task=task)
            data = (write_preferences(root / "pairs.jsonl", rows=16, seed=0) if task == "dpo"
                    else write_demo_data(root / "data", num_clients=1, rows_per_client=16)[0])
            args = ClientArguments(dataset_name=str(data), batch_size=2, output_dir=str(root / "out"), quiet=True)
            made[task] = LocalTrainer(federation.client_config(), args), decode_file(federation.latest_global().path)
        return made[task]

    return client


def first_step_gradient(trainer: LocalTrainer, global_tensors, offset, mu: float, accumulation: int):
    """The real HookedTrainer's gradient at its first optimizer step, from w = w_g + offset, FedProx with ``mu``."""
    trainer.args = dataclasses.replace(trainer.args, gradient_accumulation_steps=accumulation)
    trainer.hook = FedProxHook(mu)
    set_adapter_tensors(trainer.model, global_tensors)
    trainer.hook.begin_round(trainer.params, global_tensors)  # w_g
    with torch.no_grad():
        for name, p in trainer.params.items():
            p.add_(offset[name])
    hf_trainer = trainer._new_trainer(1, 1e-3, 1)
    hf_trainer.args.max_grad_norm = 0.0  # the gradient itself, not clipped
    capture = GradientAtStep(trainer.params)
    hf_trainer.add_callback(capture)
    hf_trainer.train()
    return capture.grads


@pytest.mark.integration
@pytest.mark.parametrize(("task", "accumulation"), [("sft", 1), ("sft", 2), ("sft", 4), ("dpo", 2)])
def test_proximal_term_adds_mu_times_the_distance_once_per_optimizer_step(task, accumulation, prox_clients):
    """Whatever the accumulation, the term's share of a step's gradient is exactly μ(w − w_g). SFT's loss is
    normalised over the accumulated batch (num_items_in_batch), DPO's is divided by the trainer: both branches."""
    trainer, global_tensors = prox_clients(task)
    generator = torch.Generator().manual_seed(0)
    offset = {name: 0.1 * torch.randn(p.shape, generator=generator) for name, p in trainer.params.items()}
    mu = 0.5
    with_term = first_step_gradient(trainer, global_tensors, offset, mu, accumulation)
    data_only = first_step_gradient(trainer, global_tensors, offset, 0.0, accumulation)
    assert any(g.abs().sum() > 0 for g in data_only.values())
    for name, distance in offset.items():
        torch.testing.assert_close(with_term[name] - data_only[name], mu * distance, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ SCAFFOLD over HTTP
class Killed(BaseException):
    """Stands for SIGKILL: raised at a crash point, no handler of the client runs after it."""


@contextmanager
def serving(federation: Federation) -> Iterator[str]:
    """The server's Flask app (with its background round progress) on a loopback port."""
    server = make_server("127.0.0.1", 0, create_app(federation), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def wait_until(condition: Callable[[], object], timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


class Bob:
    """A scripted second client: pushes a zero delta with a random Δc in each round of ``rounds`` it is sampled for."""

    def __init__(self, url: str, rounds: set[int]):
        self.url = url
        self.rounds = rounds
        self.c_i: dict[str, torch.Tensor] = {}  # the Σ of the Δc it pushed: its c_i
        self.error: BaseException | None = None
        assert self._call("POST", "/v1/join", json={"num_samples": 8}).status_code == 200
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"X-FedLLM-Client": "bob", **kwargs.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def _run(self) -> None:
        try:
            upload = self._call("GET", "/v1/config").json()["upload_tensors"]
            generator = torch.Generator().manual_seed(1)
            while not self._stop.is_set():
                status = self._call("GET", "/v1/round").json()
                if status["phase"] == "finished":
                    return
                if status["selected"] and not status["submitted"] and status["round"] in self.rounds:
                    controls = {name: 0.01 * torch.randn(shape, generator=generator)
                                for name, shape in upload.items() if name.startswith(CONTROL_PREFIX)}
                    tensors = {name: torch.zeros(shape) for name, shape in upload.items()} | controls
                    answer = self._call("POST", f"/v1/update?round={status['round']}", data=encode(tensors),
                                        headers={"X-FedLLM-Num-Samples": "8"})
                    assert answer.status_code == 202, answer.text
                    for name, delta in controls.items():
                        self.c_i[name] = self.c_i.get(name, torch.zeros_like(delta)) + delta
                time.sleep(0.05)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert self.error is None, self.error


def alice_args(url: str, data: Path, output_dir: Path) -> ClientArguments:
    return ClientArguments(server_url=url, client_id="alice", dataset_name=str(data), batch_size=4,
                           output_dir=str(output_dir), quiet=True, poll_interval=0.05, max_poll_interval=0.2,
                           max_retries=1)


def assert_c_is_the_mean_of_the_clients_c_i(url: str, state_dir: Path, client_states: list[dict[str, torch.Tensor]],
                                            num_clients: int) -> None:
    """c = (1/N) Σ_i c_i, for the c served with the global adapter and the c in the server's state file."""
    served = load(requests.get(url + "/v1/global", headers={"X-FedLLM-Client": "bob"}, timeout=30).content)
    stored = load_file(sorted((state_dir / "globals").glob("v*.state.safetensors"))[-1])
    served_c = {k: v for k, v in served.items() if k.startswith(CONTROL_PREFIX)}
    stored_c = {k[k.index(CONTROL_PREFIX):]: v for k, v in stored.items() if CONTROL_PREFIX in k}
    assert served_c.keys() == stored_c.keys() and served_c
    for name in served_c:
        expected = sum(c_i[name] for c_i in client_states) / num_clients
        assert expected.abs().sum() > 0
        torch.testing.assert_close(served_c[name], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stored_c[name], expected, rtol=1e-5, atol=1e-6)


def counting_rounds(monkeypatch) -> list[int]:
    """The rounds LocalTrainer trains from now on."""
    trained, train_round = [], LocalTrainer.train_round

    def counted(self, global_tensors, round_number, *args):
        trained.append(round_number)
        return train_round(self, global_tensors, round_number, *args)

    monkeypatch.setattr(LocalTrainer, "train_round", counted)
    return trained


@pytest.fixture(scope="module")
def alice_data(tmp_path_factory) -> Path:
    return write_demo_data(tmp_path_factory.mktemp("alice-data"), num_clients=1, rows_per_client=8)[0]


@pytest.mark.integration
def test_refused_scaffold_update_leaves_c_the_mean_of_c_i(tiny_model_dir, alice_data, tmp_path, monkeypatch):
    """Round 1 closes at its deadline with bob's update only; alice's late upload is refused (409), so her c_i⁺ of
    round 1 is dropped and round 2 starts from her old c_i."""
    federation = new_federation(tmp_path / "state", tiny_model_dir, fed_alg="scaffold", round_timeout=1.0,
                                min_fit_clients=1)
    train_round = LocalTrainer.train_round

    def late_in_round_1(self, global_tensors, round_number, *args):
        result = train_round(self, global_tensors, round_number, *args)
        if round_number == 1:  # her upload arrives after the round closed without her
            wait_until(lambda: federation.status()["round"] == 2)
        return result

    monkeypatch.setattr(LocalTrainer, "train_round", late_in_round_1)
    with serving(federation) as url:
        bob = Bob(url, rounds={1})
        report = run_client(alice_args(url, alice_data, tmp_path / "alice"))
        bob.stop()
        assert [r.round for r in report.rounds] == [2]
        assert [h["participants"] for h in federation.history()] == [["bob"], ["alice"]]
        alice_c_i = load_file(tmp_path / "alice" / "client_state.safetensors")
        assert_c_is_the_mean_of_the_clients_c_i(url, tmp_path / "state", [alice_c_i, bob.c_i], 2)
    assert list((tmp_path / "alice" / "pending").iterdir()) == []


def _raise_after(function: Callable) -> Callable:
    def killed_after(*args, **kwargs):
        function(*args, **kwargs)
        raise Killed

    return killed_after


def _raise_instead(*args, **kwargs):
    raise Killed


def _kill_writing_the_manifest(write: Callable) -> Callable:
    def write_until_the_manifest(path: Path, data: bytes) -> None:
        if path.name == state_module.MANIFEST_FILE:  # the update and the state are written, the directory is not
            raise Killed
        write(path, data)

    return write_until_the_manifest


# Each crash point, in the order the client passes them: (object, attribute, wrapper of the attribute, whether the
# restarted client trains round 1 again because the update died with the process).
CRASH_POINTS = {
    "trained": (LocalTrainer, "train_round", _raise_after, True),
    "writing_pending": (state_module, "_write_synced", _kill_writing_the_manifest, True),
    "pending_written": (FederationClient, "upload_update", lambda f: _raise_instead, False),
    "accepted_unanswered": (FederationClient, "upload_update", _raise_after, False),
    "committing": (ClientState, "_finish_commit", lambda f: _raise_instead, False),
    "committed": (ClientState, "deliver", _raise_after, False),
}


@pytest.mark.integration
@pytest.mark.parametrize("crash", list(CRASH_POINTS))
def test_client_killed_between_training_and_acceptance_keeps_c_the_mean_of_c_i(
        crash, tiny_model_dir, alice_data, tmp_path, monkeypatch):
    """Alice dies at ``crash`` in round 1; restarted, she re-sends or retrains, and c = (1/N) Σ c_i after round 2."""
    federation = new_federation(tmp_path / "state", tiny_model_dir, fed_alg="scaffold")
    owner, name, wrap, retrains = CRASH_POINTS[crash]
    with serving(federation) as url:
        bob = Bob(url, rounds={1, 2})
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, wrap(getattr(owner, name)))
            with pytest.raises(Killed):
                run_client(alice_args(url, alice_data, tmp_path / "alice"))
        with monkeypatch.context() as patch:
            trained = counting_rounds(patch)
            report = run_client(alice_args(url, alice_data, tmp_path / "alice"))
        bob.stop()
        assert trained == ([1, 2] if retrains else [2])
        # Re-sent after the restart: the update that was pending (the server may have taken it already).
        resent = crash in ("pending_written", "accepted_unanswered")
        assert [r.round for r in report.rounds] == ([1, 2] if retrains or resent else [2])
        assert [h["participants"] for h in federation.history()] == [["alice", "bob"], ["alice", "bob"]]
        alice_c_i = load_file(tmp_path / "alice" / "client_state.safetensors")
        assert_c_is_the_mean_of_the_clients_c_i(url, tmp_path / "state", [alice_c_i, bob.c_i], 2)
    assert list((tmp_path / "alice" / "pending").iterdir()) == []


# ------------------------------------------------------------------------------------------ binding, sample count


@pytest.mark.integration
def test_client_refuses_the_state_of_another_federation_and_exits_non_zero(tiny_model_dir, alice_data, tmp_path,
                                                                          capsys, restore_logging):
    federation = new_federation(tmp_path / "state", tiny_model_dir, fed_alg="scaffold")
    other = ClientState(tmp_path / "alice",
                        FederationBinding("another-federation", federation.client_config()["model_fingerprint"]))
    other.deliver(other.write_pending(1, b"body", 8, {"control.w": torch.ones(2)}), lambda p: True)
    with serving(federation) as url:
        argv = ["--server_url", url, "--client_id", "alice", "--dataset_name", str(alice_data),
                "--output_dir", str(tmp_path / "alice"), "--quiet", "true"]
        assert client_http.main(argv) == 2
        assert federation.status()["clients_joined"] == 0  # refused before it joined
    err = capsys.readouterr().err
    assert "client_state.safetensors belongs to another federation (federation id another-federation" in err


@pytest.mark.integration
def test_simulated_clients_refuse_the_state_of_a_replaced_federation(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    write_demo_data(data, num_clients=2, rows_per_client=8)
    federation = FederationArguments(model_name_or_path=str(tiny_model_dir), fed_alg="scaffold", num_clients=2,
                                     sample_clients=2, num_rounds=1, max_steps=1, peft_lora_r=4, seq_length=64,
                                     round_timeout=0.0)
    sim = SimulationArguments(client_data=str(data), output_dir=str(tmp_path / "run"))
    client = SimulatedClientArguments(batch_size=4, quiet=True)
    run_simulation(federation, client, sim, on_round=None)
    shutil.rmtree(tmp_path / "run" / "state")  # a new federation in the same output dir: a new c, a new id
    with pytest.raises(ClientStateMismatchError, match="belongs to another federation"):
        run_simulation(federation, client, sim, on_round=None)


@pytest.mark.integration
def test_resent_update_reports_the_examples_trained_on(tiny_model_dir, tmp_path, monkeypatch):
    """TRL drops the examples whose prompt fills seq_length; a restarted client re-sends the count trained on."""
    rows = [{"instruction": "Name a fruit.", "input": "", "output": "apple"}] * 6
    rows += [{"instruction": "word " * 200, "input": "", "output": "apple"}] * 4  # beyond seq_length 64
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    federation = new_federation(tmp_path / "state", tiny_model_dir, num_clients=1, sample_clients=1, num_rounds=1)
    with serving(federation) as url:
        with monkeypatch.context() as patch:
            patch.setattr(FederationClient, "upload_update", _raise_instead)
            with pytest.raises(Killed):
                run_client(alice_args(url, data, tmp_path / "alice"))
        binding = FederationBinding.of(federation.client_config())
        assert ClientState(tmp_path / "alice", binding).pending().num_samples == 6
        with monkeypatch.context() as patch:
            trained = counting_rounds(patch)
            run_client(alice_args(url, data, tmp_path / "alice"))
        assert trained == []  # re-sent, not retrained
    assert federation.history()[0]["num_samples"] == 6
