"""Local training of one client: the base model loaded once, one TRL run per round.

The same class serves the HTTP client and the simulation, so both train identically. Each
round: load the global adapter, evaluate it on the held-out local data (``--local_eval_fraction``),
let the algorithm's :class:`~fedllm.algorithms.ClientHook` see it, train ``max_steps`` with TRL at
the round's learning rate, and return the delta (local − global) plus any extra tensors the
algorithm uploads, and the hook state the round leaves (pending until the server accepts the
upload, :mod:`fedllm.client.state`). SFT and DPO share the whole round; they differ only in the TRL
trainer and config (:meth:`LocalTrainer._new_trainer`) and in which logged values become metrics
(``_LOGGED``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainerCallback

from ..adapter import (
    get_adapter_tensors,
    load_causal_lm,
    load_model_config,
    model_fingerprint,
    set_adapter_tensors,
    trainable_parameters,
)
from ..algorithms import ClientHook, get_algorithm
from ..algorithms.base import Tensors
from ..compression.codecs import Codec, get_codec
from ..compression.updates import compress_with_feedback, encode_body, residual_state, split_residual
from ..config import ClientArguments, FederationArguments
from ..privacy.dp_fedavg import UNCLIPPED_METRIC, clip_delta
from ..privacy.dp_sgd import DPSGDLedger, default_delta, dp_sgd_trainer
from ..wire import encode, metrics_metadata
from .state import ClientState, FederationBinding

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger("fedllm.client")

LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type")

# TRL's DPOTrainer takes the reference policy from the adapter of this name when the model has one,
# and from the base model (all adapters disabled) otherwise.
REFERENCE_ADAPTER = "ref"

# Values TRL logs at every training step, per task: metric name -> TRL's key. A round reports each one's
# mean over the round (``train_loss`` for the loss) and its last step's (``final_<name>``); the held-out
# evaluation reports ``eval_<name>``.
_LOGGED: dict[str, dict[str, str]] = {
    "sft": {"loss": "loss"},
    "dpo": {"loss": "loss", "reward_accuracy": "rewards/accuracies", "reward_margin": "rewards/margins"},
}


class ModelMismatchError(RuntimeError):
    """The client's base model is not the federation's."""


@dataclass
class RoundResult:
    tensors: Tensors  # delta (local − global) and the algorithm's extra upload tensors
    metrics: dict[str, float] = field(default_factory=dict)
    state: Tensors = field(default_factory=dict)  # the hook state the round leaves once its upload is accepted
    codec: Codec | None = None  # --update_compression: the upload is ``parts``, the codec's encoding of ``tensors``
    parts: Tensors = field(default_factory=dict)

    def encode(self, wire_dtype: str) -> bytes:
        """The upload body: the tensors in ``wire_dtype`` (or the codec's parts), the metrics as safetensors metadata."""
        if self.codec is not None:
            return encode_body(self.codec, self.parts, metrics_metadata(self.metrics))
        return encode(self.tensors, wire_dtype, metadata=metrics_metadata(self.metrics))


class _HookCallback(TrainerCallback):
    """Calls the algorithm hook after every optimizer step."""

    def __init__(self, hook: ClientHook, params: Mapping[str, torch.nn.Parameter]):
        self.hook = hook
        self.params = params

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else args.learning_rate
        self.hook.after_optimizer_step(self.params, lr)


def _trainer_with_hook(base_cls: type, hook: ClientHook, params: Mapping[str, torch.nn.Parameter]) -> type:
    """A subclass of a TRL trainer that adds the hook's extra loss (e.g. FedProx's proximal term) in training.

    The term R(w) counts once per optimizer step, whatever the gradient accumulation: with G micro-batches
    (``current_gradient_accumulation_steps``) the step's gradient gets exactly ∇R(w) (FedProx: μ(w − w_g)).
    ``Trainer.training_step`` divides each micro-batch's loss by G unless the loss is already normalised
    over the whole accumulated batch (``num_items_in_batch``); then R(w)/G is added here instead.
    """

    class HookedTrainer(base_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            # The term belongs to the local objective, not to the evaluation of the global adapter.
            extra = hook.extra_loss(params) if model.training else None
            if extra is None:
                return result
            if self._loss_is_scaled_for_accumulation(num_items_in_batch):
                extra = extra / self.current_gradient_accumulation_steps
            if return_outputs:
                loss, outputs = result
                return loss + extra, outputs
            return result + extra

        def _loss_is_scaled_for_accumulation(self, num_items_in_batch) -> bool:
            """Whether ``training_step`` leaves the loss undivided by G (transformers' rule, ``loss_is_scaled_for_ga``)."""
            if self.loss_is_scaled_for_ga is not None:  # TRL's trainers say so (DPOTrainer: False)
                return self.loss_is_scaled_for_ga
            return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None)

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
        _check_dp_sgd(args, self.federation)
        # Refuses another federation's state before anything is loaded.
        self.client_state = ClientState(state_dir or Path(args.output_dir), FederationBinding.of(server_config))
        self.client_id = args.client_id or ""  # --client_id over HTTP; the simulation sets it (use_client)
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

        self.train_dataset, self.eval_dataset = self.load_datasets()
        self.num_samples = len(self.train_dataset)
        self.hook = get_algorithm(self.federation.fed_alg, self.federation).client_hook()
        self.codec = get_codec(self.federation)  # chosen by the server (/v1/config), never by a client flag

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
        model = load_causal_lm(model_path, **kwargs)
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

    def load_datasets(self, source: str | None = None) -> tuple[Dataset, Dataset | None]:
        """(train, held-out or None) from ``source`` (default ``--dataset_name``), as this client trains on them.

        The held-out part is ``--local_eval_fraction`` of the examples, seeded by ``--seed``.
        """
        return _hold_out(self._load_data(source), self.args.local_eval_fraction, self.args.seed)

    def use_client(self, client_id: str, train_dataset: Dataset, eval_dataset: Dataset | None,
                   client_state: ClientState) -> None:
        """Train as another data owner from now on (the simulation shares one base model across clients)."""
        self.client_id = client_id
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.num_samples = len(train_dataset)
        self.client_state = client_state

    def _load_data(self, source: str | None = None) -> Dataset:
        from ..data import load_dpo_dataset, load_sft_dataset

        source = source or self.args.dataset_name
        if not source:
            raise ValueError("--dataset_name is required: a local data file, folder or dataset name")
        loader = load_dpo_dataset if self.federation.task == "dpo" else load_sft_dataset
        return loader(
            source,
            tokenizer=self.tokenizer,
            template=self.federation.template,
            dataset_format=self.args.dataset_format,
            field_map=self.args.field_map,
            dataset_sample=self.args.dataset_sample,
            seed=self.args.seed,
        )

    # --- one round ---
    def _new_trainer(self, round_number: int, learning_rate: float, max_steps: int) -> Trainer:
        """This round's TRL trainer (SFTTrainer or DPOTrainer, with the hook), and no DPO reference adapter."""
        from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

        settings: dict[str, Any] = dict(
            output_dir=str(Path(self.args.output_dir) / "trainer"),
            max_steps=max_steps,
            per_device_train_batch_size=self.args.batch_size,
            per_device_eval_batch_size=self.args.batch_size,
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
        if self.args.dp_sgd:
            settings["max_grad_norm"] = 0.0  # DP-SGD clips per example; no clipping of the noised batch gradient
        if self.federation.task == "dpo":
            trainer_cls, config = DPOTrainer, DPOConfig(**settings, beta=self.federation.dpo_beta)
        else:
            trainer_cls, config = SFTTrainer, SFTConfig(**settings)
        # Given a PeftModel, DPOTrainer's constructor adds a 'ref' copy of the adapter (and refuses to if
        # one exists); the reference is set per round by train_round instead, so drop it on both sides.
        self._set_reference(None)
        if self.args.dp_sgd:
            trainer_cls = dp_sgd_trainer(trainer_cls, self.hook, self.params, self.args.dp_sgd_clip_norm,
                                         self.args.dp_sgd_noise_multiplier)
        else:
            trainer_cls = _trainer_with_hook(trainer_cls, self.hook, self.params)
        trainer = trainer_cls(
            model=self.model,
            args=config,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            processing_class=self.tokenizer,
            callbacks=[_HookCallback(self.hook, self.params)],
        )
        self._set_reference(None)
        if self.args.quiet:  # without progress bars transformers prints every log dict; the client logs its own line
            trainer.remove_callback(PrinterCallback)
        kept, given = len(trainer.train_dataset), len(self.train_dataset)
        if kept < given:  # TRL drops examples whose prompt alone fills max_length: nothing left to learn
            message = (f"{given - kept} of {given} examples dropped: their prompt alone fills "
                       f"--seq_length {self.federation.seq_length}")
            if kept == 0:
                raise ValueError(message + "; raise the federation's --seq_length")
            log.warning(message)
        # Kept tokenised: SFTTrainer then skips tokenising in later rounds (DPOTrainer redoes it, same result).
        self.train_dataset, self.eval_dataset = trainer.train_dataset, trainer.eval_dataset
        self.num_samples = len(self.train_dataset)  # FedAvg weighs what is trained on, not what was dropped
        return trainer

    def _set_reference(self, adapter: Mapping[str, torch.Tensor] | None) -> None:
        """DPO's reference policy: a frozen adapter holding ``adapter``, or with None the base model."""
        if REFERENCE_ADAPTER in self.model.peft_config:
            self.model.delete_adapter(REFERENCE_ADAPTER)
        if adapter is not None:
            # PEFT adds it inactive and not trainable; only the 'default' adapter is trained and uploaded.
            self.model.add_adapter(REFERENCE_ADAPTER, self.model.peft_config["default"])
            set_adapter_tensors(self.model, adapter, adapter_name=REFERENCE_ADAPTER)

    def train_round(self, global_tensors: Mapping[str, torch.Tensor], round_number: int, learning_rate: float,
                    max_steps: int, clip_norm: float | None = None, *, hook_state: Tensors | None = None
                    ) -> RoundResult:
        """One round from ``global_tensors``; with ``clip_norm`` (``--dp client``) the delta is clipped to that
        L2 norm before it leaves, and ``dp_unclipped`` reports whether it was within it (for adaptive clipping).

        The algorithm hook starts from ``hook_state``, by default this client's committed state; a replica of a
        multi-process client (:mod:`fedllm.client.distributed`) is handed rank 0's."""
        started = time.time()
        set_adapter_tensors(self.model, global_tensors)
        trainer = self._new_trainer(round_number, learning_rate, max_steps)
        metrics = self._evaluate(trainer) if self.eval_dataset is not None else {}
        if self.federation.task == "dpo" and self.federation.dpo_reference == "global":
            self._set_reference(global_tensors)
        before = get_adapter_tensors(self.model)  # after the trainer is built: QLoRA casts the adapter to bf16
        # Every round starts from the committed state, never from a round whose upload was not accepted.
        hook_committed, residual = split_residual(self.client_state.committed() if hook_state is None else hook_state)
        self.hook.load_state_dict(hook_committed)
        self.hook.begin_round(self.params, global_tensors)
        trainer.train()
        after = get_adapter_tensors(self.model)
        tensors = {k: after[k] - before[k] for k in after}
        if self.args.dp_sgd:
            metrics.update(self._account_dp_sgd(trainer.state.global_step))
        if clip_norm is not None:
            tensors, within = clip_delta(tensors, list(after), clip_norm)
            metrics[UNCLIPPED_METRIC] = float(within)
        tensors.update(self.hook.end_round(self.params, trainer.state.global_step, learning_rate))
        metrics.update(self._train_metrics(trainer.state.log_history, trainer.state.global_step, started))
        if self.codec is None:
            return RoundResult(tensors, metrics, self.hook.state_dict())
        # Error feedback: what the codec drops now joins the next round's delta (pending like the hook state).
        parts, residual = compress_with_feedback(self.codec, tensors, residual, self.federation.wire_dtype)
        return RoundResult(tensors, metrics, {**self.hook.state_dict(), **residual_state(residual)}, self.codec, parts)

    def _account_dp_sgd(self, steps: int) -> dict[str, float]:
        """Add this round's DP-SGD steps to the client's ledger; the (ε, δ) spent so far, as metrics."""
        delta = self.args.dp_sgd_delta or default_delta(self.num_samples)
        ledger = DPSGDLedger.open(self.client_state.folder, self.num_samples, self.args.batch_size,
                                  self.args.dp_sgd_noise_multiplier, delta)
        ledger.add(self.client_state.folder, steps)
        epsilon = ledger.epsilon()
        log.info("DP-SGD: %d steps so far, (ε, δ) = (%s, %.3g)", ledger.steps,
                 "n/a (σ = 0)" if epsilon is None else f"{epsilon:.3f}", delta)
        return {"dp_sgd_delta": delta, **({"dp_sgd_epsilon": epsilon} if epsilon is not None else {})}

    def _evaluate(self, trainer: Trainer) -> dict[str, float]:
        """The global adapter's loss on the held-out data, before training; for DPO against the base model.

        Against the round's reference (the global adapter itself) the DPO loss would always be log 2.
        """
        results = trainer.evaluate()
        metrics = {"eval_samples": float(len(self.eval_dataset))}
        for name, key in _LOGGED[self.federation.task].items():
            if f"eval_{key}" in results:
                metrics[f"eval_{name}"] = float(results[f"eval_{key}"])
        return metrics

    def _train_metrics(self, log_history: list[dict[str, Any]], steps: int, started: float) -> dict[str, float]:
        metrics = {"steps": float(steps), "seconds": time.time() - started}
        for name, key in _LOGGED[self.federation.task].items():
            values = [float(h[key]) for h in log_history if key in h]
            if values:
                metrics["train_loss" if name == "loss" else name] = sum(values) / len(values)
                metrics[f"final_{name}"] = values[-1]
        return metrics


def _check_dp_sgd(args: ClientArguments, federation: FederationArguments) -> None:
    if not args.dp_sgd:
        return
    problems = []
    if federation.task != "sft":
        problems.append("--dp_sgd trains SFT only (its per-example gradients are taken over SFT examples)")
    if args.gradient_accumulation_steps != 1:
        problems.append("--dp_sgd needs --gradient_accumulation_steps 1 (the noise is added once per step)")
    if not args.dp_sgd_clip_norm > 0 or not math.isfinite(args.dp_sgd_clip_norm):
        problems.append(f"--dp_sgd_clip_norm must be a finite number > 0, got {args.dp_sgd_clip_norm}")
    if not args.dp_sgd_noise_multiplier >= 0 or not math.isfinite(args.dp_sgd_noise_multiplier):
        problems.append(f"--dp_sgd_noise_multiplier must be >= 0, got {args.dp_sgd_noise_multiplier}")
    if args.dp_sgd_delta is not None and not 0 < args.dp_sgd_delta < 1:
        problems.append(f"--dp_sgd_delta must be in (0, 1), got {args.dp_sgd_delta}")
    if problems:
        raise ValueError("; ".join(problems))


def _hold_out(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Split ``fraction`` of the examples off (seeded) for the per-round evaluation; (train, eval or None)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--local_eval_fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return dataset, None
    split = dataset.train_test_split(test_size=fraction, seed=seed)
    return split["train"], split["test"]
