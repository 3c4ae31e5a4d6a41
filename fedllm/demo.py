"""A real federation on 127.0.0.1: the gunicorn server and N clients as separate processes.

    python -m fedllm.demo                      # tiny Llama built offline + generated non-IID data
    python -m fedllm.demo --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name tatsu-lab/alpaca   # with internet

With a dataset of your own, each client gets an IID share of it (``fedllm.data.split``).
Prints the loss per round and where the final adapter is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from .localserver import ROOT, LocalServer


def _prepare(args: argparse.Namespace, workdir: Path) -> tuple[str, list[Path]]:
    data_dir = workdir / "data"
    if args.dataset_name:
        from .data import load_records
        from .data.split import split_records, write_clients

        records = load_records(args.dataset_name, dataset_sample=args.dataset_sample, seed=args.seed)
        shards = split_records(records, args.num_clients, "iid", seed=args.seed)
        files = write_clients(shards, data_dir)
    else:
        from .data import write_demo_data

        files = write_demo_data(data_dir, num_clients=args.num_clients, rows_per_client=64, seed=args.seed)
    model = args.model_name_or_path
    if model is None:
        from .tiny import build_tiny_llama

        model = str(build_tiny_llama(workdir / "tiny-llama", seed=args.seed))
    return model, files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="demo-run", help="Where the model, data, state and logs go.")
    parser.add_argument("--model_name_or_path", default=None, help="Default: a tiny Llama built offline.")
    parser.add_argument("--dataset_name", default=None, help="Default: generated non-IID demo data.")
    parser.add_argument("--dataset_sample", type=int, default=None)
    parser.add_argument("--fed_alg", default="fedavg")
    parser.add_argument("--num_clients", type=int, default=3)
    parser.add_argument("--sample_clients", type=int, default=3)
    parser.add_argument("--num_rounds", type=int, default=3)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--learning_rate", type=float, default=2e-2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--peft_lora_r", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    state_dir = workdir / "state"
    if state_dir.exists():
        import shutil

        shutil.rmtree(state_dir)  # the demo starts a new federation each time
    workdir.mkdir(parents=True, exist_ok=True)
    model, files = _prepare(args, workdir)
    server_args = [
        "--model_name_or_path", model, "--fed_alg", args.fed_alg,
        "--num_clients", str(args.num_clients), "--sample_clients", str(args.sample_clients),
        "--num_rounds", str(args.num_rounds), "--max_steps", str(args.max_steps),
        "--learning_rate", str(args.learning_rate), "--peft_lora_r", str(args.peft_lora_r),
        "--peft_lora_alpha", str(2 * args.peft_lora_r), "--seq_length", "128", "--seed", str(args.seed),
        "--state_dir", str(state_dir), "--workers", str(args.workers),
    ]
    (workdir / "server.log").unlink(missing_ok=True)  # LocalServer appends
    server = LocalServer(server_args, workdir / "server.log")
    url = server.url
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print(f"server: {url} (gunicorn, {args.workers} workers), logs in {workdir}/server.log")
    clients: list[subprocess.Popen] = []
    try:
        try:
            server.start()
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"the server did not come up: {exc}") from None
        for i, data in enumerate(files):
            cmd = [sys.executable, str(ROOT / "client_http.py"), "--server_url", url, "--client_id", f"client{i}",
                   "--dataset_name", str(data), "--batch_size", str(args.batch_size), "--quiet", "true",
                   "--output_dir", str(workdir / f"client{i}"), "--poll_interval", "0.5", "--max_poll_interval", "1",
                   "--seed", str(args.seed + i)]
            log = open(workdir / f"client{i}.log", "wb")
            # One thread each: the clients share the machine's cores.
            clients.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env={**env, "OMP_NUM_THREADS": "1"}))
        print(f"clients: {len(clients)} processes, logs in {workdir}/client*.log")
        _follow(url, clients, args.num_rounds)
        codes = [c.wait(timeout=120) for c in clients]
        if any(codes):
            print(f"a client failed (exit codes {codes}); see {workdir}/client*.log", file=sys.stderr)
            return 1
        final = state_dir / "adapters" / "final"
        print(f"\nfinal adapter (PEFT directory): {final}")
        print(f"load it with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({model!r}), {str(final)!r})")
        return 0
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
        server.stop()


def _follow(url: str, clients: list[subprocess.Popen], num_rounds: int) -> None:
    headers = {"X-FedLLM-Client": "demo-observer"}
    printed = 0
    print(f"\n{'round':>5}  {'clients':>7}  {'train loss':>10}  {'seconds':>7}")
    while True:
        history = requests.get(url + "/v1/history", headers=headers, timeout=10).json()
        for record in history[printed:]:
            loss = record["train_loss"]
            print(f"{record['round']:>5}  {len(record['participants']):>7}  "
                  f"{loss if loss is None else f'{loss:.4f}':>10}  {record['seconds']:>7.1f}", flush=True)
        printed = len(history)
        if printed >= num_rounds:
            return
        if all(c.poll() is not None for c in clients):
            raise SystemExit("all clients exited before the federation finished; see client*.log\n"
                             + json.dumps(history)[:500])
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
