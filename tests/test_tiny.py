"""``python -m fedllm.tiny --pretrain``: a from_pretrained directory, deterministic for a seed, cached."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.tiny import PRETRAIN_FILE, PretrainSettings, build_tiny_llama, pretrain_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
# A micro model and schedule: the test is about the command, not about what the model learns.
MICRO = ["--vocab_size", "320", "--hidden_size", "16", "--intermediate_size", "32", "--num_hidden_layers", "1",
         "--num_attention_heads", "2", "--seq_length", "32", "--batch_size", "2", "--steps", "3"]
MICRO_SETTINGS = PretrainSettings(vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, seq_length=32, batch_size=2, steps=3)
CORPUS = [f"The company reported a net profit of {n} million euros, up from {n + 3} a year earlier." for n in range(40)]


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"instruction": "Summarise.", "input": line, "output": "profit up"}) + "\n"
                            for line in CORPUS))
    return path


@pytest.mark.integration
def test_pretrain_cli_writes_a_from_pretrained_directory(tmp_path: Path, corpus_file: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "base"
    done = subprocess.run([sys.executable, "-m", "fedllm.tiny", "--pretrain", "--output_dir", str(out), "--seed", "3",
                           "--corpus", str(corpus_file), *MICRO], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(out)
    record = json.loads((out / PRETRAIN_FILE).read_text())
    assert record["seed"] == 3 and record["settings"]["steps"] == 3 and record["documents"] == len(CORPUS)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.hidden_size == 16 and len(tokenizer) == model.config.vocab_size
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|user|>")


@pytest.mark.integration
def test_pretrain_is_deterministic_for_a_seed_and_cached(tmp_path: Path) -> None:
    first = pretrain_tiny_llama(tmp_path / "a", seed=1, settings=MICRO_SETTINGS, corpus=CORPUS, log_every=0)
    second = pretrain_tiny_llama(tmp_path / "b", seed=1, settings=MICRO_SETTINGS, corpus=CORPUS, log_every=0)
    other = pretrain_tiny_llama(tmp_path / "c", seed=2, settings=MICRO_SETTINGS, corpus=CORPUS, log_every=0)
    weights = [(d / "model.safetensors").read_bytes() for d in (first, second, other)]
    assert weights[0] == weights[1] != weights[2]
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert pretrain_tiny_llama(first, seed=1, settings=MICRO_SETTINGS, corpus=CORPUS) == first  # cached: not retrained
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other settings, seed or corpus"):
        pretrain_tiny_llama(first, seed=9, settings=MICRO_SETTINGS, corpus=CORPUS)


def test_random_build_keeps_its_positional_cli(tmp_path: Path) -> None:
    from fedllm.tiny import main

    main([str(tmp_path / "random")])
    assert (tmp_path / "random" / "config.json").exists()
    assert build_tiny_llama(tmp_path / "again", seed=0).name == "again"
