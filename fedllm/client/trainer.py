"""Local training of one client: the base model loaded once, one TRL run per round.

The same class serves the HTTP client and the simulation, so both train identically. Each
round: load the global adapter, let the algorithm's :class:`~fedllm.algorithms.ClientHook`
see it, train ``max_steps`` with TRL at the round's learning rate, and return the delta
(local − global) plus any extra tensors the algorithm uploads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from ..adapter import (
    get_adapter_tensors,
    load_model_config,
    model_fingerprint,
    set_adapter_tensors,
    trainable_parameters,
)
from ..algorithms import ClientHook, get_algorithm
from ..algorithms.base import Tensors
from ..config import ClientArguments, FederationArguments
from ..fsutil import atomic_write

log = logging.getLogger("fedllm.client")

LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type")


class ModelMismatchError(RuntimeError):
    """The client's base model is not the federation's."""


@dataclass
class RoundResult:
    tensors: Tensors  # delta (local − global) and the algorithm's extra upload tensors
    metrics: dict[str, float] = field(default_factory=dict)


class _HookCallback(TrainerCallback):
    """Calls the algorithm hook after every optimizer step."""

    def __init__(self, hook: ClientHook, params: Mapping[str, torch.nn.Parameter]):
        self.hook = hook
        self.params = params

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else args.learning_rate
        self.hook.after_optimizer_step(self.params, lr)


def _trainer_with_hook(base_cls: type, hook: ClientHook, params: Mapping[str, torch.nn.Parameter]) -> type:
    """A subclass of a TRL trainer that adds the hook's extra loss (e.g. FedProx's proximal term)."""

    class HookedTrainer(base_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            extra = hook.extra_loss(params)
            if extra is None:
                return result
            if return_outputs:
                loss, outputs = result
                return loss + extra, outputs
            return result + extra

    return HookedTrainer


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class LocalTrainer:
    """A data owner's model, data and algorithm hook, kept for the whole federation."""

    def __init__(self, server_config: Mapping[str, Any], args: ClientArguments, *, state_dir: Path | None = None):
        self.federation = FederationArguments(**server_config["federation"])
        self.args = args
        self.state_path = (state_dir or Path(args.output_dir)) / "client_state.safetensors"
        model_path = args.model_name_or_path or self.federation.model_name_or_path
        fingerprint = model_fingerprint(load_model_config(model_path))
        if fingerprint != server_config["model_fingerprint"]:
            raise ModelMismatchError(
                f"base model {model_path!r} does not match the federation's "
                f"{self.federation.model_name_or_path!r} (config fingerprint {fingerprint[:12]} != "
                f"{server_config['model_fingerprint'][:12]}); refusing to train"
            )
        self.device = resolve_device(args.device)
        on_gpu = self.device.startswith("cuda")
        self.bf16 = args.bf16 if args.bf16 is not None else (on_gpu and torch.cuda.is_bf16_supported())
        self.gradient_checkpointing = args.gradient_checkpointing if args.gradient_checkpointing is not None else on_gpu

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = self._load_model(model_path, on_gpu)
        lora_settings = {k: v for k, v in server_config["lora_config"].items() if k in LORA_KEYS}
        self.model = get_peft_model(self.model, LoraConfig(**lora_settings))
        self._check_adapter(server_config["adapter"])
        self.params = trainable_parameters(self.model)

        self.train_dataset = self._load_data()
        self.num_samples = len(self.train_dataset)
        self.hook = get_algorithm(self.federation.fed_alg, self.federation).client_hook()
        if self.state_path.exists():
            self.hook.load_state_dict(load_file(str(self.state_path)))

    def _load_model(self, model_path: str, on_gpu: bool):
        kwargs: dict[str, Any] = {}
        if self.args.load_in_8bit or self.args.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_8bit=self.args.load_in_8bit,
                load_in_4bit=self.args.load_in_4bit,
                bnb_4bit_compute_dtype=torch.bfloat16 if self.bf16 else torch.float32,
            )
            kwargs["device_map"] = {"": self.device}
        else:
            kwargs["dtype"] = torch.bfloat16 if self.bf16 else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
        if kwargs.get("quantization_config") is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.gradient_checkpointing)
        elif on_gpu:
            model = model.to(self.device)
        return model

    def _check_adapter(self, served: Mapping[str, list[int]]) -> None:
        local = {k: list(v.shape) for k, v in get_adapter_tensors(self.model).items()}
        if local != {k: list(v) for k, v in served.items()}:
            diff = sorted(set(local) ^ set(served))[:3] or [k for k in local if local[k] != served.get(k)][:3]
            raise ModelMismatchError(f"this model's LoRA adapter differs from the federation's (e.g. {diff})")

    def _load_data(self):
        from ..data import load_dpo_dataset, load_sft_dataset

        if not self.args.dataset_name:
            raise ValueError("--dataset_name is required: a local data file, folder or dataset name")
        loader = load_dpo_dataset if self.federation.task == "dpo" else load_sft_dataset
        return loader(
            self.args.dataset_name,
            tokenizer=self.tokenizer,
            template=self.federation.template,
            dataset_format=self.args.dataset_format,
            field_map=self.args.field_map,
            dataset_sample=self.args.dataset_sample,
            seed=self.args.seed,
        )

    # --- one round ---
    def _training_args(self, round_number: int, learning_rate: float, max_steps: int, output_dir: Path):
        from trl import SFTConfig

        return SFTConfig(
            output_dir=str(output_dir),
            max_steps=max_steps,
            per_device_train_batch_size=self.args.batch_size,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",  # the schedule across rounds is the server's
            warmup_steps=0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            bf16=self.bf16,
            fp16=False,
            gradient_checkpointing=self.gradient_checkpointing,
            use_cpu=self.device == "cpu",
            max_length=self.federation.seq_length,
            seed=self.args.seed * 100003 + round_number,  # a different data order every round
            disable_tqdm=self.args.quiet,
            dataloader_num_workers=0,
        )

    def train_round(self, global_tensors: Mapping[str, torch.Tensor], round_number: int, learning_rate: float,
                    max_steps: int) -> RoundResult:
        from trl import SFTTrainer

        started = time.time()
        adapter = {k: v for k, v in global_tensors.items() if k in self.params or ".lora_" in k}
        set_adapter_tensors(self.model, adapter)
        before = get_adapter_tensors(self.model)
        self.hook.begin_round(self.params, global_tensors)
        trainer_cls = _trainer_with_hook(SFTTrainer, self.hook, self.params)
        trainer = trainer_cls(
            model=self.model,
            args=self._training_args(round_number, learning_rate, max_steps, Path(self.args.output_dir) / "trainer"),
            train_dataset=self.train_dataset,
            processing_class=self.tokenizer,
            callbacks=[_HookCallback(self.hook, self.params)],
        )
        self.train_dataset = trainer.train_dataset  # tokenised once; later rounds reuse it
        trainer.train()
        after = get_adapter_tensors(self.model)
        tensors = {k: after[k] - before[k] for k in after}
        tensors.update(self.hook.end_round(self.params, trainer.state.global_step, learning_rate))
        self._save_hook_state()
        return RoundResult(tensors, self._metrics(trainer.state.log_history, trainer.state.global_step, started))

    def _save_hook_state(self) -> None:
        state = {k: v.contiguous() for k, v in self.hook.state_dict().items()}
        if state:
            atomic_write(self.state_path, lambda tmp: save_file(state, tmp))

    def _metrics(self, log_history: list[dict[str, Any]], steps: int, started: float) -> dict[str, float]:
        step_losses = [h["loss"] for h in log_history if "loss" in h]
        summary = next((h for h in reversed(log_history) if "train_loss" in h), {})
        metrics = {"steps": float(steps), "seconds": time.time() - started}
        if "train_loss" in summary:
            metrics["train_loss"] = float(summary["train_loss"])
        if step_losses:
            metrics["final_loss"] = float(step_losses[-1])
        return metrics
