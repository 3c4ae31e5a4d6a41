"""Training datasets in TRL's formats: prompt/completion for SFT, prompt/chosen/rejected for DPO.

The pipeline is the same for both: read every record, rename fields, pick the format, parse and
check every row (a bad row raises :class:`DataFormatError` before any training), take the seeded
sample, then render prompts with the template and end each response with the tokenizer's eos.
Giving TRL a prompt/completion split (rather than token ids) makes its SFTTrainer compute the loss
on the completion only, with any tokenizer.
"""

from __future__ import annotations

from typing import Any

import datasets

from fedllm.data.formats import Prompt, parse_rows, resolve_format
from fedllm.data.records import read_rows, sample
from fedllm.data.templates import apply_template, check_tokenizer, format_response


def _prompt_text(template: str, prompt: Prompt, tokenizer: Any) -> str:
    return apply_template(template, prompt.instruction, prompt.input, tokenizer=tokenizer, history=prompt.history)


def _examples(
    source: str, task: str, template: str, tokenizer: Any, dataset_format: str | None,
    field_map: str | None, dataset_sample: int | None, seed: int,
) -> tuple[str, list[Any]]:
    check_tokenizer(template, tokenizer)
    rows = read_rows(source, field_map)
    fmt = resolve_format(rows, dataset_format, task)
    return fmt, sample(parse_rows(rows, fmt), dataset_sample, seed)


def load_sft_dataset(
    source: str,
    *,
    tokenizer: Any,
    template: str = "alpaca",
    dataset_format: str | None = None,
    field_map: str | None = None,
    dataset_sample: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
    """A ``datasets.Dataset`` with string columns ``prompt`` and ``completion`` (ending with eos).

    The ``text`` format (plain language modelling) gives one column ``text`` instead, also ending with eos.
    """
    fmt, examples = _examples(source, "sft", template, tokenizer, dataset_format, field_map, dataset_sample, seed)
    eos = tokenizer.eos_token
    if fmt == "text":
        return datasets.Dataset.from_dict({"text": [t if t.endswith(eos) else t + eos for t in examples]})
    return datasets.Dataset.from_dict({
        "prompt": [_prompt_text(template, prompt, tokenizer) for prompt, _ in examples],
        "completion": [format_response(template, response, tokenizer) for _, response in examples],
    })


def load_dpo_dataset(
    source: str,
    *,
    tokenizer: Any,
    template: str = "alpaca",
    dataset_format: str | None = None,
    field_map: str | None = None,
    dataset_sample: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
    """A ``datasets.Dataset`` with string columns ``prompt`` (templated), ``chosen`` and ``rejected`` (end in eos)."""
    _, examples = _examples(source, "dpo", template, tokenizer, dataset_format, field_map, dataset_sample, seed)
    return datasets.Dataset.from_dict({
        "prompt": [_prompt_text(template, prompt, tokenizer) for prompt, _, _ in examples],
        "chosen": [format_response(template, chosen, tokenizer) for _, chosen, _ in examples],
        "rejected": [format_response(template, rejected, tokenizer) for _, _, rejected in examples],
    })
