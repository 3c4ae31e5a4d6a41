"""FedKSeed (Qin et al., ICML 2024, arXiv 2312.06353): federated full-parameter tuning that moves K scalars a round.

The server draws K seeds ``σ_1..σ_K`` once, from one pool seed it serves (``kseed.pool``; every machine
draws the same K from it, :func:`draw_seeds`). Each seed names a direction ``z(σ) ~ N(0, I)`` over the tuned
parameters, generated the same way on every machine (:func:`direction`). The global model is never sent: it is

    w = w₀ − Σ_s A[s] · z(σ_s),

with ``w₀`` the base model every client has and ``A ∈ R^K`` the accumulated scalars, the federation's served
"adapter" (``kseed.A``, 16 KiB at K = 4096; with FedKSeed-Pro also ``kseed.probs``, 16 KiB more). A client rebuilds ``w`` from ``w₀`` and ``A``, then takes τ
(``--max_steps``) zeroth-order steps, each on a seed ``s`` drawn from the pool (uniformly, or with
FedKSeed-Pro's probabilities ``kseed.probs``; each client and round its own draws, :func:`step_generator`):
two forward passes give ``g = (L(w + εz) − L(w − εz)) / 2ε``, no autograd, inference memory only; ``w ← w − η g z`` and ``c[s] += η g``. It uploads the pairs
``(s, c[s])`` of the seeds it used (:data:`INDEX`, :data:`VALUE`): 8 bytes a step. The server adds them
with the federation's weights, FedAvg on ``A``: ``A ← A + Σ_i (n_i / n_S) c_i``.

FedKSeed-Pro (``--kseed_pro``): the server keeps each seed's mean amplitude ``ā_s`` of its aggregated
scalars; clients draw seed s with probability ∝ exp((ā_s − min ā)/(max ā − min ā)) (seeds never used count
at the mean), so the ratio of the likeliest to the least likely seed is at most e.

Determinism across machines: ``z(σ)`` is drawn by ``torch.Generator('cpu')`` seeded with σ, in float32, one
parameter tensor after another in sorted name order, and only then moved to the parameter's device: a CUDA
generator (Philox) would give other numbers. The served ``kseed.probe`` holds the first values of
``z(σ_1)``; a client whose torch draws other seeds or numbers (another torch version's sampler) refuses to train.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..wire import TensorFile, WireError, parse_header
from .base import MeanDeltaAlgorithm, Tensors
from .fedkseed_config import FedKSeedConfig

SCALARS = "kseed.A"  # the accumulated scalars A (what is aggregated)
POOL = "kseed.pool"  # the pool seed σ_1..σ_K are drawn from: one integer below 2^24 (exact in float32)
PROBS = "kseed.probs"  # FedKSeed-Pro: the seed probabilities clients draw with (uniform without it)
PROBE = "kseed.probe"  # the first PROBE_SIZE values of z(σ_1), for the clients' determinism check
INDEX = "kseed.index"  # an upload: the seed indices it used, int32, strictly increasing
VALUE = "kseed.value"  # an upload: their accumulated scalars c[s], float32
PROBE_SIZE = 64
SEED_RANGE = 1 << 24
STATE_AMPLITUDE = "amplitude"  # FedKSeed-Pro: Σ |ΔA[s]| over the rounds seed s moved
STATE_COUNT = "count"  # ... and how many rounds that was


def direction_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def probe(seed: int) -> torch.Tensor:
    """The first values of z(σ) as every machine must draw them."""
    return torch.randn(PROBE_SIZE, generator=direction_generator(seed), dtype=torch.float32)


def perturb(params: Sequence[tuple[str, torch.Tensor]], seed: int, scale: float) -> None:
    """``p ← p + scale · z(σ)`` for the tuned parameters ``params`` (in sorted name order), in place, no autograd."""
    generator = direction_generator(seed)
    with torch.no_grad():
        for _name, p in params:
            z = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            p.add_(z.to(p.device, p.dtype), alpha=scale)


def rebuild(params: Sequence[tuple[str, torch.Tensor]], w0: Mapping[str, torch.Tensor], scalars: torch.Tensor,
            seeds: Sequence[int]) -> None:
    """``w = w₀ − Σ_s A[s] z(σ_s)``, in place; only the seeds with A[s] ≠ 0 cost anything."""
    with torch.no_grad():
        for name, p in params:
            p.copy_(w0[name])
        for s in torch.nonzero(scalars).flatten().tolist():
            perturb(params, int(seeds[s]), -float(scalars[s]))


def zeroth_order_step(params: Sequence[tuple[str, torch.Tensor]], seed: int, epsilon: float, learning_rate: float,
                      loss: Any) -> float:
    """One FedKSeed step on direction z(σ): returns ``η g`` with ``g = (L(w + εz) − L(w − εz)) / 2ε``, and leaves
    ``w − η g z``. ``loss()`` is the mini-batch loss at the current parameters (the same batch both times)."""
    perturb(params, seed, epsilon)
    plus = float(loss())
    perturb(params, seed, -2 * epsilon)
    minus = float(loss())
    gradient = (plus - minus) / (2 * epsilon)
    perturb(params, seed, epsilon - learning_rate * gradient)  # back to w, then the step, in one pass
    return learning_rate * gradient


def step_generator(client_id: str, round_number: int, local_seed: int) -> torch.Generator:
    """The generator a client draws its round's seed indices s with: seeded by SHA-256 of (client id, round, its
    ``--seed``), so the clients of one round take independent steps (one shared seed would make every client of
    the round walk the same directions), and a client that trains a round again draws the same."""
    digest = hashlib.sha256(f"{client_id}\0{round_number}\0{local_seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def draw_pool_seed(seed: int) -> int:
    """The pool seed, drawn from the federation's seed (which clients are not shown)."""
    return int(torch.randint(0, SEED_RANGE, (1,), generator=torch.Generator().manual_seed(seed)))


def draw_seeds(k: int, pool_seed: int) -> list[int]:
    """σ_1..σ_K from the pool seed (two equal seeds, chance K²/2^32, only give two indices one direction)."""
    generator = torch.Generator().manual_seed(pool_seed)
    return torch.randint(0, 2**31 - 1, (k,), generator=generator, dtype=torch.int64).tolist()


def pool_of(scalars: Mapping[int, float]) -> Tensors:
    """An upload's tensors: the used seed indices (increasing) and their scalars."""
    indices = sorted(scalars)
    return {INDEX: torch.tensor(indices, dtype=torch.int32), VALUE: torch.tensor([scalars[s] for s in indices],
                                                                                 dtype=torch.float32)}


class FedKSeed(MeanDeltaAlgorithm):
    """FedAvg on the K accumulated scalars; the clients' zeroth-order steps live in fedllm.client.kseed."""

    name = "fedkseed"
    config_class = FedKSeedConfig
    exports_peft_adapter = False

    def initial_global(self, adapter: Mapping[str, torch.Tensor]) -> Tensors:
        k = self.hparams.kseed_k
        pool = draw_pool_seed(self.config.seed)
        served = {SCALARS: torch.zeros(k), POOL: torch.tensor([float(pool)]), PROBE: probe(draw_seeds(k, pool)[0])}
        if self.hparams.kseed_pro:
            served[PROBS] = torch.full((k,), 1.0 / k)
        return served

    def init_state(self, global_params):
        k = self.hparams.kseed_k
        return {STATE_AMPLITUDE: torch.zeros(k), STATE_COUNT: torch.zeros(k)} if self.hparams.kseed_pro else {}

    def aggregate(self, global_params, updates, state):
        mean = _weighted_scalars(updates, global_params[SCALARS].numel())
        return self.server_step(global_params, {SCALARS: mean}, state)

    def server_step(self, global_params, mean_delta, state):
        delta = mean_delta[SCALARS]
        new_global = {k: v.clone() for k, v in global_params.items()}
        new_global[SCALARS] = global_params[SCALARS].to(torch.float32) + delta
        if not self.hparams.kseed_pro:
            return new_global, dict(state)
        moved = delta != 0
        amplitude = state[STATE_AMPLITUDE] + delta.abs()
        count = state[STATE_COUNT] + moved.to(torch.float32)
        new_global[PROBS] = pro_probabilities(amplitude, count)
        return new_global, {STATE_AMPLITUDE: amplitude, STATE_COUNT: count}

    def upload_format(self, spec: Mapping[str, tuple[int, ...]], wire_dtype: str, max_steps: int):
        """How the server checks and reads an upload: seed pairs, not the spec's tensors."""
        k = int(math.prod(spec[SCALARS]))
        return (lambda path: validate_pool_file(path, k, max_steps),
                lambda row, path: PoolUpdate(row.client_id, row.num_samples, row.metrics, path, k))


def pro_probabilities(amplitude: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """FedKSeed-Pro's seed probabilities ∝ exp(normalised mean amplitude); unused seeds at the mean."""
    seen = count > 0
    if not bool(seen.any()):
        return torch.full_like(amplitude, 1.0 / amplitude.numel())
    mean = torch.where(seen, amplitude / count.clamp(min=1), torch.zeros_like(amplitude))
    mean = torch.where(seen, mean, mean[seen].mean())
    low, high = float(mean.min()), float(mean.max())
    normalised = (mean - low) / (high - low) if high > low else torch.zeros_like(mean)
    weights = torch.exp(normalised)
    return weights / weights.sum()


def _weighted_scalars(updates: Sequence[Any], k: int) -> torch.Tensor:
    """Σ_i (n_i / n_S) c_i, one update's K-vector at a time."""
    total = sum(u.num_samples for u in updates)
    if not updates or total <= 0:
        raise ValueError("aggregation needs at least one update with num_samples > 0")
    acc = torch.zeros(k)
    for update in updates:
        acc.add_(update.get(SCALARS), alpha=update.num_samples / total)
    return acc


def validate_pool_file(path: str | Path, k: int, max_steps: int) -> dict[str, str]:
    """An upload of seed pairs: exactly ``kseed.index`` (I32) and ``kseed.value`` (F32) of one length m in
    [1, min(K, --max_steps)], indices in [0, K) strictly increasing, values finite. 400 malformed; 422 otherwise."""
    header, metadata = parse_header(path)
    if set(header) != {INDEX, VALUE}:
        raise WireError(422, f"a FedKSeed upload holds exactly {INDEX} and {VALUE}, got {sorted(header)[:5]}")
    index, value = header[INDEX], header[VALUE]
    if index["dtype"] != "I32" or value["dtype"] != "F32":
        raise WireError(422, f"{INDEX} must be I32 and {VALUE} F32, got {index['dtype']} and {value['dtype']}")
    if len(index["shape"]) != 1 or index["shape"] != value["shape"]:
        raise WireError(422, f"{INDEX} and {VALUE} must be vectors of one length, got {index['shape']} and "
                             f"{value['shape']}")
    count = index["shape"][0]
    if not 1 <= count <= min(k, max_steps):
        raise WireError(422, f"a FedKSeed upload has 1 to min(K = {k}, --max_steps = {max_steps}) seeds, got {count}")
    with TensorFile(path) as f:
        indices = f.get(INDEX).long()
        values = f.get(VALUE)
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= k:
        raise WireError(422, f"seed index {low if low < 0 else high} is not in the pool [0, {k})")
    steps = indices[1:] - indices[:-1]
    if bool((steps == 0).any()):
        raise WireError(422, "seed indices repeat")
    if bool((steps < 0).any()):
        raise WireError(422, "seed indices must be strictly increasing")
    if not bool(torch.isfinite(values).all()):
        raise WireError(422, "seed scalars are NaN or infinite")
    return metadata


class PoolUpdate:
    """An accepted FedKSeed upload as an :class:`~.base.Update`: its scalars scattered into a K-vector."""

    def __init__(self, client_id: str, num_samples: int, metrics: Mapping[str, float], path: str | Path, k: int):
        self.client_id = client_id
        self.num_samples = num_samples
        self.metrics = metrics
        self.path = path
        self.k = k

    def get(self, name: str) -> torch.Tensor:
        dense = torch.zeros(self.k)
        if name == SCALARS:
            with TensorFile(self.path) as f:
                dense[f.get(INDEX).long()] = f.get(VALUE)
        return dense

    def names(self) -> Iterable[str]:
        return [SCALARS]
