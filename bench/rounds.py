"""Benchmark 4: rounds at scale -- 200 lightweight HTTP clients, 20 sampled per round, 4 workers.

Every client is a thread with its own ``FederationClient`` (a ``requests.Session``): it joins,
polls ``GET /v1/round`` at a fixed interval with jitter, and when sampled pulls the global
adapter (``GET /v1/global``, sha256 checked against the ETag, body discarded) and pushes a
32 MiB delta (the same pre-encoded file for every client and round; no training). A watcher
polls ``/v1/round`` every 20 ms to see when the next round opens.

Measured: the server-side seconds from the last upload of a round to the next round being
open with its global servable (``rounds.closed_at`` to the next round's ``started_at`` in the
server's database, one transaction after the new global is written), the same as seen by the
watcher, the aggregation step alone (``aggregation_seconds`` of the history), latency of
``GET /v1/round`` under the polling load, and errors.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from .common import (
    QV_7B,
    QV_QUICK,
    RESULTS_DIR,
    AdapterSize,
    ServerProcess,
    Table,
    Target,
    benchmark_main,
    percentile,
    server_args,
    write_llama_config,
    write_results,
)
from .transfer import write_delta

NAME = "rounds"
TITLE = "Rounds at scale: many HTTP clients, real gunicorn server"
TURNAROUND_TARGET = 2.0
WATCH_INTERVAL = 0.02


@dataclass
class Scale:
    size: AdapterSize
    clients: int
    sampled: int
    rounds: int
    workers: int
    poll_interval: float


FULL = Scale(QV_7B, clients=200, sampled=20, rounds=3, workers=4, poll_interval=1.0)
QUICK = Scale(QV_QUICK, clients=8, sampled=2, rounds=2, workers=1, poll_interval=0.3)


@dataclass
class DriverStats:
    """What the client threads saw; appended to under a lock."""

    poll_latencies: list[float] = field(default_factory=list)
    busy_poll_latencies: list[float] = field(default_factory=list)  # polls that overlapped a pull or push
    in_flight: int = 0  # pulls and pushes under way
    errors: list[str] = field(default_factory=list)
    watcher_errors: list[str] = field(default_factory=list)
    acks: dict[int, list[float]] = field(default_factory=dict)  # round -> time.time() of each 202
    pulls: int = 0
    transitions: list[tuple[float, int, str]] = field(default_factory=list)  # watcher: (time, round, phase)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, where: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{where}: {type(exc).__name__}: {str(exc)[:200]}")


def pull(client, stats: DriverStats) -> None:
    """GET /v1/global, checked against its ETag; the body is discarded (no disk writes on this side)."""
    digest = hashlib.sha256()
    with client.session.get(client.base + "/v1/global", stream=True, timeout=client.timeout) as response:
        response.raise_for_status()
        for chunk in response.iter_content(1 << 20):
            digest.update(chunk)
        if digest.hexdigest() != response.headers["ETag"].strip('"'):
            raise ValueError("global adapter does not match its ETag")
    with stats.lock:
        stats.pulls += 1


def client_loop(url: str, client_id: str, delta: Path, scale: Scale, stats: DriverStats, deadline: float) -> None:
    """One lightweight client: join, poll, and when sampled pull + push."""
    from fedllm.client.http import FederationClient

    client = FederationClient(url, client_id, quiet=True, max_retries=0, timeout=120)
    try:
        client.join(100)
    except Exception as exc:  # noqa: BLE001 - every failure is an error to report
        stats.error(f"{client_id} join", exc)
        return
    pushed: set[int] = set()
    while time.time() < deadline:
        started = time.perf_counter()
        busy = stats.in_flight > 0
        try:
            status = client.round_status()
        except Exception as exc:  # noqa: BLE001
            stats.error(f"{client_id} poll", exc)
            time.sleep(scale.poll_interval)
            continue
        with stats.lock:
            latency = time.perf_counter() - started
            stats.poll_latencies.append(latency)
            if busy or stats.in_flight > 0:
                stats.busy_poll_latencies.append(latency)
        if status["phase"] == "finished":
            return
        number = status["round"]
        if status["phase"] == "training" and status["selected"] and not status["submitted"] and number not in pushed:
            pushed.add(number)
            with stats.lock:
                stats.in_flight += 1
            try:
                pull(client, stats)
                client.upload_update(number, delta, 100)
                with stats.lock:
                    stats.acks.setdefault(number, []).append(time.time())
            except Exception as exc:  # noqa: BLE001
                stats.error(f"{client_id} round {number}", exc)
            finally:
                with stats.lock:
                    stats.in_flight -= 1
            continue
        time.sleep(scale.poll_interval * (0.75 + 0.5 * random.random()))


def watch(url: str, stats: DriverStats, deadline: float) -> None:
    """Record every change of (round, phase) as soon as it is visible (four ids in turn, far below the rate limit)."""
    session = requests.Session()
    last = None
    for count in itertools.count():
        if time.time() >= deadline:
            return
        # Four watcher ids in turn: each stays far below the server's per-client rate limit.
        headers = {"X-FedLLM-Client": f"bench-watcher-{count % 4}"}
        try:
            response = session.get(url + "/v1/round", timeout=30, headers=headers)
            response.raise_for_status()
            status = response.json()
        except (requests.RequestException, ValueError) as exc:
            with stats.lock:
                stats.watcher_errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            time.sleep(0.5)
            continue
        key = (status["round"], status["phase"])
        if key != last:
            with stats.lock:
                stats.transitions.append((time.time(), *key))
            last = key
        if status["phase"] == "finished":
            return
        time.sleep(WATCH_INTERVAL)


def server_timeline(state_dir: Path, rounds: int) -> dict[int, dict[str, float]]:
    """Per round: closed_at, the next round's started_at, the new global's created_at, aggregation_seconds."""
    from fedllm.server.store import Store

    store = Store(state_dir)
    try:
        db = store.read()
        history = {record["round"]: record for record in store.history(db)}
        timeline = {}
        for number in range(1, rounds + 1):
            row = store.get_round(db, number)
            following = store.get_round(db, number + 1)
            created = db.execute("SELECT created_at FROM globals WHERE version = ?", (number,)).fetchone()
            timeline[number] = {
                "started_at": row.started_at,
                "closed_at": row.closed_at,
                "next_started_at": following.started_at if following else None,
                "global_created_at": created[0] if created else None,
                "aggregation_seconds": history.get(number, {}).get("aggregation_seconds"),
            }
        return timeline
    finally:
        store.close()


def run_federation(scale: Scale, workdir: Path, time_limit: float) -> dict[str, Any]:
    model_dir = write_llama_config(workdir / "model", scale.size)
    state_dir = workdir / "state"
    args = server_args(model_dir, state_dir, scale.size, num_clients=scale.clients, sample_clients=scale.sampled,
                       num_rounds=scale.rounds, workers=scale.workers, threads=4, save_model_freq=0)
    stats = DriverStats()
    with ServerProcess(args, workdir / "server.log") as server:
        delta = workdir / "delta.safetensors"
        write_delta(server.url, delta)
        deadline = time.time() + time_limit
        started = time.time()
        threads = [threading.Thread(target=client_loop, args=(server.url, f"client-{i:03d}", delta, scale, stats, deadline),
                                    daemon=True) for i in range(scale.clients)]
        threads.append(threading.Thread(target=watch, args=(server.url, stats, deadline), daemon=True))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.time()) + 5)
        wall = time.time() - started
        unfinished = sum(thread.is_alive() for thread in threads)
        final = requests.get(server.url + "/v1/round", headers={"X-FedLLM-Client": "bench"}, timeout=30).json()
    timeline = server_timeline(state_dir, scale.rounds)
    return {"stats": stats, "timeline": timeline, "wall": wall, "unfinished_threads": unfinished, "final": final}


def run(out_dir: Path = RESULTS_DIR, quick: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    scale = QUICK if quick else FULL
    directory = Path(tempfile.mkdtemp(prefix="fedllm-bench-rounds-", dir=workdir))
    try:
        result = run_federation(scale, directory, time_limit=120 if quick else 420)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    stats: DriverStats = result["stats"]
    table = Table("Per round", ["round", "uploads", "server turnaround s", "seen by a client s",
                                "aggregation step s", "round wall s"])
    turnarounds = []
    for number, times in result["timeline"].items():
        acks = stats.acks.get(number, [])
        opened = times["next_started_at"] or times["global_created_at"]
        server_turnaround = opened - times["closed_at"] if opened and times["closed_at"] else float("nan")
        seen = next((t for t, r, phase in stats.transitions if r > number or phase == "finished"), None)
        observed = seen - max(acks) if seen and acks else float("nan")
        end = opened or float("nan")
        table.rows.append([number, len(acks), server_turnaround, observed, times["aggregation_seconds"] or float("nan"),
                           end - times["started_at"]])
        turnarounds.append(server_turnaround)
    polls = stats.poll_latencies
    busy = stats.busy_poll_latencies
    load = Table("Polling and errors (latency of GET /v1/round as the clients saw it)",
                 ["clients", "sampled", "workers", "poll interval s", "polls", "polls/s", "p50 ms", "p99 ms",
                  "max ms", "p50 ms during pulls/pushes", "p99 ms during pulls/pushes", "pulls", "errors", "wall s"])
    load.rows.append([scale.clients, scale.sampled, scale.workers, scale.poll_interval, len(polls),
                      len(polls) / result["wall"], 1000 * percentile(polls, 50), 1000 * percentile(polls, 99),
                      1000 * max(polls, default=float("nan")), 1000 * percentile(busy, 50),
                      1000 * percentile(busy, 99), stats.pulls, len(stats.errors), result["wall"]])
    finished = result["final"]["phase"] == "finished"
    worst = max(turnarounds, default=float("nan"))
    targets = [
        Target(f"round turnaround, {scale.sampled} × {scale.size.label}", f"< {TURNAROUND_TARGET:g} s (every round)",
               f"{worst:.2f} s (worst)", None if quick else worst < TURNAROUND_TARGET),
        Target("errors", "0", str(len(stats.errors)), len(stats.errors) == 0 and finished),
    ]
    notes = [
        f"Server: run_server.sh, {scale.workers} gunicorn workers × 4 threads, fedavg, fp32 wire, {scale.size.label} "
        f"adapter ({scale.size.fp32_bytes / (1 << 20):.3g} MiB); clients and server share this machine's CPUs.",
        "server turnaround = next round's started_at − this round's closed_at in the server's database (for the last "
        "round: the final global's created_at). The next round is committed in the same transaction as the new "
        "global version, so it is servable from then on.",
        "seen by a client = the first sight of the next round by a watcher polling every "
        f"{WATCH_INTERVAL:g} s − the last upload's 202.",
        "Polls during pulls/pushes wait for a free gunicorn thread when the workers' threads are all moving "
        "32 MiB bodies (gthread: --workers × --threads requests at once); that is the tail of the latency.",
        f"Every client polls every {scale.poll_interval:g} s ± 25% (the real client backs off up to "
        "--max_poll_interval while waiting, so real load is lower).",
    ]
    if stats.errors:
        notes.append("errors: " + "; ".join(stats.errors[:5]))
    return write_results(NAME, TITLE, out_dir, quick=quick,
                         params={"clients": scale.clients, "sampled": scale.sampled, "rounds": scale.rounds,
                                 "workers": scale.workers, "poll_interval": scale.poll_interval,
                                 "adapter": scale.size.label},
                         tables=[table, load], targets=targets, notes=notes,
                         data={"timeline": result["timeline"], "transitions": stats.transitions,
                               "acks": stats.acks, "errors": stats.errors, "watcher_errors": stats.watcher_errors,
                               "final": result["final"],
                               "unfinished_threads": result["unfinished_threads"]})


def main(argv: list[str] | None = None) -> None:
    benchmark_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
