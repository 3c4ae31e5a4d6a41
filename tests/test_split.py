"""Split learning (fedllm.split): the cut, its exactness against unsplit LoRA training, its memory, its refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BertConfig

from fedllm.adapter import adapter_spec, build_lora_config, initial_adapter, load_model_config, set_adapter_tensors
from fedllm.split.model import (
    CLIENT_PARTS,
    HEAD,
    MIDDLE,
    SERVER_PARTS,
    TAIL,
    SplitConfigError,
    SplitPlan,
    build_part_model,
)
from fedllm.split.step import Batch, SplitEnds, SplitMiddle, new_optimizer, set_part_adapter_tensors, split_step

STEPS = 4
LEARNING_RATE = 5e-3


@pytest.fixture
def tiny4(tiny4_model_dir: Path) -> Path:
    return tiny4_model_dir


def _batches(seed: int, n: int, vocab_size: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(4, vocab_size, (3, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0  # right padding of different lengths
        mask[2, 5:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :2] = -100  # a prompt without loss
        batches.append(Batch(ids, mask, labels))
    return batches


def _start_adapter(spec: dict, seed: int) -> dict[str, torch.Tensor]:
    tensors = initial_adapter(spec, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for name, tensor in tensors.items():  # lora_B nonzero, so every part's gradient flows from step 1
        if ".lora_B." in name:
            tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))
    return tensors


def check_split_training_equals_single_process(model_dir: Path, target_modules: list[str], head_layers: int,
                                               tail_layers: int) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """S split steps (noise off) against S single-process LoRA steps on the same batches: the same per-step losses
    (1e-5) and, the three parts' LoRA put together, the same final logits (1e-4). Returns that adapter and its
    config."""
    model_config = load_model_config(str(model_dir))
    lora = build_lora_config(model_config, r=4, alpha=8, dropout=0.0, target_modules=target_modules)
    spec = adapter_spec(model_config, lora)
    start = _start_adapter(spec, seed=3)
    batches = _batches(seed=7, n=STEPS, vocab_size=model_config.vocab_size)

    full = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    set_adapter_tensors(full, start)
    optimizer = new_optimizer(full, LEARNING_RATE)
    plain_losses = []
    for batch in batches:
        loss = full(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        plain_losses.append(float(loss.detach()))

    plan = SplitPlan.of(model_config, head_layers, tail_layers)
    client_model = build_part_model(model_dir, model_config, plan, CLIENT_PARTS, lora)
    server_model = build_part_model(model_dir, model_config, plan, SERVER_PARTS, lora)
    set_part_adapter_tensors(client_model, plan, CLIENT_PARTS, {k: v for k, v in start.items()
                                                               if plan.part_of(k) in CLIENT_PARTS})
    set_part_adapter_tensors(server_model, plan, SERVER_PARTS, {k: v for k, v in start.items()
                                                               if plan.part_of(k) == MIDDLE})
    ends = SplitEnds(client_model, plan, LEARNING_RATE)
    middle = SplitMiddle(server_model, plan, LEARNING_RATE)
    split_losses = [split_step(ends, middle, batch) for batch in batches]

    assert split_losses == pytest.approx(plain_losses, abs=1e-5)
    with torch.no_grad():  # it trained: the first batch's loss fell (the later batches are other random tokens)
        first = batches[0]
        assert full(input_ids=first.input_ids, attention_mask=first.attention_mask,
                    labels=first.labels).loss < plain_losses[0]
    # The final model, the three parts' adapters put together, gives the single-process model's logits.
    adapter = {**ends.adapter(), **middle.adapter()}
    merged = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    set_adapter_tensors(merged, adapter)
    probe = _batches(seed=11, n=1, vocab_size=model_config.vocab_size)[0]
    with torch.no_grad():
        expected = full(input_ids=probe.input_ids, attention_mask=probe.attention_mask).logits
        got = merged(input_ids=probe.input_ids, attention_mask=probe.attention_mask).logits
    real = probe.attention_mask.bool()
    assert (got[real] - expected[real]).abs().max() < 1e-4
    return adapter, lora


@pytest.mark.integration  # trains (by hand, a few steps of a tiny model)
@pytest.mark.parametrize("head_layers,tail_layers", [(2, 1)])
def test_split_training_equals_single_process_lora_training(tiny4: Path, head_layers: int, tail_layers: int) -> None:
    check_split_training_equals_single_process(tiny4, ["q_proj", "v_proj", "o_proj"], head_layers, tail_layers)


def check_each_side_holds_only_its_parts_weights(model_dir: Path) -> SplitPlan:
    """Client and server models of a 1 + 1 split: real (and, LoRA, trainable) exactly where their parts are."""
    model_config = load_model_config(str(model_dir))
    lora = build_lora_config(model_config, r=4, alpha=8, dropout=0.0, target_modules=None)
    plan = SplitPlan.of(model_config, 1, 1)
    for parts in (CLIENT_PARTS, SERVER_PARTS):
        model = build_part_model(model_dir, model_config, plan, parts, lora)
        for name, param in model.named_parameters():
            assert param.is_meta == (plan.part_of(name) not in parts), name
            assert param.requires_grad == (".lora_" in name and plan.part_of(name) in parts), name
    return plan


def test_each_side_holds_only_its_parts_weights(tiny4: Path) -> None:
    plan = check_each_side_holds_only_its_parts_weights(tiny4)
    assert plan.part_of("base_model.model.model.embed_tokens.weight") == HEAD
    assert plan.part_of("base_model.model.lm_head.weight") == TAIL
    assert plan.part_of("base_model.model.model.norm.weight") == TAIL
    assert plan.part_of("base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight") == MIDDLE


def test_a_split_that_leaves_the_server_no_block_is_refused(tiny4: Path) -> None:
    model_config = load_model_config(str(tiny4))
    with pytest.raises(SplitConfigError, match=r"--split_head_layers 2 \+ --split_tail_layers 2 must be fewer than "
                                               r"the model's 4 layers"):
        SplitPlan.of(model_config, 2, 2)
    with pytest.raises(SplitConfigError, match="must be >= 1"):
        SplitPlan.of(model_config, 0, 1)


def test_an_architecture_that_cannot_be_split_is_named_with_the_supported_ones() -> None:
    with pytest.raises(SplitConfigError, match=r"supports the decoder architectures llama, mistral, qwen2, gpt2; "
                                               r"model type 'bert' is not one of them \(use --fed_mode lora\)"):
        SplitPlan.of(BertConfig(num_hidden_layers=6), 2, 2)


def test_the_simulation_says_split_mode_runs_over_http(tmp_path: Path) -> None:
    from fedllm.config import FederationArguments, SimulatedClientArguments, SimulationArguments
    from fedllm.simulation import run_simulation

    config = FederationArguments(model_name_or_path=str(tmp_path), fed_mode="split")
    with pytest.raises(ValueError, match="--fed_mode split runs over HTTP"):
        run_simulation(config, SimulatedClientArguments(), SimulationArguments(output_dir=str(tmp_path / "sim")))


def test_the_clients_defences_clip_and_noise_what_it_sends() -> None:
    from fedllm.split.step import PrivacyKnobs

    grad = torch.ones(3, 4, 5) * torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1)
    clipped = PrivacyKnobs(gradient_clip=1.0).protect_gradient(grad, None)
    assert clipped.flatten(1).norm(dim=1).tolist() == pytest.approx([0.1 * 20**0.5, 1.0, 1.0], rel=1e-5)
    generator = torch.Generator().manual_seed(0)
    noised = PrivacyKnobs(gradient_noise=0.5).protect_gradient(torch.zeros(64, 64, 8), generator)
    assert noised.std().item() == pytest.approx(0.5, rel=0.05)
    hidden = PrivacyKnobs(activation_noise=2.0).noise_activations(torch.zeros(32, 32, 8), generator)
    assert hidden.std().item() == pytest.approx(2.0, rel=0.05)
    assert PrivacyKnobs().protect_gradient(grad, None) is grad  # off by default: exactly the gradient
