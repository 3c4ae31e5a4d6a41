"""Evaluation of a base model plus an adapter (``evaluate.py``): loss/perplexity and generation-based metrics.

:mod:`fedllm.evaluation.metrics` holds the metrics as pure functions; :mod:`fedllm.evaluation.evaluator`
the model side (loss on response tokens, batched greedy generation) and :func:`run_evaluation`.
"""

from .evaluator import (
    GENERATION_METRICS,
    METRICS,
    Evaluator,
    Example,
    evaluate,
    load_examples,
    parse_metrics,
    run_evaluation,
)
from .metrics import (
    REFUSAL_KEYWORDS,
    classification_scores,
    exact_match,
    extract_final_answer,
    extract_label,
    is_refusal,
    perplexity,
    refusal_rate,
    rouge_l,
    rouge_n,
    rouge_scores,
)

__all__ = [
    "GENERATION_METRICS", "METRICS", "REFUSAL_KEYWORDS", "Evaluator", "Example", "classification_scores", "evaluate",
    "exact_match", "extract_final_answer", "extract_label", "is_refusal", "load_examples", "parse_metrics",
    "perplexity", "refusal_rate", "rouge_l", "rouge_n", "rouge_scores", "run_evaluation",
]
