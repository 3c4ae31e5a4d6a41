"""Export: any available round as a PEFT directory, merged models that give the adapter's logits, generate."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import export as export_cli
from fedllm.client.trainer import RoundResult
from fedllm.config import FederationArguments
from fedllm.export import available_rounds, export_adapter, load_adapter, load_state_dir, merge_adapter
from fedllm.server.federation import Federation
from fedllm.server.store import Store
from fedllm.simulation import submit


@pytest.fixture(scope="module")
def state_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished 3-round federation (adapters/round_2, adapters/final) driven with random deltas."""
    root = tmp_path_factory.mktemp("export") / "state"
    config = FederationArguments(model_name_or_path=str(tiny_model_dir), num_clients=2, sample_clients=2,
                                 num_rounds=3, peft_lora_r=4, peft_lora_alpha=8, round_timeout=0, save_model_freq=2)
    Federation.initialize(config, root)
    federation = Federation(Store(root))
    generator = torch.Generator().manual_seed(0)
    for client in ("alice", "bob"):
        federation.join(client, 10)
    for round_number in (1, 2, 3):
        for client in ("alice", "bob"):
            delta = {name: 0.05 * torch.randn(shape, generator=generator) for name, shape in federation.spec.items()}
            submit(federation, client, round_number, 10, RoundResult(delta, {"train_loss": 1.0}))
        assert federation.tick()
    federation.store.close()
    return root


def test_available_rounds_and_their_sources(state_dir):
    rounds = available_rounds(state_dir, num_rounds=3)
    assert sorted(rounds) == [2, 3]  # rounds 0 and 1: their state files are gone, no adapter directory
    assert rounds[2].name == "v000002.state.safetensors"  # the fp32 master copy is preferred
    latest = load_state_dir(state_dir)
    assert "round 3" in latest.description and latest.federation["num_rounds"] == 3
    with pytest.raises(ValueError, match=r"round 1 is not available .* Available rounds: 2, 3"):
        load_state_dir(state_dir, 1)
    with pytest.raises(ValueError, match="--round needs --state_dir"):
        load_adapter(round_number=2)


def test_round_from_state_file_equals_the_saved_directory(state_dir, tmp_path):
    from_state = load_state_dir(state_dir, 2)
    directory = load_adapter(adapter=str(state_dir / "adapters" / "round_2"))
    assert from_state.tensors.keys() == directory.tensors.keys()
    assert all(torch.equal(from_state.tensors[k], directory.tensors[k]) for k in directory.tensors)
    # Once the state file is gone, the round comes from adapters/round_N (and the final from adapters/final).
    copy = shutil.copytree(state_dir, tmp_path / "state")
    for state_file in (copy / "globals").glob("*.state.safetensors"):
        state_file.unlink()
    assert load_state_dir(copy, 2).description.endswith("(adapters/round_2)")
    assert load_state_dir(copy, 3).description.endswith("(adapters/final)")
    assert all(torch.equal(load_state_dir(copy, 2).tensors[k], from_state.tensors[k]) for k in from_state.tensors)


def test_exported_adapter_is_a_standard_peft_directory(state_dir, tiny_model_dir, tmp_path):
    source = load_state_dir(state_dir, 2)
    out = export_adapter(source, tmp_path / "round2")
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], source.tensors[k]) for k in source.tensors)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert model.peft_config["default"].r == 4


def test_merged_model_gives_the_adapters_logits(state_dir, tiny_model_dir, tmp_path):
    merged_dir = merge_adapter(load_state_dir(state_dir), tmp_path / "merged")
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                            state_dir / "adapters" / "final").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
    assert not torch.allclose(base, adapted, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
    assert (merged_dir / "tokenizer.json").is_file()


def test_export_cli(state_dir, tiny_model_dir, tmp_path, capsys):
    assert export_cli.main(["adapter", "--state_dir", str(state_dir), "--round", "3", "--output_dir",
                            str(tmp_path / "r3")]) == 0
    final = load_file(str(state_dir / "adapters" / "final" / "adapter_model.safetensors"))
    exported = load_file(str(tmp_path / "r3" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], exported[k]) for k in final)
    assert export_cli.main(["adapter", "--state_dir", str(state_dir), "--round", "1", "--output_dir",
                            str(tmp_path / "r1")]) == 2
    assert "round 1 is not available" in capsys.readouterr().err

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a fruit.\n\nRepeat: cat\n")
    assert export_cli.main(["generate", "--state_dir", str(state_dir), "--prompts_file", str(prompts),
                            "--max_new_tokens", "4", "--batch_size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("### generation") == 2 and "### Instruction:\nRepeat: cat" in out
    assert export_cli.main(["generate", "--model_name_or_path", str(tiny_model_dir), "--prompt", "Hi",
                            "--max_new_tokens", "2"]) == 0
    assert export_cli.main(["unknown"]) == 2
