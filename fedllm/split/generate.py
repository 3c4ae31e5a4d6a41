"""Generation with a split model: head, middle and tail each keep their own KV cache; only hidden states travel.

The client holds the head (embedding + blocks[0:p]) and the tail (blocks[N-q:N] + norm + LM head), the server
the middle (blocks[p:N-q]); each part runs its training forward (:func:`~fedllm.split.model.head_forward`,
``middle_forward``, ``tail_logits``) with its own transformers ``DynamicCache``. For a left-padded batch:

* prefill: the prompts' h_A ``[B, T, H]`` goes head → middle once, h_B ``[B, T, H]`` comes back to the tail;
* each decoding step: the new token's h_A ``[B, 1, H]`` goes head → middle, h_B ``[B, 1, H]`` comes back.

Every hand-off is a training forward message (:mod:`fedllm.split.messages`, in the wire dtype), so what travels
is real bytes: hidden states plus each row's ``starts``/``lengths`` (its span of real tokens among the cached
and the new) and ``position_ids``; never a token id or a logit. Positions are transformers' ``generate``'s:
``cumsum(attention_mask) - 1`` over the prompt (0 on padding), then +1 per new token; rows that produced EOS go
on with the pad token, as ``generate`` does. With a float32 wire the tokens are the merged model's greedy
``generate``'s (the test); bf16 or fp16 round each hand-off, as in training.

:class:`MiddleDecoder` is the server's side as two calls, ``forward(session, body) -> body`` and ``end(session)``,
with one KV cache per session: what an HTTP endpoint would call. ``export.py generate`` calls it in process.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Protocol

import torch
from peft import PeftModel
from transformers import DynamicCache

from .messages import MessageError, MessageShape, decode_forward, decode_tensor, encode_forward, encode_tensor
from .model import MIDDLE, MaskInfo, SplitPlan, cached_length, head_forward, middle_forward, tail_logits


def new_cache(model: PeftModel) -> DynamicCache:
    """An empty KV cache of the model's layout; a part fills only its own blocks' layers."""
    return DynamicCache(config=model.get_base_model().config)


class Middle(Protocol):
    """The server's side of generation, as the client reaches it (in process: :class:`MiddleDecoder`)."""

    def forward(self, session: str, body: bytes) -> bytes: ...

    def end(self, session: str) -> None: ...


class MiddleDecoder:
    """The middle's blocks for generation, one KV cache per session.

    A session's first forward message is its prefill, the next ones its decoding steps; each is checked as a
    training message is (:func:`~fedllm.split.messages.decode_forward`; the spans within the cached tokens and
    the new) and must keep the session's batch size. A refused message changes nothing. ``end`` frees the cache.
    """

    def __init__(self, model: PeftModel, plan: SplitPlan, shape: MessageShape):
        self.model, self.plan, self.shape = model, plan, shape
        self.model.eval()
        self.sessions: dict[str, DynamicCache] = {}

    @torch.no_grad()
    def forward(self, session: str, body: bytes) -> bytes:
        layers = self.plan.layers(MIDDLE)
        cache = self.sessions.get(session) or new_cache(self.model)
        cached = cached_length(cache, layers)
        hidden, mask = decode_forward(body, self.shape, cached)
        rows = cache.layers[layers[0]].keys.shape[0] if cached else hidden.shape[0]
        if hidden.shape[0] != rows:
            raise MessageError(f"session {session} generates {rows} rows, this step has {hidden.shape[0]}")
        output = middle_forward(self.model, self.plan, hidden.to(self.model.get_base_model().dtype), mask, cache)
        self.sessions[session] = cache
        return encode_tensor("hidden", output, self.shape.wire_dtype)

    def end(self, session: str) -> None:
        self.sessions.pop(session, None)


@dataclass
class Exchange:
    """One hand-off's bytes on the wire: the forward message up, h_B down."""

    sent: int
    received: int


@dataclass
class SplitGeneration:
    sequences: torch.Tensor  # [B, T + new]: the prompts and their continuations, as transformers' generate
    logits: list[torch.Tensor] = field(default_factory=list)  # per new token: [B, vocab] float32
    exchanges: list[Exchange] = field(default_factory=list)  # [0] the prefill, then one per decoding step


def prefill_mask(attention_mask: torch.Tensor) -> MaskInfo:
    """The prompts' mask info, positions as ``generate`` makes them; the prompts must be non-empty, left-padded."""
    mask = MaskInfo.from_attention_mask(attention_mask)
    if bool((mask.starts + mask.lengths != attention_mask.shape[1]).any()) or bool((mask.lengths < 1).any()):
        raise ValueError("split generation needs non-empty, left-padded prompts")
    positions = torch.arange(attention_mask.shape[1]).unsqueeze(0) - mask.starts.unsqueeze(1)
    return MaskInfo(mask.starts, mask.lengths, positions.clamp_min(0))


def next_token_mask(mask: MaskInfo) -> MaskInfo:
    """One more real token per row after ``mask``'s: the span grows by one; its position is the span's length so
    far."""
    return MaskInfo(mask.starts, mask.lengths + 1, mask.lengths.unsqueeze(1).clone())


class SplitGenerator:
    """The client's side of generation: head and tail with their own KV caches, the middle reached through
    ``middle``; :meth:`generate` is called as transformers' ``generate`` is (greedy)."""

    def __init__(self, model: PeftModel, plan: SplitPlan, middle: Middle, shape: MessageShape):
        self.model, self.plan, self.middle, self.shape = model, plan, middle, shape
        self.model.eval()
        self.last: SplitGeneration | None = None

    def _exchange(self, session: str, hidden: torch.Tensor, mask: MaskInfo, exchanges: list[Exchange]) -> torch.Tensor:
        body = encode_forward(hidden, mask, self.shape.wire_dtype)
        answer = self.middle.forward(session, body)
        exchanges.append(Exchange(len(body), len(answer)))
        return decode_tensor(answer, "hidden", self.shape, tuple(hidden.shape)).to(hidden.dtype)

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
            eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> SplitGeneration:
        """Greedy decoding of ``max_new_tokens`` (fewer once every row produced EOS)."""
        head_cache, tail_cache = new_cache(self.model), new_cache(self.model)
        eos = torch.tensor([] if eos_token_id is None else eos_token_id).long().flatten()
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool)
        result = SplitGeneration(input_ids)
        session = uuid.uuid4().hex
        tokens, mask = input_ids, prefill_mask(attention_mask)
        try:
            for step in range(max_new_tokens):
                if step:
                    mask = next_token_mask(mask)
                hidden_a = head_forward(self.model, self.plan, tokens, mask, head_cache)
                hidden_b = self._exchange(session, hidden_a, mask, result.exchanges)
                logits = tail_logits(self.model, self.plan, hidden_b, mask, tail_cache, last_only=True)[:, -1].float()
                result.logits.append(logits)
                new = logits.argmax(dim=-1)
                if pad_token_id is not None:
                    new = torch.where(unfinished, new, torch.full_like(new, pad_token_id))
                result.sequences = torch.cat([result.sequences, new.unsqueeze(1)], dim=1)
                unfinished &= ~torch.isin(new, eos)
                if not bool(unfinished.any()):
                    break
                tokens = new.unsqueeze(1)
        finally:
            self.middle.end(session)
        self.last = result
        return result

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 do_sample: bool = False, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """The prompts and their greedy continuations, for :func:`fedllm.evaluation.evaluator.generate_texts`."""
        if do_sample:
            raise ValueError("split generation is greedy, as export.py generate is")
        return self.run(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id).sequences
