"""Typed refusals of split-learning messages (mapped to HTTP statuses in ``fedllm.server.app.ERROR_STATUS``)."""

from __future__ import annotations

from ..server.errors import FederationError


class NotSplitMode(FederationError):
    error = "not a split federation"


class InvalidSplitStep(FederationError):
    """``?round=R&step=S`` missing or malformed."""

    error = "invalid split step"


class StepOutOfOrder(FederationError):
    """A forward for a step already done (a replay) or beyond the next one; a backward for a step with no
    pending forward (unknown, already answered with another body, or expired)."""

    error = "split step out of order"


class StepDropped(FederationError):
    """A backward for a step whose forward the server discarded without taking a step with it: dropped from its
    batch's step (no backward within ``--split_batch_wait``) or freed after the pending-step timeout. The step is
    not done and nothing of it was applied; the client redoes it from its forward (fedllm.split.client)."""

    error = "split step dropped"


class ChunkOutOfOrder(FederationError):
    """A chunk of a chunked split message (``--split_sequence_chunk``) that is not the next one of the message being
    received: bound to another message, missing its predecessors, a resent chunk with another body, or no message
    of that step being received."""

    error = "split chunk out of order"


class MalformedActivations(FederationError):
    """Not a safetensors body, or not the tensors of a split message."""

    error = "malformed split message"


class InvalidActivations(FederationError):
    """Tensors of the wrong shape (against the served config), dtype, range, or not finite."""

    error = "invalid split message"


class SplitMessageTooLarge(FederationError):
    error = "split message too large"


SPLIT_ERROR_STATUS: dict[type[FederationError], int] = {
    NotSplitMode: 409,
    InvalidSplitStep: 400,
    StepOutOfOrder: 409,
    StepDropped: 409,
    ChunkOutOfOrder: 409,
    MalformedActivations: 400,
    InvalidActivations: 422,
    SplitMessageTooLarge: 413,
}
