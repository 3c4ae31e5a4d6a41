#!/usr/bin/env python
"""Can a base model learn Financial PhraseBank at all? One pooled (central) fine-tuning, no federation.

A diagnostic for ``bench/fl_vs_local.py --study fpb``: it separates "the base cannot learn the task" from "the
study's schedule does not teach it". Plain PyTorch: AdamW on the completion-only loss (the label word and eos,
as TRL's SFTTrainer computes it) over batches of ``--batch_size`` drawn with a seeded RNG from every record but
the study's held-out test split (the same 300 sentences, seed 42), then scored on that test split by the label
word's likelihood: the prediction is the label whose tokens (and eos) the model finds likeliest after the prompt,
so the output format does not have to be learnt first, unlike the study's generated-label scoring.

    python bench/fpb_learnability.py --model_name_or_path bench/results/tiny-llama-pretrained-seed0 \\
        --mode full --learning_rate 1e-3 --steps 600
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LABELS = ("negative", "neutral", "positive")
DATA = ROOT.parent / "shared" / "datasets" / "financial_phrasebank" / "fpb_50agree_instruction.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--mode", choices=("full", "lora"), default="full")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--test_size", type=int, default=300)
    parser.add_argument("--data", default=str(DATA))
    return parser.parse_args(argv)


def macro_f1(predictions: list[str], gold: list[str]) -> float:
    scores = []
    for label in LABELS:
        tp = sum(p == label == g for p, g in zip(predictions, gold, strict=True))
        wrong = sum((p == label) != (g == label) for p, g in zip(predictions, gold, strict=True))
        scores.append(2 * tp / (2 * tp + wrong) if tp else 0.0)
    return sum(scores) / len(scores)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedllm.data import apply_template

    args = parse(argv)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                 target_modules=TARGETS))
    records = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    random.Random(42).shuffle(records)
    test, train = records[: args.test_size], records[args.test_size:]

    def prompt_ids(record: dict[str, str]) -> list[int]:
        text = apply_template("chat", record["instruction"], record["input"], tokenizer=tokenizer)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_ids(label: str) -> list[int]:
        return tokenizer(label + tokenizer.eos_token, add_special_tokens=False)["input_ids"]

    examples = [(prompt_ids(r), completion_ids(r["output"])) for r in train]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=0.0)
    started = time.time()
    model.train()
    for step in range(args.steps):
        batch = random.Random(step).sample(examples, args.batch_size)
        width = max(len(p) + len(c) for p, c in batch)
        ids, labels, mask = [], [], []
        for p, c in batch:
            pad = width - len(p) - len(c)
            ids.append(p + c + [tokenizer.pad_token_id] * pad)
            labels.append([-100] * len(p) + c + [-100] * pad)
            mask.append([1] * (len(p) + len(c)) + [0] * pad)
        loss = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    model.eval()
    candidates = [completion_ids(label) for label in LABELS]
    predictions = []
    with torch.no_grad():
        for record in test:
            p = prompt_ids(record)
            scores = []
            for c in candidates:
                logprobs = model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
                scores.append(sum(logprobs[len(p) - 1 + i, token].item() for i, token in enumerate(c)))
            predictions.append(LABELS[max(range(len(LABELS)), key=scores.__getitem__)])
    gold = [r["output"] for r in test]
    print(json.dumps({
        "mode": args.mode, "learning_rate": args.learning_rate, "steps": args.steps, "batch_size": args.batch_size,
        "accuracy": round(sum(p == g for p, g in zip(predictions, gold, strict=True)) / len(gold), 3),
        "macro_f1": round(macro_f1(predictions, gold), 3), "predicted": {lb: predictions.count(lb) for lb in LABELS},
        "seconds": round(time.time() - started)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
