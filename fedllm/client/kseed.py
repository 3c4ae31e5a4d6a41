"""FedKSeed's client (fedllm.algorithms.fedkseed): the model rebuilt from w₀ and K scalars, zeroth-order steps.

:class:`ZerothOrderTrainer` is a :class:`~fedllm.client.trainer.LocalTrainer` whose round takes no gradient: it
loads the same model, data and TRL batches (the SFT trainer's own data loader and loss, so templates, masks and
``--seq_length`` are the federation's), rebuilds ``w = w₀ − Σ_s A[s] z(σ_s)`` from the served scalars, takes
``--max_steps`` two-point steps under ``torch.no_grad`` in eval mode (no dropout: both forward passes see one
function), and uploads the (seed index, scalar) pairs it moved. Memory: the model, one float32 copy of the
tuned parameters' w₀, one direction tensor at a time; no activations kept, no optimizer state.

Tuned parameters: every parameter of the base model (full-parameter FedKSeed; the LoRA layers PEFT adds
stay at B = 0, so they change nothing), or with ``--kseed_lora`` the LoRA adapter only, initialised
(w₀) by :func:`fedllm.adapter.initial_adapter` from the pool's first seed so every client starts alike.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from ..adapter import get_adapter_tensors, initial_adapter, save_peft_adapter, set_adapter_tensors
from ..algorithms.fedkseed import (
    POOL,
    PROBE,
    PROBS,
    SCALARS,
    SEED_RANGE,
    draw_seeds,
    pool_of,
    probe,
    rebuild,
    step_generator,
    zeroth_order_step,
)
from ..algorithms.fedkseed_config import FedKSeedConfig
from ..wire import metrics_metadata
from .trainer import LORA_KEYS, LocalTrainer, ModelMismatchError, RoundResult

log = logging.getLogger("fedllm.client")

GLOBAL_TENSORS = frozenset({SCALARS, POOL, PROBE})  # and PROBS with --kseed_pro


class DirectionMismatchError(ModelMismatchError):
    """This machine's torch draws other random directions than the federation's: its steps would be noise."""


class PoolResult(RoundResult):
    """A FedKSeed round's result: the upload is the seed pairs as they are (int32 indices, float32 scalars)."""

    def encode(self, wire_dtype: str) -> bytes:
        return save(self.tensors, metadata=metrics_metadata(self.metrics))


def trainer_class(server_config: Mapping[str, Any]) -> type[LocalTrainer]:
    """The trainer the federation's algorithm needs."""
    return ZerothOrderTrainer if server_config["federation"]["fed_alg"] == "fedkseed" else LocalTrainer


def seed_pool(tensors: Mapping[str, torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    """(σ_1..σ_K, the seed probabilities) of a served FedKSeed global, once checked: a pool seed that is an
    integer in range, probabilities that are a distribution over K, a probe this machine draws bit for bit."""
    k = tensors[SCALARS].numel()
    pool = float(tensors[POOL][0])
    if not (0 <= pool < SEED_RANGE and pool == int(pool)):
        raise ModelMismatchError(f"the served FedKSeed pool seed {pool!r} is not an integer in [0, {SEED_RANGE})")
    probs = tensors.get(PROBS, torch.full((k,), 1.0 / k))
    if probs.shape != (k,) or not bool((probs >= 0).all()) or abs(float(probs.sum()) - 1) > 1e-3:
        raise ModelMismatchError("the served FedKSeed seed probabilities are not a distribution over the K seeds")
    seeds = draw_seeds(k, int(pool))
    if not torch.equal(probe(seeds[0]), tensors[PROBE]):
        raise DirectionMismatchError(
            f"this machine's torch {torch.__version__} draws other directions z(σ) than the federation's "
            "(torch.Generator('cpu'), float32): its zeroth-order steps would not be the ones the server adds up; "
            "refusing to train (install the torch version the other clients run)")
    return seeds, probs


class ZerothOrderTrainer(LocalTrainer):
    """FedKSeed's local round (see the module docstring)."""

    def __init__(self, server_config: Mapping[str, Any], args: Any, *, state_dir: Path | None = None):
        super().__init__(server_config, args, state_dir=state_dir)
        self.kseed = FedKSeedConfig.from_federation(self.federation)
        self.model.eval()  # no dropout: L(w + εz) and L(w − εz) must be one function
        for p in self.model.parameters():
            p.requires_grad_(False)
        if self.kseed.kseed_lora:
            self.tuned = sorted(self.params.items())
        else:
            self.tuned = sorted((n, p) for n, p in self.model.get_base_model().named_parameters() if "lora_" not in n)
        self.w0: dict[str, torch.Tensor] | None = None  # set at the first round (LoRA: from the pool's seeds)

    def _check_adapter(self, served: Mapping[str, list[int]]) -> None:
        if not GLOBAL_TENSORS <= set(served) <= GLOBAL_TENSORS | {PROBS}:
            raise ModelMismatchError(f"the served global is not a FedKSeed pool: {sorted(served)[:4]}")

    def _start(self, seeds: list[int]) -> None:
        if self.kseed.kseed_lora:
            local = {name: tuple(t.shape) for name, t in get_adapter_tensors(self.model).items()}
            set_adapter_tensors(self.model, initial_adapter(local, seeds[0]))
        self.w0 = {name: p.detach().to(torch.float32, copy=True) for name, p in self.tuned}

    def train_round(self, global_tensors: Mapping[str, torch.Tensor], round_number: int, learning_rate: float,
                    max_steps: int, clip_norm: float | None = None, *, hook_state: Any = None) -> RoundResult:
        started = time.time()
        seeds, probs = seed_pool(global_tensors)
        if self.w0 is None:
            self._start(seeds)
        rebuild(self.tuned, self.w0, global_tensors[SCALARS], seeds)
        trainer = self._new_trainer(round_number, learning_rate, max_steps)
        metrics = self._evaluate(trainer) if self.eval_dataset is not None else {}
        self.model.eval()
        batches = itertools.cycle(trainer.get_train_dataloader())
        draw = step_generator(self.client_id, round_number, self.args.seed)
        moved: dict[int, float] = {}
        losses = []
        with torch.no_grad():
            for _ in range(max_steps):
                batch = trainer._prepare_inputs(next(batches))
                index = int(torch.multinomial(probs, 1, generator=draw))
                step_losses: list[float] = []

                def loss(batch: Any = batch, step_losses: list[float] = step_losses) -> float:
                    value = float(trainer.compute_loss(self.model, batch))
                    step_losses.append(value)
                    return value

                scalar = zeroth_order_step(self.tuned, seeds[index], self.kseed.kseed_epsilon, learning_rate, loss)
                moved[index] = moved.get(index, 0.0) + scalar
                losses.append(sum(step_losses) / 2)
        metrics.update({"steps": float(max_steps), "seconds": time.time() - started,
                        "train_loss": sum(losses) / len(losses), "final_loss": losses[-1]})
        return PoolResult(pool_of(moved), metrics)

    def save_final(self, global_tensors: Mapping[str, torch.Tensor], target: Path) -> Path:
        """The federation's final model: a directory ``from_pretrained`` loads (with --kseed_lora, a PEFT adapter
        directory ``PeftModel.from_pretrained`` loads on the base model)."""
        seeds, _ = seed_pool(global_tensors)
        if self.w0 is None:
            self._start(seeds)
        rebuild(self.tuned, self.w0, global_tensors[SCALARS], seeds)
        if self.kseed.kseed_lora:
            from peft import LoraConfig

            settings = {k: v for k, v in self.model.peft_config["default"].to_dict().items() if k in LORA_KEYS}
            settings["base_model_name_or_path"] = self.federation.model_name_or_path
            return save_peft_adapter(target, get_adapter_tensors(self.model), LoraConfig(**settings))
        model = self.model.get_base_model()
        state = {name: p for name, p in model.state_dict().items() if "lora_" not in name}
        config = model.config
        fresh = type(model)(config)  # the base architecture without PEFT's layers, holding the tuned weights
        fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in state.items()}, strict=True)
        fresh.save_pretrained(target)
        self.tokenizer.save_pretrained(target)
        return target
