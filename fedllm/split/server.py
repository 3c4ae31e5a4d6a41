"""The server's side of split learning: the middle blocks, their LoRA and optimizer, one step per client message.

One process holds the middle model (``--fed_mode split`` runs gunicorn with one worker; its threads serve the
clients concurrently, one middle computation at a time under a lock). Each client's step is bound to
``(client, round, step)``:

* ``forward(R, S)`` is taken when R is the open round, the client is sampled in it, and S is its next step (the
  one after its last completed step); a forward for a done step is a replay and refused, one beyond the next is
  out of order. A forward for the step already pending replaces it (the client lost the answer or restarted).
* ``backward(R, S)`` needs that step's pending forward; it runs the backward, takes one AdamW step on the
  middle's LoRA and completes the step. An identical retry of a completed backward gets the same answer again;
  another body for it is refused.
* A forward whose backward does not come within :data:`PENDING_STEP_TIMEOUT` seconds is freed (its graph with it)
  and logged; the client's later backward is refused and it redoes the step.

When another client's step changed the middle since a forward, its graph is stale (autograd would refuse the
updated weights); the forward is then recomputed from the kept h_A under the current weights before the
backward. The middle's LoRA, AdamW state and every client's progress are one safetensors file written
atomically every ``--save_model_freq`` completed steps and whenever a client completes its round's last step; a
restarted server continues from it (clients ask ``next_step`` and go on from there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..adapter import adapter_spec, build_lora_config, initial_adapter, load_model_config
from ..algorithms import round_learning_rate
from ..fsutil import atomic_write
from ..server.errors import NoOpenRound
from ..server.rounds import RoundEngine
from .errors import InvalidActivations, MalformedActivations, StepOutOfOrder
from .messages import MessageError, MessageShape, decode_forward, decode_tensor, encode_tensor
from .model import MIDDLE, SERVER_PARTS, MaskInfo, SplitPlan, build_part_model
from .step import SplitMiddle, load_optimizer_tensors, optimizer_tensors, set_learning_rate, set_part_adapter_tensors

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


@dataclass
class PendingStep:
    round: int
    step: int
    hidden_a: torch.Tensor
    mask: MaskInfo
    leaf: torch.Tensor
    output: torch.Tensor
    version: int
    created: float


@dataclass
class Answer:
    """A completed backward's answer, kept so that an identical retry gets it again."""

    round: int
    step: int
    request_sha256: str
    body: bytes


class MiddleService:
    """The middle blocks of a split federation, trained by every client's steps in turn."""

    def __init__(self, federation: Any):
        self.federation = federation
        config = federation.config
        self.config = config
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
        self.completed_steps = 0
        self.pending: dict[str, PendingStep] = {}
        self.answers: dict[str, Answer] = {}
        self.lock = threading.Lock()
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
        """Step 2: h_B for the client's h_A; the graph is kept until its backward (or the timeout)."""
        self._check_round(client_id, round_number)
        hidden_a, mask = self._decode(lambda: decode_forward(body, self.shape))
        with self.lock:
            self._expire()
            done = self._done(client_id, round_number)
            if step <= done:
                raise StepOutOfOrder(f"step {step} of round {round_number} is done (a replay); the next is {done + 1}")
            if step != done + 1 or step > self.config.max_steps:
                raise StepOutOfOrder(f"step {step} is not the next one: send step {done + 1} of "
                                     f"{self.config.max_steps}")
            self.pending.pop(client_id, None)
            set_learning_rate(self.middle.optimizer, round_learning_rate(self.config, round_number))
            leaf, output = self.middle.forward(hidden_a, mask)
            self.pending[client_id] = PendingStep(round_number, step, hidden_a, mask, leaf, output,
                                                  self.middle.version, time.monotonic())
            return encode_tensor("hidden", output, self.config.wire_dtype)

    def backward(self, client_id: str, round_number: int, step: int, body: bytes) -> bytes:
        """Step 4: g_A for the client's g_B, after one AdamW step on the middle's LoRA."""
        self._check_round(client_id, round_number)
        sha = hashlib.sha256(body).hexdigest()
        with self.lock:
            self._expire()
            pending = self.pending.get(client_id)
            if pending is None or (pending.round, pending.step) != (round_number, step):
                answer = self.answers.get(client_id)
                if answer is not None and (answer.round, answer.step, answer.request_sha256) == (
                        round_number, step, sha):
                    return answer.body  # the same request again: its answer was lost on the way
                raise StepOutOfOrder(f"no forward of step {step} of round {round_number} is pending (never sent, "
                                     f"already answered, or freed after {PENDING_STEP_TIMEOUT:g} s); send its "
                                     "forward first")
            grad_b = self._decode(lambda: decode_tensor(body, "grad", self.shape, tuple(pending.output.shape)))
            leaf, output = pending.leaf, pending.output
            if pending.version != self.middle.version:  # another client's step changed the weights since
                leaf, output = self.middle.forward(pending.hidden_a, pending.mask)
            grad_a = self.middle.backward(leaf, output, grad_b)
            del self.pending[client_id]
            answer = encode_tensor("grad", grad_a, self.config.wire_dtype)
            self.answers[client_id] = Answer(round_number, step, sha, answer)
            self.progress[client_id] = (round_number, step)
            self.completed_steps += 1
            every = self.config.save_model_freq
            if step == self.config.max_steps or (every > 0 and self.completed_steps % every == 0):
                self._checkpoint()
            return answer

    # ------------------------------------------------------------------ helpers
    def _check_round(self, client_id: str, round_number: int) -> None:
        store = self.federation.store
        current = store.current_round(store.read())
        if current is None:
            raise NoOpenRound("the federation is waiting for clients to join")
        RoundEngine.check_can_submit(current, client_id, round_number)

    def _done(self, client_id: str, round_number: int) -> int:
        done_round, done_step = self.progress.get(client_id, (0, 0))
        return done_step if done_round == round_number else 0

    @staticmethod
    def _decode(decode):
        try:
            return decode()
        except MessageError as exc:
            raise (MalformedActivations if exc.malformed else InvalidActivations)(str(exc)) from None

    def _expire(self) -> None:
        now = time.monotonic()
        for client_id, pending in list(self.pending.items()):
            if now - pending.created > PENDING_STEP_TIMEOUT:
                del self.pending[client_id]
                log.warning("split: freed the graph of %s's step %d of round %d: no backward within %g s",
                            client_id, pending.step, pending.round, PENDING_STEP_TIMEOUT,
                            extra={"event": "split_step_expired", "client_id": client_id, "round": pending.round,
                                   "step": pending.step})

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
