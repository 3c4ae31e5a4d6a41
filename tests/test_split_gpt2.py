"""Split learning of a GPT-2 (learned positions, LM head tied to the token embedding, Conv1D blocks): the checks of
the Llama's in test_split.py, plus the tie, a base-model checkpoint, and one round through the real server app."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from fedllm.adapter import build_lora_config, load_model_config
from fedllm.export import AdapterSource, export_adapter, merge_adapter
from fedllm.split.model import CLIENT_PARTS, HEAD, MIDDLE, SERVER_PARTS, TAIL, SplitPlan, build_part_model
from fedllm.tiny import build_tiny_gpt2

from .test_split import check_each_side_holds_only_its_parts_weights, check_split_training_equals_single_process

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # Conv1D: attention's qkv and output projections, the MLP's two


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), seed=0, num_hidden_layers=4)


@pytest.mark.integration  # trains (by hand, a few steps of a tiny model)
def test_split_gpt2_training_equals_single_process_lora_training_and_its_export_loads(tiny_gpt2: Path,
                                                                                      tmp_path: Path) -> None:
    adapter, lora = check_split_training_equals_single_process(tiny_gpt2, GPT2_TARGETS, head_layers=2, tail_layers=1)
    # The three parts' LoRA as export.py writes it: a PEFT directory that PeftModel loads, and the merged model.
    source = AdapterSource(adapter, lora, str(tiny_gpt2), "the split GPT-2's three parts")
    peft_dir = export_adapter(source, tmp_path / "adapter")
    merged_dir = merge_adapter(source, tmp_path / "merged")
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_gpt2)(ids).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), peft_dir)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
    assert (loaded - merged).abs().max() < 1e-4
    assert (loaded - base).abs().max() > 1e-3  # the trained adapter is in both


def test_each_side_holds_only_its_gpt2_parts_and_the_client_its_tied_lm_head(tiny_gpt2: Path) -> None:
    plan = check_each_side_holds_only_its_parts_weights(tiny_gpt2)
    assert plan.part_of("base_model.model.transformer.wte.weight") == HEAD
    assert plan.part_of("base_model.model.transformer.wpe.weight") == HEAD
    assert plan.part_of("base_model.model.transformer.ln_f.bias") == TAIL
    assert plan.part_of("base_model.model.lm_head.weight") == TAIL
    assert plan.part_of("base_model.model.transformer.h.2.attn.c_attn.lora_A.weight") == MIDDLE
    config = load_model_config(str(tiny_gpt2))
    lora = build_lora_config(config, r=4, alpha=8, dropout=0.0, target_modules=None)  # GPT-2's default: c_attn
    client = build_part_model(tiny_gpt2, config, plan, CLIENT_PARTS, lora).get_base_model()
    assert client.lm_head.weight.data_ptr() == client.transformer.wte.weight.data_ptr()  # tied: stored once
    server = build_part_model(tiny_gpt2, config, plan, SERVER_PARTS, lora).get_base_model()
    assert server.lm_head.weight.is_meta and server.transformer.wte.weight.is_meta


def test_a_gpt2_base_model_checkpoint_splits_as_the_hubs_gpt2_is_stored(tiny_gpt2: Path, tmp_path: Path) -> None:
    """The hub's GPT-2 checkpoint is of the base model: ``h.0.…``, ``wte.weight``, without ``transformer.``."""
    full = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    full.transformer.save_pretrained(tmp_path / "base")
    config = load_model_config(str(tmp_path / "base"))
    plan = SplitPlan.of(config, 1, 1)
    lora = build_lora_config(config, r=4, alpha=8, dropout=0.0, target_modules=None)
    for parts in (CLIENT_PARTS, SERVER_PARTS):
        model = build_part_model(tmp_path / "base", config, plan, parts, lora).get_base_model()
        for name, tensor in full.state_dict().items():
            if plan.part_of(name) in parts:
                assert torch.equal(model.state_dict()[name.replace("c_attn.", "c_attn.base_layer.")], tensor), name


@pytest.mark.integration  # the middle takes optimizer steps on the server app
def test_one_split_round_of_a_gpt2_through_the_server_app(tiny_gpt2: Path, tmp_path: Path) -> None:
    from fedllm.adapter import initial_adapter
    from fedllm.config import ClientArguments
    from fedllm.data import write_demo_data
    from fedllm.server.app import create_app
    from fedllm.server.federation import Federation
    from fedllm.server.store import Store
    from fedllm.split.client import SplitTrainer

    from .test_split_http import AppTransport, split_config

    Federation.initialize(split_config(tiny_gpt2, num_clients=1, sample_clients=1), tmp_path / "state")
    federation = Federation(Store(tmp_path / "state"))
    federation.join("alice", 10)
    http = create_app(federation, start_ticker=False).test_client()
    server_config = federation.client_config()
    assert {int(name.split(".h.")[1].split(".")[0]) for name in server_config["adapter"]} == {0, 3}
    service = http.application.extensions["fedllm"]["split"]
    middle_before = service.middle.adapter()
    served = initial_adapter({k: tuple(v) for k, v in server_config["adapter"].items()}, 5)
    (data,) = write_demo_data(tmp_path / "data", num_clients=1, rows_per_client=8, seed=4)
    args = ClientArguments(client_id="alice", dataset_name=str(data), batch_size=2, output_dir=str(tmp_path / "a"))
    result = SplitTrainer(server_config, args, AppTransport(http, "alice")).train_round(served, 1, 0.01, 3)
    assert result.metrics["steps"] == 3 and torch.isfinite(torch.tensor(result.metrics["train_loss"]))
    assert any(t.any() for t in result.tensors.values())  # the ends trained
    assert any(not torch.equal(v, middle_before[k]) for k, v in service.middle.adapter().items())  # and the middle
    federation.store.close()


def test_the_tiny_gpt2_build_is_deterministic_for_a_seed(tiny_gpt2: Path, tmp_path: Path) -> None:
    again = build_tiny_gpt2(tmp_path / "again", seed=0, num_hidden_layers=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_gpt2 / name).read_bytes(), name
    assert (build_tiny_gpt2(tmp_path / "other", seed=1) / "model.safetensors").read_bytes() != (
        tiny_gpt2 / "model.safetensors").read_bytes()
