"""Smoke test of the benchmark suite: every benchmark runs at --quick sizes and writes its results.

No timing is asserted: the numbers of a quick run mean nothing. What must not rot is that each
benchmark still runs against the current code and writes the JSON and markdown it promises.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import ALL_QUICK, QV_QUICK, lora_spec
from bench.run_all import BENCHMARKS

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT_KEYS = {"benchmark", "title", "quick", "created", "machine", "params", "targets", "tables", "notes", "data"}
# A column (or target name) each benchmark's results must have.
EXPECTED = {
    "aggregation": ("fedavg ×", "fedavg peak RSS"),
    "wire_format": ("bytes/param", "bf16 vs JSON size"),
    "transfer": ("server / raw", "worker peak RSS"),
    "rounds": ("server turnaround s", "errors"),
    "client_overhead": ("trainer init", "client time ratio"),
    "secagg": ("client time ratio", "client masking vs plain"),
}


def test_benchmark_shapes_are_peft_names_and_shapes() -> None:
    """The generated adapters have exactly the tensor names and shapes PEFT gives a Llama."""
    from transformers import LlamaConfig

    from fedllm.adapter import adapter_spec, build_lora_config

    for size in (QV_QUICK, ALL_QUICK):
        config = LlamaConfig(hidden_size=size.hidden, intermediate_size=size.intermediate,
                             num_hidden_layers=size.layers, num_attention_heads=8, num_key_value_heads=8,
                             vocab_size=1024)
        lora = build_lora_config(config, r=size.rank, alpha=2 * size.rank, dropout=0.0,
                                 target_modules=list(size.modules))
        spec = adapter_spec(config, lora)
        assert list(spec) == list(size.spec())
        assert spec == lora_spec(size.modules, rank=size.rank, layers=size.layers, hidden=size.hidden,
                                 intermediate=size.intermediate)


@pytest.mark.integration
def test_every_benchmark_runs_quick(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (out / "summary.md").read_text().startswith("# fedllm benchmarks")
    for name in BENCHMARKS:
        document = json.loads((out / f"{name}.json").read_text())
        assert DOCUMENT_KEYS <= set(document), name
        assert document["benchmark"] == name and document["quick"] is True
        assert document["tables"] and all(table["rows"] for table in document["tables"]), name
        assert all({"name", "goal", "measured", "met"} <= set(t) for t in document["targets"]), name
        column, target = EXPECTED[name]
        assert any(column in table["columns"] for table in document["tables"]), (name, column)
        assert any(t["name"].startswith(target) for t in document["targets"]), (name, target)
        markdown = (out / f"{name}.md").read_text()
        assert markdown.startswith("### ") and column in markdown, name
    rounds = json.loads((out / "rounds.json").read_text())
    assert rounds["data"]["errors"] == [] and rounds["data"]["final"]["phase"] == "finished"
