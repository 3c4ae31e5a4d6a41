"""The server's side of split learning: the middle blocks, their LoRA and optimizer, the clients' steps.

One process holds the middle model (``--fed_mode split`` runs gunicorn with one worker; its threads serve the
clients concurrently, one middle computation at a time under a lock). Each client's step is bound to
``(client, round, step)``:

* ``forward(R, S)`` is taken when R is the open round, the client is sampled in it, and S is its next step (the
  one after its last completed step); a forward for a done step is a replay and refused, one beyond the next is
  out of order. A forward for the step already pending replaces it (the client lost the answer or restarted).
* ``backward(R, S)`` needs that step's pending forward; it back-propagates the client's g_B and answers its g_A
  at once, which completes the client's step. An identical retry of a completed backward gets the same answer
  again; another body for it is refused.
* A forward whose backward does not come within :data:`PENDING_STEP_TIMEOUT` seconds is freed (its graph with it)
  and logged; the client's later backward is refused as ``split step dropped`` (409), and it redoes the step.

**Batches** (FL-LLaMA's client-batch mode, ``--split_batch_wait W``). Forwards arriving within W seconds of the
first (or until every client sampled in the round with steps left has sent one) are concatenated along the
batch dimension (:func:`~fedllm.split.step.concat_rows`) and run as ONE forward of the middle; each client gets
its own rows of h_B. Each member's backward, when it arrives, back-propagates its rows' g_B (zero elsewhere)
through the shared graph, which gives its g_A at once and its LoRA gradient ∇θ L_i. The batch takes ONE AdamW
step when every member has sent its backward, or W seconds after the first backward (or after another client's
forward queued behind the batch) -- a member later than that contributes nothing, is logged
(``split_batch_member_dropped``) and redoes its step -- with the gradient of **L = (1/m) Σ_i L_i over the m
members that contributed** (each L_i is that client's own mean token loss); its graph is then freed. A client's
g_A is ∂L_i/∂h_A (its own loss's), so its ends step as they would alone. While a batch awaits its backwards,
new forwards wait for its step and form the next batch, so every batch is computed at the weights its step
updates: exact. With W = 0 (the default) every forward is its own batch of one, computed at once, and steps
interleave freely: a forward made before another client's step changed the middle is recomputed from the kept
h_A under the current weights before its backward (autograd would refuse the updated weights).

With ``--split_sequence_chunk`` a message arrives in chunks (:class:`~fedllm.split.chunks.ChunkAssembler`, chunk 0
checked with :meth:`MiddleService.check_step` like the whole message); the assembled message is the unchunked one,
taken by the same ``forward``/``backward``, and :meth:`MiddleService.respond` cuts the answer the same way.

The middle's LoRA, AdamW state and every client's progress are one safetensors file written atomically every
``--save_model_freq`` optimizer steps of the middle (one per batch; with W = 0 one per client step) and whenever
a step completes a client's round; a restarted server continues from it (clients ask ``next_step`` and go on).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..adapter import adapter_spec, build_lora_config, initial_adapter, load_model_config
from ..algorithms import round_learning_rate
from ..fsutil import atomic_write
from ..server.errors import NoOpenRound
from ..server.metrics import instruments
from ..server.rounds import RoundEngine
from ..server.store import RoundRow
from .chunks import Binding, ChunkAssembler, encode_answer, read_binding
from .errors import InvalidActivations, MalformedActivations, StepDropped, StepOutOfOrder
from .messages import MessageError, MessageShape, decode_forward, decode_tensor, encode_tensor
from .model import MIDDLE, SERVER_PARTS, MaskInfo, SplitPlan, build_part_model
from .step import (
    SplitMiddle,
    add_gradients,
    concat_rows,
    load_optimizer_tensors,
    optimizer_tensors,
    set_learning_rate,
    set_part_adapter_tensors,
)

log = logging.getLogger("fedllm.server")

PENDING_STEP_TIMEOUT = 300.0  # seconds a forward's graph is kept waiting for its backward
CHECKPOINT = "middle.safetensors"


def split_plan(config: Any) -> SplitPlan:
    return SplitPlan.of(load_model_config(config.model_name_or_path), config.split_head_layers,
                        config.split_tail_layers)


def message_shape(config: Any) -> MessageShape:
    model_config = load_model_config(config.model_name_or_path)
    return MessageShape(int(model_config.hidden_size), int(model_config.max_position_embeddings),
                        int(config.seq_length), config.wire_dtype)


def initial_parts(config: Any) -> tuple[dict[str, torch.Tensor], SplitPlan]:
    """The whole model's initial adapter (seeded, as the LoRA federation's) and the plan that cuts it."""
    model_config = load_model_config(config.model_name_or_path)
    plan = SplitPlan.of(model_config, config.split_head_layers, config.split_tail_layers)
    lora = build_lora_config(model_config, r=config.peft_lora_r, alpha=config.peft_lora_alpha,
                             dropout=config.peft_lora_dropout, target_modules=config.target_module_list())
    return initial_adapter(adapter_spec(model_config, lora), config.seed), plan


WAITING, COMPUTED, CONTRIBUTED, DROPPED = "waiting", "computed", "contributed", "dropped"


@dataclass(eq=False)
class Member:
    """One client's step in a batch: its h_A, then its rows of the batch and the forward's answer."""

    client_id: str
    round: int
    step: int
    hidden_a: torch.Tensor
    mask: MaskInfo
    state: str = WAITING
    batch: Batch | None = None
    rows: slice | None = None  # its rows of the batch, once computed
    answer: bytes = b""


@dataclass(eq=False)
class Batch:
    """Concurrent clients' forwards run as one, and what their backwards have contributed since."""

    round: int
    sampled: tuple[str, ...]
    opened: float
    members: list[Member] = field(default_factory=list)
    hidden_a: torch.Tensor | None = None  # the concatenated h_A, kept for a recompute
    mask: MaskInfo | None = None
    leaf: torch.Tensor | None = None
    output: torch.Tensor | None = None
    version: int = 0
    computed: float = 0.0
    clock: float | None = None  # when the wait for the backwards started
    gradient_sum: list[torch.Tensor | None] | None = None
    contributors: int = 0
    failure: Exception | None = None

    def resolved(self) -> bool:
        return all(m.state in (CONTRIBUTED, DROPPED) for m in self.members)


@dataclass
class Answer:
    """A completed backward's answer, kept so that an identical retry gets it again."""

    round: int
    step: int
    request_sha256: str
    body: bytes


class MiddleService:
    """The middle blocks of a split federation, trained by every client's steps, alone or in batches."""

    def __init__(self, federation: Any):
        self.federation = federation
        config = federation.config
        self.config = config
        self.batch_wait = float(config.split_batch_wait)
        self.folder = federation.store.root / "split"
        self.folder.mkdir(parents=True, exist_ok=True)
        model_config = load_model_config(config.model_name_or_path)
        self.plan = SplitPlan.of(model_config, config.split_head_layers, config.split_tail_layers)
        self.shape = message_shape(config)
        lora = build_lora_config(model_config, r=config.peft_lora_r, alpha=config.peft_lora_alpha,
                                 dropout=config.peft_lora_dropout, target_modules=config.target_module_list())
        model = build_part_model(config.model_name_or_path, model_config, self.plan, SERVER_PARTS, lora)
        self.middle = SplitMiddle(model, self.plan, config.learning_rate)
        self.progress: dict[str, tuple[int, int]] = {}  # client -> (round, last completed step)
        self.completed_steps = 0  # client steps
        self.steps: dict[str, Member] = {}  # client -> its step between forward and backward
        self.collecting: Batch | None = None  # forwards gathering for one middle forward
        self.pending: list[Batch] = []  # computed batches awaiting their members' backwards
        self.answers: dict[str, Answer] = {}
        # client -> (round, step, why): its forward was discarded without a step; its backward is told so
        self.dropped: dict[str, tuple[int, int, str]] = {}
        self.lock = threading.Condition()
        self.chunk_size = int(config.split_sequence_chunk)
        self.assembler = ChunkAssembler(self.shape, self.chunk_size, PENDING_STEP_TIMEOUT, self.check_step) if (
            self.chunk_size) else None
        if (self.folder / CHECKPOINT).exists():
            self._restore()
        else:
            start, _ = initial_parts(config)
            set_part_adapter_tensors(model, self.plan, SERVER_PARTS,
                                     {k: v for k, v in start.items() if self.plan.part_of(k) == MIDDLE})

    # ------------------------------------------------------------------ steps
    def next_step(self, client_id: str, round_number: int) -> dict[str, Any]:
        """Where ``client_id`` stands in the round: the step it sends next, of ``max_steps``."""
        self._check_round(client_id, round_number)
        with self.lock:
            return {"round": round_number, "next_step": self._done(client_id, round_number) + 1,
                    "max_steps": self.config.max_steps}

    def forward(self, client_id: str, round_number: int, step: int, body: bytes) -> bytes:
        """Step 2: h_B for the client's h_A, from its batch's one forward; the graph is kept until the batch's step
        (or the timeout)."""
        current = self._check_round(client_id, round_number)
        hidden_a, mask = self._decode(lambda: decode_forward(body, self.shape))
        with self.lock:
            self._tend()
            self._check_next(client_id, round_number, step)
            self._drop(client_id)  # its earlier forward of this step, replaced
            self.dropped.pop(client_id, None)  # a dropped step, redone
            member = Member(client_id, round_number, step, hidden_a, mask)
            self.steps[client_id] = member
            arrived = time.monotonic()
            while member.state == WAITING:
                if member.batch is None:
                    self._join(member, current.sampled, arrived)
                batch = member.batch
                if batch is not None and self._collected(batch):
                    self._compute(batch)
                else:
                    self.lock.wait(self._sleep())
                    self._tend()
            if member.batch is not None and member.batch.failure is not None:
                raise member.batch.failure
            if member.state == DROPPED:
                raise StepOutOfOrder(f"this forward of step {step} was replaced by a later one of the same step")
            return member.answer

    def backward(self, client_id: str, round_number: int, step: int, body: bytes) -> bytes:
        """Step 4: g_A for the client's g_B through its batch's graph; the batch's AdamW step once every member
        has sent its backward (or the wait ran out)."""
        self._check_round(client_id, round_number)
        sha = hashlib.sha256(body).hexdigest()
        with self.lock:
            self._tend()
            member = self._pending(client_id, round_number, step, sha)
            if isinstance(member, bytes):
                return member  # the same request again: its answer was lost on the way
            rows, length = member.hidden_a.shape[:2]
            grad_b = self._decode(lambda: decode_tensor(body, "grad", self.shape, (rows, length, self.shape.hidden_size)))
            batch = member.batch
            if batch.version != self.middle.version:
                # Only with --split_batch_wait 0: another client's step changed the weights since this batch of
                # one was computed (with a wait, forwards wait for the pending batch's step).
                batch.leaf, batch.output = self.middle.forward(batch.hidden_a, batch.mask)
                batch.version = self.middle.version
            full = torch.zeros_like(batch.output)
            full[member.rows, :length] = grad_b.to(full.dtype)
            grad_a, grads = self.middle.gradients(batch.leaf, batch.output, full)
            batch.gradient_sum = add_gradients(batch.gradient_sum, grads)
            batch.contributors += 1
            member.state = CONTRIBUTED
            del self.steps[client_id]
            answer = encode_tensor("grad", grad_a[member.rows, :length], self.config.wire_dtype)
            self.answers[client_id] = Answer(round_number, step, sha, answer)
            self.progress[client_id] = (round_number, step)
            self.completed_steps += 1
            if batch.resolved():
                self._close(batch)
            else:
                self._start_clock(batch, time.monotonic())
            return answer

    def receive(self, kind: str, client_id: str, round_number: int, step: int,
                body: bytes) -> tuple[Binding | None, bytes | None]:
        """The whole message a request's body completes: the body itself (no chunks), or with
        ``--split_sequence_chunk`` the chunk's binding and the whole message once its last chunk came (else None)."""
        if self.assembler is None:
            if self._decode(lambda: read_binding(body)) is not None:
                raise MalformedActivations("this federation sends each split message as one body "
                                           "(--split_sequence_chunk 0, served by /v1/config); this body is a chunk")
            return None, body
        return self._decode(lambda: self.assembler.accept(kind, client_id, round_number, step, body))

    def respond(self, kind: str, client_id: str, round_number: int, step: int, answer: bytes) -> bytes:
        """The answer as sent: the body itself, or with chunks cut and framed like the request."""
        if self.assembler is None:
            return answer
        return encode_answer(answer, "hidden" if kind == "forward" else "grad", self.chunk_size,
                             self.config.wire_dtype, kind, client_id, round_number, step)

    def check_step(self, kind: str, client_id: str, round_number: int, step: int) -> None:
        """Refuse, as :meth:`forward` or :meth:`backward` would, a message for a step that cannot be taken now (a
        chunked message's chunk 0 is checked with this before it is kept)."""
        self._check_round(client_id, round_number)
        with self.lock:
            self._tend()
            if kind == "forward":
                self._check_next(client_id, round_number, step)
            else:
                self._pending(client_id, round_number, step, None)

    def _check_next(self, client_id: str, round_number: int, step: int) -> None:
        done = self._done(client_id, round_number)
        if step <= done:
            raise StepOutOfOrder(f"step {step} of round {round_number} is done (a replay); the next is {done + 1}")
        if step != done + 1 or step > self.config.max_steps:
            raise StepOutOfOrder(f"step {step} is not the next one: send step {done + 1} of {self.config.max_steps}")

    def _pending(self, client_id: str, round_number: int, step: int, sha: str | None) -> Member | bytes:
        """The step's computed forward awaiting this backward; or the answer of the same backward again (``sha``
        None: any body may be that retry); else the refusal."""
        member = self.steps.get(client_id)
        if member is not None and member.state == COMPUTED and (member.round, member.step) == (round_number, step):
            return member
        answer = self.answers.get(client_id)
        if answer is not None and (answer.round, answer.step) == (round_number, step) and sha in (
                None, answer.request_sha256):
            return answer.body
        dropped = self.dropped.get(client_id)
        if dropped is not None and dropped[:2] == (round_number, step):
            raise StepDropped(f"step {step} of round {round_number} was {dropped[2]}; the step is not done "
                              "and nothing of it was applied: send its forward again")
        raise StepOutOfOrder(f"no forward of step {step} of round {round_number} is pending (never sent, "
                             "already answered with another body, or lost in a server restart); send its "
                             "forward first")

    # ------------------------------------------------------------------ batches (all under self.lock)
    def _join(self, member: Member, sampled: list[str], arrived: float) -> None:
        """Put ``member`` in the collecting batch, unless a batch awaits its backwards (with a wait: the member
        joins the next, computed after that one's step) or the collecting batch is of another round."""
        if self.batch_wait > 0 and self.pending:
            for batch in self.pending:
                self._start_clock(batch, arrived)  # a forward waits for it: its members have the wait
            return
        if self.collecting is None:
            self.collecting = Batch(member.round, tuple(sampled), time.monotonic())
        elif self.collecting.round != member.round:
            return
        member.batch = self.collecting
        self.collecting.members.append(member)
        self.lock.notify_all()

    def _collected(self, batch: Batch) -> bool:
        """Whether the collecting ``batch`` is complete: the wait ran out, or every client sampled in its round
        with steps left has sent its forward."""
        if time.monotonic() >= batch.opened + self.batch_wait:
            return True
        expected = {c for c in batch.sampled if self._done(c, batch.round) < self.config.max_steps}
        return expected <= {m.client_id for m in batch.members}

    def _compute(self, batch: Batch) -> None:
        """The batch's one forward: each member's rows of h_B, as its answer."""
        self.collecting = None
        batch.hidden_a, batch.mask = concat_rows([(m.hidden_a, m.mask) for m in batch.members])
        set_learning_rate(self.middle.optimizer, round_learning_rate(self.config, batch.round))
        try:
            batch.leaf, batch.output = self.middle.forward(batch.hidden_a, batch.mask)
        except Exception as exc:  # every member's request fails with it; nothing was changed
            batch.failure = exc
            for member in batch.members:
                member.state = DROPPED
                self.steps.pop(member.client_id, None)
            self.lock.notify_all()
            raise
        batch.version, batch.computed = self.middle.version, time.monotonic()
        offset = 0
        for member in batch.members:
            rows, length = member.hidden_a.shape[:2]
            member.rows = slice(offset, offset + rows)
            offset += rows
            member.answer = encode_tensor("hidden", batch.output[member.rows, :length], self.config.wire_dtype)
            member.state = COMPUTED
        self.pending.append(batch)
        instruments().split_batch_size.observe(len(batch.members))
        log.debug("split: one middle forward for %d clients' steps", len(batch.members),
                  extra={"event": "split_batch", "round": batch.round, "clients": len(batch.members)})
        self.lock.notify_all()

    def _start_clock(self, batch: Batch, at: float) -> None:
        """Start the wait for ``batch``'s backwards (once); a timer closes it when the wait runs out."""
        if batch.clock is not None:
            return
        batch.clock = at
        timer = threading.Timer(max(0.0, at + self.batch_wait - time.monotonic()), self._tend_now)
        timer.daemon = True
        timer.start()

    def _tend_now(self) -> None:
        with self.lock:
            self._tend()

    def _tend(self) -> None:
        """Close the batches whose wait for backwards ran out, and free those older than the timeout."""
        now = time.monotonic()
        for batch in list(self.pending):
            if now - batch.computed > PENDING_STEP_TIMEOUT:
                self._close(batch, expired=True)
            elif batch.clock is not None and now >= batch.clock + self.batch_wait:
                self._close(batch)

    def _sleep(self) -> float:
        """How long a waiting forward may sleep before a wait it depends on may have run out."""
        deadlines = [b.clock + self.batch_wait for b in self.pending if b.clock is not None]
        if self.collecting is not None:
            deadlines.append(self.collecting.opened + self.batch_wait)
        return max(0.01, min(deadlines, default=time.monotonic() + 1.0) - time.monotonic())

    def _drop(self, client_id: str) -> None:
        """Withdraw ``client_id``'s open step (its forward was sent again): its rows contribute nothing."""
        member = self.steps.pop(client_id, None)
        if member is None:
            return
        previous, member.state = member.state, DROPPED
        batch = member.batch
        if batch is None:
            return
        if previous == WAITING:
            batch.members.remove(member)
            if not batch.members and batch is self.collecting:
                self.collecting = None
        elif batch.resolved():
            self._close(batch)
        self.lock.notify_all()

    def _close(self, batch: Batch, expired: bool = False) -> None:
        """The batch's AdamW step with its contributors' mean gradient (none: no step); its graph is freed."""
        for member in batch.members:
            if member.state != COMPUTED:
                continue
            member.state = DROPPED
            if self.steps.get(member.client_id) is member:
                del self.steps[member.client_id]
            why = (f"freed after {PENDING_STEP_TIMEOUT:g} s without its backward" if expired else
                   f"dropped from its batch's step: no backward within --split_batch_wait {self.batch_wait:g} s")
            self.dropped[member.client_id] = (member.round, member.step, why)
            if expired:
                log.warning("split: freed the graph of %s's step %d of round %d: no backward within %g s",
                            member.client_id, member.step, member.round, PENDING_STEP_TIMEOUT,
                            extra={"event": "split_step_expired", "client_id": member.client_id,
                                   "round": member.round, "step": member.step})
            else:
                log.warning("split: %s's step %d of round %d left out of its batch's step: no backward within "
                            "--split_batch_wait %g s", member.client_id, member.step, member.round, self.batch_wait,
                            extra={"event": "split_batch_member_dropped", "client_id": member.client_id,
                                   "round": member.round, "step": member.step})
        if batch.contributors:
            self.middle.step(batch.gradient_sum, batch.contributors)
        self.pending.remove(batch)
        batch.hidden_a = batch.leaf = batch.output = batch.gradient_sum = None
        every = self.config.save_model_freq
        round_end = any(m.state == CONTRIBUTED and m.step == self.config.max_steps for m in batch.members)
        if batch.contributors and (round_end or (every > 0 and self.middle.version % every == 0)):
            self._checkpoint()
        self.lock.notify_all()

    # ------------------------------------------------------------------ helpers
    def _check_round(self, client_id: str, round_number: int) -> RoundRow:
        store = self.federation.store
        current = store.current_round(store.read())
        if current is None:
            raise NoOpenRound("the federation is waiting for clients to join")
        RoundEngine.check_can_submit(current, client_id, round_number)
        return current

    def _done(self, client_id: str, round_number: int) -> int:
        done_round, done_step = self.progress.get(client_id, (0, 0))
        return done_step if done_round == round_number else 0

    @staticmethod
    def _decode(decode):
        try:
            return decode()
        except MessageError as exc:
            raise (MalformedActivations if exc.malformed else InvalidActivations)(str(exc)) from None

    # ------------------------------------------------------------------ durability
    def _checkpoint(self) -> None:
        """The middle's LoRA, its AdamW state and the clients' progress, in one file written atomically."""
        tensors = {**{f"lora/{k}": v for k, v in self.middle.adapter().items()},
                   **optimizer_tensors(self.middle.optimizer)}
        metadata = {"progress": json.dumps(self.progress), "completed_steps": str(self.completed_steps),
                    "version": str(self.middle.version)}
        atomic_write(self.folder / CHECKPOINT, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def _restore(self) -> None:
        from safetensors import safe_open

        path = self.folder / CHECKPOINT
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        lora = {k.removeprefix("lora/"): v for k, v in tensors.items() if k.startswith("lora/")}
        set_part_adapter_tensors(self.middle.model, self.plan, SERVER_PARTS, lora)
        load_optimizer_tensors(self.middle.optimizer, tensors)
        self.progress = {k: (int(v[0]), int(v[1])) for k, v in json.loads(metadata.get("progress", "{}")).items()}
        self.completed_steps = int(metadata.get("completed_steps", "0"))
        self.middle.version = int(metadata.get("version", "0"))
        log.info("split: restored the middle after %d steps (clients' progress: %s)", self.completed_steps,
                 self.progress)


def middle_checkpoint_adapter(state_dir: str | Path) -> dict[str, torch.Tensor]:
    """The middle's LoRA tensors (PEFT wire names) from a split federation's state_dir (export.py merge)."""
    path = Path(state_dir) / "split" / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"{path}: no middle checkpoint; is {state_dir} a split federation's state_dir "
                                "that has trained at least one round?")
    return {k.removeprefix("lora/"): v for k, v in load_file(str(path)).items() if k.startswith("lora/")}
