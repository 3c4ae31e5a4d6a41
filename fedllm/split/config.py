"""The federation's split-learning options (``--fed_mode split`` ...): part of its identity, served to clients.

No torch here: :mod:`fedllm.config` imports this to build :class:`~fedllm.config.FederationArguments`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

FED_MODES = ("lora", "split")
# How the server groups the clients' steps, not what a step computes: an operator may change it on a restart.
SPLIT_OPERATIONAL = frozenset({"split_batch_wait", "split_sequence_chunk"})


@dataclass
class SplitArguments:
    """Split learning of the LLM (FL-LLaMA): the clients hold the embedding, the first and the last blocks, the
    final norm and the LM head; the server holds and trains the blocks between. See docs/split_learning.md."""

    fed_mode: str = field(
        default="lora",
        metadata={"help": "lora: every client trains the whole model's LoRA and uploads it (federated LoRA). "
                          "split: split learning; --max_steps is then the split steps per client per round.",
                  "choices": list(FED_MODES)},
    )
    split_head_layers: int = field(
        default=2, metadata={"help": "--fed_mode split: transformer blocks p on the client after the embedding (>= 1)."}
    )
    split_tail_layers: int = field(
        default=2,
        metadata={"help": "--fed_mode split: transformer blocks q on the client before the final norm and LM head "
                          "(>= 1; p + q < the model's layers)."},
    )
    split_activation_noise: float = field(
        default=0.0,
        metadata={"help": "--fed_mode split: std of the Gaussian noise each client adds to the hidden states it "
                          "sends (0 = off; a heuristic defence, no formal guarantee)."},
    )
    split_gradient_clip: float = field(
        default=0.0,
        metadata={"help": "--fed_mode split: L2 norm each sample's gradient of the middle's output is clipped to "
                          "before it is sent (0 = off)."},
    )
    split_gradient_noise: float = field(
        default=0.0,
        metadata={"help": "--fed_mode split: std of the Gaussian noise added to that gradient before it is sent "
                          "(0 = off)."},
    )
    split_private_ends: bool = field(
        default=False,
        metadata={"help": "--fed_mode split: each client keeps its head and tail LoRA to itself (it uploads a "
                          "zero update to close the round) instead of their being aggregated with --fed_alg."},
    )
    split_batch_wait: float = field(
        default=0.0,
        metadata={"help": "--fed_mode split, client-batch mode: seconds the server waits after a forward for the other "
                          "sampled clients' forwards, to run them as one batch of its blocks, and after a batch's first "
                          "backward for the others' (a member later than that is dropped from the step and redoes "
                          "it). 0 = off: every client step is its own middle step (the default: on the CPU a batch "
                          "saves no time, and it makes a slow client redo its steps). See docs/split_learning.md."},
    )

    split_sequence_chunk: int = field(
        default=0,
        metadata={"help": "--fed_mode split: send every hidden-state and gradient message, and its answer, in chunks of "
                          "at most this many tokens of the sequence, each its own checked safetensors body (for long "
                          "sequences: bounded request bodies). 0 = off: one body per message. Served by /v1/config; "
                          "the result is the same either way. See docs/split_learning.md."},
    )

    @property
    def split_enabled(self: Any) -> bool:
        return self.fed_mode == "split"

    def split_problems(self: Any) -> list[str]:
        """What is wrong with the split options; the model-dependent checks (p + q < layers, architecture) are
        :meth:`fedllm.split.model.SplitPlan.of`'s, run when the federation is created."""
        if not self.split_enabled:
            return []
        problems = []
        for name in ("split_head_layers", "split_tail_layers"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("split_activation_noise", "split_gradient_clip", "split_gradient_noise", "split_batch_wait"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                problems.append(f"--{name} must be a finite number >= 0, got {value}")
        if self.split_sequence_chunk < 0:
            problems.append(f"--split_sequence_chunk must be >= 0 (0 = off), got {self.split_sequence_chunk}")
        if self.task != "sft":
            problems.append("--fed_mode split trains SFT only (--task sft)")
        if self.dp != "off":
            problems.append("--fed_mode split does not combine with --dp (client-level DP of the ends only would "
                            "leave the middle unaccounted)")
        return problems
