"""Split learning's client-batch mode (--split_batch_wait): one forward of the middle for concurrent clients' steps,
exact against one forward/backward of their concatenated rows; a member that never sends its backward does not stop
the others' step beyond the wait; two real clients over gunicorn train in batches of two."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

from fedllm.adapter import build_lora_config, load_model_config
from fedllm.algorithms import round_learning_rate
from fedllm.server.app import create_app
from fedllm.server.federation import Federation
from fedllm.server.store import Store
from fedllm.split.messages import decode_tensor, encode_forward, encode_tensor
from fedllm.split.model import (
    CLIENT_PARTS,
    MIDDLE,
    SERVER_PARTS,
    MaskInfo,
    build_part_model,
    causal_lm_loss,
    tail_logits,
)
from fedllm.split.server import MiddleService, initial_parts
from fedllm.split.step import Batch, SplitEnds, SplitMiddle, set_learning_rate, set_part_adapter_tensors

from .test_split_http import forward_body, grad_body, post, run_federation, server_args, split_config

pytestmark = pytest.mark.integration  # the middle takes optimizer steps; the federation starts processes


def _federation(model_dir: Path, state: Path, **overrides) -> Federation:
    Federation.initialize(split_config(model_dir, **overrides), state)
    federation = Federation(Store(state))
    federation.join("alice", 10)
    federation.join("bob", 10)  # round 1 opens with both sampled
    return federation


def _batch(generator: torch.Generator, rows: int, width: int, vocab_size: int) -> Batch:
    ids = torch.randint(4, vocab_size, (rows, width), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, width - 3:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt without loss
    return Batch(ids, mask, labels)


def _threads(*calls) -> None:
    threads = [threading.Thread(target=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive()


def test_a_batch_of_two_clients_steps_is_one_forward_and_backward_of_their_concatenated_rows(
        tiny4_model_dir: Path, tmp_path: Path) -> None:
    federation = _federation(tiny4_model_dir, tmp_path / "state", split_batch_wait=120.0)
    config = federation.config
    service = MiddleService(federation)
    model_config = load_model_config(str(tiny4_model_dir))
    plan = service.plan
    lora = build_lora_config(model_config, r=config.peft_lora_r, alpha=config.peft_lora_alpha, dropout=0.0,
                             target_modules=config.target_module_list())
    start, _ = initial_parts(config)
    generator = torch.Generator().manual_seed(2)
    for name, tensor in start.items():  # lora_B nonzero, so that the middle's gradient flows at step 1
        if ".lora_B." in name:
            tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))
    middle_start = {k: v for k, v in start.items() if plan.part_of(k) == MIDDLE}
    set_part_adapter_tensors(service.middle.model, plan, SERVER_PARTS, middle_start)
    ends, batches = {}, {}
    for name, (rows, width) in {"alice": (3, 12), "bob": (2, 8)}.items():  # different T: bob's rows are padded
        model = build_part_model(tiny4_model_dir, model_config, plan, CLIENT_PARTS, lora)
        set_part_adapter_tensors(model, plan, CLIENT_PARTS, {k: v for k, v in start.items()
                                                            if plan.part_of(k) in CLIENT_PARTS})
        ends[name] = SplitEnds(model, plan, config.learning_rate)
        batches[name] = _batch(generator, rows, width, model_config.vocab_size)

    # Over the service: both forwards, concurrently, become one batch; each backward is answered at once.
    heads = {name: ends[name].head(batches[name]) for name in ends}
    answers = {}

    def forward(name: str):
        return lambda: answers.__setitem__(name, service.forward(name, 1, 1, encode_forward(*heads[name], "float32")))

    _threads(forward("alice"), forward("bob"))
    assert [len(b.members) for b in service.pending] == [2]
    losses, grads_a = {}, {}
    for name in ("alice", "bob"):
        shape = tuple(heads[name][0].shape)
        hidden_b = decode_tensor(answers[name], "hidden", service.shape, shape)
        losses[name], grad_b = ends[name].tail(hidden_b, batches[name].labels)
        body = service.backward(name, 1, 1, encode_tensor("grad", grad_b, "float32"))
        grads_a[name] = decode_tensor(body, "grad", service.shape, shape)
        assert service.middle.version == (0 if name == "alice" else 1)  # one step, when both have contributed
    assert not service.pending

    # In one process: the concatenated rows (bob's right-padded) through a fresh middle, L = (L_alice + L_bob) / 2.
    reference = SplitMiddle(build_part_model(tiny4_model_dir, model_config, plan, SERVER_PARTS, lora), plan,
                            config.learning_rate)
    set_part_adapter_tensors(reference.model, plan, SERVER_PARTS, middle_start)
    set_learning_rate(reference.optimizer, round_learning_rate(config, 1))
    width = 12
    hidden = torch.cat([heads["alice"][0], torch.nn.functional.pad(heads["bob"][0], (0, 0, 0, width - 8))])
    attention = torch.cat([batches["alice"].attention_mask,
                           torch.nn.functional.pad(batches["bob"].attention_mask, (0, width - 8))])
    leaf, output = reference.forward(hidden, MaskInfo.from_attention_mask(attention))
    rows = {"alice": slice(0, 3), "bob": slice(3, 5)}
    loss = {name: causal_lm_loss(ends[name].model, tail_logits(
        ends[name].model, plan, output[rows[name], :batches[name].input_ids.shape[1]], heads[name][1]),
        batches[name].labels) for name in ends}
    ((loss["alice"] + loss["bob"]) / 2).backward()
    reference.optimizer.step()

    for name in ends:
        assert losses[name] == pytest.approx(float(loss[name].detach()), abs=1e-6)
        expected = 2 * leaf.grad[rows[name], :batches[name].input_ids.shape[1]]  # ∂L_i/∂h_A = m ∂L/∂h_A
        assert (grads_a[name] - expected).abs().max() < 1e-5, name
    # AdamW's first moment after one step is (1 - β1) g: the combined gradient itself, not only its sign.
    for ours, theirs in zip(service.middle.optimizer.param_groups[0]["params"],
                            reference.optimizer.param_groups[0]["params"], strict=True):
        ours, theirs = service.middle.optimizer.state[ours]["exp_avg"], reference.optimizer.state[theirs]["exp_avg"]
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    moved = 0.0
    for key, value in reference.adapter().items():
        assert (service.middle.adapter()[key] - value).abs().max() < 1e-5, key
        moved = max(moved, float((value - middle_start[key]).abs().max()))
    assert moved > 1e-4  # the step did something
    federation.store.close()


def test_a_member_that_never_sends_its_backward_does_not_stop_the_others_step(tiny4_model_dir: Path, tmp_path: Path,
                                                                              caplog) -> None:
    federation = _federation(tiny4_model_dir, tmp_path / "state", split_batch_wait=0.5)
    app = create_app(federation, start_ticker=False)
    service = app.extensions["fedllm"]["split"]
    answers = {}

    def send(kind: str, step: int, client: str, body: bytes):
        return lambda: answers.__setitem__((kind, step, client), post(app.test_client(), kind, step, body, client))

    _threads(send("forward", 1, "alice", forward_body()), send("forward", 1, "bob", forward_body(batch=1, seq_len=5)))
    assert load_bytes(answers["forward", 1, "bob"].data)["hidden"].shape == (1, 5, 64)  # its own rows only
    assert [len(b.members) for b in service.pending] == [2]
    assert post(app.test_client(), "backward", 1, grad_body()).status_code == 200
    assert service.middle.version == 0  # bob has the wait to send his
    # Bob vanished. Alice's next forward waits for the batch's step only until the wait runs out.
    with caplog.at_level(logging.WARNING, logger="fedllm.server"):
        assert post(app.test_client(), "forward", 2, forward_body()).status_code == 200
    assert service.middle.version == 1
    dropped = [r for r in caplog.records if getattr(r, "event", None) == "split_batch_member_dropped"]
    assert [(r.client_id, r.round, r.step) for r in dropped] == [("bob", 1, 1)]
    late = post(app.test_client(), "backward", 1, grad_body(batch=1, seq_len=5), client="bob")
    assert late.status_code == 409 and "dropped from its batch" in late.get_json()["detail"]
    assert post(app.test_client(), "backward", 2, grad_body()).status_code == 200  # alice goes on
    assert service.middle.version == 2
    assert app.test_client().get("/v1/split/step?round=1", headers={"X-FedLLM-Client": "bob"}).get_json()[
        "next_step"] == 1  # bob redoes his step
    federation.store.close()


def test_two_real_clients_over_gunicorn_train_in_batches_of_two(tiny4_model_dir: Path, tmp_path: Path, start_server,
                                                                restore_logging) -> None:
    from fedllm.data import write_demo_data

    server = start_server(server_args(tiny4_model_dir, tmp_path / "state", num_rounds=2, max_steps=4,
                                      split_batch_wait=30.0))
    data = write_demo_data(tmp_path / "data", num_clients=2, rows_per_client=16, seed=1)
    run_federation(server, data, tmp_path)

    history = requests.get(server.url + "/v1/history", headers={"X-FedLLM-Client": "client0"}, timeout=30).json()
    losses = [h["train_loss"] for h in history]
    assert [h["round"] for h in history] == [1, 2] and losses[-1] < losses[0], losses
    metrics = {line.split(" ")[0]: float(line.split(" ")[1])
               for line in requests.get(server.url + "/metrics", timeout=30).text.splitlines()
               if line.startswith("fedllm_split_batch_size")}
    batches, singles = metrics["fedllm_split_batch_size_count"], metrics['fedllm_split_batch_size_bucket{le="1.0"}']
    print("split batches:", batches, "of one client:", singles)
    assert batches - singles >= 1  # batches of two were formed
    assert metrics["fedllm_split_batch_size_sum"] == 2 * 2 * 4  # every client step in one: 2 rounds x 2 x 4 steps


def test_the_batch_wait_is_checked_and_may_change_when_the_server_restarts(tiny4_model_dir: Path) -> None:
    from fedllm.config import federation_changes

    assert "--split_batch_wait must be a finite number >= 0" in " ".join(
        split_config(tiny4_model_dir, split_batch_wait=-1.0).split_problems())
    stored = {**vars(split_config(tiny4_model_dir))}
    identity, operational = federation_changes(stored, split_config(tiny4_model_dir, split_batch_wait=2.0))
    assert identity == {} and operational == {"split_batch_wait": (0.0, 2.0)}


class ServerTransport:
    """A client's split calls to the real server app, its refusals raised as the HTTP client raises them; bob's
    first backward of ``hold_step`` is held until the server has dropped that step from its batch."""

    def __init__(self, app, client_id: str, hold_step: int | None = None):
        self.app, self.client_id, self.hold_step = app, client_id, hold_step

    def split_step(self, round_number: int) -> dict:
        response = self.app.test_client().get(f"/v1/split/step?round={round_number}",
                                              headers={"X-FedLLM-Client": self.client_id})
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    def split_exchange(self, kind: str, round_number: int, step: int, body: bytes, limit: int) -> bytes:
        from fedllm.client.http import ServerError

        if kind == "backward" and step == self.hold_step:
            self.hold_step = None
            service = self.app.extensions["fedllm"]["split"]
            for _ in range(6000):  # until the batch's step went without this member (the server's timer)
                if service.dropped.get(self.client_id, (0, 0))[:2] == (round_number, step):
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the server never dropped the held step")
        response = post(self.app.test_client(), kind, step, body, client=self.client_id, round_number=round_number)
        if response.status_code not in (200, 202):  # 202: a chunk's receipt (--split_sequence_chunk)
            raise ServerError(response.status_code, response.get_json()["error"], response.get_json()["detail"])
        return response.data


@pytest.mark.parametrize("chunk", [0, 7])  # 7: every message in sequence chunks (--split_sequence_chunk)
def test_a_member_dropped_from_its_batch_redoes_the_step_in_process_and_every_loss_is_exact(
        tiny4_model_dir: Path, tmp_path: Path, caplog, chunk: int) -> None:
    from fedllm.adapter import initial_adapter
    from fedllm.config import ClientArguments
    from fedllm.data import write_demo_data
    from fedllm.split.client import ENDS_FILE, PROGRESS_FILE, SplitTrainer
    from fedllm.split.step import add_gradients

    federation = _federation(tiny4_model_dir, tmp_path / "state", split_batch_wait=4.0, split_sequence_chunk=chunk)
    app = create_app(federation, start_ticker=False)
    service = app.extensions["fedllm"]["split"]
    schedule: list[list[tuple[str, int, bool]]] = []  # each middle step's members: (client, step, contributed)
    close = service._close

    def recording_close(batch, expired: bool = False) -> None:
        schedule.append([(m.client_id, m.step, m.state == "contributed") for m in batch.members])
        close(batch, expired)

    service._close = recording_close
    server_config = federation.client_config()
    served = initial_adapter({k: tuple(v) for k, v in server_config["adapter"].items()}, 5)
    data = dict(zip(("alice", "bob"), write_demo_data(tmp_path / "data", num_clients=2, rows_per_client=12, seed=3),
                    strict=True))
    learning_rate, steps = 0.01, 3

    def trainer(name: str, transport, folder: str) -> SplitTrainer:
        return SplitTrainer(server_config, ClientArguments(client_id=name, dataset_name=str(data[name]),
                                                           batch_size=2, output_dir=str(tmp_path / folder), seed=1),
                            transport)

    trainers = {"alice": trainer("alice", ServerTransport(app, "alice"), "alice"),
                "bob": trainer("bob", ServerTransport(app, "bob", hold_step=2), "bob")}
    results, failures = {}, []

    def run(name: str):
        def call() -> None:
            try:
                results[name] = trainers[name].train_round(served, 1, learning_rate, steps)
            except Exception as exc:  # reported below, with the thread's traceback
                failures.append(exc)
                raise
        return call

    with caplog.at_level(logging.WARNING, logger="fedllm.client"):
        _threads(run("alice"), run("bob"))
    assert not failures, failures
    redone = [r for r in caplog.records if getattr(r, "event", None) == "split_step_redo"]
    assert [(r.round, r.step, r.attempt) for r in redone] == [(1, 2, 2)]
    assert ("bob", 2, False) in [m for batch in schedule for m in batch]  # bob's first step 2 went unused
    assert sum(m[2] for batch in schedule for m in batch) == 2 * steps  # every step contributed once
    assert results["bob"].metrics["steps"] == steps == results["alice"].metrics["steps"]

    # The same schedule in one process: each batch's members at the middle's current weights, its step on the
    # mean of its contributors' gradients; a dropped member's ends take no step and keep their h_A.
    plan, config = service.plan, federation.config
    reference_middle = SplitMiddle(build_part_model(tiny4_model_dir, load_model_config(str(tiny4_model_dir)), plan,
                                                    SERVER_PARTS, build_lora_config(
                                                        load_model_config(str(tiny4_model_dir)),
                                                        r=config.peft_lora_r, alpha=config.peft_lora_alpha,
                                                        dropout=0.0, target_modules=config.target_module_list())),
                                   plan, config.learning_rate)
    start, _ = initial_parts(config)
    set_part_adapter_tensors(reference_middle.model, plan, SERVER_PARTS,
                             {k: v for k, v in start.items() if plan.part_of(k) == MIDDLE})
    set_learning_rate(reference_middle.optimizer, round_learning_rate(config, 1))
    references, ends, heads = {}, {}, {}
    for name in trainers:
        references[name] = trainer(name, None, f"reference-{name}")
        set_part_adapter_tensors(references[name].model, plan, CLIENT_PARTS, served)
        ends[name] = SplitEnds(references[name].model, plan, learning_rate)
    losses: dict[str, list[float]] = {"alice": [], "bob": []}
    for batch in schedule:
        gradient_sum, contributors = None, 0
        for name, step, contributed in batch:
            rows = references[name].batch(1, step)
            if (name, step) not in heads:
                heads[name, step] = ends[name].head(rows)
            leaf, output = reference_middle.forward(*heads[name, step])
            loss, grad_b = ends[name].tail(output, rows.labels)
            if not contributed:
                ends[name].discard_tail()
                continue
            grad_a, grads = reference_middle.gradients(leaf, output, grad_b)
            gradient_sum, contributors = add_gradients(gradient_sum, grads), contributors + 1
            ends[name].head_backward(grad_a)
            losses[name].append(loss)
        if contributors:
            reference_middle.step(gradient_sum, contributors)

    for name in trainers:
        folder = tmp_path / name / "split"
        ran = __import__("json").loads((folder / PROGRESS_FILE).read_text())["losses"]
        assert ran == pytest.approx(losses[name], abs=1e-5), name
        after = ends[name].adapter()
        for key, delta in results[name].tensors.items():
            assert (served[key].float() + delta - after[key]).abs().max() < 1e-5, key
        saved = load_file(str(folder / ENDS_FILE))
        assert {float(v) for k, v in saved.items() if k.endswith("/step")} == {float(steps)}  # 3 AdamW steps
    for key, value in reference_middle.adapter().items():
        assert (service.middle.adapter()[key] - value).abs().max() < 1e-5, key
    federation.store.close()
