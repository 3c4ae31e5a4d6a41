"""Split learning over HTTP: the middle service's refusals and restart, the client's bytes, a gunicorn federation."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from fedllm.config import FederationArguments
from fedllm.server.app import create_app
from fedllm.server.federation import Federation
from fedllm.server.store import Store
from fedllm.split.model import MaskInfo

pytestmark = pytest.mark.integration  # the middle takes optimizer steps; the federations start processes

HIDDEN = 64  # the tiny Llama's


def split_config(model_dir: Path, **overrides) -> FederationArguments:
    settings = dict(model_name_or_path=str(model_dir), fed_mode="split", split_head_layers=1, split_tail_layers=1,
                    num_clients=2, sample_clients=2, num_rounds=2, max_steps=3, learning_rate=0.01, peft_lora_r=4,
                    peft_lora_alpha=8, peft_lora_dropout=0.0, seq_length=96, round_timeout=0, save_model_freq=1,
                    seed=5)
    settings.update(overrides)
    return FederationArguments(**settings)


@pytest.fixture(scope="module")
def split_state(tiny4_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("split-state") / "state"
    Federation.initialize(split_config(tiny4_model_dir), root)
    store = Store(root)
    federation = Federation(store)
    federation.join("alice", 10)
    federation.join("bob", 10)  # round 1 opens with both sampled
    store.close()
    return root


def forward_body(batch: int = 2, seq_len: int = 8, dtype: torch.dtype = torch.float32, **replace) -> bytes:
    mask = MaskInfo.from_attention_mask(torch.ones(batch, seq_len, dtype=torch.long))
    tensors = {"hidden": torch.randn(batch, seq_len, HIDDEN, dtype=dtype), **mask.tensors()}
    tensors.update(replace)
    return save_bytes(tensors)


def grad_body(batch: int = 2, seq_len: int = 8) -> bytes:
    return save_bytes({"grad": torch.randn(batch, seq_len, HIDDEN)})


def post(http, kind: str, step: int, body: bytes, client: str = "alice", round_number: int = 1):
    return http.post(f"/v1/split/{kind}?round={round_number}&step={step}", data=body,
                     headers={"X-FedLLM-Client": client, "Content-Type": "application/octet-stream"})


def test_the_middle_refuses_bad_messages_and_replays_and_continues_after_a_restart(split_state: Path, tmp_path: Path,
                                                                                   monkeypatch) -> None:
    state = tmp_path / "state"
    shutil.copytree(split_state, state)
    federation = Federation(Store(state))
    http = create_app(federation, start_ticker=False).test_client()
    headers = {"X-FedLLM-Client": "alice"}
    assert http.get("/v1/split/step?round=1", headers=headers).get_json() == {
        "round": 1, "next_step": 1, "max_steps": 3}

    def error(response, status: int) -> str:
        assert response.status_code == status, response.get_data(as_text=True)
        return response.get_json()["error"] + ": " + response.get_json()["detail"]

    # Wrong shape, dtype, values, names: refused, nothing pending afterwards.
    assert "hidden_size 64" in error(post(http, "forward", 1, save_bytes({
        "hidden": torch.randn(2, 8, 32), **MaskInfo.from_attention_mask(torch.ones(2, 8, dtype=torch.long)).tensors()
    })), 422)
    assert "dtype torch.float16" in error(post(http, "forward", 1, forward_body(dtype=torch.float16)), 422)
    assert "NaN" in error(post(http, "forward", 1, forward_body(hidden=torch.full((2, 8, HIDDEN), float("nan")))),
                          422)
    assert "--seq_length 96" in error(post(http, "forward", 1, forward_body(seq_len=100)), 422)
    assert "position_ids must be in" in error(post(http, "forward", 1, forward_body(
        position_ids=torch.full((2, 8), 10**6, dtype=torch.long))), 422)
    assert "span" in error(post(http, "forward", 1, forward_body(lengths=torch.tensor([9, 8]))), 422)
    assert "expected the tensors" in error(post(http, "forward", 1, save_bytes({"input_ids": torch.zeros(2, 8)})),
                                           400)
    assert "not a valid safetensors" in error(post(http, "forward", 1, b"\x00" * 40), 400)
    # A gradient for a step the server does not have; steps out of order; a client not in the round.
    assert "no forward of step 1" in error(post(http, "backward", 1, grad_body()), 409)
    assert "not the next one" in error(post(http, "forward", 2, forward_body()), 409)
    assert error(post(http, "forward", 1, forward_body(), round_number=2), 409).startswith("wrong round")
    assert error(post(http, "forward", 1, forward_body(), client="zed"), 409).startswith("not sampled")
    assert error(http.post("/v1/split/forward?round=1", headers=headers, data=b""), 400).startswith(
        "invalid split step")

    # Step 1 done; its backward retried identically gets the same answer, with another body it is refused.
    answer = post(http, "forward", 1, forward_body())
    assert answer.status_code == 200 and load_bytes(answer.data)["hidden"].shape == (2, 8, HIDDEN)
    assert "shape [2, 4, 64], expected [2, 8, 64]" in error(post(http, "backward", 1, grad_body(seq_len=4)), 422)
    gradient = grad_body()
    first = post(http, "backward", 1, gradient)
    assert first.status_code == 200 and torch.isfinite(load_bytes(first.data)["grad"]).all()
    assert post(http, "backward", 1, gradient).data == first.data
    assert "no forward of step 1" in error(post(http, "backward", 1, grad_body()), 409)
    assert "a replay" in error(post(http, "forward", 1, forward_body()), 409)
    # Another client's step between bob's forward and backward: bob's graph is recomputed, not refused.
    assert post(http, "forward", 1, forward_body(), client="bob").status_code == 200
    assert post(http, "forward", 2, forward_body()).status_code == 200
    assert post(http, "backward", 2, grad_body()).status_code == 200
    assert post(http, "backward", 1, grad_body(), client="bob").status_code == 200
    middle = http.application.extensions["fedllm"]["split"].middle.adapter()
    federation.store.close()

    # A restarted server (checkpoint every step here) continues the round where it was, with the same middle.
    restarted = Federation(Store(state))
    http = create_app(restarted, start_ticker=False).test_client()
    assert http.get("/v1/split/step?round=1", headers=headers).get_json()["next_step"] == 3
    assert http.get("/v1/split/step?round=1", headers={"X-FedLLM-Client": "bob"}).get_json()["next_step"] == 2
    service = http.application.extensions["fedllm"]["split"]
    assert all(torch.equal(service.middle.adapter()[k], v) for k, v in middle.items())
    assert service.middle.optimizer.state  # the AdamW moments came back too
    # A client that vanishes after its forward: the graph is freed after the timeout, and a late backward refused.
    monkeypatch.setattr("fedllm.split.server.PENDING_STEP_TIMEOUT", 0.0)
    assert post(http, "forward", 3, forward_body()).status_code == 200
    assert "freed after" in error(post(http, "backward", 3, grad_body()), 409)
    assert not service.pending
    restarted.store.close()


def test_a_split_federation_serves_only_the_ends_as_its_global_adapter(split_state: Path) -> None:
    federation = Federation(Store(split_state))
    config = federation.client_config()
    layers = {int(name.split(".layers.")[1].split(".")[0]) for name in config["adapter"]}
    assert layers == {0, 3}  # head block 0 and tail block 3 of 4; the middle (1, 2) is the server's alone
    assert config["federation"]["fed_mode"] == "split"
    federation.store.close()


def server_args(model_dir: Path, state_dir: Path, **overrides) -> list[str]:
    settings = {"model_name_or_path": model_dir, "state_dir": state_dir, "fed_mode": "split", "split_head_layers": 1,
                "split_tail_layers": 1, "num_clients": 2, "sample_clients": 2, "num_rounds": 3, "max_steps": 6,
                "learning_rate": 0.02, "peft_lora_r": 4, "peft_lora_alpha": 8, "seq_length": 96,
                "target_modules": "q_proj,v_proj,o_proj", "workers": 2, "threads": 4, "seed": 7, "rate_limit": 0}
    settings.update(overrides)
    return [arg for key, value in settings.items() for arg in (f"--{key}", str(value))]


def run_federation(server, data: list[Path], tmp_path: Path, extra: list[str] = ()) -> None:
    from .conftest import run_client_process

    clients = {f"client{i}": run_client_process(
        ["--server_url", server.url, "--client_id", f"client{i}", "--dataset_name", str(path), "--batch_size", "4",
         "--output_dir", str(tmp_path / f"client{i}"), "--quiet", "true", "--poll_interval", "0.2",
         "--max_poll_interval", "1", *extra],
        tmp_path / f"client{i}.log", env={"OMP_NUM_THREADS": "1"}) for i, path in enumerate(data)}
    for name, proc in clients.items():
        try:
            assert proc.wait(timeout=400) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{name} did not finish:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}\n"
                        f"{server.log()[-3000:]}")


def test_a_two_client_split_federation_over_gunicorn_trains(tiny4_model_dir: Path, tmp_path: Path, start_server,
                                                            restore_logging) -> None:
    from fedllm.data import write_demo_data

    from .conftest import SHARED_DATASETS

    server = start_server(server_args(tiny4_model_dir, tmp_path / "state", num_rounds=2, max_steps=5))
    dolly = SHARED_DATASETS / "dolly15k_fed10"
    if dolly.is_dir():  # real data: two of Dolly's non-IID client shards, 40 examples each
        data, extra = [dolly / "local_training_0.json", dolly / "local_training_1.json"], ["--dataset_sample", "40"]
    else:  # a user's checkout has no ../shared: the project's demo data
        data, extra = write_demo_data(tmp_path / "data", num_clients=2, rows_per_client=20, seed=1), []
    run_federation(server, data, tmp_path, extra)

    assert "serving with 1 gunicorn worker" in server.log()
    headers = {"X-FedLLM-Client": "client0"}
    history = requests.get(server.url + "/v1/history", headers=headers).json()
    assert [h["round"] for h in history] == [1, 2]
    losses = [h["train_loss"] for h in history]
    print("split federation train_loss per round:", losses)
    assert losses[-1] < losses[0], losses
    # Each client kept the federation's head and tail; the middle stayed in the server's state_dir.
    final = tmp_path / "state" / "adapters" / "final" / "adapter_model.safetensors"
    for name in ("client0", "client1"):
        assert (tmp_path / name / "final_adapter" / "adapter_model.safetensors").read_bytes() == final.read_bytes()
    assert (tmp_path / "state" / "split" / "middle.safetensors").exists()
    # export.py merge builds the single model: the server's middle and this client's head and tail, merged.
    from transformers import AutoModelForCausalLM

    from fedllm.commands.export import main as export_main
    from fedllm.export import load_adapter
    from fedllm.split.server import middle_checkpoint_adapter

    merged_dir = tmp_path / "merged"
    assert export_main(["merge", "--state_dir", str(tmp_path / "state"), "--client_output_dir",
                        str(tmp_path / "client0"), "--output_dir", str(merged_dir)]) == 0
    source = load_adapter(state_dir=str(tmp_path / "state"), client_output_dir=str(tmp_path / "client0"))
    assert set(middle_checkpoint_adapter(tmp_path / "state")) < set(source.tensors)
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in source.tensors} == {0, 1, 2, 3}
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny4_model_dir)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
    assert (merged - base).abs().max() > 1e-3
    assert export_main(["generate", "--state_dir", str(tmp_path / "state"), "--prompt", "Name a fruit.",
                        "--max_new_tokens", "4"]) == 0


def test_no_token_label_or_text_of_the_clients_data_is_in_its_requests(tiny4_model_dir: Path, tmp_path: Path,
                                                                       start_server, monkeypatch,
                                                                       restore_logging) -> None:
    import json

    from transformers import AutoTokenizer

    from fedllm.client.runner import run_client
    from fedllm.config import ClientArguments
    from fedllm.data import load_sft_dataset, write_demo_data
    from fedllm.split.client import tokenize_sft

    server = start_server(server_args(tiny4_model_dir, tmp_path / "state", num_clients=1, sample_clients=1,
                                      num_rounds=1, max_steps=3))
    (data,) = write_demo_data(tmp_path / "data", num_clients=1, rows_per_client=12, seed=2)
    sent: list[bytes] = []
    real_request = requests.Session.request

    def recording(self, method, url, data=None, json=None, **kwargs):
        if data is not None:
            data = data.getvalue() if hasattr(data, "getvalue") else b"".join(data) if not isinstance(
                data, (bytes, str)) else data
            sent.append(data if isinstance(data, bytes) else data.encode())
        if json is not None:
            sent.append(__import__("json").dumps(json).encode())
        sent.append(url.encode())
        return real_request(self, method, url, data=data, json=json, **kwargs)

    monkeypatch.setattr(requests.Session, "request", recording)
    report = run_client(ClientArguments(server_url=server.url, client_id="owner", dataset_name=str(data),
                                        batch_size=4, output_dir=str(tmp_path / "owner"), quiet=True,
                                        poll_interval=0.2, max_poll_interval=1.0))
    assert report.steps == 3 and len(sent) > 10
    everything = b"\n".join(sent)

    tokenizer = AutoTokenizer.from_pretrained(tiny4_model_dir)
    dataset = load_sft_dataset(str(data), tokenizer=tokenizer, template="alpaca")
    examples = tokenize_sft(dataset, tokenizer, 96)
    checked = 0
    for ids, labels in examples:
        for sequence in (ids, [t for t in labels if t != -100]):
            for i in range(len(sequence) - 3):
                window = sequence[i:i + 4]
                if all(b - a == 1 for a, b in zip(window, window[1:], strict=False)):
                    continue  # 0, 1, 2, 3 ... are the position ids the server needs
                for dtype in (torch.int64, torch.int32, torch.int16):
                    assert torch.tensor(window, dtype=dtype).numpy().tobytes() not in everything
                checked += 1
    assert checked > 100
    # The check can fail: the same bytes are found where token ids do travel.
    assert torch.tensor(examples[0][0][:4]).numpy().tobytes() in save_bytes({"ids": torch.tensor(examples[0][0])})
    for row in dataset:
        for text in (row["prompt"], row["completion"]):
            for piece in (text.strip()[:24], text.strip()[-24:]):
                assert piece.encode() not in everything
                assert json.dumps(piece)[1:-1].encode() not in everything
class AppTransport:
    """The client's split calls (``FederationClient.split_step``/``split_exchange``) to an in-process server app."""

    def __init__(self, http, client_id: str, crash_at: int | None = None):
        self.http, self.client_id, self.crash_at = http, client_id, crash_at

    def split_step(self, round_number: int) -> dict:
        response = self.http.get(f"/v1/split/step?round={round_number}", headers={"X-FedLLM-Client": self.client_id})
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    def split_exchange(self, kind: str, round_number: int, step: int, body: bytes, limit: int) -> bytes:
        if kind == "forward" and step == self.crash_at:
            raise KeyboardInterrupt("the client dies here")
        response = post(self.http, kind, step, body, client=self.client_id, round_number=round_number)
        assert response.status_code == 200, response.get_json()
        return response.data


def test_a_restarted_client_resumes_at_its_next_step_and_ends_where_an_unbroken_round_ends(
        split_state: Path, tiny4_model_dir: Path, tmp_path: Path) -> None:
    from fedllm.adapter import initial_adapter
    from fedllm.config import ClientArguments
    from fedllm.data import write_demo_data
    from fedllm.split.client import SplitTrainer

    (data,) = write_demo_data(tmp_path / "data", num_clients=1, rows_per_client=12, seed=3)
    results = {}
    for run in ("unbroken", "restarted"):
        state = tmp_path / run / "state"
        shutil.copytree(split_state, state)
        federation = Federation(Store(state))
        http = create_app(federation, start_ticker=False).test_client()
        server_config = federation.client_config()
        global_tensors = initial_adapter({k: tuple(v) for k, v in server_config["adapter"].items()}, 5)
        args = ClientArguments(client_id="alice", dataset_name=str(data), batch_size=2,
                               output_dir=str(tmp_path / run / "alice"), seed=1)
        if run == "restarted":
            trainer = SplitTrainer(server_config, args, AppTransport(http, "alice", crash_at=3))
            with pytest.raises(KeyboardInterrupt):
                trainer.train_round(global_tensors, 1, 0.01, 3)
        trainer = SplitTrainer(server_config, args, AppTransport(http, "alice"))  # a fresh process, in effect
        results[run] = trainer.train_round(global_tensors, 1, 0.01, 3)
        federation.store.close()
    unbroken, restarted = results["unbroken"], results["restarted"]
    assert restarted.metrics["steps"] == 3
    assert restarted.metrics["train_loss"] == pytest.approx(unbroken.metrics["train_loss"], abs=1e-6)
    for name, delta in unbroken.tensors.items():
        assert torch.allclose(restarted.tensors[name], delta, atol=1e-6), name


def test_private_ends_never_leave_the_client(tiny4_model_dir: Path, tmp_path: Path) -> None:
    from fedllm.adapter import initial_adapter
    from fedllm.config import ClientArguments
    from fedllm.data import write_demo_data
    from fedllm.split.client import PRIVATE_ENDS_FILE, SplitTrainer, final_ends

    state = tmp_path / "state"
    Federation.initialize(split_config(tiny4_model_dir, split_private_ends=True, num_clients=1, sample_clients=1),
                          state)
    federation = Federation(Store(state))
    federation.join("alice", 10)
    http = create_app(federation, start_ticker=False).test_client()
    server_config = federation.client_config()
    served = initial_adapter({k: tuple(v) for k, v in server_config["adapter"].items()}, 5)
    (data,) = write_demo_data(tmp_path / "data", num_clients=1, rows_per_client=8, seed=4)
    args = ClientArguments(client_id="alice", dataset_name=str(data), batch_size=2, output_dir=str(tmp_path / "a"))
    trainer = SplitTrainer(server_config, args, AppTransport(http, "alice"))
    result = trainer.train_round(served, 1, 0.01, 2)
    assert result.metrics["steps"] == 2 and all(not t.any() for t in result.tensors.values())  # a zero upload
    private = final_ends(server_config, tmp_path / "a", served)
    assert (tmp_path / "a" / "split" / PRIVATE_ENDS_FILE).exists()
    assert any(private[k].ne(served[k]).any() for k in served)  # trained, and kept here
    federation.store.close()
