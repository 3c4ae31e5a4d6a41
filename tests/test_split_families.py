"""Split learning of the other supported rotary families, Qwen2 (biased q/k/v) and Mistral (sliding-window
attention): the Llama's exactness and each-side-holds-only-its-parts checks (test_split.py) on tiny ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from fedllm.tiny import build_tokenizer

from .test_split import check_each_side_holds_only_its_parts_weights, check_split_training_equals_single_process


def _build(kind: str, output_dir: Path) -> Path:
    tokenizer = build_tokenizer(1024)
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(0)
    if kind == "mistral":
        # A window shorter than the test batches' 12 tokens: the sliding mask, not the causal one, decides.
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=4))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def family_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.mark.integration  # trains (by hand, a few steps of a tiny model)
def test_split_training_equals_single_process_lora_training(family_model: Path) -> None:
    check_split_training_equals_single_process(family_model, ["q_proj", "v_proj", "o_proj"], head_layers=1,
                                               tail_layers=2)


def test_each_side_holds_only_its_parts_weights(family_model: Path) -> None:
    check_each_side_holds_only_its_parts_weights(family_model)
