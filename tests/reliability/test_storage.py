"""Resource faults: a full disk, a read-only state_dir, and SIGTERM while an upload is in flight.

The disk faults run for real on a small tmpfs mounted as the state_dir (root only; skipped with the reason
otherwise), and always as monkeypatched variants that raise what a full disk raises. In every case the
request that hit the fault is answered 503 JSON with Retry-After, nothing changes, nothing torn or partial
is left behind, and the same request succeeds once the space (or write access) is back.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file
from werkzeug.test import TestResponse

from fedllm.server import versions as versions_module
from fedllm.server.ingest import UploadIngestor
from fedllm.server.store import Store
from fedllm.wire import encode

from ..test_api import CLIENTS, Api, assert_error, make_api, snapshot
from ..test_integration import server_args
from .conftest import copy_joined

pytestmark = pytest.mark.reliability

GUNICORN_GRACEFUL_TIMEOUT = 30  # gunicorn's default graceful_timeout; server_http.py keeps it


# ------------------------------------------------------------------------------------------------ helpers
def assert_unavailable(response: TestResponse, reason: str) -> None:
    """503 JSON that says the storage failed and when to retry."""
    body = assert_error(response, 503, "storage unavailable")
    assert reason in body["detail"] and "nothing was changed" in body["detail"], body
    assert int(response.headers["Retry-After"]) > 0


def assert_no_space(exc: BaseException) -> None:
    assert getattr(exc, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(exc), repr(exc)


def leftovers(state_dir: Path) -> list[str]:
    """Partial files: anything in incoming/ and any temporary file of an atomic write."""
    return sorted(str(p.relative_to(state_dir)) for p in state_dir.rglob("*")
                  if p.is_file() and (p.parent.name == "incoming" or p.name.endswith(".tmp")))


def global_served(api: Api) -> tuple[str, str, str]:
    """``(version, ETag, sha256 of the body)`` of ``GET /v1/global``."""
    response = api.get("/v1/global")
    assert response.status_code == 200
    return response.headers["X-FedLLM-Version"], response.headers["ETag"].strip('"'), hashlib.sha256(
        response.get_data()).hexdigest()


def push_round(api: Api) -> None:
    for i, client in enumerate(api.sampled()):
        assert api.upload(client, api.delta(i), num_samples=str(CLIENTS[client])).status_code == 202
    assert api.get("/v1/round").get_json()["phase"] == "aggregating"


def assert_aggregation_pending(api: Api, served: tuple[str, str, str]) -> None:
    """The closed round is still waiting, the previous global is served intact, and no file is torn."""
    assert api.get("/v1/round").get_json()["phase"] == "aggregating"
    assert api.get("/v1/history").get_json() == []
    assert global_served(api) == served and served[1] == served[2]
    assert leftovers(api.state_dir) == []
    for path in (api.state_dir / "globals").glob("*.safetensors"):
        load_file(path)  # a file that exists under its final name is complete


def assert_aggregates_exactly_once(api: Api, served: tuple[str, str, str]) -> None:
    assert api.federation.tick() is True
    assert api.federation.tick() is False
    assert [h["round"] for h in api.get("/v1/history").get_json()] == [1]
    version, etag, digest = global_served(api)
    assert version == "1" and etag == digest != served[1]
    assert api.get("/v1/round").get_json()["round"] == 2


# ------------------------------------------------------------------------------------------------ a real tmpfs
@dataclass
class Disk:
    """A tmpfs mount holding the state_dir, with the API over it."""

    mount: Path
    api: Api

    def free_bytes(self) -> int:
        info = os.statvfs(self.mount)
        return info.f_bavail * info.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Take all free space but ``leave`` bytes (whole pages) with a filler file."""
        page = os.statvfs(self.mount).f_frsize
        with open(self.mount / "filler", "ab", buffering=0) as filler:
            for size in (1 << 20, page):
                while self.free_bytes() - size >= leave:
                    filler.write(b"\0" * size)
        assert self.free_bytes() == leave

    def free(self) -> None:
        (self.mount / "filler").unlink()

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.mount)], check=True, capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the monkeypatched variants below cover the same guarantees")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here ({result.stderr.strip()}); the monkeypatched variants "
                    "below cover the same guarantees")
    try:
        yield mount
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], capture_output=True)
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture
def disk(tmpfs: Path, prepared: Path) -> Iterator[Disk]:
    api = make_api(copy_joined(prepared, tmpfs / "state"))
    yield Disk(tmpfs, api)
    api.federation.store.close()


def test_disk_full_during_upload(disk: Disk) -> None:
    """A full disk refuses an upload with 503 and changes nothing, while polls are still answered; with space
    back the same upload is taken."""
    api = disk.api
    client, body = api.sampled()[0], api.delta()
    before = snapshot(api.state_dir)
    disk.fill()
    assert_unavailable(api.upload(client, body), os.strerror(errno.ENOSPC))
    assert snapshot(api.state_dir) == before and leftovers(api.state_dir) == []
    poll = api.get("/v1/round", client)  # reads keep working (recording the poll is only bookkeeping)
    assert poll.status_code == 200 and poll.get_json()["received"] == []
    disk.free()
    response = api.upload(client, body)
    assert response.status_code == 202 and response.get_json()["duplicate"] is False
    assert api.get("/v1/round", client).get_json()["received"] == [client]


def test_disk_full_between_file_and_row(disk: Disk) -> None:
    """Room for the upload's body but not for its database row: 503, and the stored body is removed too."""
    api = disk.api
    client, body = api.sampled()[0], api.delta()
    before = snapshot(api.state_dir)
    page = os.statvfs(disk.mount).f_frsize
    disk.fill(leave=-(-len(body) // page) * page)
    assert_unavailable(api.upload(client, body), "database or disk is full")
    assert snapshot(api.state_dir) == before and leftovers(api.state_dir) == []
    disk.free()
    assert api.upload(client, body).status_code == 202
    assert api.get("/v1/round", client).get_json()["received"] == [client]


def test_disk_full_during_aggregation(disk: Disk) -> None:
    """A full disk stops aggregation before anything is committed: the round stays closed, the previous global
    is served intact, no file is torn; with space back the next tick aggregates exactly once."""
    api = disk.api
    push_round(api)
    served = global_served(api)
    disk.fill()
    with pytest.raises(Exception) as failure:  # safetensors reports a full disk as a SafetensorError
        api.federation.tick()
    assert_no_space(failure.value)
    assert_aggregation_pending(api, served)
    disk.free()
    assert_aggregates_exactly_once(api, served)


def test_read_only_state_dir(disk: Disk) -> None:
    """A state_dir remounted read-only answers an upload with 503 and changes nothing; once it is writable
    again the same upload is taken."""
    api = disk.api
    client, body = api.sampled()[0], api.delta()
    before = snapshot(api.state_dir)
    api.federation.store.close()  # a remount to read-only needs no file open for writing on it
    disk.remount("ro")
    try:
        response = api.upload(client, body)
    finally:
        disk.remount("rw")
    assert response.status_code == 503
    assert_error(response, 503, "storage unavailable")
    assert response.headers["Retry-After"]
    assert snapshot(api.state_dir) == before and leftovers(api.state_dir) == []
    assert api.upload(client, body).status_code == 202
    assert api.get("/v1/round", client).get_json()["received"] == [client]


# ------------------------------------------------------------------------------------------------ always: monkeypatched
def enospc(path: object = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path is not None else None)


def test_upload_write_fails(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while an upload streams to disk (part of it written): 503, no partial file, nothing changed."""
    client, body = api.sampled()[0], api.delta()
    before = snapshot(api.state_dir)

    def full_disk(self: UploadIngestor, read: Callable[[int], bytes], path: Path, content_length: int | None):
        path.write_bytes(read(1000))
        raise enospc(path)

    monkeypatch.setattr(UploadIngestor, "stream_to_file", full_disk)
    assert_unavailable(api.upload(client, body), os.strerror(errno.ENOSPC))
    assert snapshot(api.state_dir) == before and leftovers(api.state_dir) == []
    monkeypatch.undo()
    assert api.upload(client, body).status_code == 202


def test_upload_commit_fails(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database cannot grow when the update is committed: 503, and the stored update file goes too."""
    client, body = api.sampled()[0], api.delta()
    before = snapshot(api.state_dir)

    def full_database(*args: object) -> None:
        exc = sqlite3.OperationalError("database or disk is full")
        exc.sqlite_errorcode = sqlite3.SQLITE_FULL  # as SQLite sets it: classified by code, not by text
        raise exc

    monkeypatch.setattr(Store, "insert_update", staticmethod(full_database))
    assert_unavailable(api.upload(client, body), "database or disk is full")
    assert snapshot(api.state_dir) == before and leftovers(api.state_dir) == []
    monkeypatch.undo()
    assert api.upload(client, body).status_code == 202


@pytest.mark.parametrize("failing_write", [1, 2], ids=["global file", "state file"])
def test_aggregation_write_fails(api: Api, monkeypatch: pytest.MonkeyPatch, failing_write: int) -> None:
    """ENOSPC while the new version's files are written (the served global, or the state file after it): the
    round stays closed, the previous global is served intact, the partial file is gone; the next tick once
    the disk has room aggregates exactly once."""
    push_round(api)
    served = global_served(api)
    real_save_file = versions_module.save_file
    writes: list[str] = []

    def full_disk(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
        writes.append(path)
        if len(writes) == failing_write:
            Path(path).write_bytes(b"\0" * 100)  # what got written before the disk filled up
            raise enospc(path)
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(versions_module, "save_file", full_disk)
    with pytest.raises(OSError) as failure:
        api.federation.tick()
    assert_no_space(failure.value)
    assert len(writes) == failing_write
    assert_aggregation_pending(api, served)
    monkeypatch.undo()
    assert_aggregates_exactly_once(api, served)


# ------------------------------------------------------------------------------------------------ SIGTERM
def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


@pytest.mark.integration
def test_sigterm_drains_in_flight_upload(tiny_model_dir: Path, tmp_path: Path, start_server) -> None:
    """SIGTERM to the gunicorn master while an upload is still streaming in: the upload completes with 202 and
    is recorded (a restarted server on the same state_dir has it), and the master exits within the graceful
    timeout."""
    state_dir = tmp_path / "state"
    args = server_args(tiny_model_dir, state_dir, workers=2, threads=2, max_upload_mb=8)
    server = start_server(args)
    for client, n in CLIENTS.items():
        requests.post(server.url + "/v1/join", json={"num_samples": n}, headers={"X-FedLLM-Client": client},
                      timeout=30).raise_for_status()
    headers = {"X-FedLLM-Client": "alice"}
    status = requests.get(server.url + "/v1/round", headers=headers, timeout=30).json()
    client = status["sampled"][0]
    spec = requests.get(server.url + "/v1/config", headers=headers, timeout=30).json()["upload_tensors"]
    # Over 1 MiB (padded metadata), so the worker spools the arriving body to incoming/ where the test can see it.
    body = encode({name: torch.full(shape, 0.01) for name, shape in spec.items()},
                  metadata={"train_loss": "1.0", "pad": "x" * (2 << 20)})
    head = (f"POST /v1/update?round={status['round']} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-FedLLM-Client: {client}\r\n"
            f"X-FedLLM-Num-Samples: {CLIENTS[client]}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()

    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head + body[: len(body) // 4])
        # The worker has the upload once its body is arriving in incoming/ (spooled by the worker's event loop).
        _wait_for(lambda: any((state_dir / "incoming").glob("*.spool")), 30, "the upload never started")
        started = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)  # the master only, as systemd or Kubernetes would
        _wait_for(lambda: "Handling signal: term" in server.log(), 10, "the master did not take SIGTERM")
        time.sleep(0.5)
        assert server.proc.poll() is None  # still draining: the upload is not finished
        rest = body[len(body) // 4:]
        for i in range(4):
            sock.sendall(rest[i * len(rest) // 4:(i + 1) * len(rest) // 4])
            time.sleep(0.2)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 202"), reply.decode(errors="replace") + server.log()[-3000:]
    assert server.proc.wait(timeout=GUNICORN_GRACEFUL_TIMEOUT + 10) == 0, server.log()[-3000:]
    assert time.monotonic() - started < GUNICORN_GRACEFUL_TIMEOUT

    restarted = start_server(args)
    status = requests.get(restarted.url + "/v1/round", headers=headers, timeout=30).json()
    assert status["received"] == [client] and status["round"] == 1
