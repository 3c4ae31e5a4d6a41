"""Adapters out of a federation: any round as a PEFT directory, merged into the base model, or loaded for use.

Where a round's adapter can come from, in a server's or a simulation's ``state_dir``:

* ``globals/vNNNNNN.state.safetensors`` -- the fp32 master copy (``global.`` prefix) of version N, kept
  for the newest versions only (the server deletes older ones as rounds go by);
* ``adapters/round_N`` -- written every ``--save_model_freq`` rounds, and ``adapters/final`` after the
  last round (version ``--num_rounds``). A server started with ``--output_dir`` wrote these there
  instead; pass that directory to ``--adapter``.

A round found in neither is not available, and :func:`load_state_dir` says which rounds are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import load_peft_weights
from safetensors import safe_open

from .adapter import load_causal_lm, save_peft_adapter, set_adapter_tensors
from .algorithms.base import Tensors
from .server.versions import STATE_GLOBAL_PREFIX

# LoraConfig fields a state_dir records that a PEFT directory needs (as the server writes them).
ADAPTER_CONFIG_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type",
                       "base_model_name_or_path")
MERGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class AdapterSource:
    """An adapter's tensors (wire names = PEFT names) and config, and where they came from."""

    tensors: Tensors
    lora_config: LoraConfig
    base_model: str | None
    description: str
    federation: dict[str, Any] = field(default_factory=dict)  # the state_dir's settings (template, seq_length, ...)


def load_adapter_dir(path: str | Path) -> AdapterSource:
    """A standard PEFT adapter directory (``adapter_config.json`` + weights)."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    config = LoraConfig.from_pretrained(str(path))
    tensors = {k: v.to(torch.float32) for k, v in load_peft_weights(str(path), device="cpu").items()}
    return AdapterSource(tensors, config, config.base_model_name_or_path, f"adapter {path}")


def _read_state_file(path: Path) -> Tensors:
    with safe_open(str(path), framework="pt") as f:
        return {k[len(STATE_GLOBAL_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(STATE_GLOBAL_PREFIX)}


def available_rounds(state_dir: str | Path, num_rounds: int | None = None) -> dict[int, Path]:
    """Round -> the file or directory its adapter can be read from (a state file preferred: fp32 master).

    ``adapters/final`` counts as round ``num_rounds`` (it exists only once the federation finished).
    """
    root = Path(state_dir)
    found: dict[int, Path] = {}
    for directory in sorted((root / "adapters").glob("round_*")):
        if (m := re.fullmatch(r"round_(\d+)", directory.name)) and (directory / "adapter_config.json").is_file():
            found[int(m.group(1))] = directory
    if num_rounds is not None and (root / "adapters" / "final" / "adapter_config.json").is_file():
        found[num_rounds] = root / "adapters" / "final"
    for state in (root / "globals").glob("v*.state.safetensors"):
        if m := re.fullmatch(r"v(\d+)\.state\.safetensors", state.name):
            found[int(m.group(1))] = state
    return dict(sorted(found.items()))


def load_state_dir(state_dir: str | Path, round_number: int | None = None) -> AdapterSource:
    """The global adapter after ``round_number`` (0 = the initial one; default: the latest) of a state_dir."""
    from .server.store import Store

    root = Path(state_dir)
    if not (root / "state.db").is_file():
        raise ValueError(f"{root} is not a fedllm state_dir (no state.db)")
    store = Store(root)
    try:
        db = store.read()
        federation = store.get_meta(db, "federation") or {}
        lora_dict = store.get_meta(db, "lora_config") or {}
        latest = store.latest_global(db)
    finally:
        store.close()
    if round_number is None:
        round_number = latest.version if latest else 0
    rounds = available_rounds(root, federation.get("num_rounds"))
    if round_number not in rounds:
        listed = ", ".join(map(str, rounds)) or "none"
        raise ValueError(
            f"round {round_number} is not available in {root}: a state_dir keeps adapters/round_N every "
            f"--save_model_freq rounds, adapters/final, and the state files of the newest versions only "
            f"(latest: {latest.version if latest else 'none'}). Available rounds: {listed}")
    where = rounds[round_number]
    if where.is_dir():
        source = load_adapter_dir(where)
        source.description = f"{root} round {round_number} ({where.relative_to(root)})"
    else:
        config = LoraConfig(**{k: v for k, v in lora_dict.items() if k in ADAPTER_CONFIG_KEYS})
        source = AdapterSource(_read_state_file(where), config, config.base_model_name_or_path,
                               f"{root} round {round_number} ({where.relative_to(root)})")
    source.base_model = federation.get("model_name_or_path") or source.base_model
    source.federation = federation
    return source


def load_adapter(adapter: str | None = None, state_dir: str | None = None, round_number: int | None = None,
                 client_output_dir: str | None = None) -> AdapterSource | None:
    """``--adapter DIR`` or ``--state_dir DIR [--round N]``; None when neither is given (the base model alone).

    A split federation's state_dir gives the whole model's adapter: the middle's LoRA from its checkpoint, the
    head's and tail's from ``client_output_dir``'s ``final_adapter`` or else from the state_dir's global.
    """
    if adapter and state_dir:
        raise ValueError("give --adapter or --state_dir, not both")
    if round_number is not None and not state_dir:
        raise ValueError("--round needs --state_dir")
    if client_output_dir and not state_dir:
        raise ValueError("--client_output_dir needs the split federation's --state_dir")
    if state_dir:
        source = load_state_dir(state_dir, round_number)
        if source.federation.get("fed_mode") == "split":
            _complete_split(source, state_dir, round_number, client_output_dir)
        return source
    return load_adapter_dir(adapter) if adapter else None


def _complete_split(source: AdapterSource, state_dir: str, round_number: int | None,
                    client_output_dir: str | None) -> None:
    """The three parts' LoRA in ``source``: the server's middle plus a client's (or the federation's) ends."""
    from .split.server import middle_checkpoint_adapter

    if round_number is not None:
        raise ValueError("a split federation keeps its middle's latest LoRA only; drop --round")
    if client_output_dir:
        ends = load_adapter_dir(Path(client_output_dir) / "final_adapter")
        source.tensors = ends.tensors
        source.description = f"{state_dir} (middle) + {client_output_dir}/final_adapter (head and tail)"
    elif source.federation.get("split_private_ends"):
        raise ValueError("this split federation kept its ends private (--split_private_ends): pass "
                         "--client_output_dir, the --output_dir of the client whose head and tail to use")
    else:
        source.description = f"{state_dir} (middle and the federation's head and tail)"
    middle = middle_checkpoint_adapter(state_dir)
    overlap = sorted(set(middle) & set(source.tensors))
    if overlap:
        raise ValueError(f"the ends hold tensors of the middle, e.g. {overlap[:2]}: not this federation's")
    source.tensors = {**source.tensors, **middle}


def export_adapter(source: AdapterSource, output_dir: str | Path) -> Path:
    """Write ``source`` as a standard PEFT directory that ``PeftModel.from_pretrained(base, dir)`` loads."""
    return save_peft_adapter(output_dir, source.tensors, source.lora_config)


def with_adapter(base_model: torch.nn.Module, source: AdapterSource) -> PeftModel:
    """``base_model`` wrapped with LoRA and ``source``'s tensors loaded (the model a client trains)."""
    model = get_peft_model(base_model, source.lora_config)
    set_adapter_tensors(model, source.tensors)
    return model


def merge_adapter(source: AdapterSource, output_dir: str | Path, *, model_name_or_path: str | None = None,
                  dtype: str = "float32") -> Path:
    """Merge ``source`` into its base model (``merge_and_unload``) and save a full model directory.

    The result loads with ``AutoModelForCausalLM.from_pretrained(output_dir)``; the tokenizer is saved with it.
    The merge is done in float32, then the weights are cast to ``dtype``.
    """
    from transformers import AutoTokenizer

    base_path = model_name_or_path or source.base_model
    if not base_path:
        raise ValueError("the adapter does not name its base model; pass --model_name_or_path")
    output_dir = Path(output_dir)
    base = load_causal_lm(base_path, dtype=torch.float32)
    merged = with_adapter(base, source).merge_and_unload()
    merged.to(MERGE_DTYPES[dtype]).save_pretrained(str(output_dir))
    AutoTokenizer.from_pretrained(base_path).save_pretrained(str(output_dir))
    return output_dir


def split_generator(source: AdapterSource, model_name_or_path: str | None = None) -> tuple[Any, Any]:
    """``export.py generate`` on a split federation: (a :class:`~fedllm.split.generate.SplitGenerator`, the
    tokenizer). The three parts run as three, each with its own KV cache, their hand-offs encoded in the
    federation's ``--wire_dtype`` (in process, on the CPU); ``source`` holds all three parts' LoRA
    (:func:`load_adapter`)."""
    from transformers import AutoTokenizer

    from .adapter import load_model_config
    from .split.generate import MiddleDecoder, SplitGenerator
    from .split.messages import MessageShape
    from .split.model import CLIENT_PARTS, SERVER_PARTS, SplitPlan, build_part_model
    from .split.step import set_part_adapter_tensors

    base_path = model_name_or_path or source.base_model
    if not base_path:
        raise ValueError("the adapter does not name its base model; pass --model_name_or_path")
    federation = source.federation
    model_config = load_model_config(base_path)
    plan = SplitPlan.of(model_config, federation["split_head_layers"], federation["split_tail_layers"])
    models = {}
    for parts in (CLIENT_PARTS, SERVER_PARTS):
        models[parts] = build_part_model(base_path, model_config, plan, parts, source.lora_config)
        set_part_adapter_tensors(models[parts], plan, parts,
                                 {k: v for k, v in source.tensors.items() if plan.part_of(k) in parts})
    positions = int(model_config.max_position_embeddings)  # a prompt and its continuation fit the model's positions
    shape = MessageShape(int(model_config.hidden_size), positions, positions, federation.get("wire_dtype", "float32"))
    generator = SplitGenerator(models[CLIENT_PARTS], plan, MiddleDecoder(models[SERVER_PARTS], plan, shape), shape)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return generator, tokenizer
