"""The Ray backend: a round's sampled clients trained in parallel on Ray actors vs one after another in-process.

For K = 1, 2, 4, 8 clients per round (all sampled), the tiny offline Llama (``fedllm.tiny``) runs the same
simulation (FedAvg, R rounds of S steps) in-process and with ``--backend ray`` on a local Ray instance of this
machine's cores (one worker per core, at most K), both on one torch thread per client so that they compute the
same sums; the final adapters are compared bit for bit. Cases are interleaved (in-process, ray, per K) and
repeated; the ratio is the median of the per-repetition ratios of the steady round time (rounds 2..R: round 1
also tokenises every client's data). Ray's own start (once) and each run's actor start (every worker imports
torch/transformers/TRL and loads the base model) are reported apart.

    python -m bench.ray_backend            # ~10 minutes on 2 shared cores
    python -m bench.ray_backend --quick    # K = 1, 2, one repetition
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR, Table, Target, benchmark_main, ratio, write_results

NAME = "ray_backend"
TITLE = "Ray backend: a round's clients in parallel on Ray actors vs one after another in-process"
THREADS = 1  # torch threads per client, both backends: the same sums, the same bits


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {"clients": [1, 2], "rounds": 2, "steps": 1, "repeat": 1}
    return {"clients": [1, 2, 4, 8], "rounds": 3, "steps": 4, "repeat": 2}


def simulate(model: Path, data: Path, output_dir: Path, clients: int, rounds: int, steps: int,
             backend: str) -> dict[str, Any]:
    """One simulation; its wall time, the seconds of each round and of each client's training in it, and the final
    adapter's tensors."""
    from safetensors.torch import load_file

    from fedllm.config import FederationArguments, SimulatedClientArguments, SimulationArguments
    from fedllm.simulation import run_simulation

    started = time.perf_counter()
    finished: list[float] = []
    result = run_simulation(
        FederationArguments(model_name_or_path=str(model), num_clients=clients, sample_clients=clients,
                            num_rounds=rounds, max_steps=steps, learning_rate=0.01, peft_lora_r=8, peft_lora_alpha=16,
                            seq_length=128, seed=3, save_model_freq=0),
        SimulatedClientArguments(batch_size=4, quiet=True),
        SimulationArguments(client_data=str(data), output_dir=str(output_dir), backend=backend,
                            num_cpus_per_client=THREADS),
        on_round=lambda name, record: finished.append(time.perf_counter()))
    wall = time.perf_counter() - started
    history = result.history["global"]
    return {"wall_s": wall, "round_s": [h["seconds"] for h in history],
            "client_s": [[m["seconds"] for m in h["metrics"].values()] for h in history],
            "first_round_end_s": finished[0] - started,
            "adapter": load_file(str(result.adapters["global"] / "adapter_model.safetensors"))}


def run(out_dir: Path = RESULTS_DIR, quick: bool = False) -> dict[str, Any]:
    import torch

    from fedllm.data.demo import write_demo_data
    from fedllm.ray_backend import start_ray
    from fedllm.tiny import build_tiny_llama

    settings = plan(quick)
    cores = os.cpu_count() or 1
    directory = Path(tempfile.mkdtemp(prefix="fedllm-bench-ray-"))
    raw: dict[str, Any] = {"runs": []}
    try:
        model = build_tiny_llama(directory / "tiny-llama", seed=0)
        data = {k: write_demo_data(directory / f"data-{k}", num_clients=k, rows_per_client=32, seed=k)[0].parent
                for k in settings["clients"]}
        started = time.perf_counter()
        start_ray()  # once for every Ray run: each run then starts its own actors
        import ray

        ray_start_s = time.perf_counter() - started
        raw["ray_start_s"] = ray_start_s
        raw["ray_cpus"] = ray.cluster_resources().get("CPU", 0)
        runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for repetition in range(settings["repeat"]):
            for k in settings["clients"]:
                for backend in ("inprocess", "ray"):
                    out = directory / f"run-{repetition}-{k}-{backend}"
                    measured = simulate(model, data[k], out, k, settings["rounds"], settings["steps"], backend)
                    shutil.rmtree(out, ignore_errors=True)
                    runs.setdefault((k, backend), []).append(measured)
                    raw["runs"].append({"repetition": repetition, "clients": k, "backend": backend,
                                        **{key: v for key, v in measured.items() if key != "adapter"}})
        ray.shutdown()
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    def steady(measured: dict[str, Any]) -> float:
        later = measured["round_s"][1:] or measured["round_s"]
        return statistics.median(later)

    def client(measured: dict[str, Any]) -> float:
        """A client's training (LocalTrainer.train_round) in rounds 2..R."""
        return statistics.median(t for ts in measured["client_s"][1:] or measured["client_s"] for t in ts)

    def concurrency(measured: dict[str, Any]) -> float:
        """Clients training at once: their seconds added up over the round's."""
        rounds = list(zip(measured["round_s"], measured["client_s"], strict=True))[1:]
        return statistics.median(sum(ts) / r for r, ts in rounds)

    def setup(measured: dict[str, Any]) -> float:
        """From the call to round 1 opening: the model load here, or the workers' start (each loads it) on Ray."""
        return measured["first_round_end_s"] - measured["round_s"][0]

    table = Table(f"Round time, K clients per round, tiny Llama (R={settings['rounds']} rounds × S={settings['steps']} "
                  f"steps, batch 4, seq 128, LoRA r8; {THREADS} torch thread per client; medians of "
                  f"{settings['repeat']} interleaved repetitions)",
                  ["K", "ray workers", "in-process round s", "ray round s", "ray / in-process", "speedup",
                   "in-process client s", "ray client s", "ray concurrency", "in-process setup s", "ray setup s",
                   "identical"])
    identical_everywhere = True
    speedups: dict[int, float] = {}
    for k in settings["clients"]:
        base, case = runs[(k, "inprocess")], runs[(k, "ray")]
        workers = min(k, int(raw["ray_cpus"] // THREADS))
        ratios = [ratio(steady(c), steady(b)) for b, c in zip(base, case, strict=True)]
        identical = all(all(torch.equal(c["adapter"][n], b["adapter"][n]) for n in b["adapter"])
                        for b, c in zip(base, case, strict=True))
        identical_everywhere &= identical
        median_ratio = statistics.median(ratios)
        speedups[k] = 1 / median_ratio
        table.rows.append([k, workers, statistics.median(steady(b) for b in base),
                           statistics.median(steady(c) for c in case), median_ratio, 1 / median_ratio,
                           statistics.median(client(b) for b in base), statistics.median(client(c) for c in case),
                           statistics.median(concurrency(c) for c in case), statistics.median(setup(b) for b in base),
                           statistics.median(setup(c) for c in case), identical])
    four = speedups.get(4, speedups[max(speedups)])
    targets = [
        Target("identical results", "ray's final adapter = in-process, bit for bit, at every K",
               "identical" if identical_everywhere else "different", identical_everywhere),
        Target("4-client round, 2 workers", "faster than in-process (speedup > 1)",
               f"{four:.2f}× ({'K=4' if 4 in speedups else f'K={max(speedups)}'})", None if quick else four > 1),
    ]
    notes = [
        f"Ray: a local instance on 127.0.0.1 with this machine's {raw['ray_cpus']:g} CPUs, started once in "
        f"{ray_start_s:.1f} s; each Ray run starts min(K, CPUs) workers of --num_cpus_per_client {THREADS}, and each "
        "worker imports torch/transformers/TRL and loads the base model: 'setup' is the time from the call to "
        "round 1 opening (in-process: loading the model in this process, whose imports are warm).",
        "round s = the history's seconds of rounds 2..R (round 1 also tokenises each client's data); speedup = "
        "in-process / ray; client s = one client's LocalTrainer.train_round (median); ray concurrency = the "
        "clients' seconds of a round added up, over the round's seconds (how many trained at once).",
        "What to expect with more cores or GPUs: a round of K clients on W workers takes about ceil(K / W) × one "
        "client's round plus a fixed cost per round (handing every update over and aggregating, in the driver), "
        "so the speedup grows with W until K / W is 1, as long as each worker has its own cores or GPU. Here "
        "the two workers do train at once (concurrency ~2), but on two cores already shared with other jobs "
        "(the load average), so each client trains about half as fast as alone and the round takes as long.",
    ]
    return write_results(NAME, TITLE, out_dir, quick=quick,
                         params={**settings, "threads_per_client": THREADS, "cores": cores}, tables=[table],
                         targets=targets, notes=notes, data=raw)


def main(argv: list[str] | None = None) -> None:
    benchmark_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
