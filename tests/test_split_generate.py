"""Split generation: head, middle and tail each with a KV cache give the merged model's greedy tokens and logits,
and each decoding step puts one token's hidden state (and its span and position) on the wire."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from fedllm.adapter import adapter_spec, build_lora_config, load_model_config, save_peft_adapter, set_adapter_tensors
from fedllm.commands.export import _prompts as templated_prompts
from fedllm.commands.export import main as export_main
from fedllm.config import EvaluationArguments, FederationArguments
from fedllm.evaluation import Evaluator
from fedllm.export import load_adapter
from fedllm.server.federation import Federation
from fedllm.split.generate import MiddleDecoder, SplitGenerator
from fedllm.split.messages import MessageError, MessageShape, encode_forward
from fedllm.split.model import CLIENT_PARTS, MIDDLE, SERVER_PARTS, MaskInfo, SplitPlan, build_part_model
from fedllm.split.server import CHECKPOINT
from fedllm.split.step import set_part_adapter_tensors

from .test_split import _start_adapter
from .test_split_gpt2 import GPT2_TARGETS, tiny_gpt2  # noqa: F401 (its 4-block GPT-2 fixture)

HIDDEN = 64  # the tiny Llama's
NEW_TOKENS = 6


class RecordingMiddle:
    """The in-process middle, keeping every message that crosses the wire."""

    def __init__(self, middle: MiddleDecoder):
        self.middle, self.requests, self.answers, self.ended = middle, [], [], []

    def forward(self, session: str, body: bytes) -> bytes:
        self.requests.append(body)
        self.answers.append(self.middle.forward(session, body))
        return self.answers[-1]

    def end(self, session: str) -> None:
        self.ended.append(session)
        self.middle.end(session)


LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj"]


def _parts(model_dir: Path, wire_dtype: str, targets: list[str] = LLAMA_TARGETS
           ) -> tuple[torch.nn.Module, SplitGenerator, RecordingMiddle]:
    """The merged single model and the three-part generator of the same model and LoRA (p = q = 1 of 4 blocks)."""
    model_config = load_model_config(str(model_dir))
    lora = build_lora_config(model_config, r=4, alpha=8, dropout=0.0, target_modules=targets)
    adapter = _start_adapter(adapter_spec(model_config, lora), seed=3)
    merged = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    set_adapter_tensors(merged, adapter)
    merged = merged.merge_and_unload().eval()
    plan = SplitPlan.of(model_config, 1, 1)
    models = {}
    for parts in (CLIENT_PARTS, SERVER_PARTS):
        models[parts] = build_part_model(model_dir, model_config, plan, parts, lora)
        set_part_adapter_tensors(models[parts], plan, parts,
                                 {k: v for k, v in adapter.items() if plan.part_of(k) in parts})
    shape = MessageShape(HIDDEN, model_config.max_position_embeddings, 96, wire_dtype)
    middle = RecordingMiddle(MiddleDecoder(models[SERVER_PARTS], plan, shape))
    return merged, SplitGenerator(models[CLIENT_PARTS], plan, middle, shape), middle


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 9, 6 and 3 tokens, left-padded."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 1000, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_three_part_cached_generation_gives_the_merged_models_tokens_and_logits(family: str, request) -> None:
    if family == "llama":
        merged, generator, middle = _parts(request.getfixturevalue("tiny4_model_dir"), "float32")
    else:  # learned positions (the head adds them), the LM head tied to the embedding
        merged, generator, middle = _parts(request.getfixturevalue("tiny_gpt2"), "float32", GPT2_TARGETS)
    ids, mask = _prompts()
    with torch.no_grad():
        expected = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    got = generator.run(ids, mask, NEW_TOKENS, eos_token_id=None, pad_token_id=0)

    assert got.sequences.shape == (3, 9 + NEW_TOKENS)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.logits) == len(expected.logits) == NEW_TOKENS
    for step, (ours, theirs) in enumerate(zip(got.logits, expected.logits, strict=True)):
        assert (ours - theirs).abs().max() < 1e-4, step
    # One prefill and NEW_TOKENS - 1 decoding steps crossed to the middle; its session's cache is freed after.
    assert len(middle.requests) == NEW_TOKENS and len(middle.ended) == 1 and not middle.middle.sessions
    # The HF-style call that export.py generate makes.
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS, pad_token_id=0), got.sequences)


def test_rows_that_produce_eos_go_on_with_pad_and_generation_stops_when_all_have(tiny4_model_dir: Path) -> None:
    merged, generator, _ = _parts(tiny4_model_dir, "float32")
    ids, mask = _prompts()
    first = generator.run(ids, mask, NEW_TOKENS).sequences[:, 9:]
    eos = int(first[1, 1])  # row 1's second new token: that row stops there
    with torch.no_grad():
        expected = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=0, eos_token_id=eos)
    got = generator.run(ids, mask, NEW_TOKENS, eos_token_id=eos, pad_token_id=0).sequences
    assert torch.equal(got, expected)
    assert (got[1, 11:] == 0).all()


def _payload_bytes(body: bytes) -> int:
    """A safetensors body's tensor bytes: all of it less the 8-byte length and the JSON header."""
    (header_length,) = struct.unpack("<Q", body[:8])
    json.loads(body[8 : 8 + header_length])
    return len(body) - 8 - header_length


def test_each_decoding_step_sends_one_tokens_hidden_state_and_its_position(tiny4_model_dir: Path) -> None:
    _, generator, middle = _parts(tiny4_model_dir, "bfloat16")
    ids, mask = _prompts()
    result = generator.run(ids, mask, NEW_TOKENS)
    batch = ids.shape[0]
    prefill, *steps = middle.requests
    assert load_bytes(prefill)["hidden"].shape == (batch, 9, HIDDEN)
    assert [e.sent for e in result.exchanges] == [len(r) for r in middle.requests]
    for step, (request, answer) in enumerate(zip(steps, middle.answers[1:], strict=True), start=1):
        sent = load_bytes(request)
        assert {k: tuple(v.shape) for k, v in sent.items()} == {"hidden": (batch, 1, HIDDEN), "starts": (batch,),
                                                                "lengths": (batch,), "position_ids": (batch, 1)}
        assert sent["hidden"].dtype == torch.bfloat16
        # The row's span of real tokens among the cached and the new, the new token's position: no token id.
        assert sent["starts"].tolist() == [0, 3, 6] and sent["lengths"].tolist() == [9 + step, 6 + step, 3 + step]
        assert sent["position_ids"].flatten().tolist() == [8 + step, 5 + step, 2 + step]
        assert _payload_bytes(request) == batch * HIDDEN * 2 + 3 * batch * 8
        assert _payload_bytes(answer) == batch * HIDDEN * 2
        assert tuple(load_bytes(answer)["hidden"].shape) == (batch, 1, HIDDEN)
    print(f"bytes per decoding step (B={batch}, H={HIDDEN}, bf16): {len(steps[0])} up, {len(middle.answers[1])} "
          f"down; prefill {len(prefill)} up")


def test_the_middle_refuses_a_step_that_does_not_fit_its_session(tiny4_model_dir: Path) -> None:
    _, generator, middle = _parts(tiny4_model_dir, "float32")
    decoder = middle.middle
    first_block = decoder.plan.layers(MIDDLE)[0]
    ids, mask = _prompts()
    prompt = MaskInfo(torch.tensor([0, 3, 6]), torch.tensor([9, 6, 3]), torch.zeros(3, 9, dtype=torch.long))
    decoder.forward("s", encode_forward(torch.randn(3, 9, HIDDEN), prompt, "float32"))
    step = MaskInfo(torch.tensor([0, 3, 6]), torch.tensor([10, 7, 4]), torch.tensor([[9], [6], [3]]))
    with pytest.raises(MessageError, match="generates 3 rows, this step has 2"):
        two_rows = MaskInfo(step.starts[:2], step.lengths[:2], step.position_ids[:2])
        decoder.forward("s", encode_forward(torch.randn(2, 1, HIDDEN), two_rows, "float32"))
    beyond = MaskInfo(step.starts, step.lengths + 1, step.position_ids)
    with pytest.raises(MessageError, match="within 10 tokens"):
        decoder.forward("s", encode_forward(torch.randn(3, 1, HIDDEN), beyond, "float32"))
    assert decoder.sessions["s"].get_seq_length(first_block) == 9  # the refused steps changed nothing
    decoder.forward("s", encode_forward(torch.randn(3, 1, HIDDEN), step, "float32"))
    assert decoder.sessions["s"].get_seq_length(first_block) == 10
    decoder.end("s")
    assert not decoder.sessions
    with pytest.raises(ValueError, match="left-padded"):
        generator.run(ids, torch.flip(mask, dims=[1]), 2)


def test_export_generate_on_a_split_state_dir_runs_the_three_parts(tiny4_model_dir: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    # A split federation's state dir: its settings, the middle's checkpoint, and one client's final ends.
    config = FederationArguments(model_name_or_path=str(tiny4_model_dir), fed_mode="split", split_head_layers=1,
                                 split_tail_layers=1, peft_lora_r=4, peft_lora_alpha=8, num_rounds=1)
    state = tmp_path / "state"
    Federation.initialize(config, state)
    model_config = load_model_config(str(tiny4_model_dir))
    lora = build_lora_config(model_config, r=4, alpha=8, dropout=0.0, target_modules=config.target_module_list())
    adapter = _start_adapter(adapter_spec(model_config, lora), seed=9)
    plan = SplitPlan.of(model_config, 1, 1)
    (state / "split").mkdir()
    save_file({f"lora/{k}": v for k, v in adapter.items() if plan.part_of(k) == MIDDLE}, str(state / "split" / CHECKPOINT))
    save_peft_adapter(tmp_path / "client" / "final_adapter",
                      {k: v for k, v in adapter.items() if plan.part_of(k) in CLIENT_PARTS}, lora)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a fruit.\nRepeat: cat\n")
    assert export_main(["generate", "--state_dir", str(state), "--client_output_dir", str(tmp_path / "client"),
                        "--prompts_file", str(prompts), "--max_new_tokens", "5", "--batch_size", "2"]) == 0
    captured = capsys.readouterr()
    generations = [block.split("\n### generation\n")[1].strip() for block in captured.out.split("### prompt\n")[1:]]
    assert "split generation (last batch): prefill" in captured.err and "each decoding step" in captured.err
    # The same texts as the merged model in one process.
    source = load_adapter(state_dir=str(state), client_output_dir=str(tmp_path / "client"))
    evaluator = Evaluator.for_adapter(source, device="cpu")
    texts = templated_prompts(EvaluationArguments(prompts_file=str(prompts)), evaluator.tokenizer, "alpaca")
    assert len(generations) == 2 and all(generations), generations
    assert generations == evaluator.generate(texts, batch_size=2, max_new_tokens=5, progress=False)
