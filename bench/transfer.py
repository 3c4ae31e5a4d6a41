"""Benchmark 3: moving adapters through the real server (gunicorn on loopback) vs a raw socket.

Uploads (``FederationClient.upload_update``: sha256, POST, the server streams the body to disk,
fsyncs, validates names/shapes/dtype/finite values, commits) and downloads
(``FederationClient.download_global``: GET, sha256 checked against the ETag, atomic file write)
of real 7B-sized LoRA deltas, against a tiny socket server in its own process that only reads or
writes N bytes. Then 8 concurrent uploads of the largest adapter while the gunicorn workers' peak
RSS is watched: the body must stream to disk, never sit in memory.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from .common import (
    ALL_7B,
    ALL_QUICK,
    MB,
    QV_7B,
    RESULTS_DIR,
    ROOT,
    AdapterSize,
    ServerProcess,
    Table,
    Target,
    benchmark_main,
    proc_status,
    random_adapter,
    reset_peak_rss,
    server_args,
    write_llama_config,
    write_results,
)

NAME = "transfer"
TITLE = "Transfer through the real server (gunicorn, loopback) vs a raw socket"
THROUGHPUT_TARGET = 0.5  # of the raw socket's throughput
RSS_TARGET = 64 * MB  # worker peak RSS above idle during the concurrent uploads
CONCURRENT = 8
CHUNK = 1 << 20


# ------------------------------------------------------------------------------------------ raw socket
def raw_server() -> None:
    """Serve raw transfers on a free loopback port (printed on stdout) until stdin closes.

    A connection sends ``b"U" + N`` (8 bytes, little-endian) then N bytes, answered with ``b"K"``;
    or ``b"D" + N``, answered with N bytes.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), listener.close()), daemon=True).start()
    buffer = bytearray(CHUNK)
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                command = _recv_exactly(conn, 9)
            except ConnectionError:  # the connection that wakes accept() at shutdown
                continue
            kind, size = command[:1], struct.unpack("<Q", command[1:])[0]
            if kind == b"U":
                view = memoryview(buffer)
                left = size
                while left:
                    count = conn.recv_into(view, min(left, CHUNK))
                    if not count:
                        break
                    left -= count
                conn.sendall(b"K")
            else:
                view = memoryview(buffer)
                left = size
                while left:
                    count = min(left, CHUNK)
                    conn.sendall(view[:count])
                    left -= count


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("raw peer closed early")
        data += chunk
    return data


def raw_upload(port: int, path: Path) -> None:
    """Send a file's bytes to the raw server (read in 1 MiB chunks, like the HTTP client)."""
    size = path.stat().st_size
    with socket.create_connection(("127.0.0.1", port)) as conn, open(path, "rb") as f:
        conn.sendall(b"U" + struct.pack("<Q", size))
        while chunk := f.read(CHUNK):
            conn.sendall(chunk)
        if _recv_exactly(conn, 1) != b"K":
            raise ConnectionError("raw upload not acknowledged")


def raw_download(port: int, size: int) -> None:
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"D" + struct.pack("<Q", size))
        left = size
        while left:
            count = conn.recv_into(view, min(left, CHUNK))
            if not count:
                raise ConnectionError("raw download cut short")
            left -= count


class RawServer:
    """The raw socket server in its own process (like gunicorn, it does not share our GIL)."""

    def __enter__(self) -> RawServer:
        code = "from bench.transfer import raw_server; raw_server()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ------------------------------------------------------------------------------------------ the server side
def _client(url: str, client_id: str):
    from fedllm.client.http import FederationClient

    return FederationClient(url, client_id, quiet=True, max_retries=0, timeout=600)


def write_delta(server_url: str, path: Path) -> tuple[int, dict[str, list[int]]]:
    """An upload body of exactly the spec the server serves in /v1/config ``upload_tensors``."""
    from fedllm.wire import encode

    config = requests.get(server_url + "/v1/config", headers={"X-FedLLM-Client": "bench"}, timeout=60).json()
    spec = {name: tuple(shape) for name, shape in config["upload_tensors"].items()}
    body = encode(random_adapter(spec, seed=1), config["federation"]["wire_dtype"],
                  metadata={"train_loss": "1.0", "steps": "10.0"})
    path.write_bytes(body)
    return len(body), config["upload_tensors"]


def integrity_passes(body_path: Path, spec: dict[str, list[int]], workdir: Path) -> dict[str, float]:
    """Seconds of the per-byte work an upload and a download must do besides moving bytes, on this machine.

    upload: the client's sha256 of the file, the server's stream to disk (sha256 + write + fsync, with the
    server's own ``UploadIngestor.stream_to_file``) and its validation; download: the client's sha256 + write + fsync.
    """
    import io

    from fedllm.server.ingest import UploadIngestor
    from fedllm.wire import sha256_file, validate_tensors_file

    body = body_path.read_bytes()
    target = workdir / "passes.part"
    started = time.perf_counter()
    sha256_file(body_path)
    hashed = time.perf_counter()
    server = UploadIngestor(None, None, spec, "float32", max_upload_bytes=len(body))
    server.stream_to_file(io.BytesIO(body).read, target, len(body))
    streamed = time.perf_counter()
    validate_tensors_file(target, spec, "float32")
    validated = time.perf_counter()
    target.unlink()
    return {"client sha256": hashed - started, "stream to disk": streamed - hashed, "validate": validated - streamed,
            "upload": validated - started, "download": streamed - hashed}


def worker_memory(server: ServerProcess) -> dict[int, dict[str, int]]:
    return {pid: proc_status(pid) for pid in server.workers()}


class RssSampler:
    """Samples the workers' VmRSS every few milliseconds (a check on VmHWM, and a fallback)."""

    def __init__(self, pids: list[int], interval: float = 0.01):
        self.pids = pids
        self.interval = interval
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                try:
                    self.peak[pid] = max(self.peak[pid], proc_status(pid)["VmRSS"])
                except OSError:
                    pass
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure_size(size: AdapterSize, workdir: Path, repeat: int, concurrent: bool) -> dict[str, Any]:
    """Sequential uploads/downloads against the raw socket, then (optionally) 8 concurrent uploads."""
    model_dir = write_llama_config(workdir / "model", size)
    clients = [f"c{i:03d}" for i in range(repeat + (CONCURRENT if concurrent else 0) + 1)]
    args = server_args(model_dir, workdir / "state", size, num_clients=len(clients), sample_clients=len(clients),
                       num_rounds=1, workers=2, threads=4)
    result: dict[str, Any] = {}
    with ServerProcess(args, workdir / "server.log") as server, RawServer() as raw:
        body_path = workdir / "delta.safetensors"
        nbytes, spec = write_delta(server.url, body_path)
        result["bytes"] = nbytes
        result["idle_fresh"] = worker_memory(server)
        for client_id in clients:
            _client(server.url, client_id).join(100)
        times: dict[str, list[float]] = {"raw upload": [], "http upload": [], "raw download": [],
                                         "http download": []}
        passes: list[dict[str, float]] = []
        cache = workdir / "cache"
        for i in range(repeat):
            started = time.perf_counter()
            raw_upload(raw.port, body_path)
            times["raw upload"].append(time.perf_counter() - started)
            started = time.perf_counter()
            _client(server.url, clients[i]).upload_update(1, body_path, 100)
            times["http upload"].append(time.perf_counter() - started)
            shutil.rmtree(cache, ignore_errors=True)
            started = time.perf_counter()
            path, _version, _sha = _client(server.url, clients[i]).download_global(cache)
            times["http download"].append(time.perf_counter() - started)
            result["global_bytes"] = path.stat().st_size
            started = time.perf_counter()
            raw_download(raw.port, result["global_bytes"])
            times["raw download"].append(time.perf_counter() - started)
            passes.append(integrity_passes(body_path, spec, workdir))
        result["times"] = times
        result["passes"] = passes
        if concurrent:
            result["concurrent"] = concurrent_uploads(server, body_path, clients[repeat:repeat + CONCURRENT])
    return result


def concurrent_uploads(server: ServerProcess, body_path: Path, clients: list[str]) -> dict[str, Any]:
    """8 uploads at once; the workers' peak RSS above their idle RSS."""
    time.sleep(1.0)  # let the previous requests' memory settle
    idle = worker_memory(server)
    reset = all(reset_peak_rss(pid) for pid in idle)
    started = time.perf_counter()
    with RssSampler(list(idle)) as sampler, concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        results = list(pool.map(lambda c: _client(server.url, c).upload_update(1, body_path, 100), clients))
    seconds = time.perf_counter() - started
    after = worker_memory(server)
    growth = {pid: (after[pid]["VmHWM"] if reset else sampler.peak[pid]) - idle[pid]["VmRSS"] for pid in idle}
    sampled = {pid: sampler.peak[pid] - idle[pid]["VmRSS"] for pid in idle}
    return {"seconds": seconds, "accepted": sum(1 for r in results if r.get("accepted")), "hwm_reset": reset,
            "idle": idle, "after": after, "growth": growth, "sampled_growth": sampled,
            "bytes": body_path.stat().st_size * len(clients)}


def run(out_dir: Path = RESULTS_DIR, quick: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    plan = [(ALL_QUICK, 1, True)] if quick else [(QV_7B, 5, False), (ALL_7B, 3, True)]
    table = Table("Throughput (best of the interleaved runs; server / raw = median of paired ratios)",
                  ["adapter", "MB", "direction", "raw MB/s", "server MB/s", "server / raw", "server s"])
    passes_table = Table("Per-byte work besides moving bytes, measured alone on the same machine (MB/s, best run)",
                         ["adapter", "client sha256", "server stream to disk (sha256 + write + fsync)",
                          "server validation", "all three back to back"])
    memory = Table(f"gunicorn worker memory during {CONCURRENT} concurrent uploads",
                   ["adapter", "upload MB", "worker", "idle RSS MB", "peak RSS MB", "peak − idle MB",
                    "sampled peak − idle MB", "wall s", "accepted"])
    targets: list[Target] = []
    raw_data: dict[str, Any] = {}
    for size, repeat, concurrent_ in plan:
        directory = Path(tempfile.mkdtemp(prefix="fedllm-bench-transfer-", dir=workdir))
        try:
            result = measure_size(size, directory, repeat, concurrent_)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        raw_data[size.label] = result
        times = result["times"]
        for direction in ("upload", "download"):
            nbytes = result["bytes"] if direction == "upload" else result["global_bytes"]
            raw_t, http_t = times[f"raw {direction}"], times[f"http {direction}"]
            share = statistics.median(r / h for r, h in zip(raw_t, http_t, strict=True))
            table.rows.append([size.label, nbytes / MB, direction, nbytes / min(raw_t) / MB,
                               nbytes / min(http_t) / MB, share, min(http_t)])
            targets.append(Target(f"{direction} throughput, {size.label}", f"≥ {THROUGHPUT_TARGET:.0%} of raw",
                                  f"{share:.0%}", None if quick else share >= THROUGHPUT_TARGET))
        fastest = {key: min(p[key] for p in result["passes"]) for key in result["passes"][0]}
        passes_table.rows.append([size.label, *[result["bytes"] / fastest[key] / MB
                                                for key in ("client sha256", "stream to disk", "validate", "upload")]])
        if concurrent_:
            c = result["concurrent"]
            for pid, growth in c["growth"].items():
                memory.rows.append([size.label, c["bytes"] / MB, pid, c["idle"][pid]["VmRSS"] / MB,
                                    (c["idle"][pid]["VmRSS"] + growth) / MB, growth / MB,
                                    c["sampled_growth"][pid] / MB, c["seconds"], c["accepted"]])
            worst = max(c["growth"].values())
            targets.append(Target(f"worker peak RSS, {CONCURRENT} × {size.label} uploads",
                                  f"≤ idle + {RSS_TARGET / MB:g} MB", f"+{worst / MB:.1f} MB",
                                  None if quick else worst <= RSS_TARGET))
    notes = [
        "server upload = FederationClient.upload_update: client sha256 of the file, POST, server streams to disk "
        "with sha256, fsync, validation (structure, names, shapes, dtype, finite values), rename, SQLite commit.",
        "server download = FederationClient.download_global: GET /v1/global, sha256 checked against the ETag, "
        "written with fsync and rename. raw = bytes through a loopback socket to/from a process that does nothing "
        "with them.",
        "Every upload is hashed twice (client: X-Content-SHA256; server: while streaming), written and fsynced, "
        "and read again for validation; every download is hashed against the ETag and written atomically. "
        "Raw loopback is a memory copy, several times faster than SHA-256 alone on this CPU, so these integrity "
        "passes, not the HTTP stack, set the throughput; the server's upload time is about the sum of the "
        "passes (less where the client's and the server's overlap).",
        "Peak RSS is VmHWM after resetting it (/proc/PID/clear_refs) just before the uploads; the sampled column "
        "polls VmRSS every 10 ms as a cross-check.",
    ]
    return write_results(NAME, TITLE, out_dir, quick=quick,
                         params={"plan": [(s.label, r, c) for s, r, c in plan], "workers": 2, "threads": 4},
                         tables=[table, passes_table, memory], targets=targets, notes=notes, data=raw_data)


def main(argv: list[str] | None = None) -> None:
    benchmark_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
