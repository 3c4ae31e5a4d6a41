"""SecAgg+ as per-stage state machines of plain data, one for a client and one for the server.

One attempt of a round, with S the sampled clients, N(u) u's neighbours (:mod:`.graph`), H(u) = {u} ∪ N(u) its
share holders and t the threshold:

1. ``advertise`` -- u sends two fresh X25519 public keys: c_u (share encryption) and s_u (masks). U1 = senders.
2. ``share`` -- u gets the keys of N(u) ∩ U1, draws its self-mask seed b_u, splits b_u and s_u's private key
   into Shamir shares for H(u) ∩ U1 (t of them reconstruct) and sends each neighbour's pair AES-GCM encrypted
   under HKDF(X25519(c_u, c_v)), the associated data naming sender, receiver, round, attempt and stage. U2 =
   senders; the server relays each ciphertext to its receiver and can read none.
3. ``masked`` -- u decrypts the shares sent to it (a neighbour whose share fails authentication is reported and
   dropped from the round), then uploads ``y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ U2} ±PRG(s_uv) mod 2^bits``
   with s_uv = HKDF(X25519(s_u, s_v)) and + when u < v, - otherwise (the pairwise terms cancel in the sum).
   U3 = uploaders not reported by anyone.
4. ``unmask`` -- the server names U3; each u ∈ U3 reveals, for every v it holds a share of, the share of b_v
   if v ∈ U3, else the share of v's mask key (never both for one v). With t shares the server rebuilds b_v for
   v ∈ U3 and s_v for v ∈ U2 \\ U3, removes PRG(b_v) and the dropped clients' pairwise terms and is left with
   Σ_{u ∈ U3} x_u.

A stage closes when every client expected in it has answered, or (the caller decides when) at its deadline;
one that leaves fewer than t clients, or a secret with fewer than t shares, fails the attempt and the round is
re-run by the caller. Every method takes and returns JSON-able data; bytes travel as hex.
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import crypto, shamir
from .encoding import FixedPoint
from .graph import neighbour_graph, threshold_for

STAGES = ("advertise", "share", "masked", "unmask", "done", "failed")
OPEN_STAGES = STAGES[:4]


class ProtocolError(ValueError):
    """A message this stage cannot accept: ill-formed, or not what the protocol allows (HTTP 422)."""


class StageMismatch(ProtocolError):
    """A message for another round, attempt or stage: replayed, reordered or late (HTTP 409)."""


class AlreadySent(ProtocolError):
    """A second, different message from the same client in the same stage (HTTP 409)."""


class NotInStage(ProtocolError):
    """A client this stage does not expect: not sampled, or dropped in an earlier stage (HTTP 409)."""


@dataclass(frozen=True)
class RoundSetup:
    """What every party of one attempt of a round agrees on; the server fixes it and serves it."""

    context: str  # the federation id: binds keys, shares and masks to this federation
    round: int
    attempt: int
    clients: tuple[str, ...]  # the attempt's clients, sorted
    weights: Mapping[str, float]  # p_i, summing to 1 over ``clients`` (a client is served its own only)
    neighbours: int  # k
    threshold_spec: float  # --secagg_threshold
    bits: int
    clip: float
    length: int  # coordinates of an encoded update, the weight included

    @property
    def label(self) -> bytes:
        return f"{self.context}/{self.round}/{self.attempt}".encode()

    @functools.cached_property
    def graph(self) -> dict[str, list[str]]:
        return neighbour_graph(list(self.clients), self.neighbours, self.label)

    def holders(self, client: str) -> list[str]:
        return sorted([client, *self.graph[client]])

    @functools.cached_property
    def threshold(self) -> int:
        return min(threshold_for(self.threshold_spec, len(self.holders(c))) for c in self.clients)

    def point(self, client: str) -> int:
        """The Shamir evaluation point of ``client``."""
        return self.clients.index(client) + 1

    @property
    def fixed_point(self) -> FixedPoint:
        return FixedPoint(self.bits, self.clip)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["clients"] = list(self.clients)
        data["weights"] = dict(self.weights)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundSetup:
        try:
            setup = cls(context=str(data["context"]), round=int(data["round"]), attempt=int(data["attempt"]),
                        clients=tuple(str(c) for c in data["clients"]),
                        weights={str(k): float(v) for k, v in dict(data["weights"]).items()},
                        neighbours=int(data["neighbours"]), threshold_spec=float(data["threshold_spec"]),
                        bits=int(data["bits"]), clip=float(data["clip"]), length=int(data["length"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"not a round setup: {exc}") from None
        if list(setup.clients) != sorted(set(setup.clients)) or not set(setup.weights) <= set(setup.clients):
            raise ProtocolError("the setup's clients must be sorted and unique, and weights only theirs")
        if len(setup.clients) < 3 or setup.length < 2 or not all(0 < w <= 1 for w in setup.weights.values()):
            raise ProtocolError("a setup needs ≥ 3 clients, ≥ 2 coordinates and weights in (0, 1]")
        setup.fixed_point  # noqa: B018 -- validates bits and clip
        return setup


def _sign(u: str, v: str) -> int:
    return 1 if u < v else -1


def _info(purpose: str, setup: RoundSetup) -> bytes:
    return b"fedllm-secagg/" + purpose.encode() + b"/" + setup.label


def _share_aad(setup: RoundSetup, sender: str, receiver: str) -> bytes:
    return json.dumps([setup.context, setup.round, setup.attempt, "share", sender, receiver]).encode()


def _hex(value: Any, length: int, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * length:
        raise ProtocolError(f"{what} must be {length} bytes as hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ProtocolError(f"{what} is not hex") from None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def pairwise_seed(private: bytes, peer_public: bytes, setup: RoundSetup) -> bytes:
    return crypto.agree(private, peer_public, _info("mask", setup))


def add_masks(vector: np.ndarray, masks: list[tuple[bytes, int]], fixed: FixedPoint) -> None:
    """vector ← vector + Σ sign·PRG(seed) mod 2^bits, in place, every mask one cache-sized chunk at a time."""
    if not masks:
        return
    signs = [sign for _, sign in masks]
    for start, streams in crypto.keystreams([seed for seed, _ in masks], vector.size, fixed.dtype):
        part = vector[start:start + streams[0].size]
        for stream, sign in zip(streams, signs, strict=True):
            (np.add if sign > 0 else np.subtract)(part, stream, out=part)
        fixed.reduce(part)


# ---------------------------------------------------------------------------------------------- client
class ClientRound:
    """One client's side of one attempt. ``state`` (JSON-able, secret: the client keeps it to itself, on its own
    disk) lets a restarted client continue the stage it was in; :meth:`state_dict` returns it."""

    def __init__(self, client_id: str, setup: RoundSetup, state: Mapping[str, Any] | None = None):
        if client_id not in setup.clients:
            raise NotInStage(f"{client_id!r} is not one of this attempt's clients")
        self.client_id = client_id
        self.setup = setup
        self.state: dict[str, Any] = dict(state or {})

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    @property
    def neighbours(self) -> list[str]:
        return self.setup.graph[self.client_id]

    def advertise(self) -> dict[str, str]:
        """Stage 1: the two public keys (fresh for this attempt; the same ones again after a restart)."""
        if "c_sk" not in self.state:
            self.state.update(c_sk=crypto.generate_private_key().hex(), s_sk=crypto.generate_private_key().hex())
        return {"c_pk": crypto.public_key(bytes.fromhex(self.state["c_sk"])).hex(),
                "s_pk": crypto.public_key(bytes.fromhex(self.state["s_sk"])).hex()}

    def share(self, keys: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 2: ``keys`` = the server's relay of U1's public keys (at least this client's neighbours in U1)."""
        if "c_sk" not in self.state:
            raise StageMismatch("advertise keys before sharing")
        if "shares_sent" in self.state:
            return self.state["shares_sent"]
        mine = self.advertise()
        relayed = _object(keys, "keys")
        if relayed.get(self.client_id) != mine:
            raise ProtocolError("the server relayed other keys for this client than it advertised")
        peers: dict[str, dict[str, str]] = {}
        for v in self.neighbours:
            if v in relayed:
                entry = _object(relayed[v], f"keys of {v}")
                c_pk, s_pk = _hex(entry.get("c_pk"), 32, "c_pk"), _hex(entry.get("s_pk"), 32, "s_pk")
                try:
                    crypto.check_public_key(c_pk)
                    crypto.check_public_key(s_pk)
                except ValueError as exc:
                    raise ProtocolError(f"the relayed keys of {v!r}: {exc}") from None
                peers[v] = {"c_pk": c_pk.hex(), "s_pk": s_pk.hex()}
        holders = [h for h in self.setup.holders(self.client_id) if h == self.client_id or h in peers]
        if len(holders) < self.setup.threshold:
            raise ProtocolError(f"{len(holders)} share holders are left, fewer than the threshold "
                                f"{self.setup.threshold}")
        b = secrets.token_bytes(32)
        points = [self.setup.point(h) for h in holders]
        b_shares = shamir.split(b, points, self.setup.threshold)
        s_shares = shamir.split(bytes.fromhex(self.state["s_sk"]), points, self.setup.threshold)
        c_sk = bytes.fromhex(self.state["c_sk"])
        ciphertexts = {}
        for h in holders:
            if h == self.client_id:
                continue
            x = self.setup.point(h)
            plain = json.dumps({"b": b_shares[x].hex(), "s": s_shares[x].hex()}).encode()
            try:
                key = crypto.agree(c_sk, bytes.fromhex(peers[h]["c_pk"]), _info("share", self.setup))
            except ValueError as exc:  # a low-order public key: X25519 gives the all-zero value
                raise ProtocolError(f"the relayed key of {h!r}: {exc}") from None
            ciphertexts[h] = crypto.encrypt(key, plain, _share_aad(self.setup, self.client_id, h)).hex()
        x = self.setup.point(self.client_id)
        self.state.update(b=b.hex(), peers=peers,
                          held={self.client_id: {"b": b_shares[x].hex(), "s": s_shares[x].hex()}},
                          shares_sent={"shares": ciphertexts})
        return self.state["shares_sent"]

    def masked_input(self, survivors: Iterable[str], ciphertexts: Mapping[str, Any], encoded: np.ndarray
                     ) -> tuple[np.ndarray, list[str]]:
        """Stage 3: the masked vector and the neighbours whose shares failed authentication (they are dropped).

        ``survivors`` = U2, ``ciphertexts`` = the shares addressed to this client, by sender.
        """
        if "shares_sent" not in self.state:
            raise StageMismatch("send shares before the masked input")
        fixed = self.setup.fixed_point
        if encoded.shape != (self.setup.length,) or encoded.dtype != fixed.dtype:
            raise ProtocolError(f"the encoded update must be {self.setup.length} {fixed.dtype} values")
        u2 = set(survivors)
        if self.client_id not in u2 or not u2 <= set(self.setup.clients):
            raise ProtocolError("U2 must name this client and only the attempt's clients")
        if "excluded" not in self.state:
            self._open_shares(u2, _object(ciphertexts, "ciphertexts"))
        excluded = set(self.state["excluded"])
        s_sk = bytes.fromhex(self.state["s_sk"])
        masks = [(bytes.fromhex(self.state["b"]), 1)]
        masks += [(pairwise_seed(s_sk, bytes.fromhex(self.state["peers"][v]["s_pk"]), self.setup),
                   _sign(self.client_id, v)) for v in self.state["masked_with"] if v not in excluded]
        masked = encoded.copy()
        add_masks(masked, masks, fixed)
        return masked, sorted(excluded)

    def _open_shares(self, u2: set[str], ciphertexts: dict[str, Any]) -> None:
        """Decrypt the shares of N(u) ∩ U2; a neighbour whose share is missing or fails authentication is excluded."""
        c_sk = bytes.fromhex(self.state["c_sk"])
        held = dict(self.state["held"])
        expected = [v for v in self.neighbours if v in u2 and v in self.state["peers"]]
        excluded = []
        for v in expected:
            try:
                ciphertext = bytes.fromhex(ciphertexts[v]) if isinstance(ciphertexts.get(v), str) else b""
                key = crypto.agree(c_sk, bytes.fromhex(self.state["peers"][v]["c_pk"]), _info("share", self.setup))
                plain = json.loads(crypto.decrypt(key, ciphertext, _share_aad(self.setup, v, self.client_id)))
                held[v] = {"b": _hex(plain["b"], shamir.SHARE_BYTES, "b").hex(),
                           "s": _hex(plain["s"], shamir.SHARE_BYTES, "s").hex()}
            except (crypto.AuthenticationFailed, ProtocolError, ValueError, KeyError, TypeError):
                excluded.append(v)
        self.state.update(held=held, excluded=excluded, masked_with=expected)

    def unmask(self, survivors: Iterable[str]) -> dict[str, dict[str, str]]:
        """Stage 4: for each v this client holds a share of, b_v's share if v ∈ U3 (``survivors``), else s_v's.

        Answered once per attempt: a second call with another U3 is refused (revealing both shares of one v
        would give the server v's update).
        """
        if "excluded" not in self.state:
            raise StageMismatch("upload the masked input before unmasking")
        u3 = sorted(set(survivors))
        if "unmask_for" in self.state:
            if self.state["unmask_for"] != u3:
                raise ProtocolError("already answered the unmasking for another set of survivors")
            return self.state["unmask_sent"]
        if self.client_id not in u3 or not set(u3) <= set(self.setup.clients):
            raise ProtocolError("U3 must name this client and only the attempt's clients")
        if len(u3) < self.setup.threshold:
            raise ProtocolError(f"{len(u3)} survivors are fewer than the threshold {self.setup.threshold}")
        answer: dict[str, dict[str, str]] = {"b": {}, "s": {}}
        for v, pair in self.state["held"].items():
            if v in self.state["excluded"]:
                continue
            if v in u3:
                answer["b"][v] = pair["b"]
            elif v in self.state["masked_with"]:
                answer["s"][v] = pair["s"]
        self.state.update(unmask_for=u3, unmask_sent=answer)
        return answer


# ---------------------------------------------------------------------------------------------- server
class ServerRound:
    """The server's side of one attempt: what it has received, which stage is open, and the final unmasking.

    ``state`` is JSON-able and holds nothing the server may not know (public keys, ciphertexts it cannot open,
    the digests of masked inputs, the shares revealed for unmasking); the caller stores it durably after every
    accepted message and stores masked vectors next to it.
    """

    def __init__(self, setup: RoundSetup, state: Mapping[str, Any] | None = None):
        self.setup = setup
        self.state: dict[str, Any] = dict(state) if state else {
            "stage": "advertise", "keys": {}, "shares": {}, "masked": {}, "unmask": {},
            "u1": None, "u2": None, "u3": None, "dropped": {}, "failure": None,
        }

    @property
    def stage(self) -> str:
        return self.state["stage"]

    # ------------------------------------------------------------------ who is expected
    def expected(self) -> list[str]:
        """The clients the open stage waits for."""
        previous = {"advertise": list(self.setup.clients), "share": self.state["u1"], "masked": self.state["u2"],
                    "unmask": self.state["u3"]}
        return sorted(previous.get(self.stage) or [])

    def answered(self) -> list[str]:
        key = {"advertise": "keys", "share": "shares", "masked": "masked", "unmask": "unmask"}.get(self.stage)
        return sorted(self.state[key]) if key else []

    def complete(self) -> bool:
        return self.stage in OPEN_STAGES and set(self.expected()) <= set(self.answered())

    def status(self) -> dict[str, Any]:
        """``GET /v1/round``'s ``secagg``."""
        return {"stage": self.stage, "attempt": self.setup.attempt, "clients_in_stage": len(self.expected()),
                "answered": len(self.answered()), "threshold": self.setup.threshold,
                "neighbours": min(self.setup.neighbours, len(self.setup.clients) - 1),
                "dropped": {stage: len(ids) for stage, ids in self.state["dropped"].items()}}

    def _check(self, client: str, stage: str, round_number: int, attempt: int) -> None:
        if round_number != self.setup.round or attempt != self.setup.attempt:
            raise StageMismatch(f"round {round_number} attempt {attempt} is not open; round {self.setup.round} "
                                f"attempt {self.setup.attempt} is")
        if self.stage != stage:
            raise StageMismatch(f"stage {stage!r} is not open; stage {self.stage!r} is")
        if client not in self.expected():
            raise NotInStage(f"{client!r} is not among the clients of stage {stage!r}")

    def _record(self, key: str, client: str, message: Any) -> bool:
        """Store ``message``; True if it is new, False for an identical retry; AlreadySent for a different one."""
        previous = self.state[key].get(client)
        if previous is not None:
            if previous != message:
                raise AlreadySent(f"{client!r} already sent a different message in stage {self.stage!r}")
            return False
        self.state[key] = {**self.state[key], client: message}
        return True

    # ------------------------------------------------------------------ messages
    def receive_keys(self, client: str, round_number: int, attempt: int, message: Mapping[str, Any]) -> bool:
        self._check(client, "advertise", round_number, attempt)
        body = _object(message, "keys")
        keys = {}
        for name in ("c_pk", "s_pk"):
            raw = _hex(body.get(name), 32, name)
            try:
                crypto.check_public_key(raw)
            except ValueError as exc:
                raise ProtocolError(f"{name}: {exc}") from None
            keys[name] = raw.hex()
        if keys["c_pk"] == keys["s_pk"] or any(keys["c_pk"] in (k["c_pk"], k["s_pk"]) or
                                               keys["s_pk"] in (k["c_pk"], k["s_pk"])
                                               for c, k in self.state["keys"].items() if c != client):
            raise ProtocolError("public keys must be fresh: distinct from each other and from other clients'")
        return self._record("keys", client, keys)

    def receive_shares(self, client: str, round_number: int, attempt: int, message: Mapping[str, Any]) -> bool:
        self._check(client, "share", round_number, attempt)
        shares = _object(_object(message, "message").get("shares"), "shares")
        allowed = set(self.setup.graph[client]) & set(self.state["u1"])
        strangers = sorted(set(shares) - allowed)
        if strangers:
            raise ProtocolError(f"shares for clients that are not neighbours of {client!r} in U1: {strangers[:5]}")
        limit = 2 * (12 + 16 + 300)  # nonce, tag and the JSON of two 66-byte shares, as hex
        cleaned = {}
        for v, ciphertext in shares.items():
            if not isinstance(ciphertext, str) or not 56 <= len(ciphertext) <= limit:
                raise ProtocolError(f"the share for {v!r} is not a ciphertext")
            cleaned[v] = _hex(ciphertext, len(ciphertext) // 2, f"the share for {v!r}").hex()
        holders = len(cleaned) + 1
        if holders < self.setup.threshold:
            raise ProtocolError(f"shares for {holders} holders, fewer than the threshold {self.setup.threshold}")
        return self._record("shares", client, cleaned)

    def receive_masked(self, client: str, round_number: int, attempt: int, digest: str,
                       excluded: Iterable[str]) -> bool:
        """Record the masked input (the caller validated and stored the vector, named by ``digest``)."""
        self._check(client, "masked", round_number, attempt)
        excluded = sorted(set(excluded))
        if not set(excluded) <= set(self.setup.graph[client]) & set(self.state["u2"]):
            raise ProtocolError("only neighbours in U2 can fail authentication")
        return self._record("masked", client, {"sha256": digest, "excluded": excluded})

    def receive_unmask(self, client: str, round_number: int, attempt: int, message: Mapping[str, Any]) -> bool:
        self._check(client, "unmask", round_number, attempt)
        body = _object(message, "message")
        u3, u2 = set(self.state["u3"]), set(self.state["u2"])
        excluded = set(self.state["masked"][client]["excluded"])
        holds = set(self.setup.holders(client)) & u2 - excluded
        answer = {}
        for kind, wanted in (("b", holds & u3), ("s", holds - u3)):
            given = _object(body.get(kind, {}), kind)
            extra = sorted(set(given) - wanted)
            if extra:
                raise ProtocolError(f"{kind} shares for clients {client!r} holds none of, or of the wrong kind: "
                                    f"{extra[:5]}")
            answer[kind] = {v: _hex(s, shamir.SHARE_BYTES, f"{kind} share of {v}").hex() for v, s in given.items()}
        return self._record("unmask", client, answer)

    # ------------------------------------------------------------------ closing stages
    def close_stage(self) -> str:
        """Close the open stage with whoever answered (the caller calls this when :meth:`complete`, or at the
        stage's deadline). Returns the new stage: the next one, ``done`` or ``failed``."""
        stage, expected, answered = self.stage, self.expected(), self.answered()
        self.state["dropped"] = {**self.state["dropped"], stage: sorted(set(expected) - set(answered))}
        t = self.setup.threshold
        if stage == "advertise":
            self.state["u1"] = answered
            self._advance("share", len(answered) >= t, f"{len(answered)} clients advertised keys (threshold {t})")
        elif stage == "share":
            self.state["u2"] = answered
            self._advance("masked", len(answered) >= t, f"{len(answered)} clients sent shares (threshold {t})")
        elif stage == "masked":
            reported = {v for m in self.state["masked"].values() for v in m["excluded"]}
            u3 = sorted(set(answered) - reported)
            self.state["u3"] = u3
            if reported:
                self.state["dropped"]["masked"] = sorted(set(self.state["dropped"]["masked"]) | reported)
            self._advance("unmask", len(u3) >= t, f"{len(u3)} masked inputs survive (threshold {t})")
        elif stage == "unmask":
            missing = self.unrecoverable()
            self._advance("done", not missing, f"fewer than {t} shares reveal the secrets of {missing[:5]}")
        return self.stage

    def _advance(self, to: str, ok: bool, reason: str) -> None:
        if ok:
            self.state["stage"] = to
        else:
            self.state.update(stage="failed", failure={"stage": self.stage, "reason": reason,
                                                       "remaining": self.answered()})

    def _needed(self) -> dict[str, str]:
        """v -> the secret the unmasking needs of it: 'b' for U3, 's' for the dropped ones some survivor masked
        with."""
        u3 = set(self.state["u3"])
        needed = dict.fromkeys(u3, "b")
        for u in u3:
            masked = self.state["masked"][u]
            for v in set(self.setup.graph[u]) & set(self.state["u2"]) - u3 - set(masked["excluded"]):
                needed[v] = "s"
        return needed

    def _shares_of(self, v: str, kind: str) -> dict[int, bytes]:
        return {self.setup.point(u): bytes.fromhex(answer[kind][v])
                for u, answer in self.state["unmask"].items() if v in answer[kind]}

    def unrecoverable(self) -> list[str]:
        """The clients whose needed secret has fewer than t shares among the unmasking answers."""
        return sorted(v for v, kind in self._needed().items() if len(self._shares_of(v, kind)) < self.setup.threshold)

    def corrections(self) -> list[tuple[bytes, int]]:
        """Once ``done``: the (seed, sign) of every mask term to add to Σ_{u ∈ U3} y_u so that Σ x_u is left.

        ProtocolError when the shares are inconsistent or a rebuilt key does not match its advertised public key.
        """
        if self.stage != "done":
            raise StageMismatch("the unmasking is not complete")
        terms: list[tuple[bytes, int]] = []
        u3 = set(self.state["u3"])
        for v, kind in sorted(self._needed().items()):
            try:
                secret = shamir.combine(self._shares_of(v, kind), self.setup.threshold)
            except ValueError as exc:
                raise ProtocolError(f"the shares of {v!r}'s {kind}: {exc}") from None
            if kind == "b":
                terms.append((secret, -1))
                continue
            if crypto.public_key(secret).hex() != self.state["keys"][v]["s_pk"]:
                raise ProtocolError(f"the rebuilt mask key of {v!r} does not match its public key")
            for u in sorted(set(self.setup.graph[v]) & u3):
                if v not in self.state["masked"][u]["excluded"]:
                    seed = pairwise_seed(secret, bytes.fromhex(self.state["keys"][u]["s_pk"]), self.setup)
                    terms.append((seed, -_sign(u, v)))
        return terms

    # ------------------------------------------------------------------ what each client sees
    def view(self, client: str) -> dict[str, Any]:
        """What ``client`` needs to answer the open stage (nothing of other clients' secrets)."""
        setup = self.setup.to_json()
        setup["weights"] = {c: w for c, w in setup["weights"].items() if c == client}  # others' reveal their sizes
        view: dict[str, Any] = {"setup": setup, "stage": self.stage, "expected": client in self.expected(),
                                "answered": client in self.answered()}
        if self.stage == "share" and client in self.state["u1"]:
            wanted = ({client} | set(self.setup.graph[client])) & set(self.state["u1"])
            view["keys"] = {v: self.state["keys"][v] for v in sorted(wanted)}
        elif self.stage == "masked" and client in self.state["u2"]:
            view["u2"] = self.state["u2"]
            view["shares"] = {v: s[client] for v, s in self.state["shares"].items() if client in s}
        elif self.stage == "unmask" and client in self.state["u3"]:
            view["u3"] = self.state["u3"]
        return view


def unmask_sum(masked: Iterable[np.ndarray], corrections: Iterable[tuple[bytes, int]], fixed: FixedPoint,
               length: int) -> np.ndarray:
    """Σ y_u + Σ corrections mod 2^bits, one vector at a time (memory: the accumulator and one vector)."""
    total = np.zeros(length, dtype=fixed.dtype)
    for vector in masked:
        np.add(total, vector, out=total)
        fixed.reduce(total)
    add_masks(total, list(corrections), fixed)
    return total


def validate_masked(vector: np.ndarray, setup: RoundSetup) -> None:
    """ProtocolError unless ``vector`` is ``setup.length`` ring elements of the right storage type."""
    fixed = setup.fixed_point
    if vector.dtype != fixed.dtype or vector.shape != (setup.length,):
        raise ProtocolError(f"a masked input is {setup.length} values of {fixed.dtype}; got {vector.size} of "
                            f"{vector.dtype}")
    if fixed.bits not in (32, 64) and int(vector.max(initial=0)) > fixed.modulus_mask:
        raise ProtocolError(f"a masked input holds values outside the ring Z_2^{fixed.bits}")
