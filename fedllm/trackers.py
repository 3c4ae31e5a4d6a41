"""Each aggregated round's record, sent to an experiment tracker: ``--report_to tensorboard|mlflow|wandb``.

One interface, :class:`Tracker`, and one implementation per tracker (as Flower's and TRL's ``report_to``),
used by the server (after each aggregation, in the process that aggregated: :mod:`fedllm.server.metrics`)
and by the simulation (after each round). A tracker receives the round's history record -- the one
``GET /v1/history`` serves -- and writes its scalars (:data:`ROUND_SCALARS`, as ``federation/<name>``)
for that round. Each federation is one run, keyed by its federation id, so a restarted server or a
resumed simulation continues its run.

Nothing leaves the machine unless the operator asks for it:

* ``tensorboard``: event files in ``REPORT_DIR/tensorboard`` (the simulation: ``REPORT_DIR/tensorboard/<run>``);
* ``mlflow``: a local file store, ``file:REPORT_DIR/mlflow`` (``mlflow ui --backend-store-uri file:...``),
  or ``$MLFLOW_TRACKING_URI`` when set; MLflow's usage telemetry stays off unless ``MLFLOW_DISABLE_TELEMETRY``
  says otherwise;
* ``wandb``: offline runs in ``REPORT_DIR/wandb`` (upload them later with ``wandb sync``), unless
  ``WANDB_MODE`` says otherwise.

Each tracker's package is an optional extra (``pip install 'fedllm[mlflow]'``) imported only when a tracker
opens; this module itself imports nothing heavy (``fedllm.config`` takes its choices from here).
"""

from __future__ import annotations

import importlib.util
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# The scalars of a round's record that every tracker writes (``participants``: how many).
ROUND_SCALARS = ("train_loss", "eval_loss", "participants", "num_samples", "bytes_received", "seconds",
                 "aggregation_seconds")
SCALAR_PREFIX = "federation/"
ROUND_KEY = "round"  # W&B's x axis for the scalars (see WandbTracker)
PROJECT = "fedllm"  # the MLflow experiment and the W&B project
RUN_KEY_TAG = "fedllm_federation_id"  # the MLflow tag that finds a federation's run again


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """``federation/<name>`` -> value for each of :data:`ROUND_SCALARS` the record has as a number."""
    values = dict(record, participants=len(record.get("participants") or []))
    return {SCALAR_PREFIX + name: float(value) for name in ROUND_SCALARS
            if isinstance(value := values.get(name), (int, float)) and not isinstance(value, bool)}


@dataclass(frozen=True)
class Run:
    """One federation as a tracker run."""

    key: str  # the federation id: unique per federation, the same after a restart
    name: str | None = None  # the simulation's run (global, central, or a client of --mode local); None: a server
    config: Mapping[str, Any] = field(default_factory=dict)  # the federation's settings, recorded with the run


class Tracker(ABC):
    """Where each aggregated round's record goes. One instance per process and run."""

    name: ClassVar[str]  # the --report_to value
    package: ClassVar[str]  # the module it needs
    extra: ClassVar[str]  # the pip extra that installs it

    def __init__(self, report_dir: Path, run: Run):
        self.report_dir = Path(report_dir)
        self.run = run

    @abstractmethod
    def log_round(self, record: Mapping[str, Any]) -> None:
        """Write one aggregated round's scalars (:func:`round_scalars`) for its ``round``."""

    @abstractmethod
    def close(self) -> None:
        """Finish the run (the simulation, at its end; a server's workers leave theirs open)."""


class TensorBoardTracker(Tracker):
    """Event files written and flushed per round, one file per process (TensorBoard merges them by step)."""

    name, package, extra = "tensorboard", "tensorboardX", "tensorboard"

    def __init__(self, report_dir: Path, run: Run):
        super().__init__(report_dir, run)
        self.logdir = self.report_dir / "tensorboard" / (run.name or "")
        self._writer: Any = None

    def log_round(self, record: Mapping[str, Any]) -> None:
        # The low-level writer: each event is on disk before this returns (SummaryWriter queues them in a thread).
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        if self._writer is None:
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._writer = EventsWriter(str(self.logdir / "events"), f".{os.getpid()}")
        event = Event(wall_time=time.time(), step=int(record["round"]))
        for tag, value in round_scalars(record).items():
            event.summary.value.extend(scalar(tag, value).value)
        self._writer.write_event(event)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class MLflowTracker(Tracker):
    """An MLflow run in the experiment ``fedllm``, found again by the tag ``fedllm_federation_id``."""

    name, package, extra = "mlflow", "mlflow", "mlflow"

    def __init__(self, report_dir: Path, run: Run):
        super().__init__(report_dir, run)
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read by MLflow at import
        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or (self.report_dir / "mlflow").resolve().as_uri()
        if self.tracking_uri.startswith("file:"):
            # MLflow 3 keeps the file store in maintenance mode and refuses it without this switch.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(PROJECT)
        found = self.client.search_runs([experiment_id], filter_string=f"tags.{RUN_KEY_TAG} = '{run.key}'",
                                        max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            return
        created = self.client.create_run(experiment_id, run_name=run.name or run.key, tags={RUN_KEY_TAG: run.key})
        self.run_id = created.info.run_id
        # Parameters are write-once in MLflow: recorded when the run is created.
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in run.config.items()])

    def log_round(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        step = int(record["round"])
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now_ms, step)
                                                    for key, value in round_scalars(record).items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker(Tracker):
    """A W&B run with the federation id as its id, offline unless ``WANDB_MODE`` says otherwise.

    The scalars are plotted against ``round`` (a metric of their own, not W&B's step): on a server, rounds
    are aggregated by whichever worker process closes them, each with its own W&B run object, and W&B drops
    a step lower than one it has seen.
    """

    name, package, extra = "wandb", "wandb", "wandb"

    def __init__(self, report_dir: Path, run: Run):
        super().__init__(report_dir, run)
        import wandb

        self.report_dir.mkdir(parents=True, exist_ok=True)
        # A server's stdout, its git tree and the machine's load are not the federation's record; a round is in the
        # run's file within a second (W&B's default: 15 s), as a server's worker never finishes its run.
        settings = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False, x_disable_stats=True,
                                  x_transaction_log_flush_interval=1.0)
        self.wandb_run = wandb.init(project=PROJECT, id=run.key, name=run.name or run.key, dir=str(self.report_dir),
                                    mode=os.environ.get("WANDB_MODE") or "offline", resume="allow",
                                    config=dict(run.config), settings=settings)
        self.wandb_run.define_metric(ROUND_KEY)
        self.wandb_run.define_metric(SCALAR_PREFIX + "*", step_metric=ROUND_KEY)

    def log_round(self, record: Mapping[str, Any]) -> None:
        self.wandb_run.log({ROUND_KEY: int(record["round"]), **round_scalars(record)}, commit=True)

    def close(self) -> None:
        self.wandb_run.finish()


TRACKERS: dict[str, type[Tracker]] = {cls.name: cls for cls in (TensorBoardTracker, MLflowTracker, WandbTracker)}
REPORT_TO_CHOICES = ("none", *TRACKERS)


def missing_package(report_to: str) -> str | None:
    """Why ``--report_to report_to`` cannot run in this environment (its package is missing), or None."""
    tracker = TRACKERS[report_to]
    if importlib.util.find_spec(tracker.package) is None:
        return f"--report_to {report_to} needs {tracker.package} (pip install 'fedllm[{tracker.extra}]')"
    return None


def open_tracker(report_to: str, report_dir: str | Path, run: Run) -> Tracker:
    """The ``report_to`` tracker for ``run``, writing under ``report_dir``."""
    if report_to not in TRACKERS:
        raise ValueError(f"--report_to must be one of {', '.join(REPORT_TO_CHOICES)}, got {report_to!r}")
    return TRACKERS[report_to](Path(report_dir), run)
