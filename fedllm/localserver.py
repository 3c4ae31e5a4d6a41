"""A fedllm server process on a free loopback port: the demo, the benchmarks and the tests start it here.

``run_server.sh`` (gunicorn) runs in its own process group, so :meth:`LocalServer.kill` signals the
master and every worker together (``kill -9`` of the whole server, as the crash tests need).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (e.g. the gunicorn workers of a master), read from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The fields after the parenthesised command name: state, ppid, ...
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == pid:
            children.append(int(entry))
    return sorted(children)


class LocalServer:
    """``run_server.sh ARGS --host 127.0.0.1 --port <free>``, logging to ``log_path``; a context manager."""

    def __init__(self, args: Sequence[str], log_path: Path, *, scheme: str = "http",
                 env: Mapping[str, str] | None = None, verify: str | bool = True):
        self.args = list(args)
        self.log_path = Path(log_path)
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.verify = verify
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> LocalServer:
        """Start the server and wait until ``/healthz`` answers."""
        cmd = ["bash", str(ROOT / "run_server.sh"), *self.args, "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True, cwd=ROOT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if requests.get(self.url + "/healthz", timeout=2, verify=self.verify).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server did not come up:\n{self.log()[-4000:]}")

    def workers(self) -> list[int]:
        """PIDs of the gunicorn worker processes (children of the master)."""
        assert self.proc is not None
        return child_pids(self.proc.pid)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (gunicorn master and workers) and wait for the master."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (gunicorn drains requests in flight), then SIGKILL if it does not exit within 30 s."""
        try:
            self.kill(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
