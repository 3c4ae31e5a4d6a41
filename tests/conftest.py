"""Shared fixtures: the tiny model (built once per session), free ports, real server processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from fedllm.tiny import build_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


def joined_copy(source: Path, dest: Path, clients: dict[str, int]) -> Path:
    """A copy of an initialised state dir in which every client of ``clients`` (id -> num_samples) joined."""
    from fedllm.server.federation import Federation
    from fedllm.server.store import Store

    shutil.copytree(source, dest)
    store = Store(dest)
    federation = Federation(store)
    for client, n in clients.items():
        federation.join(client, n)
    store.close()
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``run_server.sh`` (gunicorn) on a free loopback port, killed at the end of the test."""

    def __init__(self, args: list[str], log_path: Path, *, scheme: str = "http", env: dict[str, str] | None = None):
        self.args = args
        self.log_path = log_path
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, verify: str | bool = True, timeout: float = 60.0) -> ServerProcess:
        cmd = ["bash", str(ROOT / "run_server.sh"), *self.args, "--host", "127.0.0.1", "--port", str(self.port)]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                                     cwd=ROOT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/healthz", timeout=2, verify=verify).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server did not come up:\n{self.log()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (gunicorn master and workers)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    servers: list[ServerProcess] = []

    def _start(args: list[str], **kwargs) -> ServerProcess:
        verify = kwargs.pop("verify", True)
        server = ServerProcess(args, tmp_path / f"server-{len(servers)}.log", **kwargs)
        servers.append(server)
        return server.start(verify=verify)

    yield _start
    for server in servers:
        server.kill()


def run_client_process(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "client_http.py"), *args]
    return subprocess.Popen(cmd, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
