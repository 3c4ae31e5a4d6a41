"""One federation bound to a ``state_dir``: its settings, and the rooms that do the work.

:class:`Federation` is what the HTTP layer (``app.py``) and the simulation talk to. It holds the
federation's settings and adapter spec and hands each call to the room that owns the idea:

* :class:`~fedllm.server.rounds.RoundEngine` -- the round life cycle and closing rules, aggregation;
* :class:`~fedllm.server.sampler.ClientSampler` -- the one place clients are sampled (used by the engine);
* :class:`~fedllm.server.ingest.UploadIngestor` -- upload streaming, validation, exactly-once acceptance;
* :class:`~fedllm.server.versions.GlobalVersions` -- global versions, their files and PEFT export;
* :class:`~fedllm.server.admin.OperatorActions` -- pause, resume, abort, remove (audited);
* :class:`~fedllm.server.store.Store` -- every row and file path of ``state_dir``; all SQL lives there.

Nothing here knows HTTP: refusals are typed :mod:`fedllm.server.errors`.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from ..adapter import adapter_spec, build_lora_config, initial_adapter, load_model_config, model_fingerprint
from ..algorithms import FedAlgorithm, get_algorithm
from ..compression.codecs import get_codec, global_codec
from ..compression.updates import compressed_reader, compressed_validator
from ..config import FederationArguments, federation_changes
from ..wire import DTYPE_CODE, WIRE_DTYPES
from .admin import OperatorActions
from .errors import ClientRemoved, FederationFull, SecAggRequired
from .ingest import UploadIngestor
from .rounds import PRIVACY_KEY as ROUNDS_PRIVACY_KEY
from .rounds import RoundEngine
from .secure_rounds import SecureRounds
from .store import GlobalRow, Store
from .versions import FileUpdate, GlobalVersions, ServedGlobal, write_version

log = logging.getLogger("fedllm.server")

SEEN_INTERVAL = 15.0  # seconds between last_seen writes for a polling client
RESTART_ACTOR = "operator@restart"


def build_algorithm(config: FederationArguments) -> FedAlgorithm:
    """``--fed_alg``'s algorithm; with ``--dp`` wrapped in client-level DP-FedAvg (fedllm.privacy)."""
    algorithm = get_algorithm(config.fed_alg, config)
    if config.dp_enabled:
        from ..privacy.dp_fedavg import DPFedAvg

        algorithm = DPFedAvg(algorithm, config)
    return algorithm


def _privacy_budget(store: Store, db: sqlite3.Connection, config: FederationArguments) -> None:
    """How many rounds ``--dp_target_epsilon`` allows, computed once at start; refused when it allows none."""
    if not config.dp_enabled:
        return
    from ..privacy.accountant import accountant_for

    accountant = accountant_for(config)
    allowed = accountant.rounds_allowed(config.dp_target_epsilon, config.num_rounds)
    if config.dp_target_epsilon is not None and allowed == 0:
        raise ValueError(f"--dp_target_epsilon {config.dp_target_epsilon:g} is exhausted before the first round: one "
                         f"round costs ε = {accountant.epsilon(1)} at δ = {accountant.delta:g} with "
                         f"--dp_noise_multiplier {config.dp_noise_multiplier:g}; raise σ or the budget")
    spent = store.get_meta(db, ROUNDS_PRIVACY_KEY, {})
    clip = config.dp_initial_clip_norm if config.adaptive_clipping else config.fixed_clip_norm()
    store.set_meta(db, ROUNDS_PRIVACY_KEY, {"epsilon": 0.0, "clip_norm": clip, **spent, "rounds_allowed": allowed})
    log.info("differential privacy: --dp %s, σ %g, δ %g: %d rounds allowed (ε after them: %s)", config.dp,
             config.dp_noise_multiplier, accountant.delta, allowed, accountant.epsilon(allowed))


class Federation:
    """One federation, bound to a state_dir."""

    def __init__(self, store: Store, *, output_dir: str | Path | None = None, max_upload_bytes: int = 0):
        self.store = store
        db = store.read()
        stored = store.get_meta(db, "federation")
        if stored is None:
            raise RuntimeError(f"{store.root} is not initialised; run the server once with the federation's settings")
        self.config = FederationArguments(**stored)
        self.federation_id: str = store.get_meta(db, "federation_id")
        self.spec: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in store.get_meta(db, "spec").items()}
        self.fingerprint: str = store.get_meta(db, "fingerprint")
        self.lora_config_dict: dict[str, Any] = store.get_meta(db, "lora_config")
        self.algorithm = build_algorithm(self.config)
        self.upload_spec = dict(self.spec)
        for extra, like in self.algorithm.upload_extras(self.spec).items():
            self.upload_spec[extra] = self.spec[like]
        self.output_dir = Path(output_dir) if output_dir else store.root / "adapters"
        element_bytes = WIRE_DTYPES[DTYPE_CODE[self.config.wire_dtype]][1]
        adapter_bytes = sum(int(torch.Size(s).numel()) for s in self.upload_spec.values()) * element_bytes
        self.max_upload_bytes = max_upload_bytes or 2 * adapter_bytes + (1 << 20)
        self.versions = GlobalVersions(store, self.config.wire_dtype, self.algorithm, self.lora_config_dict,
                                       self.output_dir, global_codec(self.config))
        validate, open_update = self._upload_format()
        self.rounds = RoundEngine(store, self.config, self.algorithm, self.versions,
                                  carries_client_state=set(self.upload_spec) != set(self.spec), open_update=open_update)
        self.uploads = UploadIngestor(store, self.rounds, self.upload_spec, self.config.wire_dtype,
                                      self.max_upload_bytes, self.config.max_control_norm,
                                      clip_norm=self.rounds.current_clip_norm, validate=validate)
        self.operator = OperatorActions(store, self.rounds)
        self.secure: SecureRounds | None = None
        if self.config.secagg_enabled:
            self.secure = SecureRounds(store, self.config, self.federation_id, self.upload_spec,
                                       self.rounds.resample_secure, summed=set(self.upload_spec) - set(self.spec))
            self.rounds.secure = self.secure
        self._last_seen: dict[str, float] = {}

    def _upload_format(self) -> tuple[Any, Any]:
        """How uploads are checked and read: dense (fedllm.wire), a codec's (fedllm.compression), or the
        algorithm's own (FedKSeed's seed pairs)."""
        codec = get_codec(self.config)
        if codec is not None:
            return (compressed_validator(codec, self.upload_spec, self.config.wire_dtype),
                    compressed_reader(codec, self.upload_spec, self.config.wire_dtype))
        own = self.algorithm.upload_format(self.upload_spec, self.config.wire_dtype, self.config.max_steps)
        return own if own is not None else (None, FileUpdate)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def initialize(config: FederationArguments, state_dir: str | Path) -> FederationArguments:
        """Create the federation in ``state_dir``, or check that it is the one already there.

        On a restart, a changed identity setting (what is computed: model, LoRA, algorithm, ...) is
        refused naming each one; changed operational settings (deadlines, ``--num_rounds``, save
        frequency, ...) are applied from the open round on and recorded in the audit log.
        Returns the settings in force.
        """
        config.validate()
        store = Store(state_dir)
        # Runs before any worker exists: bodies that were streaming when the server died are garbage.
        for partial in store.incoming_dir.glob("*.part"):
            partial.unlink()
        try:
            with store.transaction() as db:
                stored = store.get_meta(db, "federation")
                if stored is not None:
                    Federation._apply_restart_settings(store, db, stored, config)
                    if store.get_meta(db, "federation_id") is None:  # a state_dir from before federation ids
                        store.set_meta(db, "federation_id", uuid.uuid4().hex)
                    _privacy_budget(store, db, config)
                    return config
            Federation._create(config, store)
            return config
        finally:
            store.close()

    @staticmethod
    def _apply_restart_settings(store: Store, db: sqlite3.Connection, stored: dict[str, Any],
                                config: FederationArguments) -> None:
        identity, operational = federation_changes(stored, config)
        if identity:
            details = ", ".join(f"--{k} {new!r} (state_dir has {old!r})" for k, (old, new) in sorted(identity.items()))
            raise ValueError(f"{store.root} holds a federation with other settings: {details}. These define what the "
                             "federation computes; restart with the stored values to resume, or use a new --state_dir.")
        if not operational:
            return
        current = store.current_round(db)
        if "num_rounds" in operational and current is not None:
            done = current.round if current.status == "aggregated" else current.round - 1
            if config.num_rounds < max(done, 1):
                raise ValueError(f"--num_rounds {config.num_rounds}: {done} rounds are already aggregated")
        if current is not None and current.status == "training" and "round_timeout" in operational:
            old = float(stored.get("round_timeout", 0.0))
            if config.round_timeout <= 0:
                store.set_deadline(db, current.round, None)
            elif current.deadline is None or old <= 0:
                store.set_deadline(db, current.round, time.time() + config.round_timeout)
            else:
                store.set_deadline(db, current.round, current.deadline + config.round_timeout - old)
        store.set_meta(db, "federation", dataclasses.asdict(config))
        changes = {k: {"old": old, "new": new} for k, (old, new) in sorted(operational.items())}
        store.add_event(db, RESTART_ACTOR, "settings_changed", changes)
        for name, (old, new) in sorted(operational.items()):
            log.warning("restart changed --%s from %r to %r (applies from the open round on)", name, old, new)

    @staticmethod
    def _create(config: FederationArguments, store: Store) -> None:
        model_config = load_model_config(config.model_name_or_path)
        lora = build_lora_config(
            model_config,
            r=config.peft_lora_r,
            alpha=config.peft_lora_alpha,
            dropout=config.peft_lora_dropout,
            target_modules=config.target_module_list(),
            base_model_name_or_path=config.model_name_or_path,
        )
        spec = adapter_spec(model_config, lora)
        adapter = initial_adapter(spec, config.seed)
        if config.split_enabled:  # the global adapter is the clients' head and tail; the middle is the server's
            from ..split.model import CLIENT_PARTS, SplitPlan

            plan = SplitPlan.of(model_config, config.split_head_layers, config.split_tail_layers)
            adapter = {k: adapter[k] for k in plan.select(spec, CLIENT_PARTS)}
        algorithm = build_algorithm(config)
        adapter = algorithm.initial_global(adapter)
        spec = {name: tuple(tensor.shape) for name, tensor in adapter.items()}
        state = algorithm.init_state(adapter)
        lora_dict = lora.to_dict()
        lora_dict["target_modules"] = sorted(lora_dict["target_modules"]) if lora_dict.get("target_modules") else None
        lora_dict["peft_type"] = str(getattr(lora.peft_type, "value", lora.peft_type))
        lora_dict["task_type"] = str(getattr(lora.task_type, "value", lora.task_type))
        row = write_version(store, config.wire_dtype, algorithm, 0, adapter, state, global_codec(config))
        with store.transaction() as db:
            if store.get_meta(db, "federation") is not None:
                return  # another process won the race; its files are identical
            store.set_meta(db, "federation", dataclasses.asdict(config))
            store.set_meta(db, "federation_id", uuid.uuid4().hex)
            store.set_meta(db, "spec", {k: list(v) for k, v in spec.items()})
            store.set_meta(db, "fingerprint", model_fingerprint(model_config))
            store.set_meta(db, "lora_config", lora_dict)
            _privacy_budget(store, db, config)
            store.insert_global(db, row)
        log.info("initialised federation in %s: %d adapter tensors, %s", store.root, len(spec), config.fed_alg)

    # ------------------------------------------------------------------ reads
    def status(self, client_id: str | None = None) -> dict[str, Any]:
        return self.rounds.status(client_id)

    def phase(self, db: sqlite3.Connection, current: Any) -> str:
        return self.rounds.phase(db, current)

    def round_training_config(self, round_number: int) -> dict[str, Any]:
        return self.rounds.training_config(round_number)

    def client_config(self) -> dict[str, Any]:
        """The body of ``GET /v1/config``: every shared setting a client trains with."""
        current = self.store.current_round(self.store.read())
        return {
            "federation": dataclasses.asdict(self.config),
            "federation_id": self.federation_id,
            "model_fingerprint": self.fingerprint,
            "lora_config": self.lora_config_dict,
            "adapter": {k: list(v) for k, v in self.spec.items()},
            "upload_tensors": {k: list(v) for k, v in self.upload_spec.items()},
            "max_upload_bytes": self.max_upload_bytes,
            "round_config": self.round_training_config(current.round if current else 1),
        }

    def latest_global(self) -> GlobalRow:
        return self.versions.latest()

    def served_global(self, encoding: str | None) -> ServedGlobal:
        """What ``GET /v1/global?encoding=`` sends (fedllm.server.versions.GlobalVersions.served)."""
        return self.versions.served(encoding)

    def history(self) -> list[dict[str, Any]]:
        return self.store.history(self.store.read())

    def events(self) -> list[dict[str, Any]]:
        return self.operator.events()

    def is_removed(self, client_id: str) -> bool:
        return self.store.is_removed(self.store.read(), client_id)

    def record_download(self, client_id: str | None, size: int) -> None:
        """Count a global adapter of ``size`` bytes served to ``client_id`` (fedllm.server.traffic)."""
        if client_id is not None:
            self.rounds.traffic.record_download(client_id, size)

    def seen(self, client_id: str) -> None:
        """Record that a joined client polled; at most one durable write per client per SEEN_INTERVAL per process.

        Ids that never joined leave no row (and no memory): an open server cannot be filled by made-up ids.
        """
        now = time.time()
        if now - self._last_seen.get(client_id, 0.0) < SEEN_INTERVAL:
            return
        try:
            if client_id not in self.store.clients(self.store.read()):
                return
            self._last_seen[client_id] = now
            with self.store.transaction() as db:
                self.store.record_presence(db, client_id)
        except Exception as exc:  # bookkeeping only: a full or read-only disk must not fail a poll
            log.warning("could not record that %s polled: %s", client_id, exc)

    # ------------------------------------------------------------------ writes
    def join(self, client_id: str, num_samples: int) -> dict[str, Any]:
        with self.store.transaction() as db:
            if self.store.is_removed(db, client_id):
                raise ClientRemoved(f"the operator removed {client_id!r} from the federation")
            clients = self.store.clients(db)
            if client_id not in clients and len(clients) >= self.config.num_clients:
                raise FederationFull(f"all {self.config.num_clients} client places are taken; "
                                     f"{client_id!r} is not one of them")
            previous = clients.get(client_id, {}).get("num_samples")
            self.store.upsert_client(db, client_id, num_samples)
            if previous is not None and previous != num_samples:
                # Uploads may weigh at most what the client joined with; changing it is on the record.
                self.store.add_event(db, client_id, "rejoin", {"num_samples": {"old": previous, "new": num_samples}})
                log.warning("client %s re-joined with %d samples (was %d)", client_id, num_samples, previous)
            joined = len(clients) + (client_id not in clients)
            self.rounds.start_if_ready(db)
        log.info("client %s joined (%d samples)", client_id, num_samples)
        return {"client_id": client_id, "clients_joined": joined, "num_clients": self.config.num_clients}

    def receive_update(self, client_id: str, round_number: int, num_samples: int, read, content_length: int | None,
                       claimed_sha256: str | None) -> dict[str, Any]:
        if self.secure is not None:  # the server never holds a plaintext update
            raise SecAggRequired("this federation runs --secure_aggregation secagg+: send the masked input through "
                                 "the /v1/secagg stages (the fedllm client does this by itself)")
        return self.uploads.receive(client_id, round_number, num_samples, read, content_length, claimed_sha256)

    def tick(self) -> bool:
        return self.rounds.tick()

    def aggregate_if_needed(self) -> bool:
        return self.rounds.aggregate_if_needed()

    # ------------------------------------------------------------------ operator actions
    def pause(self, actor: str) -> dict[str, Any]:
        self.operator.pause(actor)
        return self.status()

    def resume(self, actor: str) -> dict[str, Any]:
        self.operator.resume(actor)
        return self.status()

    def abort_round(self, actor: str) -> dict[str, Any]:
        self.operator.abort_round(actor)
        return self.status()

    def remove_client(self, actor: str, client_id: str) -> dict[str, Any]:
        self.operator.remove_client(actor, client_id)
        return self.status()
