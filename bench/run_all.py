"""Run every benchmark: ``python -m bench`` (or ``python bench/run_all.py``), ``--quick`` for small sizes.

Each benchmark runs in its own process and writes ``NAME.json`` and ``NAME.md`` into the results
folder (``bench/results/`` by default); this script then writes ``summary.md``, all the tables
in one file, and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, ROOT  # noqa: E402

BENCHMARKS = ("aggregation", "wire_format", "transfer", "rounds", "client_overhead", "secagg")


def run_benchmark(name: str, out_dir: Path, quick: bool, timeout: float) -> tuple[bool, float, str]:
    """``python -m bench.NAME`` in a fresh process; (succeeded, seconds, stderr tail)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", f"bench.{name}", "--out", str(out_dir), *(["--quick"] if quick else [])]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - started, f"timed out after {timeout:.0f} s"
    return done.returncode == 0, time.perf_counter() - started, done.stderr[-3000:]


def summary(out_dir: Path, names: list[str], seconds: dict[str, float]) -> str:
    """All the benchmarks' markdown, with a one-table overview of the targets first."""
    lines = ["# fedllm benchmarks", "", "| benchmark | target | measured | met |", "|---|---|---|---|"]
    parts = []
    for name in names:
        path = out_dir / f"{name}.json"
        if not path.exists():
            lines.append(f"| {name} | (failed) | | **no** |")
            continue
        document = json.loads(path.read_text())
        for t in document["targets"]:
            met = "n/a (quick)" if t["met"] is None else ("yes" if t["met"] else "**no**")
            lines.append(f"| {name} | {t['name']}: {t['goal']} | {t['measured']} | {met} |")
        parts.append((out_dir / f"{name}.md").read_text())
    lines += ["", "Seconds per benchmark: " + ", ".join(f"{n} {s:.0f}" for n, s in seconds.items()), ""]
    return "\n".join(lines + parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every benchmark runs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default: bench/results)")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per benchmark")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    failed = []
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        ok, took, stderr = run_benchmark(name, args.out, args.quick, args.timeout)
        seconds[name] = took
        print(f"[bench] {name}: {'done' if ok else 'FAILED'} in {took:.0f} s", file=sys.stderr, flush=True)
        if not ok:
            failed.append(name)
            print(stderr, file=sys.stderr)
    text = summary(args.out, names, seconds)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
