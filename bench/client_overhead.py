"""Benchmark 5: what federating costs a client, next to the same training without a federation.

For each model, the real client loop (``fedllm.client.runner.run_client`` with ``LocalTrainer``)
plays R rounds of S steps against a real server (``run_server.sh``), and a plain TRL run trains
R·S steps with one trainer, in the same process setup (a fresh process; the same model, data and
TRL settings, built by ``LocalTrainer``; model loading is outside both measurements). The
client's functions are wrapped with timers in this harness (no library change) to itemise the
per-round overhead: poll, wait (the poll interval), pull, decode + verify, config, apply
(global adapter into the model), trainer init, snapshot + delta, encode, push.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from .common import RESULTS_DIR, ROOT, ServerProcess, Table, Target, write_results

NAME = "client_overhead"
TITLE = "Client overhead: federated rounds vs one plain TRL run of the same steps"
RATIO_TARGET = 1.15
# Categories of the itemised per-round overhead, in the order a round runs them.
OVERHEAD_ITEMS = ("poll", "wait", "pull", "decode", "verify", "config", "apply", "trainer init", "train teardown",
                  "snapshot", "delta & rest", "encode", "write pending", "push", "other")
VARIANTS = ("plain", "federated", "federated + gc.freeze")


@dataclass(frozen=True)
class ModelCase:
    label: str
    rounds: int
    steps: int
    batch_size: int
    seq_length: int
    build: str  # "tiny" or "50m"


def plan(quick: bool) -> tuple[list[ModelCase], int]:
    """Model cases and repetitions."""
    if quick:
        return [ModelCase("tiny Llama (2 layers, 64 wide)", 2, 2, 4, 64, "tiny")], 1
    return [ModelCase("tiny Llama (2 layers, 64 wide)", 3, 30, 8, 128, "tiny"),
            ModelCase("51M Llama (10 layers, 640 wide)", 3, 10, 4, 128, "50m")], 2


def build_models(directory: Path, builds: set[str]) -> dict[str, Path]:
    """The tiny Llama and, if asked, a ~50M-parameter Llama with random weights and the tiny tokenizer."""
    from fedllm.tiny import build_tiny_llama

    models = {"tiny": build_tiny_llama(directory / "tiny", seed=0)}
    if "50m" in builds:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(models["tiny"])
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=640, intermediate_size=1728, num_hidden_layers=10,
                             num_attention_heads=10, num_key_value_heads=10, max_position_embeddings=512,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        path = directory / "llama-50m"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        models["50m"] = path
    return models


def model_parameters(path: Path) -> int:
    """Parameters of a saved model, from its safetensors headers."""
    import math

    from safetensors import safe_open

    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


# ------------------------------------------------------------------------------------------ the two processes
def _client_args(payload: dict[str, Any]):
    from fedllm.config import ClientArguments

    return ClientArguments(server_url=payload["url"], client_id="bench-client", dataset_name=payload["data"],
                           output_dir=payload["output_dir"], batch_size=payload["batch_size"], device="cpu",
                           quiet=True, poll_interval=payload["poll_interval"], max_poll_interval=payload["poll_interval"],
                           seed=0)


def _time_teardown(events: list[tuple[str, float, float]]) -> None:
    """Time accelerate's end-of-train() cleanup (a full gc.collect()) as 'train teardown'."""
    from accelerate import Accelerator

    Accelerator.free_memory = _timed(events, "train teardown", Accelerator.free_memory)


def _timed(events: list[tuple[str, float, float]], category: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            events.append((category, started, time.perf_counter()))
    return wrapper


def plain_process(payload: dict[str, Any]) -> dict[str, Any]:
    """One TRL trainer for R·S steps, built exactly as the client builds its per-round trainer."""
    from fedllm.client.trainer import LocalTrainer

    events: list[tuple[str, float, float]] = []
    _time_teardown(events)
    server_config = requests.get(payload["url"] + "/v1/config", headers={"X-FedLLM-Client": "bench-plain"},
                                 timeout=60).json()
    local = LocalTrainer(server_config, _client_args(payload))
    started = time.perf_counter()
    trainer = local._new_trainer(1, server_config["round_config"]["learning_rate"],
                                 payload["rounds"] * payload["steps"])
    built = time.perf_counter()
    trainer.train()
    done = time.perf_counter()
    teardown = sum(end - start for category, start, end in events if category == "train teardown")
    return {"trainer init": built - started, "train": done - built, "train teardown": teardown,
            "total": done - started, "steps": trainer.state.global_step}


def federated_process(payload: dict[str, Any]) -> dict[str, Any]:
    """The real client loop with timers around its steps; events inside the rounds' window are summed."""
    from fedllm.client import http, runner, trainer

    events: list[tuple[str, float, float]] = []

    def timed(category: str, fn):
        return _timed(events, category, fn)

    from trl import SFTTrainer

    _time_teardown(events)
    if payload.get("freeze"):  # the experiment: gc.freeze() once the model and data are loaded
        import gc

        original_init = trainer.LocalTrainer.__init__

        @functools.wraps(original_init)
        def init_then_freeze(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            gc.collect()
            gc.freeze()

        trainer.LocalTrainer.__init__ = init_then_freeze

    patches = [
        (http.FederationClient, "round_status", "poll"), (http.FederationClient, "download_global", "pull"),
        (http.FederationClient, "upload_update", "push"), (http.FederationClient, "config", "config"),
        (runner.Poller, "wait", "wait"), (runner, "decode_file", "decode"), (runner, "verify_global", "verify"),
        (runner, "encode", "encode"), (runner, "atomic_write", "write pending"), (runner, "_play_round", "round"),
        (trainer, "set_adapter_tensors", "apply"), (trainer, "get_adapter_tensors", "snapshot"),
        (trainer.LocalTrainer, "_new_trainer", "trainer init"), (trainer.LocalTrainer, "train_round", "train_round"),
        (SFTTrainer, "train", "train"),
    ]
    missing = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name, _ in patches if not hasattr(owner, name)]
    for owner, name, category in patches:
        if hasattr(owner, name):
            setattr(owner, name, timed(category, getattr(owner, name)))
    report = runner.run_client(_client_args(payload))
    rounds = [(s, e) for c, s, e in events if c == "round"]
    window_start, window_end = rounds[0][0], rounds[-1][1]
    totals: dict[str, float] = {}
    for category, start, end in events:
        if window_start <= start and end <= window_end + 1e-9:
            totals[category] = totals.get(category, 0.0) + (end - start)
    return {"window": window_end - window_start, "totals": totals, "rounds": len(rounds), "missing": missing,
            "steps": sum(r.steps for r in report.rounds)}


def _subprocess(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "bench.client_overhead", f"--{kind}", json.dumps(payload)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} process failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _in_process(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """--quick: the same measurement in this process (it only has to run, not to be a clean timing)."""
    import logging

    logging.getLogger("fedllm").setLevel(logging.WARNING)
    return plain_process(payload) if kind == "plain" else federated_process(payload)


def itemise(fed: dict[str, Any]) -> dict[str, float]:
    """Overhead per category over the rounds' window (everything but the training steps themselves)."""
    t = fed["totals"]
    items = {name: t.get(name, 0.0) for name in ("poll", "wait", "pull", "decode", "verify", "config", "apply",
                                                  "trainer init", "snapshot", "encode", "write pending", "push")}
    items["train teardown"] = t.get("train teardown", 0.0)
    inside = sum(t.get(name, 0.0) for name in ("apply", "trainer init", "snapshot", "train"))
    items["delta & rest"] = max(0.0, t.get("train_round", 0.0) - inside)
    accounted = sum(items.values()) + t.get("train", 0.0) - items["train teardown"]
    items["other"] = max(0.0, fed["window"] - accounted)
    return items


def run(out_dir: Path = RESULTS_DIR, quick: bool = False, workdir: Path | None = None,
        poll_interval: float = 0.2) -> dict[str, Any]:
    from fedllm.data.demo import write_demo_data

    cases, repeat = plan(quick)
    variants = VARIANTS[:2] if quick else VARIANTS  # --quick: no gc.freeze experiment, both runs in this process
    directory = Path(tempfile.mkdtemp(prefix="fedllm-bench-client-", dir=workdir))
    ratio_table = Table("Federated rounds vs one plain TRL run of R·S steps (same model, data, TRL settings; "
                        "median of runs)",
                        ["model", "params", "R × S", "plain s", "federated s", "ratio", "federated + gc.freeze s",
                         "ratio", "plain steps/s", "overhead per round s"])
    items_table = Table("Federated overhead per round, itemised (seconds, median of runs; 'train teardown' is the "
                        "gc.collect() at the end of every Trainer.train())", ["model", *OVERHEAD_ITEMS])
    targets: list[Target] = []
    raw: dict[str, Any] = {}
    try:
        models = build_models(directory, {c.build for c in cases})
        data = write_demo_data(directory / "data", num_clients=1, rows_per_client=256)[0]
        for case in cases:
            runs = []
            for rep in range(repeat):
                run_result = {}
                for variant in variants:  # interleaved: plain, federated, federated + freeze, plain, ...
                    state = directory / f"state-{case.build}-{rep}-{len(run_result)}"
                    args = ["--model_name_or_path", str(models[case.build]), "--state_dir", str(state),
                            "--num_clients", "1", "--sample_clients", "1", "--num_rounds", str(case.rounds),
                            "--max_steps", str(case.steps), "--learning_rate", "1e-4", "--seq_length",
                            str(case.seq_length), "--round_timeout", "0", "--workers", "1", "--log_level", "WARNING"]
                    with ServerProcess(args, directory / f"server-{case.build}-{rep}-{variant}.log") as server:
                        payload = {"url": server.url, "data": str(data), "batch_size": case.batch_size,
                                   "rounds": case.rounds, "steps": case.steps, "poll_interval": poll_interval,
                                   "output_dir": str(directory / f"client-{case.build}-{rep}-{len(run_result)}"),
                                   "freeze": variant.endswith("freeze")}
                        kind = "plain" if variant == "plain" else "federated"
                        run_result[variant] = _in_process(kind, payload) if quick else _subprocess(kind, payload)
                runs.append(run_result)
            raw[case.label] = runs
            plain_s = statistics.median(r["plain"]["total"] for r in runs)
            fed = {v: statistics.median(r[v]["window"] for r in runs) if v in variants else float("nan")
                   for v in VARIANTS[1:]}
            ratio = {v: statistics.median(r[v]["window"] / r["plain"]["total"] for r in runs)
                     if v in variants else float("nan") for v in VARIANTS[1:]}
            per_run = [itemise(r["federated"]) for r in runs]
            items = {name: statistics.median(p[name] for p in per_run) / case.rounds for name in OVERHEAD_ITEMS}
            steps_s = statistics.median(r["plain"]["train"] - r["plain"]["train teardown"] for r in runs)
            overhead = statistics.median(
                (r["federated"]["window"] - r["federated"]["totals"].get("train", 0.0)
                 + r["federated"]["totals"].get("train teardown", 0.0)) / case.rounds for r in runs)
            params = model_parameters(models[case.build])
            ratio_table.rows.append([case.label, f"{params / 1e6:.1f}M", f"{case.rounds} × {case.steps}", plain_s,
                                     fed["federated"], ratio["federated"], fed["federated + gc.freeze"],
                                     ratio["federated + gc.freeze"], case.rounds * case.steps / steps_s, overhead])
            items_table.rows.append([case.label, *[items[name] for name in OVERHEAD_ITEMS]])
            targets.append(Target(f"client time ratio, {case.label}", f"≤ {RATIO_TARGET}× plain TRL",
                                  f"{ratio['federated']:.2f}× (with gc.freeze: {ratio['federated + gc.freeze']:.2f}×)",
                                  None if quick else ratio["federated"] <= RATIO_TARGET))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    notes = [
        "federated s = from the start of the client's first round to the end of its last upload (model loading, "
        "joining and saving the final adapter excluded), so it includes the polls and waits between rounds while "
        "the server aggregates. plain s = building one trainer + R·S steps (one train() call).",
        f"The client polls with --poll_interval {poll_interval:g}; after its upload it waits about that long to "
        "see the next round (the default, 2 s, is noise next to a real model's minutes of training, not here).",
        "trainer init = a new TRL trainer each round (the round's learning rate and seed); train teardown = "
        "accelerate's free_memory() at the end of every Trainer.train(), a full gc.collect() over every Python "
        "object of torch/transformers/TRL (~0.25 s here), paid once by the plain run and every round by a client.",
        "'federated + gc.freeze' is an experiment done by this harness (gc.freeze() after LocalTrainer is built, "
        "so those collections skip the long-lived objects); it is not in the library.",
    ]
    return write_results(NAME, TITLE, out_dir, quick=quick,
                         params={"cases": [c.__dict__ for c in cases], "repeat": repeat,
                                 "poll_interval": poll_interval},
                         tables=[ratio_table, items_table], targets=targets, notes=notes, data=raw)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--plain", help=argparse.SUPPRESS)
    parser.add_argument("--federated", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain or args.federated:
        import logging

        logging.basicConfig(level=logging.WARNING)
        result = plain_process(json.loads(args.plain)) if args.plain else federated_process(json.loads(args.federated))
        print(json.dumps(result))
        return
    run(args.out, quick=args.quick)
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
