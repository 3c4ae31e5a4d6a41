"""Sequence-level streaming of split messages (--split_sequence_chunk): a chunked run is the unchunked run; every
bad chunk (unbound, out of order, missing, duplicated with another body, replayed, misshapen) is refused with a JSON
error and changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_bytes

from fedllm.server.app import create_app
from fedllm.server.federation import Federation
from fedllm.server.store import Store
from fedllm.split.chunks import chunk_count, decode_answer, encode_chunks
from fedllm.split.model import MaskInfo

from .test_split_batching import ServerTransport
from .test_split_http import HIDDEN, forward_body, post, split_config

pytestmark = pytest.mark.integration  # the middle takes optimizer steps


def _state(model_dir: Path, root: Path, **overrides) -> Path:
    Federation.initialize(split_config(model_dir, num_clients=1, sample_clients=1, **overrides), root)
    federation = Federation(Store(root))
    federation.join("alice", 10)
    federation.store.close()
    return root


class CountingTransport(ServerTransport):
    def __init__(self, app, client_id: str):
        super().__init__(app, client_id)
        self.receipts = 0

    def split_exchange(self, kind: str, round_number: int, step: int, body: bytes, limit: int) -> bytes:
        answer = super().split_exchange(kind, round_number, step, body, limit)
        self.receipts += answer.startswith(b"{")
        return answer


@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16"])
def test_a_chunked_run_is_the_unchunked_run(tiny4_model_dir: Path, tmp_path: Path, wire_dtype: str) -> None:
    from fedllm.adapter import initial_adapter
    from fedllm.config import ClientArguments
    from fedllm.data import write_demo_data
    from fedllm.split.client import PROGRESS_FILE, SplitTrainer

    (data,) = write_demo_data(tmp_path / "data", num_clients=1, rows_per_client=12, seed=3)
    runs = {}
    for chunk in (0, 7):
        state = _state(tiny4_model_dir, tmp_path / f"c{chunk}" / "state", split_sequence_chunk=chunk,
                       wire_dtype=wire_dtype)
        federation = Federation(Store(state))
        app = create_app(federation, start_ticker=False)
        server_config = federation.client_config()
        assert server_config["federation"]["split_sequence_chunk"] == chunk  # served: the client needs no flag
        served = initial_adapter({k: tuple(v) for k, v in server_config["adapter"].items()}, 5)
        transport = CountingTransport(app, "alice")
        trainer = SplitTrainer(server_config, ClientArguments(client_id="alice", dataset_name=str(data),
                                                              batch_size=3, output_dir=str(tmp_path / f"c{chunk}"),
                                                              seed=1), transport)
        widths = [trainer.batch(1, step).input_ids.shape[1] for step in (1, 2, 3)]
        result = trainer.train_round(served, 1, 0.01, 3)
        losses = json.loads((tmp_path / f"c{chunk}" / "split" / PROGRESS_FILE).read_text())["losses"]
        runs[chunk] = losses, result.tensors, app.extensions["fedllm"]["split"].middle.adapter(), transport.receipts
        federation.store.close()
    (losses, ends, middle, receipts), (chunked_losses, chunked_ends, chunked_middle, chunked_receipts) = runs[0], runs[7]
    assert receipts == 0
    assert chunked_receipts == 2 * sum(chunk_count(width, 7) - 1 for width in widths) > 6  # really cut in chunks
    assert chunked_losses == pytest.approx(losses, abs=1e-5)
    for mine, theirs in ((chunked_ends, ends), (chunked_middle, middle)):
        assert set(mine) == set(theirs)
        for key, value in theirs.items():
            assert (mine[key] - value).abs().max() < 1e-5, key
    print(f"{wire_dtype}: widths {widths}, per-step losses {losses}, chunked {chunked_losses}")


def test_bad_chunks_are_refused_and_change_nothing(tiny4_model_dir: Path, tmp_path: Path) -> None:
    state = _state(tiny4_model_dir, tmp_path / "state", split_sequence_chunk=4)
    federation = Federation(Store(state))
    app = create_app(federation, start_ticker=False)
    service = app.extensions["fedllm"]["split"]
    http = app.test_client()
    mask = MaskInfo.from_attention_mask(torch.ones(2, 10, dtype=torch.long))
    hidden = torch.randn(2, 10, HIDDEN)

    def chunks(kind: str = "forward", step: int = 1, client: str = "alice", **replace) -> list[bytes]:
        tensors = {"hidden": hidden, **mask.tensors()} if kind == "forward" else {"grad": torch.randn(2, 10, HIDDEN)}
        return encode_chunks({**tensors, **replace}, 4, "float32", kind, client, 1, step)

    def refused(response, status: int) -> str:
        assert response.status_code == status, response.get_data(as_text=True)
        return response.get_json()["error"] + ": " + response.get_json()["detail"]

    forward = chunks()
    assert len(forward) == 3  # 4 + 4 + 2 tokens
    assert "no chunk binding" in refused(post(http, "forward", 1, forward_body(seq_len=10)), 400)
    assert "send its chunk 0 first" in refused(post(http, "forward", 1, forward[1]), 409)
    receipt = post(http, "forward", 1, forward[0])
    assert receipt.status_code == 202 and receipt.get_json() == {"round": 1, "step": 1, "chunk": 0, "chunks": 3}
    assert "came before chunk 1" in refused(post(http, "forward", 1, forward[2]), 409)  # chunk 1 missing
    assert "not the next one" in refused(post(http, "forward", 2, chunks(step=2)[0]), 409)  # out-of-order step
    assert "split chunk out of order" in refused(post(http, "forward", 1, chunks(client="bob")[1]), 409)
    assert "was sent as alice's forward of step 2" in refused(post(http, "forward", 2, forward[1]), 409)
    assert "split chunk out of order" in refused(post(http, "backward", 1, chunks("backward")[1]), 409)
    other = chunks(hidden=torch.randn(2, 10, HIDDEN))
    # Misshapen or bad chunks, each refused on arrival.
    narrow = encode_chunks({"hidden": hidden[:, :7], **MaskInfo.from_attention_mask(
        torch.ones(2, 7, dtype=torch.long)).tensors()}, 3, "float32", "forward", "alice", 1, 1)
    assert "every chunk but the last has --split_sequence_chunk 4" in refused(post(http, "forward", 1, narrow[1]),
                                                                             422)
    nan = chunks(hidden=torch.full((2, 10, HIDDEN), float("nan")))
    assert "NaN" in refused(post(http, "forward", 1, nan[1]), 422)
    shifted = chunks(lengths=torch.tensor([10, 9]))
    assert "differs from chunk 0's" in refused(post(http, "forward", 1, shifted[1]), 422)
    many = save_bytes({"hidden": hidden[:, :4].contiguous(), "starts": mask.starts, "lengths": mask.lengths,
                       "position_ids": mask.position_ids[:, :4].contiguous()},
                      metadata={"kind": "forward", "client": "alice", "round": "1", "step": "1", "chunk": "1",
                                "chunks": "100"})
    assert "1 to 24 chunks" in refused(post(http, "forward", 1, many), 422)
    assert "at most" in refused(post(http, "forward", 1, forward_body(batch=64, seq_len=40)), 413)
    # None of that changed the message being received: chunk 1, resent identically, then chunk 2, completes it.
    assert post(http, "forward", 1, forward[1]).status_code == 202
    assert post(http, "forward", 1, forward[1]).status_code == 202  # an identical resend: acknowledged again
    assert "already received with another body" in refused(post(http, "forward", 1, other[1]), 409)
    assert not service.steps
    answer = post(http, "forward", 1, forward[2])
    assert answer.status_code == 200
    hidden_b = decode_answer(answer.data, "hidden", service.shape, 4, (2, 10, HIDDEN), "forward", "alice", 1, 1)
    assert hidden_b.shape == (2, 10, HIDDEN) and torch.isfinite(hidden_b).all()
    with pytest.raises(ValueError, match="expected chunk 0 of 3 of alice's forward answer of step 2"):
        decode_answer(answer.data, "hidden", service.shape, 4, (2, 10, HIDDEN), "forward", "alice", 1, 2)
    # The backward, chunked the same way; then the step is done and a replayed chunk 0 of its forward is refused.
    backward = chunks("backward")
    answers = [post(http, "backward", 1, body) for body in backward]
    assert [a.status_code for a in answers] == [202, 202, 200]
    assert service.middle.version == 1
    assert "a replay" in refused(post(http, "forward", 1, forward[0]), 409)
    # The completed backward resent (its answer lost): the same answer; another body for it is refused at its end.
    again = [post(http, "backward", 1, body) for body in backward][-1]
    assert torch.equal(*(decode_answer(a.data, "grad", service.shape, 4, (2, 10, HIDDEN), "backward", "alice", 1, 1)
                         for a in (again, answers[-1])))
    another = chunks("backward")
    assert [post(http, "backward", 1, body).status_code for body in another[:2]] == [202, 202]
    assert "no forward of step 1" in refused(post(http, "backward", 1, another[2]), 409)
    assert "no forward of step 2" in refused(post(http, "backward", 2, chunks("backward", step=2)[0]), 409)
    assert service.middle.version == 1 and not service.assembler.receiving
    federation.store.close()

    # A federation that does not chunk refuses a chunk: its message would be another.
    plain = tmp_path / "plain"
    shutil.copytree(_state(tiny4_model_dir, tmp_path / "plain-new"), plain)
    federation = Federation(Store(plain))
    http = create_app(federation, start_ticker=False).test_client()
    assert "--split_sequence_chunk 0" in refused(post(http, "forward", 1, forward[0]), 400)
    federation.store.close()


def test_the_chunk_size_is_checked_and_may_change_when_the_server_restarts(tiny4_model_dir: Path) -> None:
    from fedllm.config import federation_changes

    assert "--split_sequence_chunk must be >= 0" in " ".join(
        split_config(tiny4_model_dir, split_sequence_chunk=-1).split_problems())
    stored = {**vars(split_config(tiny4_model_dir))}
    identity, operational = federation_changes(stored, split_config(tiny4_model_dir, split_sequence_chunk=64))
    assert identity == {} and operational == {"split_sequence_chunk": (0, 64)}


def test_two_real_clients_over_gunicorn_train_with_chunked_messages_in_batches(tiny4_model_dir: Path, tmp_path: Path,
                                                                               start_server, restore_logging) -> None:
    import requests

    from fedllm.data import write_demo_data

    from .test_split_http import run_federation, server_args

    server = start_server(server_args(tiny4_model_dir, tmp_path / "state", num_rounds=2, max_steps=3,
                                      split_sequence_chunk=16, split_batch_wait=30.0))
    data = write_demo_data(tmp_path / "data", num_clients=2, rows_per_client=16, seed=1)
    # The real client (FederationClient: 202 receipts, framed answers); the server refuses an unchunked body, so
    # every message of the run travelled in chunks (41-token batches: 3 of 16, 16 and 9 tokens).
    run_federation(server, data, tmp_path)
    history = requests.get(server.url + "/v1/history", headers={"X-FedLLM-Client": "client0"}, timeout=30).json()
    losses = [h["train_loss"] for h in history]
    print("chunked split federation train_loss per round:", losses)
    assert [h["round"] for h in history] == [1, 2] and losses[-1] < losses[0], losses
    metrics = requests.get(server.url + "/metrics", timeout=30).text
    assert 'fedllm_split_batch_size_sum 12.0' in metrics  # every client step went through the middle once
