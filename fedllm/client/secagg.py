"""The client's side of secure aggregation: run the round's SecAgg+ stages for a trained update.

When ``/v1/config`` says ``--secure_aggregation secagg+`` the runner hands its pending update here instead of
``POST /v1/update``: the client advertises keys, sends its encrypted shares, uploads the masked input and answers
the unmasking, polling ``GET /v1/secagg`` between stages. Its secrets (private keys, self-mask seed, the shares
it holds) are kept in ``output_dir/secagg/rNNNNNN.aAA.json`` (written atomically before each message is sent),
so a restarted client re-joins the stage it was in with the same keys. Everything the server sends is checked:
the setup must be this federation's, round and tensor layout, with the served bits and clip.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from ..fsutil import atomic_write_bytes
from ..secagg.encoding import FixedPoint, encoded_order
from ..secagg.protocol import ClientRound, ProtocolError, RoundSetup
from ..secagg.wire import masked_file
from .http import FederationClient, ServerError
from .trust import UntrustedServerError

log = logging.getLogger("fedllm.client")


class SecureUploader:
    """Delivers one pending update through the SecAgg+ stages (``send`` of :meth:`ClientState.deliver`)."""

    def __init__(self, client: FederationClient, server_config: Mapping[str, Any], folder: Path,
                 poll_interval: float = 1.0):
        self.client = client
        self.config = server_config
        self.federation = server_config["federation"]
        upload = server_config["upload_tensors"]
        # The upload extras (SCAFFOLD's Δc_i) are summed, not averaged; a client with such state commits it only
        # once the server's history says its update is in the round's aggregate (see step).
        summed = set(upload) - set(server_config["adapter"])
        self.carries_state = bool(summed)
        self.names, self.summed_from = encoded_order(upload, summed)
        self.length = sum(int(np.prod(s)) for s in upload.values()) + 1
        self.folder = Path(folder) / "secagg"
        self.poll_interval = poll_interval

    def __call__(self, pending: Any) -> bool:
        """True once this client's part of the round is done (unmasking answered; with client state, once the round
        is aggregated with its update in it); False when the round went on without it (dropped, or moved on)."""
        while (finished := self.step(pending)) is None:
            time.sleep(self.poll_interval)
        return finished

    def step(self, pending: Any) -> bool | None:
        """Look at the open stage once and answer it if it is this client's turn; None while not finished."""
        view = self.client.secagg_view()
        stage = view.get("stage")
        if self.carries_state and (view.get("round") != pending.round or stage in (None, "done")):
            counted = self._counted(pending.round)
            if counted is None and view.get("round") != pending.round:
                return False  # the round moved on without an aggregate of it (the federation was reset)
            return counted
        if view.get("round") != pending.round or stage is None:
            answered = any("unmask_sent" in json.loads(p.read_text())
                           for p in self.folder.glob(f"r{pending.round:06d}.a*.json"))
            if not answered:
                log.warning("round %d: the round moved on without this client's masked input", pending.round)
            return answered
        setup = self._check_setup(view, pending.round)
        if stage == "done":
            return True
        if stage == "failed" or (view.get("answered") and stage != "unmask"):
            return None  # the others' turn, or the server starting the next attempt
        if self.client.client_id not in setup.clients or not view.get("expected"):
            log.warning("round %d: dropped from secure aggregation in stage %s", pending.round, stage,
                        extra={"event": "secagg_dropped", "round": pending.round, "stage": stage})
            return False
        if not view.get("answered"):
            party = ClientRound(self.client.client_id, setup, self._load(setup))
            try:
                self._answer(party, stage, view, pending)
            except ServerError as exc:
                if exc.status != 409:
                    raise
                log.info("round %d: %s not taken (%s); looking again", pending.round, stage, exc.detail)
                return None
        return True if stage == "unmask" and not self.carries_state else None

    def _counted(self, round_number: int) -> bool | None:
        """Whether this client's update is in round ``round_number``'s aggregate, by the server's history (its
        ``participated``: in the survivors U3 of the attempt that was unmasked and aggregated); None until the
        round is aggregated. A client whose state moves with its update (SCAFFOLD's c_i) commits exactly then:
        dropped at any stage, or in an attempt that failed, it is not counted and must not commit."""
        record = next((r for r in self.client.history() if r.get("round") == round_number), None)
        if record is None:
            return None
        # A client token's view says "participated"; an unauthenticated server's full view lists the participants.
        counted = bool(record.get("participated", self.client.client_id in (record.get("participants") or [])))
        if not counted:
            log.warning("round %d: aggregated without this client's update", round_number)
        return counted

    def _answer(self, party: ClientRound, stage: str, view: Mapping[str, Any], pending: Any) -> None:
        setup = party.setup
        try:
            if stage == "advertise":
                message: Any = party.advertise()
            elif stage == "share":
                message = party.share(view.get("keys") or {})
            elif stage == "masked":
                encoded = self._encode(pending.update_path, setup)
                masked, excluded = party.masked_input(view.get("u2") or [], view.get("shares") or {}, encoded)
                if excluded:
                    log.warning("round %d: shares of %s failed authentication; they are dropped", setup.round,
                                excluded)
                message = masked_file(masked, excluded)
            else:
                message = party.unmask(view.get("u3") or [])
        except ProtocolError as exc:
            raise UntrustedServerError(f"secure aggregation, stage {stage}: {exc}") from None
        self._save(party)  # before sending: a restart sends the same keys and shares again
        endpoint = {"advertise": "keys", "share": "shares", "masked": "masked", "unmask": "unmask"}[stage]
        if stage == "masked":
            self.client.secagg_send(endpoint, setup.round, setup.attempt, body=message)
        else:
            self.client.secagg_send(endpoint, setup.round, setup.attempt, message=message)
        log.info("round %d attempt %d: sent %s", setup.round, setup.attempt, endpoint,
                 extra={"event": "secagg_sent", "round": setup.round, "stage": stage})

    def _check_setup(self, view: Mapping[str, Any], round_number: int) -> RoundSetup:
        try:
            setup = RoundSetup.from_json(view.get("setup") or {})
        except ProtocolError as exc:
            raise UntrustedServerError(f"secure aggregation setup: {exc}") from None
        expected = {"context": self.config["federation_id"], "round": round_number, "length": self.length,
                    "bits": self.federation["secagg_bits"], "clip": self.federation["secagg_clip"],
                    "threshold_spec": self.federation["secagg_threshold"]}
        wrong = {k: getattr(setup, k) for k, v in expected.items() if getattr(setup, k) != v}
        if wrong or view.get("attempt") != setup.attempt:
            raise UntrustedServerError(f"the secure-aggregation setup differs from this federation's: {wrong}")
        if self.client.client_id in setup.clients and self.client.client_id not in setup.weights:
            raise UntrustedServerError("the secure-aggregation setup has no weight for this client")
        return setup

    def _encode(self, update_path: Path, setup: RoundSetup) -> np.ndarray:
        """The pending update (its adapter tensors and extras, in the served order) as ring elements."""
        with safe_open(str(update_path), framework="pt") as f:
            flat = np.concatenate([f.get_tensor(n).float().numpy().ravel() for n in self.names])
        encoded, clipped = FixedPoint(setup.bits, setup.clip).encode(flat, setup.weights[self.client.client_id],
                                                                     summed_from=self.summed_from,
                                                                     clients=len(setup.clients))
        if clipped:
            log.warning("round %d: %d coordinates of the update were outside ±%g and clipped (--secagg_clip)",
                        setup.round, clipped, setup.clip)
        return encoded

    def _path(self, setup: RoundSetup) -> Path:
        return self.folder / f"r{setup.round:06d}.a{setup.attempt:02d}.json"

    def _load(self, setup: RoundSetup) -> dict[str, Any] | None:
        path = self._path(setup)
        return json.loads(path.read_text()) if path.exists() else None

    def _save(self, party: ClientRound) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self._path(party.setup), json.dumps(party.state_dict()).encode())
        for old in self.folder.glob("r*.json"):  # secrets of finished rounds are of no use to anyone
            if int(old.name[1:7]) < party.setup.round:
                old.unlink(missing_ok=True)
