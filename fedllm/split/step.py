"""One split training step, as pure in-process calls; the HTTP layer sends these same calls' tensors.

For a batch (input ids X, attention mask M, labels Y) and LoRA parameters θ_A (head), θ_M (middle), θ_T (tail):

1. client  h_A = head(X, M; θ_A) (+ N(0, σ_a²) with ``--split_activation_noise σ_a``); sends h_A, the mask info
2. server  h_B = middle(h_A; θ_M), keeping the graph; sends h_B
3. client  loss = CE(tail(h_B; θ_T), Y); backward gives ∂loss/∂θ_T and g_B = ∂loss/∂h_B; g_B's rows optionally
   clipped to L2 norm C (``--split_gradient_clip``) and noised with N(0, σ_g²) (``--split_gradient_noise``); sends g_B
4. server  backward of h_B with g_B gives ∂loss/∂θ_M and g_A = ∂loss/∂h_A; AdamW step on θ_M; sends g_A
5. client  backward of h_A with g_A gives ∂loss/∂θ_A; AdamW step on θ_A and θ_T

With noise and clipping off, the gradients are exactly those of the unsplit model (the chain rule cut at h_A and
h_B), and AdamW is elementwise, so a split run equals single-process LoRA training step for step (the test).
No global gradient-norm clipping: it would need the norms of all three parts in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from .model import (
    CLIENT_PARTS,
    SERVER_PARTS,
    MaskInfo,
    SplitPlan,
    causal_lm_loss,
    head_forward,
    middle_forward,
    tail_logits,
)


def part_adapter_tensors(model: PeftModel, plan: SplitPlan, parts: Iterable[str]) -> dict[str, torch.Tensor]:
    """The held parts' LoRA tensors under their wire names, as float32 CPU copies."""
    state = get_peft_model_state_dict(model)
    return {k: state[k].detach().to("cpu", torch.float32).clone() for k in plan.select(state, parts)}


def set_part_adapter_tensors(model: PeftModel, plan: SplitPlan, parts: Iterable[str],
                             tensors: Mapping[str, torch.Tensor]) -> None:
    """Load the held parts' LoRA tensors; every one must be given, no other."""
    expected = set(plan.select(get_peft_model_state_dict(model), parts))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"adapter tensors do not match the parts {sorted(parts)}: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    with torch.no_grad():
        result = set_peft_model_state_dict(model, dict(tensors))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter tensors were not used by the model: {result.unexpected_keys[:3]}")


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "adam") -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as named float32 tensors (safetensors, no pickle)."""
    return {f"{prefix}/{index}/{key}": torch.as_tensor(value, dtype=torch.float32).detach().clone()
            for index, state in optimizer.state_dict()["state"].items() for key, value in state.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                           prefix: str = "adam") -> None:
    """Restore what :func:`optimizer_tensors` wrote (the hyperparameters stay the optimizer's own)."""
    state_dict = optimizer.state_dict()
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(f"{prefix}/"):
            _, index, key = name.split("/")
            restored.setdefault(int(index), {})[key] = value
    state_dict["state"] = restored
    optimizer.load_state_dict(state_dict)


def trainable(model: PeftModel) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def new_optimizer(model: PeftModel, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW over the held LoRA parameters, as TRL's default (weight decay 0, betas (0.9, 0.999), eps 1e-8)."""
    return torch.optim.AdamW(trainable(model), lr=learning_rate, weight_decay=0.0)


def set_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64, never leaves the client
    attention_mask: torch.Tensor  # [B, T] 0/1, one contiguous span per row
    labels: torch.Tensor  # [B, T] int64, -100 where no loss; never leaves the client


@dataclass
class PrivacyKnobs:
    """The client's optional defences of what it sends (heuristic; no formal guarantee)."""

    activation_noise: float = 0.0  # σ_a of N(0, σ_a²) added to h_A
    gradient_clip: float = 0.0  # C: each row of g_B clipped to L2 norm C (0 = off)
    gradient_noise: float = 0.0  # σ_g of N(0, σ_g²) added to g_B

    def noise_activations(self, hidden: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.activation_noise <= 0:
            return hidden
        noise = torch.randn(hidden.shape, generator=generator, dtype=torch.float32).to(hidden)
        return hidden + self.activation_noise * noise

    def protect_gradient(self, grad: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.gradient_clip > 0:
            norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
            grad = grad * (self.gradient_clip / norms).clamp(max=1.0).view(-1, *[1] * (grad.dim() - 1))
        if self.gradient_noise > 0:
            noise = torch.randn(grad.shape, generator=generator, dtype=torch.float32).to(grad)
            grad = grad + self.gradient_noise * noise
        return grad


class SplitEnds:
    """The client's head and tail: its two forwards, its two backwards, one optimizer step per split step."""

    def __init__(self, model: PeftModel, plan: SplitPlan, learning_rate: float, knobs: PrivacyKnobs | None = None,
                 seed: int = 0):
        self.model, self.plan = model, plan
        self.optimizer = new_optimizer(model, learning_rate)
        self.knobs = knobs or PrivacyKnobs()
        self.generator = torch.Generator().manual_seed(seed)
        self._head_out: torch.Tensor | None = None
        self._mask: MaskInfo | None = None

    def head(self, batch: Batch) -> tuple[torch.Tensor, MaskInfo]:
        """Step 1: h_A (noised if asked) and the mask info; the graph is kept for :meth:`head_backward`."""
        self.model.train()
        self._mask = MaskInfo.from_attention_mask(batch.attention_mask)
        self._head_out = head_forward(self.model, self.plan, batch.input_ids, self._mask)
        sent = self.knobs.noise_activations(self._head_out.detach(), self.generator)
        return sent, self._mask

    def tail(self, hidden_b: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Step 3: the loss, the tail's gradients, and g_B (clipped and noised if asked)."""
        hidden_b = hidden_b.detach().to(self._head_out.dtype).requires_grad_(True)
        loss = causal_lm_loss(self.model, tail_logits(self.model, self.plan, hidden_b, self._mask), labels)
        loss.backward()
        return float(loss.detach()), self.knobs.protect_gradient(hidden_b.grad, self.generator)

    def discard_tail(self) -> None:
        """Forget :meth:`tail`'s gradients (the server dropped the step): the head's graph and mask are kept, so the
        step's next attempt resends the same h_A and runs :meth:`tail` again; nothing was stepped."""
        self.optimizer.zero_grad(set_to_none=True)

    def head_backward(self, grad_a: torch.Tensor) -> None:
        """Step 5: the head's gradients from g_A, then one AdamW step on head and tail."""
        self._head_out.backward(grad_a.to(self._head_out.dtype))
        self._head_out = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def adapter(self) -> dict[str, torch.Tensor]:
        return part_adapter_tensors(self.model, self.plan, CLIENT_PARTS)


class SplitMiddle:
    """The server's blocks: forward keeps the graph, a backward consumes it (one caller), or several callers' rows
    of one batched graph each take their gradients (:meth:`gradients`) and one :meth:`step` combines them."""

    def __init__(self, model: PeftModel, plan: SplitPlan, learning_rate: float):
        self.model, self.plan = model, plan
        self.optimizer = new_optimizer(model, learning_rate)
        self.version = 0  # optimizer steps taken: a graph made at another version is stale

    def forward(self, hidden_a: torch.Tensor, mask: MaskInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 2: (the leaf h_A requiring grad, h_B with its graph)."""
        self.model.train()
        leaf = hidden_a.detach().to(next(iter(trainable(self.model))).dtype).requires_grad_(True)
        return leaf, middle_forward(self.model, self.plan, leaf, mask)

    def gradients(self, leaf: torch.Tensor, output: torch.Tensor,
                  grad_b: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """(g_A, the LoRA gradients) of the vector-Jacobian product <h_B, g_B>; the graph is kept for other rows."""
        params = trainable(self.model)
        grads = torch.autograd.grad(output, [leaf, *params], grad_outputs=grad_b.to(output.dtype), retain_graph=True,
                                    allow_unused=True)
        return grads[0], list(grads[1:])

    def step(self, gradient_sum: list[torch.Tensor | None], count: int) -> None:
        """One AdamW step on θ_M with the mean of ``count`` callers' summed gradients: ∇θ (1/m) Σ_i L_i."""
        for param, grad in zip(trainable(self.model), gradient_sum, strict=True):
            param.grad = None if grad is None else grad / count
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1

    def backward(self, leaf: torch.Tensor, output: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
        """Step 4 for one caller: g_A, after one AdamW step on the middle's LoRA."""
        grad_a, grads = self.gradients(leaf, output, grad_b)
        self.step(grads, 1)
        return grad_a

    def adapter(self) -> dict[str, torch.Tensor]:
        return part_adapter_tensors(self.model, self.plan, SERVER_PARTS)


def add_gradients(total: list[torch.Tensor | None] | None,
                  grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The running sum of several callers' :meth:`SplitMiddle.gradients` (one adapter's worth of memory)."""
    if total is None:
        return list(grads)
    return [a if b is None else b if a is None else a + b for a, b in zip(total, grads, strict=True)]


def concat_rows(requests: Sequence[tuple[torch.Tensor, MaskInfo]]) -> tuple[torch.Tensor, MaskInfo]:
    """Several callers' h_A [b_i, T_i, H] and mask info as one batch [Σ b_i, max T_i, H].

    Each request's columns are padded on the right: zero hidden states outside every row's span (so masked as
    keys, and later than every real query), positions repeating the row's last; a row's real outputs are then
    those of its own request, and its padded columns' outputs are discarded.
    """
    width = max(hidden.shape[1] for hidden, _ in requests)
    hiddens, positions = [], []
    for hidden, mask in requests:
        pad = width - hidden.shape[1]
        hiddens.append(torch.nn.functional.pad(hidden.float(), (0, 0, 0, pad)))
        positions.append(torch.cat([mask.position_ids, mask.position_ids[:, -1:].expand(-1, pad)], dim=1))
    return torch.cat(hiddens), MaskInfo(torch.cat([mask.starts for _, mask in requests]),
                                        torch.cat([mask.lengths for _, mask in requests]), torch.cat(positions))


def split_step(ends: SplitEnds, middle: SplitMiddle, batch: Batch) -> float:
    """One training step of the three parts in one process (tests, the simulation): the step's loss."""
    hidden_a, mask = ends.head(batch)
    leaf, hidden_b = middle.forward(hidden_a, mask)
    loss, grad_b = ends.tail(hidden_b, batch.labels)
    grad_a = middle.backward(leaf, hidden_b, grad_b)
    ends.head_backward(grad_a)
    return loss
