"""The one seam for LoRA adapter weights: their names and shapes, getting, setting and saving.

Tensor names are PEFT's own (``get_peft_model_state_dict``: the adapter name removed), so a
global adapter file is directly an ``adapter_model.safetensors`` that
``PeftModel.from_pretrained`` loads. The server derives names and shapes from the model config
on the meta device and never loads base-model weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .algorithms.base import Tensors

# Sensible defaults per architecture (``config.model_type``); anything else falls back to PEFT's own mapping.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "chatglm": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
}

# Keys of a model config that do not change the architecture or weights layout.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "quantization_config",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "output_attentions",
    "output_hidden_states", "return_dict", "_commit_hash", "use_return_dict",
}

AdapterSpec = dict[str, tuple[int, ...]]


class ModelNotFoundError(ValueError):
    """``--model_name_or_path`` names no model this machine can read."""


# transformers' from_pretrained disables weight tying by swapping ``PreTrainedModel.tie_weights`` class-wide for
# the duration of the load (initialization.no_tie_weights). Two threads loading at once can each restore the
# other's swap, leaving tying off for the whole process: every later tied model (GPT-2's LM head) comes out
# untied. Every model this package builds goes through this lock.
MODEL_BUILD_LOCK = threading.RLock()


def load_causal_lm(model_name_or_path: str | Path, **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained``, one thread of the process at a time (see MODEL_BUILD_LOCK)."""
    with MODEL_BUILD_LOCK:
        return AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)


def causal_lm_from_config(model_config: PretrainedConfig, **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_config`` (its post_init ties weights), under the same lock."""
    with MODEL_BUILD_LOCK:
        return AutoModelForCausalLM.from_config(model_config, **kwargs)


def load_model_config(model_name_or_path: str) -> PretrainedConfig:
    """The model's config; a clear :class:`ModelNotFoundError` (not a traceback) when there is none."""
    try:
        return AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as exc:
        where = ("no such directory" if not Path(model_name_or_path).exists()
                 else "the directory holds no readable config.json")
        raise ModelNotFoundError(
            f"--model_name_or_path {model_name_or_path!r}: {where}, and no Hugging Face hub model of that name could "
            f"be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def model_fingerprint(config: PretrainedConfig) -> str:
    """sha256 of the architecture-defining part of a model config.

    A client whose base model has another fingerprint than the server's refuses to train: its
    deltas would be meaningless for the federation's adapter.
    """
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def default_target_modules(model_config: PretrainedConfig) -> list[str]:
    """The modules LoRA adapts when ``--target_modules`` is not given: ours, else PEFT's mapping."""
    model_type = model_config.model_type
    targets = DEFAULT_TARGET_MODULES.get(model_type) or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        # PEFT would fail later with a message that does not name our flag.
        raise ValueError(f"no default LoRA target modules for model type {model_type!r}; "
                         "pass --target_modules (e.g. q_proj,v_proj)")
    return list(targets)


def build_lora_config(
    model_config: PretrainedConfig,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str] | None,
    base_model_name_or_path: str | None = None,
) -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or default_target_modules(model_config),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )


def adapter_spec(model_config: PretrainedConfig, lora_config: LoraConfig) -> AdapterSpec:
    """Names and shapes of the adapter tensors, computed on the meta device (no weights)."""
    with torch.device("meta"):
        model = causal_lm_from_config(model_config)
        peft_model = get_peft_model(model, lora_config)
    return {name: tuple(t.shape) for name, t in get_peft_model_state_dict(peft_model).items()}


def initial_adapter(spec: Mapping[str, tuple[int, ...]], seed: int) -> Tensors:
    """The federation's first global adapter, as PEFT initialises one.

    lora_A is Kaiming-uniform (a = √5) and lora_B is zero, so the adapted model starts equal
    to the base model. Seeded, so a restarted server rebuilds the same tensors.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors: Tensors = {}
    for name in sorted(spec):
        tensor = torch.empty(spec[name], dtype=torch.float32)
        if ".lora_A." in name:
            torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
        else:
            torch.nn.init.zeros_(tensor)
        tensors[name] = tensor
    return tensors


def get_adapter_tensors(model: PeftModel, adapter_name: str = "default") -> Tensors:
    """The adapter's tensors under their wire names, as float32 CPU copies."""
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def set_adapter_tensors(model: PeftModel, tensors: Mapping[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Load wire-named tensors into the adapter; every adapter tensor must be given."""
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    missing = expected - set(tensors)
    if missing:
        raise ValueError(f"global adapter lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    adapter_only = {k: v for k, v in tensors.items() if k in expected}
    result = set_peft_model_state_dict(model, adapter_only, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"adapter tensors were not used by the model: {unexpected[:3]}")


def trainable_parameters(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.nn.Parameter]:
    """The adapter's live parameters keyed by wire name (for algorithm client hooks)."""
    marker = f".{adapter_name}."
    params = {}
    for name, param in model.named_parameters():
        if marker in name and param.requires_grad:
            params[name.replace(marker, ".")] = param
    return params


def save_peft_adapter(
    output_dir: str | Path, tensors: Mapping[str, torch.Tensor], lora_config: LoraConfig, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a standard PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lora_config.save_pretrained(str(output_dir))
    save_file(
        {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()},
        str(output_dir / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    return output_dir
