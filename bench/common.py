"""Shared helpers of the benchmarks: real adapter shapes, timing, memory, servers, result files.

Every benchmark reports ratios against a baseline measured in the same run, because the
machines these run on are shared and absolute timings are noisy.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedllm.localserver import LocalServer

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
MiB = 1 << 20
MB = 1_000_000

# Llama-2-7B: the shapes the LoRA adapters of the benchmarks have.
LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}
QV_MODULES = ("q_proj", "v_proj")
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})


@dataclass(frozen=True)
class AdapterSize:
    """One LoRA adapter shape of a Llama model: its label, target modules and rank."""

    label: str
    modules: tuple[str, ...]
    rank: int = 16
    layers: int = LLAMA2_7B["num_hidden_layers"]
    hidden: int = LLAMA2_7B["hidden_size"]
    intermediate: int = LLAMA2_7B["intermediate_size"]

    def spec(self) -> dict[str, tuple[int, int]]:
        """PEFT tensor names and shapes, exactly as ``get_peft_model_state_dict`` names them."""
        return lora_spec(self.modules, rank=self.rank, layers=self.layers, hidden=self.hidden,
                         intermediate=self.intermediate)

    @property
    def num_params(self) -> int:
        return sum(a * b for a, b in self.spec().values())

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.num_params

    @property
    def target_modules(self) -> str:
        return ",".join(self.modules)


# The two real sizes: Llama-2-7B, r=16 on q_proj,v_proj (8.4M parameters, 32 MiB fp32) and on all seven
# linear layers (40M parameters, 160 MB fp32).
QV_7B = AdapterSize("7B r16 q,v", QV_MODULES)
ALL_7B = AdapterSize("7B r16 all-linear", ALL_MODULES)
# --quick: the same names and structure, two layers of a 512-wide model.
QV_QUICK = AdapterSize("quick r16 q,v", QV_MODULES, layers=2, hidden=512, intermediate=1376)
ALL_QUICK = AdapterSize("quick r16 all-linear", ALL_MODULES, layers=2, hidden=512, intermediate=1376)


def lora_spec(modules: Sequence[str], *, rank: int, layers: int, hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """Names and shapes of a Llama LoRA adapter (lora_A is ``r × in``, lora_B is ``out × r``)."""
    features = {m: (hidden, hidden) for m in ATTENTION_MODULES}
    features.update({"gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
                     "down_proj": (intermediate, hidden)})
    spec: dict[str, tuple[int, int]] = {}
    for layer in range(layers):
        for module in modules:
            block = "self_attn" if module in ATTENTION_MODULES else "mlp"
            in_features, out_features = features[module]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            spec[f"{prefix}.lora_A.weight"] = (rank, in_features)
            spec[f"{prefix}.lora_B.weight"] = (out_features, rank)
    return spec


def write_llama_config(directory: Path, size: AdapterSize) -> Path:
    """A Llama ``config.json`` (no weights) with the hidden sizes of ``size``: all the server reads."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=LLAMA2_7B["num_attention_heads"] if size.hidden == 4096 else 8,
        num_key_value_heads=LLAMA2_7B["num_key_value_heads"] if size.hidden == 4096 else 8,
        vocab_size=LLAMA2_7B["vocab_size"] if size.hidden == 4096 else 1024,
    )
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    return directory


def random_adapter(spec: Mapping[str, tuple[int, ...]], seed: int, scale: float = 1e-3):
    """Random fp32 tensors of ``spec`` (a stand-in for a trained delta)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * scale for name, shape in spec.items()}


# ---------------------------------------------------------------------------------------------- timing
def interleaved(cases: Mapping[str, Callable[[], Any]], repeat: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every case once per repetition, in turn, so all see the same machine noise; seconds per run."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def summary(times: Sequence[float]) -> dict[str, float]:
    return {"best_s": min(times), "median_s": statistics.median(times), "runs": len(times)}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---------------------------------------------------------------------------------------------- memory
def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in bytes (Linux /proc)."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# The demo's, the tests' and the benchmarks' one server launcher.
ServerProcess = LocalServer


def server_args(model_dir: Path, state_dir: Path, size: AdapterSize, **overrides: Any) -> list[str]:
    """Command-line options of ``run_server.sh`` for a federation over ``size``'s adapter."""
    options: dict[str, Any] = {
        "rate_limit": 0,  # hundreds of simulated clients share 127.0.0.1, the open server's rate-limit key
        "model_name_or_path": model_dir,
        "state_dir": state_dir,
        "target_modules": size.target_modules,
        "peft_lora_r": size.rank,
        "peft_lora_alpha": 2 * size.rank,
        "fed_alg": "fedavg",
        "round_timeout": 0,
        "log_level": "WARNING",
        **overrides,
    }
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Target:
    """One target of a benchmark: what it asks, what was measured, whether it is met."""

    name: str
    goal: str
    measured: str
    met: bool | None  # None: not applicable in this run (e.g. --quick)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return str(value)


def machine() -> dict[str, Any]:
    """What the numbers were measured on (the load average says how shared the machine was)."""
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = 0
    try:
        memory = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        pass
    import torch

    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(memory / (1 << 30), 1),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def write_results(name: str, title: str, out_dir: Path, *, quick: bool, params: Mapping[str, Any],
                  tables: Sequence[Table], targets: Sequence[Target], notes: Sequence[str] = (),
                  data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out_dir/NAME.json`` and ``out_dir/NAME.md``; return the JSON document."""
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "title": title,
        "quick": quick,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "params": dict(params),
        "targets": [asdict(t) for t in targets],
        "tables": [asdict(t) for t in tables],
        "notes": list(notes),
        "data": dict(data or {}),
    }
    (out_dir / f"{name}.json").write_text(json.dumps(document, indent=2, default=str))
    (out_dir / f"{name}.md").write_text(markdown(document))
    return document


def markdown(document: Mapping[str, Any]) -> str:
    m = document["machine"]
    parts = [
        f"### {document['title']}",
        "",
        f"_{m['cpus']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, shared (load average "
        f"{m['load_average'][0]:.1f} at the end); torch {m['torch']}{', --quick sizes' if document['quick'] else ''}._",
        "",
    ]
    for table in document["tables"]:
        parts += [Table(**table).markdown(), ""]
    if document["targets"]:
        targets = Table("Targets", ["target", "goal", "measured", "met"])
        for t in document["targets"]:
            met = "n/a (quick)" if t["met"] is None else ("yes" if t["met"] else "**no**")
            targets.rows.append([t["name"], t["goal"], t["measured"], met])
        parts += [targets.markdown(), ""]
    parts += [f"- {note}" for note in document["notes"]]
    return "\n".join(parts).rstrip() + "\n"


def run_json_subprocess(module: str, payload: Mapping[str, Any], timeout: float = 900.0) -> dict[str, Any]:
    """Run ``python -m MODULE`` in a fresh process with a JSON payload on stdin; its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", module], input=json.dumps(payload), capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{module} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline > 0 else float("nan")


def run_forked(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a forked child; its (picklable) result comes back through a pipe.

    A fresh child per measurement gives clean peak-RSS numbers without paying the imports again.
    Fork only from a process that has not started torch's thread pool or other threads.
    """
    import pickle
    import traceback

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_fd)
        status = 0
        try:
            payload = pickle.dumps(("ok", fn(*args)))
        except BaseException:
            payload = pickle.dumps(("error", traceback.format_exc()))
            status = 1
        with os.fdopen(write_fd, "wb") as out:
            out.write(payload)
        os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as source:
        data = source.read()
    os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} died without a result")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in a forked child:\n{value}")
    return value


def benchmark_main(name: str, description: str | None, run: Callable[..., Any], argv: list[str] | None = None) -> None:
    """The command line every benchmark module shares: ``--quick``, ``--out``; prints its markdown table."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if run(args.out, quick=args.quick):
        print((args.out / f"{name}.md").read_text())
