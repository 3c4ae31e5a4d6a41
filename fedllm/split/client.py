"""The client's side of split learning: its head and tail, its data, one round of split steps over HTTP.

:class:`SplitTrainer` stands where :class:`~fedllm.client.trainer.LocalTrainer` stands in the client's loop
(``fedllm.client.runner``) when ``/v1/config`` says ``fed_mode: split``: same round in, same
:class:`~fedllm.client.trainer.RoundResult` out (the head and tail LoRA delta, aggregated with ``--fed_alg``;
with ``--split_private_ends`` a zero delta while the ends stay here). Token ids, labels and text never leave
this process: what it sends is h_A with the rows' spans and positions, and ∂loss/∂h_B.

A step the server dropped (its backward came after the batch stepped without it, ``--split_batch_wait``, or after
the pending-step timeout: the JSON error ``split step dropped``) is redone in process, at most
:data:`STEP_ATTEMPTS` times in all: the ends took no optimizer step for it (they step only on the middle's g_A,
which a dropped backward never gets), so the redo resends the same h_A message and recomputes the rest.

Resumable: after every step the ends' LoRA, their AdamW state and the round's losses are written atomically to
``--output_dir/split/``; a restarted client continues the round at the step the server expects next
(``GET /v1/split/step``), so a step the server completed is never sent again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from ..adapter import load_model_config, model_fingerprint
from ..client.http import ServerError
from ..config import ClientArguments, FederationArguments
from ..fsutil import atomic_write, atomic_write_bytes
from .chunks import decode_answer, encode_chunks
from .errors import StepDropped
from .messages import MAX_ROWS, MessageError, MessageShape, decode_tensor, encode_forward, encode_tensor
from .model import CLIENT_PARTS, MaskInfo, SplitPlan, build_part_model
from .step import Batch, PrivacyKnobs, SplitEnds, load_optimizer_tensors, optimizer_tensors, set_part_adapter_tensors

log = logging.getLogger("fedllm.client")

LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type")
PROGRESS_FILE = "progress.json"
ENDS_FILE = "ends.safetensors"  # the ends' LoRA and AdamW state after the last completed step
PRIVATE_ENDS_FILE = "private_ends.safetensors"  # --split_private_ends: the ends that never leave
RECEIPT_BYTES = 4096  # the server's JSON receipt of a chunk
STEP_ATTEMPTS = 4  # a step's attempts in all, when the server drops it from its batch again and again


class SplitProtocolError(RuntimeError):
    """The server's answer to a split message is not the tensor it must be."""


def _json_object(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def tokenize_sft(dataset: Any, tokenizer: Any, seq_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example: the loss on the completion only (on all of it for plain text)."""
    examples = []
    for row in dataset:
        if "text" in row:
            ids = tokenizer(row["text"])["input_ids"][:seq_length]
            labels = list(ids)
        else:
            prompt = tokenizer(row["prompt"])["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            ids = (prompt + completion)[:seq_length]
            labels = ([-100] * len(prompt) + completion)[:seq_length]
        if any(label != -100 for label in labels[1:]):  # something to learn after the shift
            examples.append((ids, labels))
    return examples


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-padded tensors of a batch."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(ids)] = 1
    return Batch(input_ids, mask, labels)


class SplitTrainer:
    """A data owner's head and tail of the federation's model and its tokenised data, kept for the federation."""

    def __init__(self, server_config: Mapping[str, Any], args: ClientArguments, client: Any):
        from transformers import AutoTokenizer

        from ..data import load_sft_dataset

        self.federation = FederationArguments(**server_config["federation"])
        self.args, self.client = args, client
        if not 1 <= args.batch_size <= MAX_ROWS or args.gradient_accumulation_steps != 1:
            raise ValueError(f"--fed_mode split: --batch_size must be in [1, {MAX_ROWS}] (rows per message) and "
                             f"--gradient_accumulation_steps 1 (one split step is one batch), got {args.batch_size} "
                             f"and {args.gradient_accumulation_steps}")
        if args.device not in ("auto", "cpu"):
            log.warning("--fed_mode split runs the client's ends on the CPU in this version (--device %s ignored)",
                        args.device)
        model_path = args.model_name_or_path or self.federation.model_name_or_path
        model_config = load_model_config(model_path)
        if model_fingerprint(model_config) != server_config["model_fingerprint"]:
            raise ValueError(f"base model {model_path!r} does not match the federation's "
                             f"{self.federation.model_name_or_path!r}; refusing to train")
        self.plan = SplitPlan.of(model_config, self.federation.split_head_layers, self.federation.split_tail_layers)
        self.shape = MessageShape(int(model_config.hidden_size), int(model_config.max_position_embeddings),
                                  self.federation.seq_length, self.federation.wire_dtype)
        lora = LoraConfig(**{k: v for k, v in server_config["lora_config"].items() if k in LORA_KEYS})
        self.model = build_part_model(model_path, model_config, self.plan, CLIENT_PARTS, lora)
        self.adapter_names = sorted(server_config["adapter"])
        self.knobs = PrivacyKnobs(self.federation.split_activation_noise, self.federation.split_gradient_clip,
                                  self.federation.split_gradient_noise)
        self.folder = Path(args.output_dir) / "split"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not args.dataset_name:
            raise ValueError("--dataset_name is required: a local data file, folder or dataset name")
        dataset = load_sft_dataset(args.dataset_name, tokenizer=self.tokenizer, template=self.federation.template,
                                   dataset_format=args.dataset_format, field_map=args.field_map,
                                   dataset_sample=args.dataset_sample, seed=args.seed)
        self.examples = tokenize_sft(dataset, self.tokenizer, self.federation.seq_length)
        if not self.examples:
            raise ValueError(f"no example of {args.dataset_name} has a completion within --seq_length "
                             f"{self.federation.seq_length}")
        self.num_samples = len(self.examples)

    # --- data ---
    def batch(self, round_number: int, step: int) -> Batch:
        """Step ``step``'s batch of round ``round_number``: a seeded order per round, so a resumed round sees the
        batches it would have seen."""
        generator = torch.Generator().manual_seed(self.args.seed * 100003 + round_number)
        size = min(self.args.batch_size, len(self.examples))
        epochs = (step * size) // len(self.examples) + 1
        order = torch.cat([torch.randperm(len(self.examples), generator=generator) for _ in range(epochs)])
        picked = order[(step - 1) * size: step * size].tolist()
        return collate([self.examples[i] for i in picked], self.tokenizer.pad_token_id)

    # --- one round ---
    def train_round(self, global_tensors: Mapping[str, torch.Tensor], round_number: int, learning_rate: float,
                    max_steps: int, clip_norm: float | None = None):
        from ..client.trainer import RoundResult

        started = time.time()
        served = {k: global_tensors[k] for k in self.adapter_names}
        private = self.folder / PRIVATE_ENDS_FILE
        start = load_file(str(private)) if self.federation.split_private_ends and private.exists() else served
        set_part_adapter_tensors(self.model, self.plan, CLIENT_PARTS, start)
        ends = SplitEnds(self.model, self.plan, learning_rate, self.knobs,
                         seed=self.args.seed * 100003 + round_number)
        losses = self._resume(ends, round_number)
        server_next = int(self.client.split_step(round_number)["next_step"])
        if server_next != len(losses) + 1:
            log.warning("split: round %d resumes at the server's step %d (this client had completed %d)",
                        round_number, server_next, len(losses),
                        extra={"event": "split_resume", "round": round_number, "step": server_next})
            losses = losses[:server_next - 1]
        for step in range(server_next, max_steps + 1):
            losses.append(self._step(ends, round_number, step))
            self._save_progress(ends, round_number, losses)
        after = ends.adapter()
        if self.federation.split_private_ends:
            atomic_write(private, lambda tmp: save_file(after, tmp))
            tensors = {k: torch.zeros_like(v) for k, v in after.items()}  # nothing of the ends leaves
        else:
            tensors = {k: after[k] - served[k].float() for k in after}
        metrics = {"steps": float(len(losses)), "seconds": time.time() - started}
        if losses:
            metrics.update(train_loss=sum(losses) / len(losses), final_loss=losses[-1])
        return RoundResult(tensors, metrics, {})

    def _step(self, ends: SplitEnds, round_number: int, step: int) -> float:
        batch = self.batch(round_number, step)
        hidden_a, mask = ends.head(batch)
        shape = tuple(hidden_a.shape)
        forward = self._encode("forward", round_number, step, {"hidden": hidden_a, **mask.tensors()})
        for attempt in range(1, STEP_ATTEMPTS + 1):
            hidden_b = self._exchange("forward", round_number, step, forward, shape)
            loss, grad_b = ends.tail(hidden_b, batch.labels)
            try:
                grad_a = self._exchange("backward", round_number, step,
                                        self._encode("backward", round_number, step, {"grad": grad_b}), shape)
            except ServerError as exc:
                if exc.status != 409 or exc.error != StepDropped.error or attempt == STEP_ATTEMPTS:
                    raise
                self._redo(ends, round_number, step, attempt, exc.detail)
                continue
            ends.head_backward(grad_a)
            log.debug("split: round %d step %d loss %.4f", round_number, step, loss)
            return loss
        raise AssertionError("unreachable")

    def _encode(self, kind: str, round_number: int, step: int, tensors: dict[str, torch.Tensor]) -> list[bytes]:
        """A message's bodies: one, or with --split_sequence_chunk its chunks (fedllm.split.chunks)."""
        wire, size = self.federation.wire_dtype, self.federation.split_sequence_chunk
        if size:
            return encode_chunks(tensors, size, wire, kind, self.args.client_id, round_number, step)
        if kind == "forward":
            mask = MaskInfo(tensors["starts"], tensors["lengths"], tensors["position_ids"])
            return [encode_forward(tensors["hidden"], mask, wire)]
        return [encode_tensor("grad", tensors["grad"], wire)]

    def _exchange(self, kind: str, round_number: int, step: int, bodies: list[bytes],
                  expected: tuple[int, ...]) -> torch.Tensor:
        """Send a message's bodies; the server's answer (h_B to a forward, g_A to a backward), checked."""
        name, size = ("hidden" if kind == "forward" else "grad"), self.federation.split_sequence_chunk
        try:
            if not size:
                answer = self.client.split_exchange(kind, round_number, step, bodies[0], self.shape.max_bytes())
                return decode_tensor(answer, name, self.shape, expected).float()
            for index, body in enumerate(bodies[:-1]):
                receipt = self.client.split_exchange(kind, round_number, step, body, RECEIPT_BYTES)
                expected_receipt = {"round": round_number, "step": step, "chunk": index, "chunks": len(bodies)}
                if _json_object(receipt) != expected_receipt:
                    raise MessageError(f"chunk {index} of {len(bodies)} was not acknowledged as such: "
                                       f"{receipt[:200]!r}")
            answer = self.client.split_exchange(kind, round_number, step, bodies[-1],
                                                len(bodies) * (self.shape.max_bytes(size) + 8))
            return decode_answer(answer, name, self.shape, size, expected, kind, self.args.client_id, round_number,
                                 step).float()
        except MessageError as exc:
            raise SplitProtocolError(f"the server's split answer is not acceptable: {exc}") from None

    def _redo(self, ends: SplitEnds, round_number: int, step: int, attempt: int, why: str) -> None:
        """Before a dropped step's next attempt: its tail gradients discarded (nothing was stepped), and the server
        confirms the step is still the one it expects."""
        ends.discard_tail()
        expected = int(self.client.split_step(round_number)["next_step"])
        if expected != step:
            raise SplitProtocolError(f"the server dropped step {step} of round {round_number} but now expects step "
                                     f"{expected}; stopping (a restart resumes where the server is)")
        log.warning("split: step %d of round %d was dropped by the server (%s); redoing it (attempt %d of %d)",
                    step, round_number, why, attempt + 1, STEP_ATTEMPTS,
                    extra={"event": "split_step_redo", "round": round_number, "step": step, "attempt": attempt + 1})

    # --- durability ---
    def _save_progress(self, ends: SplitEnds, round_number: int, losses: list[float]) -> None:
        tensors = {**{f"lora/{k}": v for k, v in ends.adapter().items()}, **optimizer_tensors(ends.optimizer)}
        atomic_write(self.folder / ENDS_FILE, lambda tmp: save_file(tensors, tmp))
        atomic_write_bytes(self.folder / PROGRESS_FILE, json.dumps({"round": round_number, "losses": losses}).encode())

    def _resume(self, ends: SplitEnds, round_number: int) -> list[float]:
        """The losses of the round's completed steps, with the ends and optimizer as they left them; [] when the
        round is new to this client."""
        progress_path, ends_path = self.folder / PROGRESS_FILE, self.folder / ENDS_FILE
        if not progress_path.exists() or not ends_path.exists():
            return []
        progress = json.loads(progress_path.read_text())
        if progress.get("round") != round_number:
            return []
        tensors = load_file(str(ends_path))
        set_part_adapter_tensors(self.model, self.plan, CLIENT_PARTS,
                                 {k.removeprefix("lora/"): v for k, v in tensors.items() if k.startswith("lora/")})
        load_optimizer_tensors(ends.optimizer, tensors)
        losses = [float(x) for x in progress.get("losses", [])]
        log.info("split: resuming round %d after step %d", round_number, len(losses),
                 extra={"event": "split_resume", "round": round_number, "step": len(losses) + 1})
        return losses


def final_ends(server_config: Mapping[str, Any], output_dir: Path, served: dict[str, torch.Tensor]) -> dict:
    """The head and tail LoRA a client keeps at the end: the federation's, or with --split_private_ends its own."""
    private = Path(output_dir) / "split" / PRIVATE_ENDS_FILE
    if server_config["federation"].get("split_private_ends") and private.exists():
        return load_file(str(private))
    return served
