"""Evaluate a base model plus an adapter on a dataset: loss and perplexity, and generation-based metrics.

Examples are read with the data layer (every format of ``docs/data.md``) and rendered with the same
template as in training. The loss is computed on the response tokens only, tokenised as TRL's
``SFTTrainer`` tokenises prompt/completion data (prompt and prompt+response tokenised separately, the
response starting where they diverge, truncated to ``seq_length`` keeping the start); it is the mean
over all response tokens of the dataset, and the perplexity is its exponential. Generation is greedy,
batched with left padding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapter import load_causal_lm, set_adapter_tensors
from ..client.trainer import resolve_device
from ..config import EvaluationArguments
from ..data import FORMATS, apply_template, detect_format, format_response
from ..data.formats import is_empty, parse_rows, resolve_format
from ..data.records import read_rows, sample
from ..export import AdapterSource, load_adapter
from . import metrics as M

METRICS = ("loss", "classification", "gsm8k", "rouge", "refusal")
GENERATION_METRICS = ("classification", "gsm8k", "rouge", "refusal")


@dataclass
class Example:
    prompt: str  # the templated prompt ("" for plain text data)
    completion: str  # what the loss is computed on: the formatted response, ending with eos
    reference: str  # the raw response (the chosen one for preference data), for the generation metrics


def load_examples(source: str, *, tokenizer: Any, template: str = "alpaca", dataset_format: str | None = None,
                  field_map: str | None = None, max_samples: int | None = None, seed: int = 0) -> list[Example]:
    """Examples of any SFT or preference format; ``max_samples`` keeps a seeded subset (in data order)."""
    rows = read_rows(source, field_map)
    first = next((row.record for row in rows if not is_empty(row.record)), rows[0].record)
    fmt = resolve_format(rows, dataset_format, FORMATS[dataset_format or detect_format(first)][0])
    examples = []
    for item in sample(parse_rows(rows, fmt), max_samples, seed):
        if isinstance(item, str):  # plain text: the loss covers all of it; nothing to prompt with
            examples.append(Example("", item if item.endswith(tokenizer.eos_token) else item + tokenizer.eos_token, item))
            continue
        prompt, response = item[0], item[1]  # (Prompt, response) or (Prompt, chosen, rejected)
        text = apply_template(template, prompt.instruction, prompt.input, tokenizer=tokenizer, history=prompt.history)
        examples.append(Example(text, format_response(template, response, tokenizer), response))
    return examples


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Evaluator:
    """A base model (loaded once) with an optional LoRA adapter that can be swapped between evaluations."""

    def __init__(self, model_name_or_path: str, *, lora_config: Any = None, device: str = "auto"):
        from peft import get_peft_model
        from transformers import AutoTokenizer

        self.device = resolve_device(device)
        on_gpu = self.device.startswith("cuda")
        dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = load_causal_lm(model_name_or_path, dtype=dtype).to(self.device)
        self.model = get_peft_model(model, lora_config) if lora_config is not None else model
        self.model.eval()

    @classmethod
    def for_adapter(cls, source: AdapterSource | None, model_name_or_path: str | None = None,
                    device: str = "auto") -> Evaluator:
        base = model_name_or_path or (source.base_model if source else None)
        if not base:
            raise ValueError("no base model: pass --model_name_or_path")
        evaluator = cls(base, lora_config=source.lora_config if source else None, device=device)
        if source is not None:
            evaluator.set_adapter(source.tensors)
        return evaluator

    def set_adapter(self, tensors: dict[str, torch.Tensor]) -> None:
        set_adapter_tensors(self.model, tensors)

    def _tokenize(self, example: Example, seq_length: int) -> tuple[list[int], list[int]]:
        prompt_ids = self.tokenizer(text=example.prompt)["input_ids"] if example.prompt else []
        ids = self.tokenizer(text=example.prompt + example.completion)["input_ids"]
        start = _common_prefix_length(prompt_ids, ids)
        ids = ids[:seq_length]
        return ids, [-100] * min(start, len(ids)) + ids[start:]

    @torch.no_grad()
    def loss(self, examples: Sequence[Example], *, seq_length: int = 512, batch_size: int = 8,
             progress: bool = True) -> dict[str, float]:
        """Mean negative log-likelihood of the response tokens, perplexity, and the counts behind them."""
        encoded = [self._tokenize(e, seq_length) for e in examples]
        kept = sorted((pair for pair in encoded if any(label != -100 for label in pair[1])), key=lambda p: len(p[0]))
        total, tokens = 0.0, 0
        pad = self.tokenizer.pad_token_id
        bar = tqdm(total=len(kept), desc="loss", disable=not progress)
        for i in range(0, len(kept), batch_size):
            batch = kept[i : i + batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch], device=self.device)
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch], device=self.device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=self.device)
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
            shifted = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), shifted.reshape(-1), ignore_index=-100, reduction="sum"))
            tokens += int((shifted != -100).sum())
            bar.update(len(batch))
        bar.close()
        mean = total / tokens if tokens else float("nan")
        return {"loss": mean, "perplexity": M.perplexity(mean), "loss_tokens": float(tokens),
                "loss_examples": float(len(kept)), "loss_skipped": float(len(examples) - len(kept))}

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, batch_size: int = 8, max_new_tokens: int = 128,
                 progress: bool = True) -> list[str]:
        """Greedy continuations of ``prompts`` (already templated), batched with left padding."""
        return generate_texts(self.model, self.tokenizer, self.device, prompts, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, progress=progress)


def generate_texts(model: Any, tokenizer: Any, device: str, prompts: Sequence[str], *, batch_size: int = 8,
                   max_new_tokens: int = 128, progress: bool = True) -> list[str]:
    """Greedy continuations of ``prompts`` (already templated) by ``model.generate`` (a transformers model, or
    a split model's :class:`~fedllm.split.generate.SplitGenerator`), batched with left padding."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs: list[str] = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
            batch = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True).to(device)
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            outputs.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return outputs


def parse_metrics(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown --metrics {unknown or text!r}; choose from {', '.join(METRICS)}")
    return names


def evaluate(evaluator: Evaluator, examples: Sequence[Example], metrics: Sequence[str], *,
             label_words: Sequence[str] = ("negative", "neutral", "positive"), seq_length: int = 512,
             batch_size: int = 8, max_new_tokens: int = 128, progress: bool = True) -> dict[str, Any]:
    """``{"metrics": {...}, "predictions": [...]}`` for ``examples``; one generation pass serves every metric."""
    scores: dict[str, float] = {"examples": float(len(examples))}
    predictions: list[dict[str, Any]] = []
    if "loss" in metrics:
        scores.update(evaluator.loss(examples, seq_length=seq_length, batch_size=batch_size, progress=progress))
    if any(m in GENERATION_METRICS for m in metrics):
        if any(not e.prompt for e in examples):
            raise ValueError("generation metrics need prompts; plain text data supports --metrics loss only")
        outputs = evaluator.generate([e.prompt for e in examples], batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, progress=progress)
        references = [e.reference for e in examples]
        predictions = [{"prompt": e.prompt, "generation": o, "reference": e.reference}
                       for e, o in zip(examples, outputs, strict=True)]
        if "classification" in metrics:
            labels = list(label_words)
            predicted = [M.extract_label(o, labels) for o in outputs]
            gold = [M.extract_label(r, labels) or r.strip() for r in references]
            scores.update(M.classification_scores(predicted, gold, labels))
            for p, label in zip(predictions, predicted, strict=True):
                p["label"] = label
        if "gsm8k" in metrics:
            scores["exact_match"] = M.exact_match(outputs, references)
        if "rouge" in metrics:
            scores.update(M.rouge_scores(outputs, references))
        if "refusal" in metrics:
            scores["refusal_rate"] = M.refusal_rate(outputs)
            for p in predictions:
                p["refusal"] = M.is_refusal(p["generation"])
    return {"metrics": scores, "predictions": predictions}


def run_evaluation(args: EvaluationArguments, *, progress: bool = True) -> dict[str, Any]:
    """evaluate.py: resolve the adapter, evaluate, write ``args.output_file``; returns the report."""
    metrics = parse_metrics(args.metrics)
    if not args.dataset_name:
        raise ValueError("--dataset_name is required")
    source = load_adapter(args.adapter, args.state_dir, args.round)
    federation = source.federation if source else {}
    template = args.template or federation.get("template") or "alpaca"
    seq_length = args.seq_length or federation.get("seq_length") or 512
    evaluator = Evaluator.for_adapter(source, args.model_name_or_path, args.device)
    examples = load_examples(args.dataset_name, tokenizer=evaluator.tokenizer, template=template,
                             dataset_format=args.dataset_format, field_map=args.field_map,
                             max_samples=args.max_samples, seed=args.seed)
    result = evaluate(evaluator, examples, metrics, label_words=[w.strip() for w in args.label_words.split(",")],
                      seq_length=seq_length, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      progress=progress)
    report: dict[str, Any] = {
        "model": args.model_name_or_path or (source.base_model if source else None),
        "adapter": source.description if source else None,
        "dataset": args.dataset_name,
        "template": template,
        "seq_length": seq_length,
        "metrics": result["metrics"],
    }
    if args.save_predictions:
        report["predictions"] = result["predictions"]
    if args.output_file:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_file).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
