"""``fedllm evaluate``: a base model plus an adapter on a dataset; prints the results as JSON and writes
--output_file (``evaluate.py``).

    fedllm evaluate --state_dir runs/fedavg/state --dataset_name ../shared/datasets/dolly15k_fed10/global_test.json
    fedllm evaluate --adapter out/final_adapter --metrics classification --max_new_tokens 8 \\
        --dataset_name ../shared/datasets/financial_phrasebank/fpb_50agree_instruction.jsonl --max_samples 500
    fedllm evaluate --model_name_or_path M --metrics gsm8k --max_new_tokens 256 \\
        --dataset_name ../shared/datasets/gsm8k/test.jsonl --field_map "question=instruction,answer=output"

Metrics: loss (perplexity), classification, gsm8k, rouge, refusal. Options: fedllm/config.py
(EvaluationArguments); docs/simulation.md.
"""

from __future__ import annotations

import json
import sys

from ..config import EvaluationArguments
from . import EXIT_OK, EXIT_USAGE, parse_options


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_options((EvaluationArguments,), argv)
    from ..data import DataFormatError
    from ..evaluation import run_evaluation

    try:
        report = run_evaluation(args)
    except (DataFormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps({k: v for k, v in report.items() if k != "predictions"}, indent=2, ensure_ascii=False))
    if args.output_file:
        print(f"results written to {args.output_file}", file=sys.stderr)
    return EXIT_OK
