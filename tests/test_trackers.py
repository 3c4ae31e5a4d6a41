"""``--report_to tensorboard|mlflow|wandb``: each tracker writes every round's record, on this machine only (MLflow's
local file store, W&B offline), one run per federation that a restart continues; the server (from the worker that
aggregated) and the simulation both report."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fedllm.config import SimulationArguments
from fedllm.simulation import run_simulation
from fedllm.trackers import (
    REPORT_TO_CHOICES,
    TRACKERS,
    MLflowTracker,
    Run,
    WandbTracker,
    missing_package,
    open_tracker,
    round_scalars,
)

from .test_dashboard import LiveFederation, live_server_args
from .test_metrics import read_tensorboard_scalars
from .test_simulation import CLIENT, federation_args

T = TypeVar("T")
# What the trackers read from the environment, or set there for themselves (WANDB_SERVICE: the W&B service a
# process started, which its children would share; a server's workers, forked from a master without W&B, each start
# their own).
TRACKER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_ALLOW_FILE_STORE", "WANDB_MODE", "WANDB_DIR",
               "WANDB_SERVICE")
RECORDS = [
    {"round": 1, "participants": ["alice", "bob"], "num_samples": 40, "train_loss": 2.75, "eval_loss": None,
     "seconds": 1.5, "aggregation_seconds": 0.01, "bytes_received": 9232, "metrics": {}},
    {"round": 2, "participants": ["bob"], "num_samples": 30, "train_loss": 1.0, "eval_loss": 1.25, "seconds": 1.0,
     "aggregation_seconds": 0.02, "bytes_received": 4616, "metrics": {}},
]


@pytest.fixture(autouse=True)
def tracker_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No tracker setting from the caller's environment, and none left behind (a tracker sets its own defaults)."""
    for name in TRACKER_ENV:
        monkeypatch.setenv(name, "")  # records the original value, restored after the test
        monkeypatch.delenv(name)
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()  # stop the W&B service this test started, if any


def mlflow_runs(store: Path) -> dict[str, Any]:
    """Run name -> (its tags, its params, metric key -> {step: value}) in the MLflow file store ``store`` (none yet:
    {})."""
    from mlflow.tracking import MlflowClient

    if not store.is_dir():
        return {}
    os.environ.update(MLFLOW_ALLOW_FILE_STORE="true", MLFLOW_DISABLE_TELEMETRY="true")  # undone by tracker_env
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name("fedllm")
    if experiment is None:
        return {}
    runs = {}
    for run in client.search_runs([experiment.experiment_id]):
        metrics = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                   for key in run.data.metrics}
        runs[run.info.run_name] = (run.data.tags, run.data.params, metrics)
    return runs


def wandb_history(wandb_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Run id -> its logged rows, read from the offline runs' ``.wandb`` files (a LevelDB log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    block = 32768  # LevelDB's log block; a record's 7-byte header: crc (4), length (2), type (1)
    rows: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        position, pending = 7, b""  # after W&B's own 7-byte file header
        while position + 7 <= len(data):
            if block - position % block < 7:  # the block's tail is padding
                position += block - position % block
                continue
            length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
            pending += data[position + 7:position + 7 + length]
            position += 7 + length
            if kind not in (1, 4):  # FIRST and MIDDLE fragments continue in the next record
                continue
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
                rows.setdefault(path.stem.removeprefix("run-"), []).append(row)
    return rows


def once_written(read: Callable[[], T], complete: Callable[[T], bool], timeout: float = 60.0) -> T:
    """``read()`` once ``complete`` says it is (or at the timeout): a server reports a round after committing it (the
    history shows it first), and W&B's service writes its file a moment after a round is logged."""
    deadline = time.time() + timeout
    while not complete(found := read()) and time.time() < deadline:
        time.sleep(0.2)
    return found


def wandb_rows(found: dict[str, list[dict[str, Any]]]) -> int:
    return sum(map(len, found.values()))


def test_round_scalars_are_the_records_numbers() -> None:
    assert round_scalars(RECORDS[0]) == {
        "federation/train_loss": 2.75, "federation/participants": 2.0, "federation/num_samples": 40.0,
        "federation/bytes_received": 9232.0, "federation/seconds": 1.5, "federation/aggregation_seconds": 0.01}
    assert round_scalars({"round": 3, "train_loss": True, "participants": None}) == {"federation/participants": 0.0}
    assert REPORT_TO_CHOICES == ("none", "tensorboard", "mlflow", "wandb")


def test_every_tracker_is_installed_for_ci_and_a_missing_one_is_named_with_its_extra(monkeypatch) -> None:
    assert [name for name in TRACKERS if missing_package(name)] == []  # the test extra installs them all
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert missing_package("mlflow") == "--report_to mlflow needs mlflow (pip install 'fedllm[mlflow]')"
    with pytest.raises(ValueError, match="--report_to must be one of none, tensorboard, mlflow, wandb"):
        open_tracker("comet", Path("."), Run("x"))


def test_tensorboard_writes_each_round_per_run(tmp_path: Path) -> None:
    tracker = open_tracker("tensorboard", tmp_path, Run("f1", name="client_0"))
    for record in RECORDS:
        tracker.log_round(record)
    tracker.close()
    scalars = read_tensorboard_scalars(tmp_path / "tensorboard" / "client_0")
    assert scalars["federation/train_loss"] == {1: 2.75, 2: 1.0}
    assert scalars["federation/participants"] == {1: 2.0, 2: 1.0}


def test_mlflow_writes_a_local_file_store_and_a_restart_continues_the_run(tmp_path: Path) -> None:
    config = {"fed_alg": "fedavg", "num_rounds": 3}
    first = open_tracker("mlflow", tmp_path, Run("f1", config=config))
    assert isinstance(first, MLflowTracker) and first.tracking_uri == (tmp_path / "mlflow").resolve().as_uri()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # nothing leaves the machine
    first.log_round(RECORDS[0])
    restarted = open_tracker("mlflow", tmp_path, Run("f1", config={**config, "num_rounds": 5}))  # another process
    restarted.log_round(RECORDS[1])
    restarted.close()
    other = open_tracker("mlflow", tmp_path, Run("f2", name="client_1"))
    other.log_round(RECORDS[0])
    runs = mlflow_runs(tmp_path / "mlflow")
    assert sorted(runs) == ["client_1", "f1"]
    tags, params, metrics = runs["f1"]
    assert tags["fedllm_federation_id"] == "f1" and params == {"fed_alg": "fedavg", "num_rounds": "3"}
    assert metrics["federation/train_loss"] == {1: 2.75, 2: 1.0}
    assert metrics["federation/eval_loss"] == {2: 1.25}
    assert runs["client_1"][2]["federation/participants"] == {1: 2.0}


def test_wandb_writes_an_offline_run_keyed_by_the_federation(tmp_path: Path) -> None:
    tracker = open_tracker("wandb", tmp_path, Run("f1abc", config={"fed_alg": "fedavg"}))
    assert isinstance(tracker, WandbTracker) and tracker.wandb_run.settings.mode == "offline"
    for record in RECORDS:
        tracker.log_round(record)
    tracker.close()
    rows = once_written(lambda: wandb_history(tmp_path), lambda found: wandb_rows(found) == 2)
    assert list(rows) == ["f1abc"]
    assert [(r["round"], r["federation/train_loss"], r["federation/participants"]) for r in rows["f1abc"]] == [
        (1, 2.75, 2), (2, 1.0, 1)]


# ------------------------------------------------------------------------------------------ server and simulation
# The server with W&B (its service started from a gunicorn worker's thread), the simulation with MLflow.
@pytest.mark.integration
def test_the_server_reports_each_aggregated_round_from_the_worker_that_aggregated(tiny_model_dir: Path,
                                                                                  tmp_path: Path, start_server) -> None:
    server = start_server(live_server_args(tiny_model_dir, tmp_path / "state", workers=2, num_clients=2,
                                           num_rounds=2, report_to="wandb", report_dir=tmp_path / "reports"))
    live = LiveFederation(server.url)
    samples = {"alice": 10, "bob": 30}
    for client, n in samples.items():
        live.join(client, n)
    live.play_round(1, {"alice": 2.0, "bob": 3.0}, samples)
    live.wait_for_rounds("alice", 1)
    live.play_round(2, {"alice": 1.0, "bob": 1.0}, samples)
    history = live.wait_for_rounds("alice", 2)
    federation_id = live.config("alice")["federation_id"]
    # Read while the workers run: they never finish their runs; W&B's service writes every second.
    rows = once_written(lambda: wandb_history(tmp_path / "reports"), lambda found: wandb_rows(found) == 2)
    assert list(rows) == [federation_id]  # one run id, in a file per worker process that aggregated
    assert sorted((r["round"], r["federation/train_loss"], r["federation/bytes_received"]) for r in rows[federation_id]) \
        == [(r["round"], pytest.approx(r["train_loss"]), r["bytes_received"]) for r in history]
    assert [r["train_loss"] for r in history] == [pytest.approx(2.75), pytest.approx(1.0)]
    assert "Traceback" not in server.log()


@pytest.mark.integration
def test_the_simulation_reports_one_run_per_federation(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedllm.data import write_demo_data

    data = tmp_path / "data"
    write_demo_data(data, num_clients=2, rows_per_client=8, seed=1)
    sim = SimulationArguments(client_data=str(data), output_dir=str(tmp_path / "run"), mode="local",
                              report_to="mlflow")
    result = run_simulation(federation_args(tiny_model_dir, num_clients=2, num_rounds=2), CLIENT, sim, on_round=None)
    runs = mlflow_runs(tmp_path / "run" / "mlflow")
    assert sorted(runs) == ["client_0", "client_1"]  # --mode local: each client alone, a run each
    for client, (_tags, params, metrics) in runs.items():
        assert params["mode"] == "local"
        assert metrics["federation/train_loss"] == {r["round"]: pytest.approx(r["train_loss"])
                                                    for r in result.history[client]}
