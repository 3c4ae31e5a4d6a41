"""Shared fixtures: the tiny model (built once per session), free ports, real server processes; the test tiers.

Tiers: a test that trains a model or starts a server or client process is marked ``integration``; every
other test is marked ``unit`` here, and :func:`_units_stay_units` makes that true -- a unit test that
trains or starts a process fails, naming the marker it needs. ``scripts/test.sh -m unit`` is the fast tier.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedllm.localserver import LocalServer
from fedllm.tiny import build_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
# Programs that serve, train or drive a federation: starting one makes a test an integration test.
FEDLLM_PROGRAMS = frozenset({"run_server.sh", "run_client.sh", "server_http.py", "client_http.py", "simulate.py",
                             "demo.sh", "gunicorn", "fedllm"})
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _weight_tying_stays_on() -> Iterator[None]:
    """No test leaves transformers' tie_weights swapped out (two unlocked loads at once do: fedllm.adapter)."""
    from transformers import PreTrainedModel

    from fedllm.adapter import MODEL_BUILD_LOCK

    original = PreTrainedModel.tie_weights
    yield
    with MODEL_BUILD_LOCK:  # a load still running in a test's background thread swaps it legitimately: wait for it
        intact = PreTrainedModel.tie_weights is original
    if not intact:
        PreTrainedModel.tie_weights = original  # the later tests get tied models again
        pytest.fail("this test left PreTrainedModel.tie_weights disabled: models were built in two threads at once "
                    "outside fedllm.adapter's lock")


@pytest.fixture(autouse=True)
def _units_stay_units(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit test may not train (TRL/transformers ``Trainer.train``) or start a server or client process."""
    if request.node.get_closest_marker("integration") is not None:
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("this test trains or starts a process: mark it @pytest.mark.integration")

    from transformers import Trainer

    popen = subprocess.Popen.__init__

    def popen_unless_fedllm(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
        argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else [str(args)]
        if any(Path(a).name in FEDLLM_PROGRAMS for a in argv):
            refuse()
        popen(self, args, *rest, **kwargs)

    monkeypatch.setattr(Trainer, "train", refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", popen_unless_fedllm)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The entry points' main() replaces the root logger's handlers; put them back after the test."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny4_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with 4 layers: enough to split into head, middle and tail (split learning's tests)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-4"), seed=0, num_hidden_layers=4)


def joined_federation_dir(config, dest: Path, clients: dict[str, int]) -> Path:
    """A state dir initialised with ``config`` (FederationArguments) in which every client of ``clients`` joined."""
    from fedllm.server.federation import Federation

    Federation.initialize(config, dest)
    return _join_all(dest, clients)


@pytest.fixture
def federation_copy(tmp_path) -> Iterator:
    """Opens a fresh copy of a prepared state dir as a Federation (``federation_copy(source)``); closes them all."""
    from fedllm.server.federation import Federation
    from fedllm.server.store import Store

    stores: list = []

    def _open(source: Path):
        dest = tmp_path / source.name
        shutil.copytree(source, dest)
        stores.append(Store(dest))
        return Federation(stores[-1])

    yield _open
    for store in stores:
        store.close()


def joined_copy(source: Path, dest: Path, clients: dict[str, int]) -> Path:
    """A copy of an initialised state dir in which every client of ``clients`` (id -> num_samples) joined."""
    shutil.copytree(source, dest)
    return _join_all(dest, clients)


def _join_all(dest: Path, clients: dict[str, int]) -> Path:
    """Join every client of ``clients`` (id -> num_samples) to the federation in the state dir ``dest``."""
    from fedllm.server.federation import Federation
    from fedllm.server.store import Store

    store = Store(dest)
    federation = Federation(store)
    for client, n in clients.items():
        federation.join(client, n)
    store.close()
    return dest


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    servers: list[LocalServer] = []

    def _start(args: list[str], **kwargs) -> LocalServer:
        server = LocalServer(args, tmp_path / f"server-{len(servers)}.log", **kwargs)
        servers.append(server)
        return server.start(timeout=60)

    yield _start
    for server in servers:
        server.kill()


def run_client_process(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "client_http.py"), *args]
    return subprocess.Popen(cmd, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
