#!/usr/bin/env python
"""Compressed updates and FedKSeed: bytes, held-out loss and codec throughput, as ratios within one run.

1. On Dolly-15k split into 10 non-IID clients (``../shared/datasets/dolly15k_fed10``) with the offline tiny
   Llama, ``simulate`` (the server's and the client's own code in one process) runs the same schedule with
   float32 FedAvg (the baseline), bf16, int8, nf4, top-k 1% and 10% (each lossy codec with error feedback)
   and FedKSeed; every final model is evaluated on the held-out ``global_test.json`` (loss on response
   tokens). Bytes per client per round: the upload body (as the server counts it) and the served global file.
2. Encode and decode throughput of each codec at the Llama-2-7B r=16 q,v adapter size (8.4M parameters) against
   the bf16 path (``fedllm.wire.encode`` to bfloat16 / read back to float32), on the same random delta.
3. Bytes one client moves per round, up (its update body) and down (the served global: dense, or with a quantizer
   the compressed global of ``GET /v1/global?encoding=compressed``), from the real encoders, at the tiny
   Llama's adapter and at the 7B r=16 q,v shapes (random tensors: sizes do not depend on the values).

    nice -n 10 python -m bench.compression           # a few minutes on 2 shared CPU cores
    python -m bench.compression --quick              # small sizes, 2 rounds (seconds to a minute)

Results: ``bench/results/compression.{json,md}``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    MB,
    QV_7B,
    QV_QUICK,
    ROOT,
    Table,
    Target,
    benchmark_main,
    interleaved,
    random_adapter,
    ratio,
    write_results,
)

NAME = "compression"
TITLE = "Compressed updates and FedKSeed: bytes and held-out loss vs float32 FedAvg; codec throughput vs bf16"
DOLLY = ROOT.parent / "shared" / "datasets" / "dolly15k_fed10"
# setting -> federation overrides
SETTINGS: dict[str, dict[str, Any]] = {
    "float32 FedAvg": {},
    "bf16": {"wire_dtype": "bfloat16"},
    "int8 + EF": {"update_compression": "int8"},
    "nf4 + EF": {"update_compression": "nf4"},
    "top-k 10% + EF": {"update_compression": "topk", "topk_fraction": 0.1},
    "top-k 1% + EF": {"update_compression": "topk", "topk_fraction": 0.01},
    "FedKSeed (K=4096)": {"fed_alg": "fedkseed", "learning_rate": 1e-3},
}


# ---------------------------------------------------------------------------------------------- throughput
def throughput(quick: bool) -> tuple[Table, dict[str, Any]]:
    import torch
    from safetensors.torch import load

    from fedllm.compression.codecs import get_codec
    from fedllm.compression.updates import compress_with_feedback, encode_body, unpack
    from fedllm.threads import torch_threads
    from fedllm.wire import encode

    size = QV_QUICK if quick else QV_7B
    spec = size.spec()
    delta = random_adapter(spec, seed=0)
    settings = {"int8": ("int8", 0.01), "nf4": ("nf4", 0.01), "fp4": ("fp4", 0.01), "topk 1%": ("topk", 0.01),
                "topk 10%": ("topk", 0.1)}
    bodies: dict[str, bytes] = {"bf16": encode(delta, "bfloat16")}
    codecs = {}
    cases = {"bf16 encode": lambda: encode(delta, "bfloat16"),
             "bf16 decode": lambda: {k: v.to(torch.float32) for k, v in load(bodies["bf16"]).items()}}
    for label, (name, fraction) in settings.items():
        codec = get_codec(type("C", (), {"update_compression": name, "compression_block_size": 128,
                                         "topk_fraction": fraction}))
        codecs[label] = codec
        bodies[label] = encode_body(codec, compress_with_feedback(codec, delta, {}, "float32")[0], {})

        def encode_case(codec=codec) -> bytes:
            return encode_body(codec, compress_with_feedback(codec, delta, {}, "float32")[0], {})

        def decode_case(label=label, codec=codec) -> dict[str, Any]:
            return unpack(codec, load(bodies[label]), spec, "float32")

        cases[f"{label} encode"] = encode_case
        cases[f"{label} decode"] = decode_case
    with torch_threads(1):  # the server aggregates on one thread; clients encode on theirs
        times = interleaved(cases, repeat=2 if quick else 3)
    best = {name: min(t) for name, t in times.items()}
    fp32 = size.fp32_bytes
    table = Table(f"Codec throughput at {size.label} ({size.num_params / 1e6:.1f}M parameters, one thread; "
                  "encode includes error feedback's decode)",
                  ["codec", "body MB", "bytes vs fp32", "encode MB/s", "encode vs bf16", "decode MB/s",
                   "decode vs bf16"])
    for label in ["bf16", *settings]:
        enc, dec = best[f"{label} encode"], best[f"{label} decode"]
        table.rows.append([label, len(bodies[label]) / MB, len(bodies[label]) / fp32, fp32 / MB / enc,
                           ratio(best["bf16 encode"], enc), fp32 / MB / dec, ratio(best["bf16 decode"], dec)])
    return table, {"seconds": best, "body_bytes": {k: len(v) for k, v in bodies.items()}, "fp32_bytes": fp32}


# ---------------------------------------------------------------------------------------------- bytes per round
def bytes_per_round(quick: bool) -> tuple[Table, dict[str, Any]]:
    from fedllm.adapter import adapter_spec, build_lora_config, load_model_config
    from fedllm.compression.codecs import get_codec
    from fedllm.compression.updates import compress_with_feedback, encode_body, encode_global
    from fedllm.config import FederationArguments
    from fedllm.tiny import build_tiny_llama
    from fedllm.wire import encode

    work = Path(tempfile.mkdtemp(prefix="fedllm-bytes-"))
    try:
        model = build_tiny_llama(work / "tiny-llama", seed=0)
        defaults = FederationArguments(model_name_or_path=str(model))
        model_config = load_model_config(str(model))
        tiny = adapter_spec(model_config, build_lora_config(
            model_config, r=defaults.peft_lora_r, alpha=defaults.peft_lora_alpha, dropout=defaults.peft_lora_dropout,
            target_modules=defaults.target_module_list(), base_model_name_or_path=str(model)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = QV_QUICK if quick else QV_7B
    shapes = {f"tiny Llama r{defaults.peft_lora_r}": tiny, size.label: size.spec()}
    table = Table("Bytes per client per round: up = the update body, down = the served global (a quantizer's is the "
                  "compressed global, ?encoding=compressed); block size 128", ["adapter", "encoding", "up bytes",
                                                                              "down bytes", "up vs float32",
                                                                              "down vs float32"])
    data: dict[str, Any] = {}
    for label, spec in shapes.items():
        delta, adapter = random_adapter(spec, seed=0), random_adapter(spec, seed=1, scale=1e-2)
        measured = {"float32": (len(encode(delta, "float32")), len(encode(adapter, "float32"))),
                    "bf16": (len(encode(delta, "bfloat16")), len(encode(adapter, "bfloat16")))}
        for name in ("int8", "nf4", "fp4"):
            codec = get_codec(type("C", (), {"update_compression": name, "compression_block_size": 128,
                                             "topk_fraction": 0.01}))
            up = encode_body(codec, compress_with_feedback(codec, delta, {}, "float32")[0], {})
            measured[name] = (len(up), len(encode_global(codec, adapter)))
        up32, down32 = measured["float32"]
        for name, (up, down) in measured.items():
            table.rows.append([label, name, up, down, up / up32, down / down32])
        data[label] = measured
    return table, data


# ---------------------------------------------------------------------------------------------- the federations
def federations(out_dir: Path, quick: bool) -> tuple[Table, list[Target], dict[str, Any]] | None:
    import datasets

    from fedllm.config import FederationArguments, SimulatedClientArguments, SimulationArguments
    from fedllm.evaluation import Evaluator, load_examples
    from fedllm.export import load_adapter_dir
    from fedllm.simulation import run_simulation
    from fedllm.tiny import build_tiny_llama

    if not DOLLY.is_dir():
        return None
    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="fedllm-compression-"))
    model = str(build_tiny_llama(work / "tiny-llama", seed=0))
    rounds, steps = (2, 2) if quick else (6, 5)
    runs: dict[str, dict[str, Any]] = {}
    for label, overrides in SETTINGS.items():
        print(f"--- {label}", flush=True)
        started = time.time()
        settings = dict(model_name_or_path=model, num_clients=10, sample_clients=2, num_rounds=rounds,
                        max_steps=steps, learning_rate=2e-2, seq_length=256, seed=2023, save_model_freq=0)
        federation = FederationArguments(**{**settings, **overrides})
        client = SimulatedClientArguments(dataset_sample=40 if quick else 100, batch_size=8, quiet=True)
        folder = work / label.split()[0].replace("%", "")
        if "top-k" in label:
            folder = work / ("topk" + label.split()[1].rstrip("%"))
        sim = SimulationArguments(client_data=str(DOLLY), output_dir=str(folder), client_seed=2023)
        result = run_simulation(federation, client, sim)
        history = result.history["global"]
        served = max((folder / "state" / "globals").glob("v*[0-9].safetensors"))
        if served.with_suffix(".compressed.safetensors").is_file():  # a quantizer: clients download this one
            served = served.with_suffix(".compressed.safetensors")
        runs[label] = {"history": history, "adapter": result.adapters["global"], "seconds": time.time() - started,
                       "global_bytes": served.stat().st_size, "fedkseed": overrides.get("fed_alg") == "fedkseed"}

    lora = next(load_adapter_dir(r["adapter"]).lora_config for r in runs.values() if not r["fedkseed"])
    evaluator = Evaluator(model, lora_config=lora, device="cpu")
    examples = load_examples(str(DOLLY / "global_test.json"), tokenizer=evaluator.tokenizer, template="alpaca")

    def held_out() -> float:
        return evaluator.loss(examples, seq_length=256, batch_size=8, progress=False)["loss"]

    for run in runs.values():
        run["loss"] = fedkseed_loss(evaluator, run["adapter"], held_out) if run["fedkseed"] else \
            adapter_loss(evaluator, run["adapter"], held_out)
    base = runs["float32 FedAvg"]
    table = Table(f"Dolly-15k, 10 non-IID clients, 2 per round, {rounds} rounds x {steps} steps, tiny Llama: "
                  "bytes and held-out loss", ["setting", "up KB / client / round", "down KB / client / round",
                                              "total MB (run)", "bytes vs float32", "held-out loss",
                                              "loss vs float32", "seconds"])
    for run in runs.values():
        history = run["history"]
        up = sum(h["bytes_received"] for h in history) / sum(len(h["participants"]) for h in history)
        total = sum(h["bytes_received"] + len(h["participants"]) * run["global_bytes"] for h in history)
        run.update(up=up, total=total)
    for label, run in runs.items():
        table.rows.append([label, run["up"] / 1e3, run["global_bytes"] / 1e3, run["total"] / MB,
                           run["total"] / base["total"], run["loss"], run["loss"] / base["loss"], run["seconds"]])
    int8, kseed = runs["int8 + EF"], runs["FedKSeed (K=4096)"]
    kseed_per_round = kseed["up"] + kseed["global_bytes"]
    kseed_losses = [h["train_loss"] for h in kseed["history"]]
    targets = [
        Target("int8 + EF loss within 1% of float32", "within ±1%", f"{100 * (int8['loss'] / base['loss'] - 1):+.2f}%",
               None if quick else abs(int8["loss"] / base["loss"] - 1) <= 0.01),
        Target("int8 + EF upload bytes <= 26% of float32, tiny Llama (4,096 entries: the header counts)",
               "<= 0.26", f"{int8['up'] / base['up']:.3f}", None if quick else int8["up"] / base["up"] <= 0.26),
        Target("FedKSeed bytes per client per round (up + down)", "< 20 KB", f"{kseed_per_round / 1e3:.1f} KB",
               kseed_per_round < 20_000),
        Target("FedKSeed train loss falls over rounds", "last round < first", " → ".join(f"{v:.3f}" for v in kseed_losses),
               None if quick else kseed_losses[-1] < kseed_losses[0]),
    ]
    data = {label: {k: v for k, v in run.items() if k != "adapter"} for label, run in runs.items()}
    shutil.rmtree(work, ignore_errors=True)
    return table, targets, data


def adapter_loss(evaluator: Any, adapter: Path, held_out: Any) -> float:
    from fedllm.export import load_adapter_dir

    evaluator.set_adapter(load_adapter_dir(adapter).tensors)
    return held_out()


def fedkseed_loss(evaluator: Any, export: Path, held_out: Any) -> float:
    """The held-out loss of the base model rebuilt from a FedKSeed export's scalars (bench.fedkseed.kseed_loss)."""
    from safetensors.torch import load_file

    from bench.fedkseed import kseed_loss
    from fedllm.server.versions import GLOBAL_EXPORT_FILE

    return kseed_loss(evaluator, load_file(str(Path(export) / GLOBAL_EXPORT_FILE)), held_out)


def run(out_dir: Path, quick: bool = False) -> bool:
    started = time.time()
    speed, speed_data = throughput(quick)
    sizes, sizes_data = bytes_per_round(quick)
    tables, targets, data = [speed, sizes], [], {"throughput": speed_data, "bytes_per_round": sizes_data}
    notes = ["EF = error feedback: each client adds its last residual to the next delta (fedllm/compression).",
             "down = the served global file, the compressed one for int8/nf4 (the simulation's clients train from it "
             "decoded, as HTTP clients do; a client over HTTP downloads it once a round it is sampled). FedKSeed's global is K = 4096 float32 scalars plus the pool seed and a probe.",
             "FedKSeed tunes every parameter of the tiny Llama with two forward passes a step (no gradients) at "
             "learning rate 1e-3; the LoRA codecs train rank-8 LoRA with TRL at 2e-2, so its loss compares "
             "different methods at equal rounds and steps, not equal compute; 5 zeroth-order steps barely move "
             "it. bench/fedkseed.py runs the schedule under which FedKSeed's held-out loss falls round after round "
             "(hundreds of steps at seq 512)."]
    int8_bytes = speed_data["body_bytes"]["int8"] / speed_data["fp32_bytes"]
    targets.append(Target("int8 upload bytes <= 26% of float32 at the 7B r16 q,v size", "<= 0.26", f"{int8_bytes:.3f}",
                          None if quick else int8_bytes <= 0.26))
    federated = federations(out_dir, quick)
    if federated is None:
        notes.append(f"{DOLLY} is absent: the federation table was skipped.")
    else:
        table, run_targets, runs = federated
        tables.insert(0, table)
        targets += run_targets
        data["runs"] = runs
    notes.append(f"{time.time() - started:.0f} s in all; loss is cross-entropy on response tokens of the 80 "
                 "held-out global_test.json examples.")
    write_results(NAME, TITLE, out_dir, quick=quick, params={"quick": quick}, tables=tables, targets=targets,
                  notes=notes, data=data)
    return True


if __name__ == "__main__":
    benchmark_main(NAME, __doc__, run)
