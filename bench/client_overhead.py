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
TRAIN_THREADS = 1
# Categories of the itemised per-round overhead, in the order a round runs them.
OVERHEAD_ITEMS = ("poll", "wait", "pull", "decode", "verify", "config", "apply", "trainer init", "train teardown",
                  "snapshot", "delta & rest", "encode", "write pending", "push", "other")


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
            ModelCase("51M Llama (10 layers, 640 wide)", 3, 10, 4, 128, "50m")], 3


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


# ------------------------------------------------------------------------------------------ the model process
def _client_args(payload: dict[str, Any], output_dir: Path):
    from fedllm.config import ClientArguments

    return ClientArguments(server_url=payload["url"], client_id="bench-client", dataset_name=payload["data"],
                           output_dir=str(output_dir), batch_size=payload["batch_size"], device="cpu", quiet=True,
                           poll_interval=payload["poll_interval"], max_poll_interval=payload["poll_interval"], seed=0)


class Timers:
    """Wraps the client's functions once per process; each wrapped call appends (category, start, end)."""

    def __init__(self) -> None:
        from accelerate import Accelerator
        from trl import SFTTrainer

        from fedllm.client import http, runner, state, trainer

        self.events: list[tuple[str, float, float]] = []
        patches = [
            (http.FederationClient, "round_status", "poll"), (http.FederationClient, "download_global", "pull"),
            (http.FederationClient, "upload_update", "push"), (http.FederationClient, "config", "config"),
            (runner.Poller, "wait", "wait"), (runner, "decode_file", "decode"), (runner, "verify_global", "verify"),
            (trainer.RoundResult, "encode", "encode"), (state.ClientState, "write_pending", "write pending"),
            (runner, "_play_round", "round"),
            (trainer, "set_adapter_tensors", "apply"), (trainer, "get_adapter_tensors", "snapshot"),
            (trainer.LocalTrainer, "_new_trainer", "trainer init"), (trainer.LocalTrainer, "train_round", "train_round"),
            (SFTTrainer, "train", "train"),
            # accelerate's cleanup at the end of every Trainer.train(): a full gc.collect()
            (Accelerator, "free_memory", "train teardown"),
        ]
        self.missing = [f"{getattr(o, '__name__', o)}.{n}" for o, n, _ in patches if not hasattr(o, n)]
        for owner, name, category in patches:
            if hasattr(owner, name):
                setattr(owner, name, self._timed(category, getattr(owner, name)))

    def _timed(self, category: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.events.append((category, started, time.perf_counter()))
        return wrapper

    def totals(self, start: float, end: float) -> dict[str, float]:
        totals: dict[str, float] = {}
        for category, began, ended in self.events:
            if start <= began and ended <= end + 1e-9:
                totals[category] = totals.get(category, 0.0) + (ended - began)
        return totals


def measure_plain(timers: Timers, payload: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """One TRL trainer for R·S steps, built exactly as the client builds its per-round trainer."""
    from fedllm.client.trainer import LocalTrainer

    server_config = requests.get(payload["url"] + "/v1/config", headers={"X-FedLLM-Client": "bench-plain"},
                                 timeout=60).json()
    local = LocalTrainer(server_config, _client_args(payload, output_dir))
    started = time.perf_counter()
    trainer = local._new_trainer(1, server_config["round_config"]["learning_rate"],
                                 payload["rounds"] * payload["steps"])
    trainer.train()
    done = time.perf_counter()
    totals = timers.totals(started, done)
    return {"total": done - started, "totals": totals, "steps": trainer.state.global_step}


def measure_federated(timers: Timers, payload: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """The real client loop; the timed calls inside its rounds' window are summed."""
    from fedllm.client import runner

    first = len(timers.events)
    report = runner.run_client(_client_args(payload, output_dir))
    rounds = [(s, e) for c, s, e in timers.events[first:] if c == "round"]
    return {"window": rounds[-1][1] - rounds[0][0], "totals": timers.totals(rounds[0][0], rounds[-1][1]),
            "rounds": len(rounds), "steps": sum(r.steps for r in report.rounds)}


def model_process(payload: dict[str, Any]) -> dict[str, Any]:
    """Every run of one model case, in one fresh process: plain and federated in turn, ``repeat`` times, each
    against a fresh server; then the gc.freeze experiment (last: gc.freeze() is for the whole process)."""
    import gc

    from fedllm.client import trainer

    timers = Timers()
    workdir = Path(payload["workdir"])
    runs: list[dict[str, Any]] = []

    def server(tag: str) -> ServerProcess:
        args = ["--model_name_or_path", payload["model"], "--state_dir", str(workdir / f"state-{tag}"),
                "--num_clients", "1", "--sample_clients", "1", "--num_rounds", str(payload["rounds"]),
                "--max_steps", str(payload["steps"]), "--learning_rate", "1e-4", "--seq_length",
                str(payload["seq_length"]), "--round_timeout", "0", "--workers", "1", "--log_level", "WARNING"]
        return ServerProcess(args, workdir / f"server-{tag}.log")

    for rep in range(payload["repeat"]):
        result = {}
        with server(f"{rep}") as srv:
            payload["url"] = srv.url
            result["plain"] = measure_plain(timers, payload, workdir / f"plain-{rep}")
            result["federated"] = measure_federated(timers, payload, workdir / f"client-{rep}")
        runs.append(result)
    freeze = None
    if payload["freeze"]:
        original_init = trainer.LocalTrainer.__init__

        @functools.wraps(original_init)
        def init_then_freeze(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            gc.collect()
            gc.freeze()  # later collections skip the model, tokenizer, datasets and libraries

        trainer.LocalTrainer.__init__ = init_then_freeze
        with server("freeze") as srv:
            payload["url"] = srv.url
            freeze = measure_federated(timers, payload, workdir / "client-freeze")
    return {"runs": runs, "freeze": freeze, "missing": timers.missing, "torch_threads": _torch_threads()}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _subprocess(payload: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(TRAIN_THREADS)}
    done = subprocess.run([sys.executable, "-m", "bench.client_overhead", "--model-process", json.dumps(payload)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"model process failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def itemise(fed: dict[str, Any]) -> dict[str, float]:
    """Overhead per category over the rounds' window (everything but the training steps themselves)."""
    t = fed["totals"]
    items = {name: t.get(name, 0.0) for name in ("poll", "wait", "pull", "decode", "verify", "config", "apply",
                                                  "trainer init", "train teardown", "snapshot", "encode",
                                                  "write pending", "push")}
    inside = sum(t.get(name, 0.0) for name in ("apply", "trainer init", "snapshot", "train"))
    items["delta & rest"] = max(0.0, t.get("train_round", 0.0) - inside)
    accounted = sum(items.values()) + t.get("train", 0.0) - items["train teardown"]
    items["other"] = max(0.0, fed["window"] - accounted)
    return items


def run(out_dir: Path = RESULTS_DIR, quick: bool = False, workdir: Path | None = None,
        poll_interval: float = 0.2) -> dict[str, Any]:
    from fedllm.data.demo import write_demo_data

    cases, repeat = plan(quick)
    directory = Path(tempfile.mkdtemp(prefix="fedllm-bench-client-", dir=workdir))
    ratio_table = Table("Federated rounds vs one plain TRL run of R·S steps (same model, data, TRL settings, process "
                        "setup; medians of the interleaved runs, ratio = median of paired ratios)",
                        ["model", "params", "R × S", "plain s", "federated s", "ratio", "ratio implied by overhead",
                         "federated + gc.freeze s", "ratio", "plain steps/s", "overhead per round s"])
    items_table = Table("Federated overhead per round, itemised (seconds, median of runs)", ["model", *OVERHEAD_ITEMS])
    targets: list[Target] = []
    raw: dict[str, Any] = {}
    try:
        models = build_models(directory, {c.build for c in cases})
        data = write_demo_data(directory / "data", num_clients=1, rows_per_client=256)[0]
        for case in cases:
            case_dir = directory / f"runs-{case.build}"
            case_dir.mkdir()
            payload = {"model": str(models[case.build]), "data": str(data), "batch_size": case.batch_size,
                       "rounds": case.rounds, "steps": case.steps, "seq_length": case.seq_length,
                       "poll_interval": poll_interval, "repeat": repeat, "freeze": not quick,
                       "workdir": str(case_dir)}
            result = _subprocess(payload)
            raw[case.label] = result
            runs = result["runs"]
            plain_s = statistics.median(r["plain"]["total"] for r in runs)
            fed_s = statistics.median(r["federated"]["window"] for r in runs)
            ratio = statistics.median(r["federated"]["window"] / r["plain"]["total"] for r in runs)
            per_round = [{name: value / case.rounds for name, value in itemise(r["federated"]).items()} for r in runs]
            items = {name: statistics.median(p[name] for p in per_round) for name in OVERHEAD_ITEMS}
            overhead = sum(items.values())
            # The ratio the itemised overhead implies, free of the step-time noise both runs share: the plain
            # run's steps (without its one trainer init and teardown) plus R rounds of overhead, over the plain run.
            plain_steps = statistics.median(r["plain"]["totals"].get("train", 0.0)
                                            - r["plain"]["totals"].get("train teardown", 0.0) for r in runs)
            implied = (plain_steps + case.rounds * overhead) / plain_s
            freeze = result["freeze"]
            freeze_ratio = freeze["window"] / plain_s if freeze else float("nan")
            params = model_parameters(models[case.build])
            ratio_table.rows.append([case.label, f"{params / 1e6:.1f}M", f"{case.rounds} × {case.steps}", plain_s,
                                     fed_s, ratio, implied, freeze["window"] if freeze else float("nan"),
                                     freeze_ratio, case.rounds * case.steps / plain_steps, overhead])
            items_table.rows.append([case.label, *[items[name] for name in OVERHEAD_ITEMS]])
            freeze_text = f"; with gc.freeze {freeze_ratio:.2f}×" if freeze else ""
            targets.append(Target(f"client time ratio, {case.label}", f"≤ {RATIO_TARGET}× plain TRL",
                                  f"{ratio:.2f}× (implied by the itemised overhead {implied:.2f}×{freeze_text})",
                                  None if quick else ratio <= RATIO_TARGET))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    notes = [
        "federated s = from the start of the client's first round to the end of its last upload (model loading, "
        "joining and saving the final adapter excluded), so it includes the polls and waits between rounds while "
        "the server aggregates. plain s = building one trainer + R·S steps (one train() call). Each model's runs "
        "share one fresh process; plain and federated alternate, each against a fresh server. 'ratio implied by "
        "overhead' = (the plain run's steps + R × the itemised overhead per round) / plain s: the same comparison "
        "without the step-time noise of a shared machine, which moved identical runs by ±25% here.",
        f"Training uses {TRAIN_THREADS} torch thread (OMP_NUM_THREADS) in both: with two intra-op threads on these "
        "two shared cores, identical runs varied up to 5× with the other load on the machine.",
        f"The client polls with --poll_interval {poll_interval:g}; after its upload it waits about that long to "
        "see the next round (the default, 2 s, is noise next to a real model's minutes of training, not here).",
        "trainer init = a new TRL trainer each round (the round's learning rate and seed); train teardown = "
        "accelerate's free_memory() at the end of every Trainer.train(), a full gc.collect() over every Python "
        "object of torch/transformers/TRL (~0.25 s here), paid once by the plain run and every round by a client.",
        "'federated + gc.freeze' is an experiment of this harness (gc.freeze() once LocalTrainer is built, so "
        "those collections skip the long-lived objects); it is not in the library.",
    ]
    return write_results(NAME, TITLE, out_dir, quick=quick,
                         params={"cases": [c.__dict__ for c in cases], "repeat": repeat,
                                 "poll_interval": poll_interval, "train_threads": TRAIN_THREADS},
                         tables=[ratio_table, items_table], targets=targets, notes=notes, data=raw)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--model-process", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model_process:
        import logging

        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(model_process(json.loads(args.model_process))))
        return
    run(args.out, quick=args.quick)
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
