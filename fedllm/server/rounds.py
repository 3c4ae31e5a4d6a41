"""The round engine: a round's life cycle and the rules that close it.

A round is ``training`` (accepting one update from each sampled client) → ``closed`` → ``aggregated``
(the new global version, its history record and the next round committed in one transaction).
The rules, in one place:

* a round closes as soon as every sampled client that is still eligible (joined, not removed) has
  submitted, or at its deadline with at least ``min(--min_fit_clients, sample size)`` updates; a
  deadline with fewer extends the round or, with ``--on_insufficient resample``, replaces the
  stragglers (:class:`~fedllm.server.sampler.ClientSampler`);
* a removed client leaves the open round at once: its place and its update, even one already
  submitted, are dropped; a round whose sample becomes empty is drawn again from the eligible
  clients, and when none are left the federation finishes, with an event saying why;
* aggregation aggregates exactly the update rows it read: if a removal changed them meanwhile,
  that attempt commits nothing and the next tick redoes it; an aggregate with NaN or infinite
  values is never committed: the round starts over with a new sample (event ``round_aborted``);
* an aggregated round that is not the last has a successor: a federation restarted with more
  ``--num_rounds`` goes on.

Several gunicorn workers run this against one ``state_dir``: SQLite transactions serialise the
state changes and an ``flock`` elects the one process that aggregates a closed round.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..algorithms import FedAlgorithm, Update, round_learning_rate, run_aggregation
from ..config import FederationArguments
from ..faults import fault_point
from ..wire import all_finite
from .errors import NoOpenRound, NotSampled, RoundClosed, WrongRound
from .sampler import ClientSampler
from .secure_rounds import SecureRounds, aggregate_secure_mean
from .store import RoundRow, Store, UpdateRow
from .traffic import TrafficLedger
from .versions import FileUpdate, GlobalVersions

log = logging.getLogger("fedllm.server")

FEDERATION_ACTOR = "federation"  # the actor of events the federation causes itself
FINISHED_KEY = "finished_early"  # meta key set when the federation ran out of eligible clients or budget
PRIVACY_KEY = "privacy"  # meta: DP rounds allowed, ε spent so far, the clip norm of the open round


class RoundEngine:
    """Rounds of one federation: starting, closing, re-sampling and aggregating them."""

    def __init__(self, store: Store, config: FederationArguments, algorithm: FedAlgorithm, versions: GlobalVersions,
                 *, carries_client_state: bool = False,
                 open_update: Callable[[UpdateRow, Path], Update] = FileUpdate):
        self.store = store
        self.config = config
        self.algorithm = algorithm
        self.versions = versions
        poisson = config.sample_clients / config.num_clients if config.client_sampling == "poisson" else None
        self.sampler = ClientSampler(config.seed, config.sample_clients, poisson)
        # Whether clients commit state with each accepted update (SCAFFOLD's c_i, uploaded as extra tensors): an
        # aborted round's accepted updates are then carried to the next aggregation instead of deleted
        # (FedAlgorithm.absorb_discarded), so the server's state keeps mirroring the clients'.
        self.carries_client_state = carries_client_state
        self.after_aggregation: list[Callable[[int], None]] = []
        self.secure: SecureRounds | None = None  # --secure_aggregation: the stages of each round (Federation sets it)
        self.open_update = open_update  # an accepted update file, read lazily (decoded, when compressed)
        self.traffic = TrafficLedger(store, config)
        self.accountant = None
        if config.dp_enabled:
            from ..privacy.accountant import accountant_for  # dp-accounting only where DP is on

            self.accountant = accountant_for(config)  # metrics, TensorBoard (fedllm.server.metrics)

    # ------------------------------------------------------------------ reads
    def phase(self, db, current: RoundRow | None) -> str:
        if self.store.get_meta(db, FINISHED_KEY) is not None:
            return "finished"
        if current is None:
            return "waiting"
        if current.status == "training":
            return "training"
        if current.status == "closed":
            return "aggregating"
        return "finished" if current.round >= self.config.num_rounds else "training"

    def status(self, client_id: str | None = None) -> dict[str, Any]:
        db = self.store.read()
        current = self.store.current_round(db)
        latest = self.store.latest_global(db)
        received = [u.client_id for u in self.store.updates(db, current.round)] if current else []
        clients = self.store.clients(db)
        status: dict[str, Any] = {
            "round": current.round if current else 0,
            "num_rounds": self.config.num_rounds,
            "phase": self.phase(db, current),
            "fed_alg": self.config.fed_alg,
            "task": self.config.task,
            "global_version": latest.version,
            "global_sha256": latest.sha256,
            "sampled": current.sampled if current else [],
            "received": received,
            "deadline": current.deadline if current else None,
            "deadline_extensions": current.extensions if current else 0,
            "clients_joined": len(clients),
            "num_clients": self.config.num_clients,
            "paused": bool(self.store.get_meta(db, "paused")),
            "communication": self.traffic.status(db),
        }
        privacy = self.privacy_status(db)
        if privacy is not None:
            status["dp"] = privacy
        if self.secure is not None:
            status["secagg"] = self.secure.status(current)
        if client_id is not None:
            # A paused federation starts no training; an update already under way is still accepted.
            status["selected"] = bool(status["phase"] == "training" and current.status == "training"
                                      and client_id in current.sampled and not status["paused"])
            status["submitted"] = client_id in received
            if self.secure is not None:  # its masked input is in (the unmasking it then answers is its own job)
                status["submitted"] = self.secure.submitted(current, client_id)
                # Past the first stage a client that is not in it can no longer take part: it is not to train.
                status["selected"] = status["selected"] and self.secure.accepts_newcomers(current)
            status["joined"] = client_id in clients
        return status

    def training_config(self, round_number: int) -> dict[str, Any]:
        """What a client trains with in ``round_number``: the scheduled learning rate and the steps."""
        config = {
            "round": round_number,
            "learning_rate": round_learning_rate(self.config, max(round_number, 1)),
            "max_steps": self.config.max_steps,
        }
        if self.config.dp == "client":  # the clients clip to this round's norm before they upload
            config["dp_clip_norm"] = self.store.get_meta(self.store.read(), PRIVACY_KEY, {}).get("clip_norm")
        return config

    # ------------------------------------------------------------------ rules (inside a transaction)
    def _deadline(self) -> float | None:
        return time.time() + self.config.round_timeout if self.config.round_timeout > 0 else None

    def start_if_ready(self, db) -> None:
        """Round 1 starts once ``--num_clients`` clients have joined."""
        if self.store.current_round(db) is None and len(self.store.clients(db)) >= self.config.num_clients:
            self.start_round(db, 1)

    def start_round(self, db, round_number: int) -> None:
        eligible = self.store.clients(db)
        if not eligible:
            self._finish_early(db, round_number, "no eligible client is left")
            return
        allowed = self.store.get_meta(db, PRIVACY_KEY, {}).get("rounds_allowed")
        if allowed is not None and round_number > allowed:
            self._finish_early(db, round_number, f"the privacy budget --dp_target_epsilon "
                                                 f"{self.config.dp_target_epsilon:g} allows {allowed} rounds")
            return
        spent = self.traffic.allows_round(db, round_number)
        if spent is not None:
            self._finish_early(db, round_number, spent)
            return
        sampled = self.sampler.sample(eligible, round_number)
        self.store.insert_round(db, round_number, sampled, self._deadline())
        if not sampled:  # a Poisson draw of nobody: the round is the noise alone, aggregated at once
            self.store.set_round_status(db, round_number, "closed")
        log.info("round %d started: sampled %s", round_number, sampled)

    def _finish_early(self, db, round_number: int, reason: str) -> None:
        self.store.set_meta(db, FINISHED_KEY, {"round": round_number, "reason": reason, "time": time.time()})
        self.store.add_event(db, FEDERATION_ACTOR, "finished_early", {"round": round_number, "reason": reason})
        log.warning("federation finished early in round %d: %s", round_number, reason)

    @staticmethod
    def check_can_submit(current: RoundRow | None, client_id: str, round_number: int) -> None:
        if current is None:
            raise NoOpenRound("the federation is waiting for clients to join")
        if round_number != current.round:
            raise WrongRound(f"round {round_number} is not open; the current round is {current.round}")
        if client_id not in current.sampled:
            raise NotSampled(f"client {client_id!r} was not sampled for round {current.round}")
        if current.status != "training":
            raise RoundClosed(f"round {current.round} no longer accepts updates")

    def close_if_complete(self, db, round_number: int) -> bool:
        """Close the round when every sampled client (all of them are eligible) has submitted."""
        current = self.store.get_round(db, round_number)
        if current is None or current.status != "training" or not current.sampled:
            return False
        received = {u.client_id for u in self.store.updates(db, round_number)}
        if not set(current.sampled) <= received:
            return False
        self.store.set_round_status(db, round_number, "closed")
        return True

    def redraw(self, db, current: RoundRow) -> list[str]:
        """Start ``current`` over with a fresh sample of the eligible clients (finishing when there are none)."""
        eligible = self.store.clients(db)
        if not eligible:
            self.store.set_sampled(db, current.round, [], None)
            self._finish_early(db, current.round, "no eligible client is left")
            return []
        sampled = self.sampler.redraw(eligible, current.round, current.extensions + 1)
        self.store.set_sampled(db, current.round, sampled, self._deadline())
        return sampled

    def discard_updates(self, db, round_number: int) -> list[str]:
        """Take a round's accepted updates out of its aggregate. Returns files to delete after commit: none when
        clients committed state with them (SCAFFOLD), whose updates are carried to the next aggregation instead."""
        if self.carries_client_state:
            self.store.carry_updates(db, round_number)
            return []
        return self.store.delete_updates(db, round_number)

    def drop_client(self, db, client_id: str) -> list[str]:
        """A removed client leaves the open round: its place and its update. Returns files to delete after commit."""
        current = self.store.current_round(db)
        if current is None or current.status == "aggregated" or client_id not in current.sampled:
            return []
        paths = [p for p in [self.store.delete_update(db, current.round, client_id)] if p]
        sampled = [c for c in current.sampled if c != client_id]
        received = {u.client_id for u in self.store.updates(db, current.round)}
        if not sampled or (current.status == "closed" and not received):
            if current.status == "closed":
                self.store.set_round_status(db, current.round, "training")
            drawn = self.redraw(db, current)
            log.warning("round %d: sample emptied by removing %s; drew %s", current.round, client_id, drawn)
            return paths
        self.store.set_sampled(db, current.round, sampled, current.deadline)
        if current.status == "training":
            self.close_if_complete(db, current.round)
        return paths

    # ------------------------------------------------------------------ progress
    def tick(self) -> bool:
        """Close a round whose deadline passed, and aggregate a closed round. Returns True if it aggregated."""
        db = self.store.read()
        current = self.store.current_round(db)
        if self.store.get_meta(db, FINISHED_KEY) is not None:
            self._export_final_once()
            return False
        if current is None or self.store.get_meta(db, "paused") or self.phase(db, current) == "finished":
            return False
        if current.status == "aggregated":  # a federation restarted with more --num_rounds goes on
            self._start_next(current.round)
            return False
        if self.secure is not None:  # secure aggregation: every stage has its own deadline and closing rule
            self.secure.tick(current)
            current = self.store.current_round(db)
        elif current.status == "training" and current.deadline is not None and time.time() > current.deadline:
            self._close_at_deadline(current.round)
            current = self.store.current_round(db)
        if current.status == "closed":
            return self.aggregate_if_needed()
        return False

    def _start_next(self, aggregated_round: int) -> None:
        with self.store.transaction() as db:
            current = self.store.current_round(db)
            if current.round == aggregated_round and current.status == "aggregated":
                self.start_round(db, aggregated_round + 1)

    def _export_final_once(self) -> None:
        """A federation that finished early exports its newest global as ``final``, like one that ran to its end."""
        if not (self.versions.output_dir / "final").exists():
            adapter, _ = self.versions.load(self.store.latest_global(self.store.read()))
            self.versions.export(adapter, "final")

    def _close_at_deadline(self, round_number: int) -> None:
        with self.store.transaction() as db:
            current = self.store.current_round(db)
            if current.round != round_number or current.status != "training" or time.time() <= (current.deadline or 0):
                return
            submitted = [u.client_id for u in self.store.updates(db, round_number)]
            needed = min(self.config.min_fit_clients, len(current.sampled))
            if submitted and len(submitted) >= needed:
                self.store.set_round_status(db, round_number, "closed")
                log.warning("round %d: deadline passed; closing with %d of %d updates",
                            round_number, len(submitted), len(current.sampled))
            elif self.config.on_insufficient == "resample":
                sampled = self.sampler.replace_stragglers(self.store.clients(db), current.sampled, submitted,
                                                          round_number, current.extensions)
                self.store.set_sampled(db, round_number, sampled, self._deadline())
                log.warning("round %d: deadline passed with %d updates (< %d); re-sampled %s",
                            round_number, len(submitted), needed, sampled)
            else:
                self.store.extend_deadline(db, round_number, self._deadline() or time.time())
                log.warning("round %d: deadline passed with %d updates (< %d); extended",
                            round_number, len(submitted), needed)

    @contextmanager
    def _aggregation_lock(self) -> Iterator[bool]:
        with open(self.store.aggregate_lock_path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def aggregate_if_needed(self) -> bool:
        """Aggregate the current round if it is closed. Exactly one process does it per round.

        Files are written first (idempotently, atomically); one transaction then commits the new
        global version, the history record and the next round. A crash before the commit leaves
        the round closed, and the next tick in any worker redoes it.
        """
        with self._aggregation_lock() as acquired:
            if not acquired:
                return False
            db = self.store.read()
            current = self.store.current_round(db)
            if current is None or current.status != "closed":
                return False
            started = time.time()
            rows = self._eligible_updates(db, current)
            carried = self.store.carried(db)
            adapter, state = self.versions.load(self.store.latest_global(db))
            if self.secure is not None:  # the survivors' masked inputs, unmasked as one sum: no update row exists
                unmasked = self.secure.mean_delta(current.round)
                if unmasked is None:  # the shares did not rebuild the masks: the round re-runs
                    return False
                mean, participants, weight = unmasked
                new_adapter, new_state = aggregate_secure_mean(self.algorithm, self.config, adapter, mean,
                                                               len(participants), state)
            else:
                updates = [self.open_update(r, self.store.resolve(r.path)) for r in rows]
                new_adapter, new_state = run_aggregation(self.algorithm, adapter, updates, state)
            if carried:
                new_state = self.algorithm.absorb_discarded(
                    new_state, [self.open_update(r, self.store.resolve(r.path)) for r in carried])
            fault_point("aggregate.loaded")
            bad = [k for k, v in {**new_adapter, **new_state}.items() if not all_finite(v)]
            if bad:
                self._abort_not_finite(current, bad)
                return False
            version = current.round
            row = self.versions.write(version, new_adapter, new_state)
            is_final = version >= self.config.num_rounds
            saves_round = self.config.save_model_freq > 0 and version % self.config.save_model_freq == 0
            if is_final:
                self.versions.export(new_adapter, "final")
            if saves_round:
                self.versions.export(new_adapter, f"round_{version}")
            fault_point("aggregate.files_written")
            record = history_record(current, rows, row.version, row.sha256, time.time() - started,
                                    self.store.round_bytes_sent(db, current.round))
            if self.secure is not None:
                record.update(participants=participants, secagg={**self.secure.status(current), "weight": weight})
            privacy = self._privacy_record(version, state, new_state)
            record.update({k: v for k, v in privacy.items() if k != "dp_next_clip_norm"})
            with self.store.transaction() as db:
                if [r.client_id for r in self._eligible_updates(db, self.store.current_round(db))] != [
                        r.client_id for r in rows]:
                    log.warning("round %d: its updates changed while aggregating (a client was removed); redoing",
                                version)
                    return False
                if len(self.store.carried(db)) != len(carried):
                    return False  # a round was aborted meanwhile: redo with its updates carried too
                self.store.clear_carried(db)
                if privacy:
                    spent = self.store.get_meta(db, PRIVACY_KEY, {})
                    self.store.set_meta(db, PRIVACY_KEY, {**spent, "epsilon": privacy["dp_epsilon"],
                                                          "clip_norm": privacy["dp_next_clip_norm"]})
                self.store.insert_global(db, row)
                self.store.insert_history(db, version, record)
                self.store.set_round_status(db, version, "aggregated")
                if not is_final:
                    self.start_round(db, version + 1)
            fault_point("aggregate.committed")
            log.info("round %d aggregated: %d updates, train_loss %s, %.2fs", version, len(rows),
                     record["train_loss"], record["aggregation_seconds"])
        self.versions.prune(version)
        if self.secure is not None:
            self.secure.forget(version)
        for hook in self.after_aggregation:
            hook(version)
        return True

    def _privacy_record(self, version: int, state: Mapping[str, Any], new_state: Mapping[str, Any]) -> dict[str, Any]:
        """``dp_epsilon`` (spent after this round) and ``dp_clip_norm`` (used this round) for the history."""
        if self.accountant is None:
            return {}
        clip = self.algorithm.clip_norm(state)
        return {"dp_epsilon": self.accountant.epsilon(version), "dp_clip_norm": clip,
                "dp_next_clip_norm": self.algorithm.clip_norm(new_state)}

    def privacy_status(self, db) -> dict[str, Any] | None:
        """``GET /v1/round``'s ``dp``: the mode, ε spent so far (null without noise), δ, C, σ, rounds allowed."""
        if self.accountant is None:
            return None
        spent = self.store.get_meta(db, PRIVACY_KEY, {})
        epsilon = spent.get("epsilon", 0.0) if self.config.dp_noise_multiplier > 0 else None
        return {"mode": self.config.dp, "epsilon": epsilon, "delta": self.accountant.delta,
                "clip_norm": spent.get("clip_norm"), "noise_multiplier": self.config.dp_noise_multiplier,
                "rounds_allowed": spent.get("rounds_allowed")}

    def current_clip_norm(self) -> float | None:
        """The clip norm uploads of the open round must keep to (``--dp client``), else None."""
        if self.accountant is None or self.config.dp != "client":
            return None
        return self.store.get_meta(self.store.read(), PRIVACY_KEY, {}).get("clip_norm")

    def _abort_not_finite(self, closed: RoundRow, names: list[str]) -> None:
        """An aggregate with NaN or infinite values is never committed: the round starts over, with an event."""
        with self.store.transaction() as db:
            current = self.store.current_round(db)
            if current.round != closed.round or current.status != "closed":
                return
            discarded = len(self.store.updates(db, current.round))
            paths = self.discard_updates(db, current.round)
            self.store.set_round_status(db, current.round, "training")
            sampled = self.redraw(db, current)
            reason = f"the aggregate has NaN or infinite values (e.g. {names[:3]})"
            self.store.add_event(db, FEDERATION_ACTOR, "round_aborted",
                                 {"round": current.round, "reason": reason, "discarded": discarded, "sampled": sampled})
        for path in paths:
            self.store.resolve(path).unlink(missing_ok=True)
        log.error("round %d aborted: %s; %d updates discarded, re-sampled %s", closed.round, reason, discarded,
                  sampled)

    def resample_secure(self, db, round_number: int, clients: list[str]) -> list[str]:
        """A failed secure-aggregation attempt: re-run the round with ``clients``, or none given, a fresh draw."""
        current = self.store.get_round(db, round_number)
        if clients:
            self.store.set_sampled(db, round_number, clients, self._deadline())
            return clients
        return self.redraw(db, current)

    def _eligible_updates(self, db, current: RoundRow) -> list[UpdateRow]:
        """The round's updates from clients that are still sampled and eligible."""
        eligible = self.store.clients(db)
        return [u for u in self.store.updates(db, current.round) if u.client_id in current.sampled
                and u.client_id in eligible]


def history_record(current: RoundRow, rows: list[UpdateRow], version: int, sha256: str,
                   seconds: float, bytes_sent: int = 0) -> dict[str, Any]:
    """The ``/v1/history`` record of an aggregated round."""
    return {
        "round": current.round,
        "participants": [r.client_id for r in rows],
        "sampled": current.sampled,
        "num_samples": sum(r.num_samples for r in rows),
        "train_loss": weighted_metric(rows, "train_loss", "num_samples"),
        # The global model's loss on the clients' held-out splits, weighted by their sizes.
        "eval_loss": weighted_metric(rows, "eval_loss", "eval_samples"),
        "seconds": time.time() - current.started_at,
        "aggregation_seconds": seconds,
        "bytes_received": sum(r.size for r in rows),
        "bytes_sent": bytes_sent,  # global downloads while the round was open
        "global_version": version,
        "global_sha256": sha256,
        "metrics": {r.client_id: r.metrics for r in rows},
    }


def weighted_metric(rows: list[UpdateRow], metric: str, weight: str) -> float | None:
    """Σ w_i·m_i / Σ w_i over the updates that report ``metric`` (weight: a metric, else num_samples)."""
    pairs = [(r.metrics[metric], r.metrics.get(weight, r.num_samples)) for r in rows
             if isinstance(r.metrics.get(metric), (int, float))]
    total = sum(w for _, w in pairs)
    return sum(m * w for m, w in pairs) / total if pairs and total > 0 else None
