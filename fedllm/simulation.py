"""A federation of N clients simulated in one process, on the same code as the HTTP deployment.

``python simulate.py`` is the research workflow of OpenFedLLM's ``main_sft.py``. Nothing in it is a
second implementation of federated learning:

* the server side is a real :class:`~fedllm.server.federation.Federation` running in-process on
  ``OUTPUT_DIR/state``: the same joins, seeded sampling (``sample_clients``), upload validation,
  ``run_aggregation`` with the same algorithm objects, state files, adapter directories and history
  as ``server_http.py``. Any tool that reads a server's ``state_dir`` (``export.py``, ``evaluate.py``)
  reads a simulation's;
* the client side is one :class:`~fedllm.client.trainer.LocalTrainer` -- the base model loaded once --
  that trains every sampled client in turn with that client's own dataset and algorithm-hook state
  (SCAFFOLD's c_i lives in ``OUTPUT_DIR/clients/<id>/``, laid out and bound to the federation as in an
  HTTP client's ``--output_dir``, :mod:`fedllm.client.state`). The delta travels as the same safetensors
  body an HTTP client uploads, kept pending with the hook state it leaves until the federation accepts it.

With the same settings, data and seeds, the final adapter equals the HTTP federation's
(``tests/test_simulation.py`` checks it). A killed run restarted with the same arguments continues
from its last completed round: updates already accepted in the open round are kept, a trained update
not yet accepted is re-sent as an HTTP client re-sends it, and a client's hook state becomes current
only once its update is accepted.

Modes: ``federated`` (``--fed_alg``), ``local`` (every client trains alone: a one-client FedAvg
federation per client, which is local training, ``--max_steps`` per round) and ``central`` (all
clients' data pooled in one trainer, ``--max_steps × --sample_clients`` steps per round: the compute
of one federated round). ``local`` and ``central`` write the same state layout, under
``OUTPUT_DIR/local/<client>/state`` and ``OUTPUT_DIR/state``.

``--report_to tensorboard|mlflow|wandb`` sends each round's record to a tracker (:mod:`fedllm.trackers`,
the server's trackers), one run per federation: ``global``, ``central``, or each client in ``local``.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import importlib.util
import io
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .client.kseed import trainer_class
from .client.state import ClientState, FederationBinding, PendingUpdate
from .client.trainer import LocalTrainer, RoundResult
from .compression.updates import read_compressed_global
from .config import ClientArguments, FederationArguments, SimulationArguments
from .fsutil import atomic_write_bytes
from .server.app import ERROR_STATUS
from .server.errors import FederationError
from .server.federation import Federation
from .server.store import Store
from .trackers import Run, Tracker, missing_package, open_tracker
from .wire import decode_file

log = logging.getLogger("fedllm.simulation")

# One client per file: OpenFedLLM/FedIT's local_training_N.json or fedllm.data.split's client_N.jsonl.
CLIENT_FILE_RE = re.compile(r"^(?:local_training|client)_(\d+)\.(?:json|jsonl|parquet|csv)$")
CENTRAL_ID = "central"
# Settings that may change when a run is resumed (they do not change what is computed).
RESUMABLE_CHANGES = frozenset({"resume", "quiet", "device", "log_format", "output_dir", "report_to", "report_dir",
                               "backend", "ray_address", "num_cpus_per_client", "num_gpus_per_client"})


@dataclass
class SimulationResult:
    mode: str
    output_dir: Path
    adapters: dict[str, Path]  # "global" (federated), "central", or each client id (local) -> final PEFT directory
    history: dict[str, list[dict[str, Any]]]  # the same keys -> the server's history records, one per round


def client_files(folder: str | Path) -> list[Path]:
    """The per-client files of ``folder`` in the order of their number (``local_training_10`` after ``_9``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--client_data {folder}: not a folder")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CLIENT_FILE_RE.match(p.name))]
    if not found:
        raise ValueError(f"--client_data {folder}: no local_training_N.json or client_N.jsonl files")
    numbers = [n for n, _ in found]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"--client_data {folder}: two files with the same client number")
    return [p for _, p in sorted(found)]


def client_sources(
    federation: FederationArguments, dataset_name: str | None, sim: SimulationArguments, output_dir: Path
) -> dict[str, str]:
    """Client id -> its data file: the files of ``--client_data``, or ``--dataset_name`` split on the fly.

    A split is written to ``OUTPUT_DIR/client_data/client_N.jsonl`` (seeded by ``--seed``, so a resumed
    run writes the same files); ``--split_field`` names a field of the raw records.
    """
    if sim.client_data and dataset_name:
        raise ValueError("give --client_data (a folder of per-client files) or --dataset_name (split on the fly), "
                         "not both")
    if sim.client_data:
        files = client_files(sim.client_data)
        if len(files) != federation.num_clients:
            raise ValueError(f"--client_data {sim.client_data} holds {len(files)} clients but --num_clients is "
                             f"{federation.num_clients}; set --num_clients {len(files)}")
        return {f"client_{CLIENT_FILE_RE.match(p.name).group(1)}": str(p) for p in files}
    if not dataset_name:
        raise ValueError("give --client_data (a folder of per-client files) or --dataset_name (split on the fly)")
    from .data import load_records
    from .data.split import split_records, write_clients

    shares = split_records(load_records(dataset_name), federation.num_clients, sim.split_strategy,
                           field=sim.split_field, alpha=sim.split_alpha, seed=federation.seed)
    paths = write_clients(shares, output_dir / "client_data")
    return {f"client_{i}": str(p) for i, p in enumerate(paths)}


class ClientPool(abc.ABC):
    """Where the simulated clients of a round train: in this process, one after another (:class:`SimulatedClients`),
    or in parallel on Ray actors (:class:`fedllm.ray_backend.RayClients`).

    Either way this process, the one holding the federation, hands every update over and commits the
    client's hook state once the update is accepted (:mod:`fedllm.client.state`), as an HTTP client does.
    """

    clients_dir: Path

    @abc.abstractmethod
    def num_samples(self, client_id: str) -> int:
        """The examples ``client_id`` joins with."""

    @abc.abstractmethod
    def play_round(self, federation: Federation, client_ids: Sequence[str], global_tensors: Mapping[str, Any],
                   round_number: int, learning_rate: float, max_steps: int, clip_norm: float | None = None) -> None:
        """Train the round of every client of ``client_ids`` from ``global_tensors``; hand each update to ``federation``."""

    def client_state(self, client_id: str, federation: Federation | FederationBinding) -> ClientState:
        """``client_id``'s state folder, bound to ``federation`` (refused if it holds another federation's state);
        a Ray worker, which holds no federation, passes its binding."""
        binding = federation if isinstance(federation, FederationBinding) else FederationBinding.of(
            federation.client_config())
        return ClientState(self.clients_dir / client_id, binding)

    def deliver(self, federation: Federation, client_id: str, pending: PendingUpdate) -> None:
        """Hand ``client_id``'s pending update to ``federation``; its hook state commits on acceptance.

        Under ``--secure_aggregation`` it stays pending: the stages need every client's update, and
        :func:`run_federation` runs them for all once the round is trained (:func:`deliver_securely`)."""
        if federation.secure is not None:
            return
        state = self.client_state(client_id, federation)
        state.deliver(pending, functools.partial(_hand_over, federation, client_id))

    def resend_pending(self, federation: Federation, client_ids: Sequence[str]) -> None:
        """After a crash: re-send every update trained but not seen accepted (accepted: its state commits)."""
        for client_id in client_ids:
            pending = self.client_state(client_id, federation).pending()
            if pending is not None:
                self.deliver(federation, client_id, pending)


class _DatasetsOnDemand(dict):
    """Client id -> (train, held-out or None), each client's loaded by the trainer the first time it is asked for."""

    def __init__(self, trainer: LocalTrainer, sources: Mapping[str, str]):
        super().__init__()
        self.trainer = trainer
        self.sources = sources

    def __missing__(self, client_id: str) -> tuple[Any, Any]:
        self[client_id] = self.trainer.load_datasets(self.sources[client_id])
        return self[client_id]


class SimulatedClients(ClientPool):
    """N clients sharing one :class:`LocalTrainer` (one base model in memory).

    Each client keeps its own data -- training examples and, with ``--local_eval_fraction``, its held-out
    examples, loaded on first use (the joins load every client's), tokenised by TRL on the client's first
    round and then reused --, its sample count and its state folder (:class:`~fedllm.client.state.ClientState`).
    :meth:`train` points the trainer at one client, runs the trainer's own ``train_round`` and keeps the update
    pending as an HTTP client does before uploading it. A Ray worker holds one of these too.
    """

    def __init__(self, trainer: LocalTrainer, clients_dir: Path, sources: Mapping[str, str]):
        self.trainer = trainer
        self.clients_dir = clients_dir
        self.datasets: dict[str, tuple[Any, Any]] = _DatasetsOnDemand(trainer, sources)

    @classmethod
    def load(cls, server_config: Mapping[str, Any], client_args: ClientArguments, sources: Mapping[str, str],
             clients_dir: Path, *, state_dir: Path | None = None) -> SimulatedClients:
        """Load the base model once, with the first client's data (the others' on first use).

        ``state_dir``: the trainer's state folder until it is pointed at a client (default: the first client's).
        """
        first, *_ = sources
        trainer = trainer_class(server_config)(  # FedKSeed's zeroth-order trainer, else the TRL one
            server_config, dataclasses.replace(client_args, dataset_name=sources[first]),
            state_dir=state_dir or clients_dir / first)
        pool = cls(trainer, clients_dir, sources)
        pool.datasets[first] = (trainer.train_dataset, trainer.eval_dataset)
        return pool

    def num_samples(self, client_id: str) -> int:
        return len(self.datasets[client_id][0])

    def use_client(self, client_id: str, federation: Federation | FederationBinding) -> None:
        """Point the shared trainer at ``client_id``: its dataset, sample count and state folder."""
        self.trainer.use_client(client_id, *self.datasets[client_id], self.client_state(client_id, federation))

    def train(self, client_id: str, federation: Federation | FederationBinding, global_tensors: Mapping[str, Any],
              round_number: int, learning_rate: float, max_steps: int, clip_norm: float | None = None
              ) -> PendingUpdate:
        """Train ``client_id``'s round; the update is kept pending with the hook state it leaves.

        A round already kept is not trained again: a Ray worker killed after keeping it is retried.
        """
        self.use_client(client_id, federation)
        state = self.trainer.client_state
        kept = state.pending()
        if kept is not None and kept.round == round_number:
            return kept
        result = self.trainer.train_round(global_tensors, round_number, learning_rate, max_steps, clip_norm)
        self.datasets[client_id] = (self.trainer.train_dataset, self.trainer.eval_dataset)  # tokenised: reused
        return state.write_pending(round_number, result.encode(self.trainer.federation.wire_dtype),
                                   self.num_samples(client_id), result.state)

    def play_round(self, federation: Federation, client_ids: Sequence[str], global_tensors: Mapping[str, Any],
                   round_number: int, learning_rate: float, max_steps: int, clip_norm: float | None = None) -> None:
        for client_id in client_ids:
            pending = self.train(client_id, federation, global_tensors, round_number, learning_rate, max_steps,
                                 clip_norm)
            self.deliver(federation, client_id, pending)


def open_federation(config: FederationArguments, state_dir: Path) -> Federation:
    """Create (or resume, with the same settings) a federation in ``state_dir``."""
    Federation.initialize(config, state_dir)
    return Federation(Store(state_dir))


def submit(federation: Federation, client_id: str, round_number: int, num_samples: int, result: RoundResult) -> None:
    """Hand a client's update to the federation as the same safetensors body an HTTP client uploads."""
    _receive(federation, client_id, round_number, num_samples, result.encode(federation.config.wire_dtype))


def _hand_over(federation: Federation, client_id: str, pending: PendingUpdate) -> bool:
    """Hand a pending update to the federation: True when accepted, False when refused (HTTP would answer 409)."""
    try:
        _receive(federation, client_id, pending.round, pending.num_samples, pending.update_path.read_bytes())
    except FederationError as exc:
        if ERROR_STATUS.get(type(exc)) != 409:
            raise
        log.warning("round %d: update of %s not taken (%s)", pending.round, client_id, exc)
        return False
    return True


def _receive(federation: Federation, client_id: str, round_number: int, num_samples: int, body: bytes) -> None:
    federation.receive_update(client_id, round_number, num_samples, io.BytesIO(body).read, len(body), None)


class InProcessSecAgg:
    """The two calls :class:`~fedllm.client.secagg.SecureUploader` makes, straight into the federation's
    :class:`~fedllm.server.secure_rounds.SecureRounds` (an error becomes the ServerError HTTP would give)."""

    def __init__(self, federation: Federation, client_id: str):
        self.federation = federation
        self.client_id = client_id

    def secagg_view(self) -> dict[str, Any]:
        return self.federation.secure.view(self.client_id)

    def history(self) -> list[dict[str, Any]]:
        from .server.views import history_view

        return history_view(self.federation.history(), self.client_id)

    def secagg_send(self, stage: str, round_number: int, attempt: int, *, message: dict[str, Any] | None = None,
                    body: bytes | None = None) -> dict[str, Any]:
        from .client.http import ServerError

        secure = self.federation.secure
        try:
            if stage == "masked":
                return secure.receive_masked(self.client_id, round_number, attempt, io.BytesIO(body).read, len(body))
            receive = {"keys": secure.receive_keys, "shares": secure.receive_shares, "unmask": secure.receive_unmask}
            return receive[stage](self.client_id, round_number, attempt, message)
        except FederationError as exc:
            raise ServerError(ERROR_STATUS[type(exc)], exc.error, exc.detail) from None


def deliver_securely(federation: Federation, clients: ClientPool, client_ids: Sequence[str]) -> bool:
    """Run the SecAgg+ stages of the round for the pending updates of ``client_ids``, the clients taking turns
    (each with its own state folder, as over HTTP); each update commits once its client's part is done (with
    client state, SCAFFOLD's c_i, once the round is aggregated with it: the federation ticks between passes).
    Returns whether it aggregated the round."""
    from .client.secagg import SecureUploader

    config = federation.client_config()
    states = {c: clients.client_state(c, federation) for c in client_ids}
    pending = {c: p for c, state in states.items() if (p := state.pending()) is not None}
    uploaders = {c: SecureUploader(InProcessSecAgg(federation, c), config, clients.clients_dir / c) for c in pending}
    finished: dict[str, bool] = {}
    aggregated = False
    for _ in range(10 * len(pending) + 10):  # every pass answers one stage for every client
        for client_id in sorted(set(pending) - set(finished)):
            result = uploaders[client_id].step(pending[client_id])
            if result is not None:
                finished[client_id] = result
                (states[client_id].commit if result else states[client_id].discard)(pending[client_id])
        if len(finished) == len(pending):
            return aggregated
        aggregated = federation.tick() or aggregated
    raise RuntimeError(f"the secure-aggregation stages did not finish: {federation.status().get('secagg')}")


RoundCallback = Callable[[str, dict[str, Any]], None]


def run_federation(federation: Federation, clients: ClientPool, client_ids: Sequence[str], *, name: str,
                   history_file: Path, on_round: RoundCallback | None = None) -> list[dict[str, Any]]:
    """Drive ``federation`` to its end: every round, train the sampled clients (in turn, or in parallel on Ray),
    submit, aggregate."""
    for client_id in client_ids:
        federation.join(client_id, clients.num_samples(client_id))  # a rejoin on resume changes nothing
    clients.resend_pending(federation, client_ids)

    def finished_round() -> None:
        history = federation.history()
        atomic_write_bytes(history_file, json.dumps(history, indent=1).encode())
        if on_round is not None:
            on_round(name, history[-1])

    while True:
        while federation.tick():  # a round closed before a restart
            finished_round()
        status = federation.status()
        if status["phase"] == "finished":
            return federation.history()
        round_number = status["round"]
        codec = federation.versions.codec  # a quantizer: clients train from ĝ = D(C(g)), as they do over HTTP
        served = federation.served_global("compressed" if codec else "dense")
        global_tensors = read_compressed_global(served.path, codec, federation.spec) if codec else \
            decode_file(served.path)
        round_config = federation.round_training_config(round_number)
        to_train = [c for c in status["sampled"] if c not in status["received"]]  # the others: accepted before a restart
        clients.play_round(federation, to_train, global_tensors, round_number, round_config["learning_rate"],
                           round_config["max_steps"], round_config.get("dp_clip_norm"))
        aggregated = federation.secure is not None and deliver_securely(federation, clients, status["sampled"])
        if not (aggregated or federation.tick()):
            raise RuntimeError(f"round {round_number} did not aggregate; state in {federation.store.root}")
        finished_round()


def _tracked(on_round: RoundCallback | None, tracker: Tracker | None) -> RoundCallback | None:
    """``on_round``, and each round's record to ``tracker`` first."""
    if tracker is None:
        return on_round

    def both(name: str, record: dict[str, Any]) -> None:
        tracker.log_round(record)
        if on_round is not None:
            on_round(name, record)

    return both


def print_round(name: str, record: Mapping[str, Any]) -> None:
    """One line per aggregated round (the demo's table)."""
    loss = record.get("train_loss")
    loss_text = f"{loss:10.4f}" if isinstance(loss, (int, float)) else f"{'n/a':>10}"
    prefix = f"{name:>10} " if name else ""
    print(f"{prefix}{record['round']:5d} {len(record['participants']):8d}  {loss_text} {record['seconds']:8.1f}",
          flush=True)


def _check_resumable(output_dir: Path, settings: dict[str, Any], resume: bool) -> None:
    """Refuse to continue a run made with other settings (or any run, with ``--resume false``)."""
    path = output_dir / "simulation.json"
    if not resume and any((output_dir / name).exists() for name in ("simulation.json", "state", "local")):
        raise ValueError(f"{output_dir} holds a simulation; use --resume true to continue it, or a new --output_dir")
    if path.exists():
        stored = json.loads(path.read_text())
        diff = {}
        for group, values in settings.items():
            for key, value in values.items():
                old = stored.get(group, {}).get(key, value)
                if key not in RESUMABLE_CHANGES and old != value:
                    diff[key] = (old, value)
        if diff:
            details = ", ".join(f"--{k} {new!r} (the run has {old!r})" for k, (old, new) in sorted(diff.items()))
            raise ValueError(f"{output_dir} holds a simulation with other settings: {details}. "
                             "Use the same settings to resume, or a new --output_dir.")


def _check_backend(sim: SimulationArguments) -> None:
    """Refuse backend options that do not fit together, before anything is written."""
    if sim.backend not in ("inprocess", "ray"):
        raise ValueError(f"unknown --backend {sim.backend!r}; choose inprocess or ray")
    if sim.num_cpus_per_client is not None and sim.num_cpus_per_client < 1:
        raise ValueError(f"--num_cpus_per_client must be at least 1, got {sim.num_cpus_per_client}")
    if sim.backend == "inprocess":
        ray_only = [f"--{name}" for name, default in (("ray_address", None), ("num_gpus_per_client", 0.0))
                    if getattr(sim, name) != default]
        if ray_only:
            raise ValueError(f"{', '.join(ray_only)} apply to --backend ray only")
        return
    if sim.mode != "federated":
        raise ValueError(f"--backend ray trains the sampled clients of a federated round in parallel; --mode "
                         f"{sim.mode} trains one client per round: use --backend inprocess")
    if sim.num_gpus_per_client < 0:
        raise ValueError(f"--num_gpus_per_client must be >= 0, got {sim.num_gpus_per_client}")
    if importlib.util.find_spec("ray") is None:
        raise ValueError("--backend ray needs Ray: pip install -c constraints.txt -e '.[ray]'")


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Train with ``threads`` intra-op threads (None: torch's own), as a Ray worker of ``--num_cpus_per_client`` does:
    a reduction's result can depend on how many threads share it. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_simulation(
    federation: FederationArguments,
    client: Any,
    sim: SimulationArguments,
    *,
    on_round: RoundCallback | None = print_round,
) -> SimulationResult:
    """Run (or resume) one simulation; ``client`` is a ``SimulatedClientArguments`` (or ``ClientArguments``)."""
    output_dir = Path(sim.output_dir)
    client_settings = {k: v for k, v in dataclasses.asdict(client).items()
                       if k in {f.name for f in dataclasses.fields(ClientArguments)}}
    settings = {"federation": dataclasses.asdict(federation), "client": client_settings,
                "simulation": dataclasses.asdict(sim)}
    federation.validate()
    if federation.split_enabled:
        raise ValueError("--fed_mode split runs over HTTP (run_server.sh + run_client.sh); simulate.py simulates "
                         "--fed_mode lora. In one process, fedllm.split.step.split_step runs the three parts.")
    if sim.report_to != "none" and (problem := missing_package(sim.report_to)):
        raise ValueError(problem)
    _check_backend(sim)
    _check_resumable(output_dir, settings, sim.resume)
    client_settings.update(seed=sim.client_seed, output_dir=str(output_dir), model_name_or_path=None)
    client_args = ClientArguments(**client_settings)
    sources = client_sources(federation, client_args.dataset_name, sim, output_dir)
    # A simulated round never times out: every sampled client trains, however long it takes.
    config = dataclasses.replace(federation, round_timeout=0.0)
    one_client = dict(num_clients=1, sample_clients=1, min_fit_clients=1, fed_alg="fedavg")

    if sim.mode == "federated":
        runs = {"global": (config, output_dir, list(sources))}
    elif sim.mode == "local":
        runs = {cid: (dataclasses.replace(config, **one_client), output_dir / "local" / cid, [cid]) for cid in sources}
    elif sim.mode == "central":
        central = dataclasses.replace(config, **one_client, max_steps=config.max_steps * config.sample_clients)
        runs = {CENTRAL_ID: (central, output_dir, [CENTRAL_ID])}
    else:
        raise ValueError(f"unknown --mode {sim.mode!r}; choose federated, local or central")

    federations: dict[str, Federation] = {}
    with contextlib.ExitStack() as stack:
        for name, (cfg, run_dir, _) in runs.items():
            federations[name] = open_federation(cfg, run_dir / "state")
            stack.callback(federations[name].store.close)
        # Written once the settings proved valid, so a mistyped first attempt does not pin them.
        atomic_write_bytes(output_dir / "simulation.json", json.dumps(settings, indent=1, sort_keys=True).encode())
        first = next(iter(federations.values()))
        if sim.backend == "ray":
            from .ray_backend import RayClients

            clients = stack.enter_context(RayClients.start(first.client_config(), client_args, sources,
                                                           output_dir / "clients", sim))
        else:
            stack.enter_context(_torch_threads(sim.num_cpus_per_client))
            clients = SimulatedClients.load(first.client_config(), client_args, sources, output_dir / "clients")
        if sim.mode == "central":
            import datasets

            train, held_out = zip(*(clients.datasets[c] for c in sources), strict=True)
            clients.datasets[CENTRAL_ID] = (datasets.concatenate_datasets(list(train)),
                                            None if held_out[0] is None else datasets.concatenate_datasets(list(held_out)))
        result = SimulationResult(sim.mode, output_dir, {}, {})
        for name, (cfg, run_dir, ids) in runs.items():
            fed = federations[name]
            label = name if sim.mode == "local" else ""
            tracker = None
            if sim.report_to != "none":
                run = Run(key=fed.federation_id, name=name, config={**dataclasses.asdict(cfg), "mode": sim.mode})
                tracker = open_tracker(sim.report_to, sim.report_dir or output_dir, run)
            try:
                result.history[name] = run_federation(fed, clients, ids, name=label,
                                                      history_file=run_dir / "history.json",
                                                      on_round=_tracked(on_round, tracker))
            finally:
                if tracker is not None:
                    tracker.close()
            result.adapters[name] = fed.output_dir / "final"
        return result
