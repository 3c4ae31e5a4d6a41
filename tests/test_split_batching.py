"""Split learning's client-batch mode (--split_batch_wait): one forward of the middle for concurrent clients' steps,
exact against one forward/backward of their concatenated rows; a member that never sends its backward does not stop
the others' step beyond the wait; two real clients over gunicorn train in batches of two."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load as load_bytes

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
