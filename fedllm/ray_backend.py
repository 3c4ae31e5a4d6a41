"""``simulate.py --backend ray``: the sampled clients of a round train in parallel, on Ray actors.

Each actor (:class:`ClientWorker`) loads the base model once and keeps it for the whole run. It holds a
:class:`~fedllm.simulation.SimulatedClients`, the in-process backend's own per-client training (the client's
data, ``LocalTrainer.train_round``, the update kept pending with the hook state it leaves,
:mod:`fedllm.client.state`), and trains whichever client it is handed. The server side stays in this process:
the same :class:`~fedllm.server.federation.Federation` (sampling, validation, aggregation, state files, resume),
and this process hands every pending update over and commits the client's state on acceptance, as the
in-process backend does. Hence the same run folder and, with the same thread count, the same results
(``--num_cpus_per_client`` pins both backends' torch threads: a reduction can add up differently on
another number of threads).

Faults: an actor whose process dies (killed, out of memory, its node lost) is restarted by Ray, loading the
base model again, and the client it was training is retried, up to :data:`MAX_RESTARTS` times; an update kept
before the death is handed over as it is, not trained again. A simulated round has no deadline (it waits for
every sampled client), so a client that fails on every try fails the run, and the same command resumes it.

Files: the actors read the model and the clients' data, and write the clients' pending updates in
``OUTPUT_DIR/clients``, at the paths this process gives them. On a cluster of several machines these must be on
a filesystem every node mounts at the same path (docs/scaling.md); a worker that cannot see the run folder says so.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .client.state import FederationBinding
from .config import ClientArguments, SimulationArguments
from .server.federation import Federation
from .simulation import ClientPool, SimulatedClients

log = logging.getLogger("fedllm.simulation")

# Ray's single-machine mode (its default on macOS and Windows): every Ray process of a local instance listens
# on 127.0.0.1 only. Ray reads it when it is imported.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Restarts of a dead actor, and retries of the client it was training.
MAX_RESTARTS = 3


def start_ray(address: str | None = None, **init_options: Any) -> bool:
    """Join the Ray cluster at ``address`` (``auto``, or its head's ``HOST:PORT``), or start a local instance on
    127.0.0.1 for this process; True if this call did (and so should shut it down), False if this process was
    connected already. ``init_options`` go to ``ray.init`` (a ``runtime_env``, say)."""
    if address is None:
        if "ray" in sys.modules and LOCAL_ONLY_ENV not in os.environ:
            log.warning("Ray was imported before fedllm could keep its local instance on 127.0.0.1; "
                        "set %s=0 before importing Ray", LOCAL_ONLY_ENV)
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    try:
        import ray
    except ImportError:
        raise ValueError("--backend ray needs Ray: pip install -c constraints.txt -e '.[ray]'") from None
    if ray.is_initialized():
        return False
    ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING, **init_options)
    return True


def worker_count(resources: Mapping[str, float], cpus: int, gpus: float, wanted: int) -> int:
    """How many actors of ``cpus`` CPUs and ``gpus`` GPUs the cluster's ``resources`` hold at once, at most ``wanted``."""
    fits = math.floor(resources.get("CPU", 0) / cpus + 1e-9)
    if gpus > 0:
        fits = min(fits, math.floor(resources.get("GPU", 0) / gpus + 1e-9))
    if fits < 1:
        raise ValueError(f"the Ray cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs: "
                         f"not enough for one client of --num_cpus_per_client {cpus} --num_gpus_per_client {gpus:g}")
    return min(fits, wanted)


class ClientWorker:
    """A Ray actor: one base model, and any client's round on it (``SimulatedClients.train``)."""

    def __init__(self, server_config: Mapping[str, Any], client_args: ClientArguments, sources: Mapping[str, str],
                 clients_dir: Path, threads: int):
        import torch

        from .client.runner import quiet_libraries

        torch.set_num_threads(threads)
        settings = clients_dir.parent / "simulation.json"  # written by the driver before any worker starts
        if not settings.exists():
            raise FileNotFoundError(f"the run folder {clients_dir.parent} is not visible on the Ray node "
                                    f"{socket.gethostname()}: on a cluster of several machines, --output_dir, the "
                                    "model and the clients' data must be on a filesystem every node mounts at the "
                                    "same path")
        quiet_libraries()
        # The trainer starts in a folder of its own that is never written: opening a client's folder here could
        # race the driver committing that client's update while Ray restarts this worker.
        self.clients = SimulatedClients.load(server_config, client_args, sources, clients_dir,
                                             state_dir=clients_dir / f".worker-{os.getpid()}")

    def num_samples(self, client_ids: Sequence[str]) -> dict[str, int]:
        """The examples of each of ``client_ids`` (loading their data)."""
        return {client_id: self.clients.num_samples(client_id) for client_id in client_ids}

    def train(self, client_id: str, binding: FederationBinding, global_tensors: Mapping[str, Any], round_number: int,
              learning_rate: float, max_steps: int, clip_norm: float | None) -> str:
        """Train ``client_id``'s round; its update is left pending in its folder for the driver to hand over."""
        self.clients.train(client_id, binding, global_tensors, round_number, learning_rate, max_steps, clip_norm)
        return client_id


class RayClients(ClientPool):
    """The clients trained on Ray actors, as many at once as the cluster holds (at most ``--sample_clients``)."""

    def __init__(self, actors: list[Any], clients_dir: Path, samples: dict[str, int], owns_ray: bool):
        self.actors = actors
        self.clients_dir = clients_dir
        self.samples = samples
        self.owns_ray = owns_ray

    @classmethod
    def start(cls, server_config: Mapping[str, Any], client_args: ClientArguments, sources: Mapping[str, str],
              clients_dir: Path, sim: SimulationArguments) -> RayClients:
        """Start the actors (each loads the base model) and count every client's examples, spread over them."""
        owns_ray = start_ray(sim.ray_address)
        actors: list[Any] = []
        try:
            import ray

            threads = sim.num_cpus_per_client or 1
            wanted = min(int(server_config["federation"]["sample_clients"]), len(sources))
            resources = ray.cluster_resources()
            count = worker_count(resources, threads, sim.num_gpus_per_client, wanted)
            worker = ray.remote(ClientWorker).options(num_cpus=threads, num_gpus=sim.num_gpus_per_client,
                                                      max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
            quiet = dataclasses.replace(client_args, quiet=True)  # no terminal in a Ray worker: no progress bars
            actors += [worker.remote(dict(server_config), quiet, dict(sources), clients_dir, threads)
                       for _ in range(count)]
            ids = list(sources)
            samples: dict[str, int] = {}
            for counted in ray.get([actor.num_samples.remote(ids[i::count]) for i, actor in enumerate(actors)]):
                samples.update(counted)
        except BaseException:
            cls(actors, clients_dir, {}, owns_ray).close()
            raise
        log.info("Ray backend: %d workers of %d CPUs, %g GPUs (the cluster: %g CPUs, %g GPUs)", count, threads,
                 sim.num_gpus_per_client, resources.get("CPU", 0), resources.get("GPU", 0))
        return cls(actors, clients_dir, samples, owns_ray)

    def num_samples(self, client_id: str) -> int:
        return self.samples[client_id]

    def play_round(self, federation: Federation, client_ids: Sequence[str], global_tensors: Mapping[str, Any],
                   round_number: int, learning_rate: float, max_steps: int, clip_norm: float | None = None) -> None:
        """Each free actor takes the next client; each update is handed over as soon as it is kept."""
        import ray
        from ray.util import ActorPool

        binding = FederationBinding.of(federation.client_config())
        shared = ray.put(dict(global_tensors))  # once for every actor
        pool = ActorPool(self.actors)
        for client_id in client_ids:
            pool.submit(lambda actor, cid: actor.train.remote(cid, binding, shared, round_number, learning_rate,
                                                              max_steps, clip_norm), client_id)
        while pool.has_next():
            client_id = pool.get_next_unordered()
            pending = self.client_state(client_id, federation).pending()
            if pending is None or pending.round != round_number:
                raise RuntimeError(f"the update of {client_id} for round {round_number}, kept by a Ray worker in "
                                   f"{self.clients_dir / client_id}, is not there: on a cluster of several machines, "
                                   "--output_dir must be on a filesystem every node mounts at the same path")
            self.deliver(federation, client_id, pending)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        if self.owns_ray:
            ray.shutdown()

    def __enter__(self) -> RayClients:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
