#!/usr/bin/env python
"""OpenFedLLM's finding, reproduced small: federated training vs each client alone vs all data pooled.

Two studies, one command each, every setting run by ``fedllm.simulation.run_simulation`` (``simulate.py``,
the deployment's own code) and scored by ``fedllm.evaluation.evaluate`` (``evaluate.py``):

* ``--study fpb`` -- Financial PhraseBank (50agree) in FinGPT's instruction form. A fixed held-out test split
  (``--test_size`` sentences, seed 42) that no client ever sees; the rest split into 10 clients by a
  Dirichlet(α) label skew over ``output`` (``fedllm.data.split``, seeded by the study seed), each client
  keeping ``--valid_fraction`` of its records aside as the validation split used by ``--tune``. Scored by
  accuracy and macro-F1 of the label word generated (``--metrics classification``).
* ``--study dolly`` -- Dolly-15k pre-split into 10 non-IID clients by category (FedIT's split,
  ``../shared/datasets/dolly15k_fed10``), ``--dataset_sample`` training examples per client (and 10 more per
  client as validation), scored by the loss on the response tokens of ``global_test.json``.

Rows: the base model, ``local`` (every client alone; mean, min and max over the 10), ``central`` (all training
clients pooled) and every algorithm in ``--algorithms``, with the same schedule: ``--num_rounds`` rounds of
``--max_steps`` local steps per trained client (``central`` trains ``--max_steps x --sample_clients`` steps a
round: the compute of one federated round). Each row is the mean ± std over ``--seeds``. The first seed's
runs also export every round's adapter, scored on ``--curve_examples`` test examples for the chart.

The base is the pretrained tiny Llama (``python -m fedllm.tiny --pretrain``, cached under ``bench/results``,
seed ``--base_seed``) or, with ``--base random``, the random one.

``--tune`` first chooses the server optimisers' hyperparameters by a grid (``TUNING_GRID``) on the validation
split of the training clients (never the test split), for the first seed and α = 0.5, and the study then uses
them; without it, FedOpt's and FedAvgM's values come from the command line (default: the algorithms' defaults).

    python bench/fl_vs_local.py --study fpb --tune         # the FPB table and chart
    python bench/fl_vs_local.py --study dolly --tune       # the Dolly table and chart
    python bench/fl_vs_local.py --study fpb --seeds 0 --alphas 0.5 --algorithms fedavg --num_rounds 2  # smoke

Writes ``bench/results/fl_vs_local_<study>.{json,md,png}`` (``--results_prefix``); the runs' state stays in
``--output_dir`` and a rerun with the same arguments reuses finished runs (``--overwrite`` starts over).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"

ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam",
              "fedmedian", "fedtrimmedavg", "krum")
FEDOPT = ("fedadagrad", "fedyogi", "fedadam")
# The grid --tune searches, per algorithm: every combination of these server hyperparameters.
TUNING_GRID: dict[str, dict[str, list[float]]] = {
    "fedavgm": {"server_lr": [0.5, 1.0], "server_momentum": [0.5, 0.9]},
    **{alg: {"fedopt_eta": [3e-3, 1e-2, 3e-2], "fedopt_tau": [1e-3, 1e-2]} for alg in FEDOPT},
}
LABELS = ("negative", "neutral", "positive")
# Study defaults: chosen so that the whole study fits well under an hour on 2 CPU cores.
STUDY_DEFAULTS: dict[str, dict[str, Any]] = {
    "fpb": dict(num_rounds=5, max_steps=20, sample_clients=3, batch_size=8, learning_rate=1e-2, seq_length=160,
                alphas="0.1,0.5,1.0", target_modules="q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj"),
    "dolly": dict(num_rounds=4, max_steps=10, sample_clients=3, batch_size=8, learning_rate=2e-2, seq_length=256,
                  alphas="", target_modules="q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj"),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=sorted(STUDY_DEFAULTS), default="dolly")
    parser.add_argument("--base", choices=("pretrained", "random"), default="pretrained")
    parser.add_argument("--base_seed", type=int, default=0, help="Seed of the (cached) pretrained base.")
    parser.add_argument("--model_name_or_path", default=None, help="Another base model (overrides --base).")
    parser.add_argument("--output_dir", default=None, help="Default: bench/results/fl_vs_local_<study>/.")
    parser.add_argument("--results_prefix", default=None, help="Default: bench/results/fl_vs_local_<study>.")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--baselines", default="local,central",
                        help="Which of the local and central rows to run (two processes may share the work: "
                             "each run's scores are kept in its folder, so a last run with every row only collects).")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--alphas", default=None, help="fpb: Dirichlet concentrations (default 0.1,0.5,1.0).")
    parser.add_argument("--full_alphas", default="0.5",
                        help="fpb: the alphas that run every algorithm over every seed; the others run "
                             "local, central and fedavg for the first seed only. 'all' for the full grid.")
    for name in ("num_rounds", "max_steps", "sample_clients", "batch_size", "seq_length"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--learning_rate", type=float, default=None)
    parser.add_argument("--target_modules", default=None)
    parser.add_argument("--fedopt_eta", type=float, default=None)
    parser.add_argument("--fedopt_tau", type=float, default=None)
    parser.add_argument("--server_lr", type=float, default=None)
    parser.add_argument("--server_momentum", type=float, default=None)
    parser.add_argument("--trim_ratio", type=float, default=0.34,
                        help="FedTrimmedAvg: 0.34 of 3 clients trims one at each end (the coordinate-wise median).")
    parser.add_argument("--krum_malicious", type=int, default=0, help="Krum's f (f = 0 allows 3 clients a round).")
    parser.add_argument("--tune", action="store_true", help="Choose the server optimisers' values on validation first.")
    parser.add_argument("--fpb_data", default=str(DATASETS / "financial_phrasebank" / "fpb_50agree_instruction.jsonl"))
    parser.add_argument("--dolly_data", default=str(DATASETS / "dolly15k_fed10"))
    parser.add_argument("--test_size", type=int, default=300, help="fpb: held-out test sentences.")
    parser.add_argument("--valid_fraction", type=float, default=0.1, help="fpb: share of each client kept for --tune.")
    parser.add_argument("--dataset_sample", type=int, default=200, help="dolly: training examples per client.")
    parser.add_argument("--curve_examples", type=int, default=None,
                        help="Test examples scored per round for the chart (first seed; default: all).")
    parser.add_argument("--overwrite", action="store_true", help="Delete earlier runs in --output_dir first.")
    args = parser.parse_args(argv)
    for key, value in STUDY_DEFAULTS[args.study].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.output_dir = args.output_dir or str(ROOT / "bench" / "results" / f"fl_vs_local_{args.study}")
    args.results_prefix = args.results_prefix or str(ROOT / "bench" / "results" / f"fl_vs_local_{args.study}")
    return args


# ---------------------------------------------------------------- data


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


def _hold_out(records: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    cut = round(len(records) * fraction) if len(records) > 1 else 0
    return [records[i] for i in order[cut:]], [records[i] for i in order[:cut]]


def prepare_fpb(args: argparse.Namespace, alpha: float, seed: int, folder: Path) -> dict[str, Any]:
    """test.jsonl (fixed for every seed and alpha), clients/client_N.jsonl and valid.jsonl for this split."""
    from fedllm.data.records import load_records
    from fedllm.data.split import split_records, summary_table, write_clients

    records = load_records(args.fpb_data)
    train, test = _hold_out(records, args.test_size / len(records), 42)
    clients = split_records(train, 10, "dirichlet", field="output", alpha=alpha, seed=seed)
    kept, valid = [], []
    for i, client in enumerate(clients):
        own, held = _hold_out(client, args.valid_fraction, seed * 100 + i)
        kept.append(own)
        valid += held
    write_clients(kept, folder / "clients")
    _write_jsonl(folder / "valid.jsonl", valid)
    _write_jsonl(folder / "test.jsonl", test)
    return {"clients": folder / "clients", "valid": folder / "valid.jsonl", "test": folder / "test.jsonl",
            "split": summary_table(kept, "output"), "client_sizes": [len(c) for c in kept]}


def prepare_dolly(args: argparse.Namespace, seed: int, folder: Path) -> dict[str, Any]:
    """Per client: ``--dataset_sample`` training records and 10 validation ones, drawn apart (seeded)."""
    from fedllm.data.records import load_records
    from fedllm.simulation import client_files

    kept, valid = [], []
    for i, path in enumerate(client_files(args.dolly_data)):
        records = load_records(str(path))
        order = list(range(len(records)))
        random.Random(seed * 100 + i).shuffle(order)
        kept.append([records[j] for j in order[: args.dataset_sample]])
        valid += [records[j] for j in order[args.dataset_sample : args.dataset_sample + 10]]
    from fedllm.data.split import summary_table, write_clients

    write_clients(kept, folder / "clients")
    _write_jsonl(folder / "valid.jsonl", valid)
    test = Path(args.dolly_data) / "global_test.json"
    return {"clients": folder / "clients", "valid": folder / "valid.jsonl", "test": test,
            "split": summary_table(kept, "category"), "client_sizes": [len(c) for c in kept]}


# ---------------------------------------------------------------- runs


def settings(args: argparse.Namespace, model: str, mode: str, fed_alg: str, client_data: Path, output_dir: Path,
             seed: int, overrides: dict[str, float], save_every_round: bool):
    from fedllm.config import FederationArguments, SimulatedClientArguments, SimulationArguments

    federation = FederationArguments(
        model_name_or_path=model, fed_alg=fed_alg, num_clients=10, sample_clients=args.sample_clients,
        num_rounds=args.num_rounds, max_steps=args.max_steps, learning_rate=args.learning_rate,
        seq_length=args.seq_length, template="chat", target_modules=args.target_modules, seed=seed,
        save_model_freq=1 if save_every_round else 0, trim_ratio=args.trim_ratio,
        krum_malicious=args.krum_malicious, **overrides,
    )
    client = SimulatedClientArguments(batch_size=args.batch_size, quiet=True)
    sim = SimulationArguments(client_data=str(client_data), mode=mode, output_dir=str(output_dir), client_seed=seed)
    return federation, client, sim


def server_overrides(args: argparse.Namespace, fed_alg: str, tuned: dict[str, dict[str, float]]) -> dict[str, float]:
    """The server hyperparameters of ``fed_alg``: tuned ones, else the command line's, else the defaults."""
    if fed_alg in tuned:
        return dict(tuned[fed_alg])
    names = {"fedavgm": ("server_lr", "server_momentum")}.get(fed_alg, ("fedopt_eta", "fedopt_tau")
                                                              if fed_alg in FEDOPT else ())
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


class Scorer:
    """One base model in memory; adapters swapped in (how evaluate.py scores one)."""

    def __init__(self, model: str, adapter: Path, study: str, args: argparse.Namespace):
        from fedllm.evaluation import Evaluator
        from fedllm.export import load_adapter_dir

        self.evaluator = Evaluator(model, lora_config=load_adapter_dir(adapter).lora_config, device="cpu")
        self.study, self.args = study, args
        self.cache: dict[str, Any] = {}

    def examples(self, source: Path, limit: int | None = None) -> list[Any]:
        from fedllm.evaluation import load_examples

        key = f"{source}:{limit}"
        if key not in self.cache:
            self.cache[key] = load_examples(str(source), tokenizer=self.evaluator.tokenizer, template="chat",
                                            max_samples=limit, seed=0)
        return self.cache[key]

    def score(self, adapter: Path | None, source: Path, limit: int | None = None,
              metrics: tuple[str, ...] | None = None) -> dict[str, float]:
        """accuracy, macro_f1 and the loss on the label tokens (fpb), or the loss (dolly), of ``adapter``
        (None: the base) on ``source``; ``metrics`` narrows them (``("loss",)`` skips generation)."""
        import contextlib

        from fedllm.evaluation import evaluate
        from fedllm.export import load_adapter_dir

        metrics = list(metrics or (("classification", "loss") if self.study == "fpb" else ("loss",)))
        context = contextlib.nullcontext()
        if adapter is None:
            context = self.evaluator.model.disable_adapter()
        else:
            self.evaluator.set_adapter(load_adapter_dir(adapter).tensors)
        with context:
            result = evaluate(self.evaluator, self.examples(source, limit), metrics, label_words=LABELS,
                              seq_length=self.args.seq_length, batch_size=32, max_new_tokens=5, progress=False)
        keep = ("accuracy", "macro_f1", "unparsed", "loss") if "classification" in metrics else ("loss",)
        return {k: float(result["metrics"][k]) for k in keep}


def main_metric(study: str) -> tuple[str, bool]:
    """The metric that ranks settings, and whether higher is better."""
    return ("macro_f1", True) if study == "fpb" else ("loss", False)


def run(args: argparse.Namespace, model: str, name: str, mode: str, fed_alg: str, data: dict[str, Any],
        run_dir: Path, seed: int, overrides: dict[str, float], curves: bool) -> tuple[Any, float]:
    from fedllm.simulation import run_simulation

    print(f"--- {run_dir.relative_to(Path(args.output_dir))}", flush=True)
    started = time.time()
    federation, client, sim = settings(args, model, mode, fed_alg, data["clients"], run_dir, seed, overrides,
                                       curves and mode != "local")
    return run_simulation(federation, client, sim, on_round=None), time.time() - started


def pretrained_base(args: argparse.Namespace) -> str:
    from fedllm.tiny import build_tiny_llama, pretrain_tiny_llama

    if args.model_name_or_path:
        return args.model_name_or_path
    results = ROOT / "bench" / "results"
    if args.base == "random":
        return str(build_tiny_llama(results / "tiny-llama-random", seed=args.base_seed))
    return str(pretrain_tiny_llama(results / f"tiny-llama-pretrained-seed{args.base_seed}", seed=args.base_seed))


def tune(args: argparse.Namespace, model: str, data: dict[str, Any], seed: int, scorer_box: list,
         algorithms: list[str]) -> dict[str, Any]:
    """Grid over TUNING_GRID on the validation split; returns the chosen values and every score."""
    metric, higher = main_metric(args.study)
    chosen: dict[str, dict[str, float]] = {}
    scores: dict[str, list[dict[str, Any]]] = {}
    for alg in algorithms:
        if alg not in TUNING_GRID:
            continue
        grid = TUNING_GRID[alg]
        scores[alg] = []
        for values in itertools.product(*grid.values()):
            overrides = dict(zip(grid, values, strict=True))
            tag = "_".join(f"{k}{v:g}" for k, v in overrides.items())
            result, _ = run(args, model, alg, "federated", alg, data, Path(args.output_dir) / "tune" / f"{alg}_{tag}",
                            seed, overrides, curves=False)
            adapter = result.adapters["global"]
            if not scorer_box:
                scorer_box.append(Scorer(model, adapter, args.study, args))
            score = scorer_box[0].score(adapter, data["valid"])
            scores[alg].append({**overrides, **score})
        best = (max if higher else min)(scores[alg], key=lambda s: s[metric])
        chosen[alg] = {k: best[k] for k in grid}
    return {"chosen": chosen, "scores": scores, "metric": metric, "grid": TUNING_GRID, "seed": seed}


def summarize(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import datasets

    datasets.disable_progress_bars()
    started = time.time()
    output_dir = Path(args.output_dir)
    if args.overwrite:
        shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = pretrained_base(args)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    algorithms = [a for a in args.algorithms.split(",") if a]
    alphas = [float(a) for a in args.alphas.split(",") if a] if args.study == "fpb" else [None]
    full = alphas if args.full_alphas == "all" else [float(a) for a in args.full_alphas.split(",") if a]

    def prepare(alpha: float | None, seed: int) -> dict[str, Any]:
        """The split's files, written once (a running simulation of another process may be reading them)."""
        folder = output_dir / "data" / (f"alpha{alpha:g}_seed{seed}" if alpha is not None else f"seed{seed}")
        marker = folder / "split.json"
        if marker.exists():
            return {k: Path(v) if k in ("clients", "valid", "test") else v
                    for k, v in json.loads(marker.read_text()).items()}
        data = prepare_fpb(args, alpha, seed, folder) if alpha is not None else prepare_dolly(args, seed, folder)
        _write_json(marker, {k: str(v) if isinstance(v, Path) else v for k, v in data.items()})
        return data

    scorer_box: list[Scorer] = []
    tuning = None
    if args.tune:
        tune_alpha = 0.5 if args.study == "fpb" else None
        tuning = tune(args, model, prepare(tune_alpha, seeds[0]), seeds[0], scorer_box, algorithms)
        print("tuned:", json.dumps(tuning["chosen"]), flush=True)
    tuned = tuning["chosen"] if tuning else {}

    cells: list[dict[str, Any]] = []  # one per (alpha, seed, setting)
    curves: dict[str, dict[str, list[float]]] = {}  # alpha -> setting -> per-round held-out loss (first seed)
    splits: dict[str, str] = {}
    for alpha in alphas:
        alpha_key = "-" if alpha is None else f"{alpha:g}"
        for seed in seeds if (alpha is None or alpha in full) else seeds[:1]:
            data = prepare(alpha, seed)
            splits[f"{alpha_key}/{seed}"] = data["split"]
            # central and fedavg first: the quickest sign of whether the schedule learns at all
            chosen = algorithms if alpha is None or alpha in full else ["fedavg"]
            baselines = args.baselines.split(",")
            plan = [("central", "central", "fedavg")] if "central" in baselines else []
            plan += [(a, "federated", a) for a in chosen if a == "fedavg"]
            plan += [("local", "local", "fedavg")] if "local" in baselines else []
            plan += [(a, "federated", a) for a in chosen if a != "fedavg"]
            base_dir = output_dir / "runs" / (f"alpha{alpha_key}" if alpha is not None else "") / f"seed{seed}"
            first = seed == seeds[0]
            if (base_dir / "base_scores.json").exists() and not any(c["setting"] == "base" and c["alpha"] == alpha_key
                                                                    for c in cells):
                cells.append(json.loads((base_dir / "base_scores.json").read_text()))
            for name, mode, fed_alg in plan:
                overrides = server_overrides(args, fed_alg, tuned) if mode == "federated" else {}
                scored = base_dir / name / "scores.json"  # this run's cell and curve, once scored
                if scored.exists():
                    done = json.loads(scored.read_text())
                    cells.append(done["cell"])
                    if done["curve"] is not None:
                        curves.setdefault(alpha_key, {})[name] = done["curve"]
                    continue
                result, seconds = run(args, model, name, mode, fed_alg, data, base_dir / name, seed, overrides, first)
                if not scorer_box:
                    scorer_box.append(Scorer(model, next(iter(result.adapters.values())), args.study, args))
                scorer = scorer_box[0]
                if not any(c["setting"] == "base" and c["alpha"] == alpha_key for c in cells):
                    cells.append({"alpha": alpha_key, "seed": seed, "setting": "base",
                                  **scorer.score(None, data["test"])})
                    _write_json(base_dir / "base_scores.json", cells[-1])
                per_adapter = {cid: scorer.score(path, data["test"]) for cid, path in result.adapters.items()}
                steps = int(sum(m.get("steps", 0) for runs in result.history.values() for h in runs
                                for m in h["metrics"].values()))
                cell = {"alpha": alpha_key, "seed": seed, "setting": name, "overrides": overrides,
                        "steps": steps, "seconds": seconds}
                scores = list(per_adapter.values())
                for key in scores[0]:
                    cell[key] = statistics.fmean(s[key] for s in scores)
                    if len(scores) > 1:
                        cell[f"{key}_min"] = min(s[key] for s in scores)
                        cell[f"{key}_max"] = max(s[key] for s in scores)
                if len(scores) > 1:
                    cell["clients"] = per_adapter
                cells.append(cell)
                curve = None
                if first and mode != "local":
                    final = next(iter(result.adapters.values()))
                    curve = curves.setdefault(alpha_key, {})[name] = [
                        scorer.score(final.parent / f"round_{r}", data["test"], args.curve_examples, ("loss",))["loss"]
                        for r in range(1, args.num_rounds + 1)]
                _write_json(scored, {"cell": cell, "curve": curve})
                print(json.dumps({k: v for k, v in cell.items() if k != "clients"}), flush=True)
                write_results(args, argv, cells, curves, tuning, splits, model, time.time() - started)
    write_results(args, argv, cells, curves, tuning, splits, model, time.time() - started)  # also when all were kept
    return 0


# ---------------------------------------------------------------- results


def table_rows(cells: list[dict[str, Any]], study: str) -> dict[str, list[dict[str, Any]]]:
    """alpha -> one row per setting: mean ± std over seeds of each metric (local: of the clients' mean)."""
    keys = ("accuracy", "macro_f1", "loss") if study == "fpb" else ("loss",)
    by_alpha: dict[str, list[dict[str, Any]]] = {}
    for alpha in dict.fromkeys(c["alpha"] for c in cells):
        rows = []
        for setting in dict.fromkeys(c["setting"] for c in cells if c["alpha"] == alpha):
            group = [c for c in cells if c["alpha"] == alpha and c["setting"] == setting]
            row: dict[str, Any] = {"setting": setting, "seeds": [c["seed"] for c in group],
                                   "overrides": group[0].get("overrides", {}), "steps": group[0].get("steps")}
            for key in keys:
                row[key] = summarize([c[key] for c in group])
                if f"{key}_min" in group[0]:
                    row[f"{key}_min"] = min(c[f"{key}_min"] for c in group)
                    row[f"{key}_max"] = max(c[f"{key}_max"] for c in group)
            rows.append(row)
        by_alpha[alpha] = rows
    return by_alpha


def _label(setting: str) -> str:
    return {"base": "base model (no training)", "local": "local (each client alone)",
            "central": "central (pooled)"}.get(setting, f"federated: {setting}")


def markdown(args: argparse.Namespace, command: str, tables: dict[str, list[dict[str, Any]]],
             tuning: dict[str, Any] | None, seconds: float) -> str:
    keys = ("accuracy", "macro_f1", "loss") if args.study == "fpb" else ("loss",)
    lines = [f"Command: `{command}` ({seconds / 60:.1f} minutes in all)", ""]
    if tuning:
        lines += [f"Tuned on the validation split (seed {tuning['seed']}, by {tuning['metric']}): "
                  + "; ".join(f"{alg} " + ", ".join(f"{k}={v:g}" for k, v in vals.items())
                              for alg, vals in tuning["chosen"].items()), ""]
    for alpha, rows in tables.items():
        if alpha != "-":
            lines += [f"### α = {alpha}", ""]
        lines += ["| setting | seeds | " + " | ".join(keys) + " | client steps |",
                  "|---|---:|" + "---:|" * len(keys) + "---:|"]
        local = next((r for r in rows if r["setting"] == "local"), None)
        for row in rows:
            cells = []
            for key in keys:
                text = f"{row[key]['mean']:.3f} ± {row[key]['std']:.3f}"
                if f"{key}_min" in row:
                    text += f" (clients {row[f'{key}_min']:.3f} – {row[f'{key}_max']:.3f})"
                elif local is not None and row["setting"] not in ("base", "local"):
                    text += f" ({row[key]['mean'] - local[key]['mean']:+.3f})"
                cells.append(text)
            steps = "—" if row["steps"] is None else str(row["steps"])
            lines.append(f"| {_label(row['setting'])} | {len(row['seeds'])} | " + " | ".join(cells) + f" | {steps} |")
        lines.append("")
    if args.study == "fpb":
        lines.append("Differences in brackets: against the mean local client of the same row's seeds.")
    else:
        lines.append("Loss: held-out loss on the response tokens (lower is better); brackets: against local.")
    return "\n".join(lines) + "\n"


def chart(args: argparse.Namespace, tables: dict[str, list[dict[str, Any]]],
          curves: dict[str, dict[str, list[float]]], path: Path) -> bool:
    """Held-out loss per round of every algorithm (first seed; FPB: on the label tokens of ``--curve_examples``
    test sentences), with local (the clients' range and mean) and central (final) as horizontal bands."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)", file=sys.stderr)
        return False
    metric = "loss"
    alphas = [a for a in tables if a in curves and len(curves[a]) > 2] or list(curves)[:1]
    fig, axes = plt.subplots(1, len(alphas), figsize=(6.5 * len(alphas), 4.6), squeeze=False)
    for ax, alpha in zip(axes[0], alphas, strict=True):
        rows = {r["setting"]: r for r in tables[alpha]}
        rounds = list(range(1, args.num_rounds + 1))
        for setting, color in (("local", "tab:gray"), ("central", "black")):
            if setting in rows:
                r = rows[setting]
                if f"{metric}_min" in r:
                    ax.axhspan(r[f"{metric}_min"], r[f"{metric}_max"], color=color, alpha=0.12,
                               label=f"{setting}: clients' range")
                ax.axhline(r[metric]["mean"], color=color, linestyle="--", linewidth=1.5,
                           label=f"{setting} (final, mean of seeds)")
        if "base" in rows:
            ax.axhline(rows["base"][metric]["mean"], color="tab:red", linestyle=":", linewidth=1, label="base")
        for i, (setting, values) in enumerate(c for c in curves[alpha].items() if c[0] != "central"):
            ax.plot(rounds, values, marker="o", markersize=3, linewidth=1.3, color=plt.cm.tab10(i % 10),
                    label=setting)
        if "central" in curves[alpha]:
            ax.plot(rounds, curves[alpha]["central"], marker="s", markersize=3, linewidth=0.8, color="black",
                    alpha=0.6, label="central (per round)")
        ax.set_xticks(rounds)
        ax.set_xlabel("round")
        ax.set_ylabel("held-out loss (label tokens)" if args.study == "fpb" else "held-out loss (response tokens)")
        ax.set_title(f"{args.study.upper()}" + (f", α = {alpha}" if alpha != "-" else "")
                     + f" (seed {args.seeds.split(',')[0]})")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(args: argparse.Namespace, argv: list[str] | None, cells: list[dict[str, Any]],
                  curves: dict[str, dict[str, list[float]]], tuning: dict[str, Any] | None, splits: dict[str, str],
                  model: str, seconds: float) -> None:
    command = ("python bench/fl_vs_local.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    tables = table_rows(cells, args.study)
    prefix = Path(args.results_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(args, command, tables, tuning, seconds)
    prefix.with_suffix(".md").write_text(text)
    pretrain = Path(model) / "pretrain.json"
    prefix.with_suffix(".json").write_text(json.dumps({
        "command": command, "args": vars(args), "model": model,
        "pretrain": json.loads(pretrain.read_text()) if pretrain.exists() else None,
        "tables": tables, "cells": cells, "curves": curves, "tuning": tuning, "splits": splits,
        "seconds": seconds}, indent=1, default=str))
    chart(args, tables, curves, prefix.with_suffix(".png"))
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
