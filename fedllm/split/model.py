"""A decoder-only LLM cut in three: the client's head and tail, the server's middle.

With N transformer blocks, ``--split_head_layers p`` and ``--split_tail_layers q``:

* head   = token embedding (+ GPT-2's position embedding) + blocks[0:p]   (client)
* middle = blocks[p:N-q]                                                  (server)
* tail   = blocks[N-q:N] + final norm + LM head                           (client)

Each process builds the *whole* model skeleton on the meta device (no memory), then gives real storage
only to the parameters of the parts it holds, read one tensor at a time from the checkpoint's
safetensors files: the server never reads the head's or tail's weights, the client never the middle's.
Module names stay those of the full model, so every part's LoRA tensors carry PEFT's own names (the
three parts' adapters together are one ordinary PEFT adapter of the full model; ``export.py merge``).

Between the parts travel hidden states ``[B, T, H]`` plus what the server needs to rebuild the attention
masks: each row's ``starts``/``lengths`` (the span of real tokens) and ``position_ids``; never token ids.
Both sides rebuild the 2-D padding mask from them and call the model's own mask functions
(``transformers.masking_utils``), so the split forward is the model's forward, block for block.

What differs between model families (where the stack, blocks, embeddings and final norm live; rotary or
learned positions) is one :class:`Architecture` per family in :data:`ARCHITECTURES`; nothing else here
depends on the family.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from ..adapter import causal_lm_from_config

HEAD, MIDDLE, TAIL = "head", "middle", "tail"
CLIENT_PARTS = frozenset({HEAD, TAIL})
SERVER_PARTS = frozenset({MIDDLE})


class SplitConfigError(ValueError):
    """A model or split that cannot be run: unsupported architecture, p + q >= N, negative counts."""


@dataclass(frozen=True)
class Architecture:
    """Where a family of ``*ForCausalLM`` models keeps its parts, and what its blocks are given.

    head: h = dropout(E_tok[x] + E_pos[position_ids]) (E_pos and dropout where the family has them), then blocks;
    each block: h = block(h, attention_mask=M, position_ids=..., [position_embeddings=rotary(h, position_ids)]);
    tail: logits = lm_head(final_norm(h)). Every name is an attribute: ``decoder`` of the causal LM (its
    ``base_model_prefix``, which a base-model checkpoint's tensor names lack), the others of the decoder.
    """

    decoder: str  # the decoder stack inside the *ForCausalLM
    blocks: str  # its ModuleList of transformer blocks
    token_embedding: str
    final_norm: str
    rotary: str | None = None  # rotary embedding module: its (cos, sin) go to every block
    position_embedding: str | None = None  # learned absolute positions, added to the token embedding
    embedding_dropout: str | None = None  # dropout on the summed embeddings

    @cached_property
    def block_name(self) -> re.Pattern:
        """A block's tensors: ``...<blocks>.<index>.``."""
        return re.compile(rf"(?:^|\.){self.blocks}\.(\d+)\.")

    @cached_property
    def embedding_name(self) -> re.Pattern:
        """The embeddings' tensors (token, and learned positions where the family has them)."""
        embeddings = "|".join(e for e in (self.token_embedding, self.position_embedding) if e)
        return re.compile(rf"(?:^|\.)(?:{embeddings})\.")

    @cached_property
    def final_name(self) -> re.Pattern:
        """The final norm (also as a base-model checkpoint names it, without the decoder prefix) and the LM head."""
        return re.compile(rf"(?:^|\.)(?:{self.decoder}\.{self.final_norm}|lm_head)\.|^{self.final_norm}\.")

    def stack(self, model: PeftModel | torch.nn.Module) -> torch.nn.Module:
        """The decoder stack inside a (PEFT-wrapped) causal LM."""
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        return getattr(base, self.decoder)

    def embed(self, stack: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The head's input to its first block, as the model's own forward computes it."""
        hidden = getattr(stack, self.token_embedding)(input_ids)
        if self.position_embedding:
            hidden = hidden + getattr(stack, self.position_embedding)(position_ids)
        if self.embedding_dropout:
            hidden = getattr(stack, self.embedding_dropout)(hidden)
        return hidden

    def block_inputs(self, stack: torch.nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """What every block gets besides the hidden states, the mask and the positions."""
        if self.rotary is None:
            return {}
        return {"position_embeddings": getattr(stack, self.rotary)(hidden, position_ids=position_ids)}


# Rotary decoders under ``model.model`` (``embed_tokens``, ``rotary_emb``, ``norm``); GPT-2 under
# ``model.transformer`` (``wte`` + learned ``wpe`` + ``drop``, blocks ``h``, ``ln_f``).
_ROTARY_DECODER = Architecture(decoder="model", blocks="layers", token_embedding="embed_tokens", final_norm="norm",
                               rotary="rotary_emb")
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _ROTARY_DECODER,
    "mistral": _ROTARY_DECODER,
    "qwen2": _ROTARY_DECODER,
    "gpt2": Architecture(decoder="transformer", blocks="h", token_embedding="wte", final_norm="ln_f",
                         position_embedding="wpe", embedding_dropout="drop"),
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)


def architecture_of(model_config: PretrainedConfig) -> Architecture:
    """The family of ``model_config``; :class:`SplitConfigError` listing the supported ones when it has none."""
    model_type = getattr(model_config, "model_type", "?")
    if model_type not in ARCHITECTURES:
        raise SplitConfigError(
            f"split learning supports the decoder architectures {', '.join(SUPPORTED_MODEL_TYPES)}; "
            f"model type {model_type!r} is not one of them (use --fed_mode lora)")
    return ARCHITECTURES[model_type]


@dataclass(frozen=True)
class SplitPlan:
    """Where the model is cut: ``num_layers`` blocks, the first ``head_layers`` and last ``tail_layers`` on the
    client; ``architecture`` names the parts' tensors."""

    num_layers: int
    head_layers: int
    tail_layers: int
    architecture: Architecture = ARCHITECTURES["llama"]

    @classmethod
    def of(cls, model_config: PretrainedConfig, head_layers: int, tail_layers: int) -> SplitPlan:
        """The plan for ``model_config``; :class:`SplitConfigError` naming the problem when it cannot be split."""
        plan = cls(int(model_config.num_hidden_layers), head_layers, tail_layers, architecture_of(model_config))
        plan.check()
        return plan

    def check(self) -> None:
        if self.head_layers < 1 or self.tail_layers < 1:
            raise SplitConfigError(f"--split_head_layers and --split_tail_layers must be >= 1 (the embedding and "
                                   f"the LM head need a block beside them), got {self.head_layers} and "
                                   f"{self.tail_layers}")
        if self.head_layers + self.tail_layers >= self.num_layers:
            raise SplitConfigError(
                f"--split_head_layers {self.head_layers} + --split_tail_layers {self.tail_layers} must be fewer than "
                f"the model's {self.num_layers} layers, so that the server holds at least one")

    def layers(self, part: str) -> range:
        return {HEAD: range(0, self.head_layers),
                MIDDLE: range(self.head_layers, self.num_layers - self.tail_layers),
                TAIL: range(self.num_layers - self.tail_layers, self.num_layers)}[part]

    def part_of(self, name: str) -> str:
        """The part a parameter, buffer or LoRA tensor of the full model belongs to, by its name."""
        match = self.architecture.block_name.search(name)
        if match:
            index = int(match.group(1))
            return next(part for part in (HEAD, MIDDLE, TAIL) if index in self.layers(part))
        if self.architecture.embedding_name.search(name):
            return HEAD
        if self.architecture.final_name.search(name):
            return TAIL
        raise SplitConfigError(f"cannot tell which part {name!r} belongs to")

    def select(self, names: Iterable[str], parts: Iterable[str]) -> list[str]:
        wanted = set(parts)
        return [n for n in names if self.part_of(n) in wanted]


def checkpoint_files(model_path: str | Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (a single file or a sharded index)."""
    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: root / file for name, file in weight_map.items()}
    single = root / "model.safetensors"
    if not single.exists():
        raise SplitConfigError(f"{model_path}: split learning reads the weights of its own part from a local "
                               f"safetensors checkpoint (model.safetensors or its index); none found")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def load_part_weights(model_path: str | Path, plan: SplitPlan, parts: Iterable[str],
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``parts`` only, read one at a time (the others are never read)."""
    files = checkpoint_files(model_path)
    wanted = plan.select(files, parts)
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                tensors[name] = f.get_tensor(name).to(dtype)
    return tensors


def build_part_model(model_path: str | Path, model_config: PretrainedConfig, plan: SplitPlan, parts: Iterable[str],
                     lora_config: LoraConfig, dtype: torch.dtype = torch.float32) -> PeftModel:
    """The full model's skeleton with real weights only for ``parts`` (the rest on the meta device), wrapped in
    PEFT's LoRA. LoRA tensors of the held parts are real and trainable; the others stay on meta, frozen."""
    parts = set(parts)
    with torch.device("meta"):
        model = causal_lm_from_config(model_config, dtype=dtype)
    architecture = plan.architecture
    weights = _as_model_names(load_part_weights(model_path, plan, parts, dtype), model, architecture)
    if TAIL in parts and "lm_head.weight" not in weights and getattr(model_config, "tie_word_embeddings", False):
        # tied (GPT-2's default): the client holds both ends
        weights["lm_head.weight"] = weights[f"{architecture.decoder}.{architecture.token_embedding}.weight"]
    missing = [n for n, _ in model.named_parameters() if plan.part_of(n) in parts and n not in weights]
    if missing:
        raise SplitConfigError(f"{model_path}: the checkpoint lacks {len(missing)} weights of the "
                               f"{'/'.join(sorted(parts))} part(s), e.g. {missing[:3]}")
    model.load_state_dict(weights, strict=False, assign=True)
    if architecture.rotary:
        # Non-persistent buffers (the rotary frequencies) were made on meta: build them for real.
        inner = architecture.stack(model)
        setattr(inner, architecture.rotary, type(getattr(inner, architecture.rotary))(config=model_config))
    for param in model.parameters():
        param.requires_grad_(False)
    peft_model = get_peft_model(model, lora_config)
    for name, param in peft_model.named_parameters():
        if ".lora_" in name:
            held = plan.part_of(name) in parts
            if held and param.is_meta:
                raise SplitConfigError(f"LoRA parameter {name} of a held part stayed on the meta device")
            param.requires_grad_(held)
    return peft_model


def _as_model_names(weights: dict[str, torch.Tensor], model: torch.nn.Module,
                    architecture: Architecture) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under the causal LM's names: a base-model checkpoint (GPT-2's on the hub: ``h.0.…``,
    ``wte.weight``) lacks the decoder's prefix."""
    known = model.state_dict().keys()
    prefixed = {name: f"{architecture.decoder}.{name}" for name in weights}
    return {(prefixed[name] if name not in known and prefixed[name] in known else name): tensor
            for name, tensor in weights.items()}


def model_architecture(model: PeftModel) -> Architecture:
    return architecture_of(model.get_base_model().config)


def decoder(model: PeftModel) -> torch.nn.Module:
    """The decoder stack (``model.model`` of a Llama, ``model.transformer`` of a GPT-2) inside a PEFT model."""
    return model_architecture(model).stack(model)


def padding_mask(starts: torch.Tensor, lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The 2-D attention mask ``[B, T]``: 1 on each row's real tokens ``[start, start + length)``."""
    positions = torch.arange(seq_len, device=starts.device).unsqueeze(0)
    return ((positions >= starts.unsqueeze(1)) & (positions < (starts + lengths).unsqueeze(1))).long()


def _layer_masks(inner: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, cache: Cache | None = None, layers: range | None = None) -> list:
    """Each block's attention mask, built as the model's own forward builds it (full or sliding window).

    With a KV ``cache`` (generation) each kind's mask is sized against the cache of the first block of that kind
    in ``layers``: a part's cache fills only its own blocks, so the model's default (its first block) would not do.
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = inner.config
    kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=cache,
                  position_ids=position_ids)
    layer_types = getattr(config, "layer_types", None)

    def first(kind: str) -> int | None:
        """The block whose cache sizes ``kind``'s mask: the part's first of that kind (no cache: the default)."""
        if cache is None:
            return None
        return next((i for i in layers if layer_types is None or layer_types[i] == kind), layers[0])

    if layer_types is None:  # Mistral: one kind for every block, sliding when the config has a window
        sliding = getattr(config, "sliding_window", None) is not None and config.model_type == "mistral"
        mask = (create_sliding_window_causal_mask if sliding else create_causal_mask)(**kwargs,
                                                                                       layer_idx=first("any"))
        return [mask] * config.num_hidden_layers
    masks = {"full_attention": None, "sliding_attention": None}
    for kind in set(layer_types):
        masks[kind] = (create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask)(
            **kwargs, layer_idx=first(kind))
    return [masks[kind] for kind in layer_types]


def run_blocks(model: PeftModel, hidden: torch.Tensor, layers: range, attention_mask: torch.Tensor,
               position_ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
    """Blocks ``layers`` of the decoder on ``hidden``, with the masks (and rotary embeddings) of the full forward.

    With ``cache`` (generation) the blocks attend to their cached keys and values and append ``hidden``'s; the 2-D
    ``attention_mask`` then spans the cached tokens and the new ones."""
    architecture = model_architecture(model)
    inner = architecture.stack(model)
    masks = _layer_masks(inner, hidden, attention_mask, position_ids, cache, layers)
    block_inputs = architecture.block_inputs(inner, hidden, position_ids)
    blocks = getattr(inner, architecture.blocks)
    for i in layers:
        hidden = blocks[i](hidden, attention_mask=masks[i], position_ids=position_ids, past_key_values=cache,
                           use_cache=cache is not None, **block_inputs)
    return hidden


@dataclass
class MaskInfo:
    """What the server needs besides the hidden states to run its blocks: no token, only positions."""

    starts: torch.Tensor  # [B] int64: first real token of each row
    lengths: torch.Tensor  # [B] int64: real tokens of each row
    position_ids: torch.Tensor  # [B, T] int64

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor) -> MaskInfo:
        """From a 2-D 0/1 mask whose real tokens are contiguous in each row (left or right padding)."""
        batch, seq_len = attention_mask.shape
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1)
        starts = torch.where(lengths > 0, mask.long().argmax(dim=1), torch.zeros_like(lengths))
        if not torch.equal(padding_mask(starts, lengths, seq_len).bool(), mask):
            raise ValueError("each row's attention mask must be one contiguous span of real tokens")
        # The model's own default (no position_ids given): 0..T-1 on every row.
        position_ids = torch.arange(seq_len).unsqueeze(0).expand(batch, seq_len).contiguous()
        return cls(starts.long(), lengths.long(), position_ids)

    def attention_mask(self, cached: int = 0) -> torch.Tensor:
        """``[B, cached + T]``: in generation the spans count the ``cached`` tokens of the KV cache too."""
        return padding_mask(self.starts, self.lengths, cached + self.position_ids.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"starts": self.starts, "lengths": self.lengths, "position_ids": self.position_ids}


def cached_length(cache: Cache | None, layers: range) -> int:
    """Tokens a part's KV cache holds (its first block's: every block of a part sees the same); 0 without one."""
    return 0 if cache is None else cache.get_seq_length(layers[0])


def head_forward(model: PeftModel, plan: SplitPlan, input_ids: torch.Tensor, mask: MaskInfo,
                 cache: Cache | None = None) -> torch.Tensor:
    """h_A = blocks[0:p](embed(input_ids)). In generation ``cache`` is the part's own KV cache: its blocks attend
    to the cached tokens and append these (the same for the middle and the tail)."""
    hidden = model_architecture(model).embed(decoder(model), input_ids, mask.position_ids)
    layers = plan.layers(HEAD)
    return run_blocks(model, hidden, layers, mask.attention_mask(cached_length(cache, layers)), mask.position_ids,
                      cache)


def middle_forward(model: PeftModel, plan: SplitPlan, hidden: torch.Tensor, mask: MaskInfo,
                   cache: Cache | None = None) -> torch.Tensor:
    """h_B = blocks[p:N-q](h_A)."""
    layers = plan.layers(MIDDLE)
    return run_blocks(model, hidden, layers, mask.attention_mask(cached_length(cache, layers)), mask.position_ids,
                      cache)


def tail_logits(model: PeftModel, plan: SplitPlan, hidden: torch.Tensor, mask: MaskInfo,
                cache: Cache | None = None, last_only: bool = False) -> torch.Tensor:
    """logits = lm_head(norm(blocks[N-q:N](h_B))); of the last position only with ``last_only`` (generation)."""
    layers = plan.layers(TAIL)
    hidden = run_blocks(model, hidden, layers, mask.attention_mask(cached_length(cache, layers)), mask.position_ids,
                        cache)
    if last_only:
        hidden = hidden[:, -1:]
    final_norm = getattr(decoder(model), model_architecture(model).final_norm)
    return model.get_base_model().lm_head(final_norm(hidden))


def causal_lm_loss(model: PeftModel, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's own next-token loss (labels shifted inside; -100 ignored), as its forward computes it."""
    base = model.get_base_model()
    return base.loss_function(logits=logits, labels=labels, vocab_size=base.config.vocab_size)


def part_adapter_names(spec: Mapping[str, object], plan: SplitPlan, parts: Iterable[str]) -> list[str]:
    """The adapter tensor names (PEFT wire names) of ``parts``."""
    return plan.select(sorted(spec), parts)
