"""bench/fl_vs_local.py without training: the FPB split keeps its test set apart, and the table and chart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import fl_vs_local as bench

SENTENCES = {"positive": "Operating profit rose to EUR {n} mn .", "negative": "Net sales fell by {n} % .",
             "neutral": "The company has {n} employees in Finland ."}


@pytest.fixture
def fpb_file(tmp_path: Path) -> Path:
    path = tmp_path / "fpb.jsonl"
    rows = [{"instruction": "What is the sentiment of this news?", "input": text.format(n=n), "output": label}
            for n in range(40) for label, text in SENTENCES.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_fpb_split_never_gives_a_client_a_test_or_validation_sentence(tmp_path: Path, fpb_file: Path) -> None:
    args = bench.parse(["--study", "fpb", "--fpb_data", str(fpb_file), "--test_size", "30"])
    data = bench.prepare_fpb(args, alpha=0.5, seed=1, folder=tmp_path / "split")
    again = bench.prepare_fpb(args, alpha=0.5, seed=2, folder=tmp_path / "other")

    def inputs(path: Path) -> list[str]:
        return [json.loads(line)["input"] for line in path.read_text().splitlines()]

    test, valid = inputs(data["test"]), inputs(data["valid"])
    train = [s for f in sorted(data["clients"].iterdir()) for s in inputs(f)]
    assert len(test) == 30 and inputs(again["test"]) == test  # the test split is the same for every seed
    assert len(set(test) | set(valid) | set(train)) == len(test) + len(valid) + len(train) == 120
    assert len(list(data["clients"].iterdir())) == 10 and valid


def test_table_markdown_and_chart(tmp_path: Path) -> None:
    args = bench.parse(["--study", "fpb", "--num_rounds", "2", "--seeds", "0,1"])
    cells = [{"alpha": "0.5", "seed": s, "setting": name, "steps": 10, "accuracy": acc + s / 100,
              "macro_f1": acc / 2, "loss": 1 - acc, **extra}
             for s in (0, 1) for name, acc, extra in (
                 ("base", 0.2, {}), ("local", 0.5, {"accuracy_min": 0.4, "accuracy_max": 0.6, "macro_f1_min": 0.2,
                                                    "macro_f1_max": 0.3, "loss_min": 0.4, "loss_max": 0.6}),
                 ("central", 0.8, {}), ("fedavg", 0.7, {}))]
    tables = bench.table_rows(cells, "fpb")
    fedavg = next(r for r in tables["0.5"] if r["setting"] == "fedavg")
    assert fedavg["accuracy"]["mean"] == pytest.approx(0.705) and fedavg["accuracy"]["n"] == 2
    text = bench.markdown(args, "python bench/fl_vs_local.py", tables, None, 60.0)
    assert "| federated: fedavg | 2 | 0.705 ± 0.007 (+0.200)" in text
    pytest.importorskip("matplotlib")
    curves = {"0.5": {"central": [0.4, 0.2], "fedavg": [0.5, 0.3]}}
    assert bench.chart(args, tables, curves, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
