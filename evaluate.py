#!/usr/bin/env python
"""Evaluate a base model plus an adapter on a dataset; prints the results as JSON and writes --output_file.

    python evaluate.py --state_dir runs/fedavg/state --dataset_name ../shared/datasets/dolly15k_fed10/global_test.json
    python evaluate.py --adapter out/final_adapter --metrics classification --max_new_tokens 8 \\
        --dataset_name ../shared/datasets/financial_phrasebank/fpb_50agree_instruction.jsonl --max_samples 500
    python evaluate.py --model_name_or_path M --metrics gsm8k --max_new_tokens 256 \\
        --dataset_name ../shared/datasets/gsm8k/test.jsonl --field_map "question=instruction,answer=output"

Metrics: loss (perplexity), classification, gsm8k, rouge, refusal. Options: fedllm/config.py
(EvaluationArguments); docs/simulation.md.
"""

from __future__ import annotations

import json
import sys

from fedllm.config import EvaluationArguments, parse_args


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_args((EvaluationArguments,), argv)
    from fedllm.data import DataFormatError
    from fedllm.evaluation import run_evaluation

    try:
        report = run_evaluation(args)
    except (DataFormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in report.items() if k != "predictions"}, indent=2, ensure_ascii=False))
    if args.output_file:
        print(f"results written to {args.output_file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
