"""Typed errors of the server: what a request did wrong, or what stopped the server from serving it.

The service layer (the round engine and its rooms) raises :class:`FederationError` subclasses and
knows nothing of HTTP; the Flask layer maps each type to a status code in one table
(``fedllm.server.app.ERROR_STATUS``). ``error`` is the short, stable name clients see in the JSON
body ``{"error": ..., "detail": ...}``; ``detail`` says what to do about it. A refused request
changed nothing.
"""

from __future__ import annotations

from typing import ClassVar


class FederationError(Exception):
    """A request that cannot be served; nothing was changed."""

    error: ClassVar[str] = "error"

    def __init__(self, detail: str = ""):
        super().__init__(f"{self.error}: {detail}" if detail else self.error)
        self.detail = detail

    def to_json(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}


# --- membership
class ClientRemoved(FederationError):
    error = "client removed"


class FederationFull(FederationError):
    error = "federation is full"


class NotJoined(FederationError):
    error = "client has not joined"


class UnknownClient(FederationError):
    error = "unknown client"


# --- rounds
class NoOpenRound(FederationError):
    error = "no round is open"


class WrongRound(FederationError):
    error = "wrong round"


class NotSampled(FederationError):
    error = "not sampled"


class RoundClosed(FederationError):
    error = "round closed"


class AlreadySubmitted(FederationError):
    error = "already submitted"


class NoRoundToAbort(FederationError):
    error = "no round to abort"


# --- uploads
class UploadTooLarge(FederationError):
    error = "upload too large"


class TruncatedBody(FederationError):
    error = "truncated body"


class ChecksumMismatch(FederationError):
    error = "checksum mismatch"


class MalformedUpdate(FederationError):
    """Not a well-formed safetensors file."""

    error = "malformed update"


class TooManySamples(FederationError):
    """An upload claims more samples than its client joined with (it would take over the weighted mean)."""

    error = "too many samples"


class InvalidUpdate(FederationError):
    """Well-formed, but not an update of this federation (names, shapes, dtype, non-finite values)."""

    error = "invalid update"


# --- secure aggregation (fedllm.server.secure_rounds)
class SecAggStage(FederationError):
    """A stage message for another round, attempt or stage (replayed, reordered, late), a second different one,
    or from a client the stage does not expect."""

    error = "secagg stage"


class SecAggInvalid(FederationError):
    """A stage message that is ill-formed or not what the protocol allows (a share for a non-neighbour, a masked
    input of the wrong length or ring, ...)."""

    error = "invalid secagg message"


class SecAggRequired(FederationError):
    """A plaintext update sent to a federation that runs secure aggregation."""

    error = "secure aggregation required"


# --- the server itself
class StorageUnavailable(FederationError):
    """The state_dir cannot be written (disk full, read-only, I/O error): retry once the operator fixed it."""

    error = "storage unavailable"


# --- the request itself (raised by the HTTP layer while parsing)
class MissingHeader(FederationError):
    error = "missing header"


class InvalidHeader(FederationError):
    error = "invalid header"


class InvalidClientId(FederationError):
    error = "invalid client id"


class BadJson(FederationError):
    error = "bad json"


class InvalidNumSamples(FederationError):
    error = "invalid num_samples"


class InvalidRound(FederationError):
    error = "invalid round"


class InvalidEncoding(FederationError):
    error = "invalid encoding"


class Unauthorized(FederationError):
    error = "unauthorized"


class Forbidden(FederationError):
    error = "forbidden"


class AdminOnly(FederationError):
    error = "admin only"
