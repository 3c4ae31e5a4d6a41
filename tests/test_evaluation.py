"""Evaluation: the metrics on hand-made cases with known answers, the loss against TRL's, and evaluate.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

import evaluate as evaluate_cli
from fedllm.data import load_sft_dataset, write_demo_data
from fedllm.evaluation import (
    Evaluator,
    classification_scores,
    evaluate,
    exact_match,
    extract_final_answer,
    extract_label,
    is_refusal,
    load_examples,
    parse_metrics,
    perplexity,
    refusal_rate,
    rouge_l,
    rouge_n,
    rouge_scores,
)
from fedllm.evaluation.metrics import lcs_length, tokenize

from .conftest import SHARED_DATASETS

# --- metrics: pure functions, answers worked out by hand ---


def test_rouge_on_hand_made_pairs():
    # Unigrams: the x2, cat, on, mat overlap (5 of 6 each side); bigrams: the cat, on the, the mat (3 of 5);
    # the LCS is "the cat on the mat" (5 of 6).
    assert rouge_n("the cat sat on the mat", "the cat is on the mat", 1) == pytest.approx(5 / 6)
    assert rouge_n("the cat sat on the mat", "the cat is on the mat", 2) == pytest.approx(3 / 5)
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # Unequal lengths: P = 6/8, R = 6/9 for ROUGE-1; the LCS "the quick brown jumps the" gives 5/8 and 5/9.
    pred, ref = "The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog"
    assert rouge_n(pred, ref, 1) == pytest.approx(2 * (6 / 8) * (6 / 9) / (6 / 8 + 6 / 9))
    assert rouge_l(pred, ref) == pytest.approx(2 * (5 / 8) * (5 / 9) / (5 / 8 + 5 / 9))
    assert rouge_n("a b", "a b", 2) == 1.0 and rouge_l("", "a b") == 0.0 and rouge_n("a", "a", 2) == 0.0
    assert rouge_scores(["a b c", "x"], ["a b c", "y"]) == {"rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5}
    assert tokenize("Hello, World! It's 2024.") == ["hello", "world", "it", "s", "2024"]
    assert lcs_length("abcbdab", "bdcaba") == 4  # the textbook example (CLRS)


def test_classification_accuracy_and_macro_f1():
    labels = ["negative", "neutral", "positive"]
    predicted = ["positive", "negative", "neutral", "positive", None]
    gold = ["positive", "negative", "positive", "neutral", "negative"]
    scores = classification_scores(predicted, gold, labels)
    # positive: tp 1, fp 1, fn 1 -> F1 1/2; negative: tp 1, fp 0, fn 1 -> 2/3; neutral: tp 0 -> 0.
    assert scores["accuracy"] == pytest.approx(2 / 5)
    assert scores["f1_positive"] == pytest.approx(0.5)
    assert scores["f1_negative"] == pytest.approx(2 / 3)
    assert scores["f1_neutral"] == 0.0
    assert scores["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 3)
    assert scores["unparsed"] == 1
    assert classification_scores(labels, labels, labels)["macro_f1"] == 1.0


def test_label_extraction():
    labels = ["negative", "neutral", "positive"]
    assert extract_label("The sentiment is Positive.", labels) == "positive"
    assert extract_label("negative, not positive", labels) == "negative"  # the first label mentioned
    assert extract_label("nonpositive outlook", labels) is None  # whole words only
    assert extract_label("", labels) is None


def test_gsm8k_final_answers_and_exact_match():
    assert extract_final_answer("She sells 9 eggs.\n#### 18") == "18"
    assert extract_final_answer("#### 1,234") == "1234"
    assert extract_final_answer("#### -3.50") == "-3.5"
    assert extract_final_answer("So the answer is $18.00.") == "18"  # no ####: the last number
    assert extract_final_answer("#### 18 apples, not 20") == "18"
    assert extract_final_answer("no number here") is None
    predictions = ["#### 18", "the answer is 17", "first 5, then 18", "nothing"]
    assert exact_match(predictions, ["#### 18", "#### 18", "18", "#### 0"]) == pytest.approx(2 / 4)
    assert exact_match([], []) == 0.0


def test_refusal_judge():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I\u2019m sorry")  # a typographic apostrophe
    assert is_refusal("As an AI language model, I will not do this.")
    assert not is_refusal("Sure, here is how to bake bread: mix flour and water.")
    assert refusal_rate(["I cannot do that.", "Here you go.", "i am unable to assist", "OK"]) == 0.5


def test_perplexity_and_metric_names():
    assert perplexity(0.0) == 1.0 and perplexity(math.log(10)) == pytest.approx(10)
    assert perplexity(1e6) == math.inf
    assert parse_metrics("loss, rouge") == ["loss", "rouge"]
    with pytest.raises(ValueError, match="unknown --metrics"):
        parse_metrics("loss,bleu")


# --- the model side ---


@pytest.fixture(scope="module")
def evaluator(tiny_model_dir) -> Evaluator:
    return Evaluator(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-data")
    write_demo_data(folder, num_clients=4, rows_per_client=40, seed=0)
    return folder / "held_out.jsonl"


def test_loss_is_trls_response_token_loss(evaluator, held_out, tmp_path):
    """The same examples as training (load_sft_dataset), tokenised, masked and truncated as TRL's SFTTrainer does."""
    from trl import SFTConfig, SFTTrainer

    examples = load_examples(str(held_out), tokenizer=evaluator.tokenizer)
    dataset = load_sft_dataset(str(held_out), tokenizer=evaluator.tokenizer)
    assert [e.prompt for e in examples] == dataset["prompt"] and [e.completion for e in examples] == dataset["completion"]
    seq_length = 40  # cuts some responses short and leaves some examples with no response token at all
    trainer = SFTTrainer(model=evaluator.model, train_dataset=dataset, processing_class=evaluator.tokenizer,
                         args=SFTConfig(output_dir=str(tmp_path), max_length=seq_length, report_to=[], use_cpu=True,
                                        disable_tqdm=True))
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in trainer.train_dataset:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += float(evaluator.model(input_ids=ids, labels=labels).loss) * n
            tokens += n
    result = evaluator.loss(examples, seq_length=seq_length, batch_size=3, progress=False)
    assert result["loss_examples"] == len(trainer.train_dataset) < len(examples)
    assert result["loss_skipped"] == len(examples) - len(trainer.train_dataset)
    assert result["loss_tokens"] == tokens
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


def test_batched_generation_equals_one_by_one(evaluator, held_out):
    """Left padding: a prompt's greedy continuation does not depend on the others in its batch."""
    prompts = [e.prompt for e in load_examples(str(held_out), tokenizer=evaluator.tokenizer)[:6]]
    prompts[1] = "Hi"  # much shorter than the rest: lots of padding in its batch
    batched = evaluator.generate(prompts, batch_size=6, max_new_tokens=6, progress=False)
    alone = [evaluator.generate([p], batch_size=1, max_new_tokens=6, progress=False)[0] for p in prompts]
    assert batched == alone
    assert evaluator.tokenizer.padding_side == "right"  # restored


def test_evaluate_scores_generations(evaluator, tmp_path):
    """A stub generator with known outputs: every generation metric computed from one pass."""
    data = tmp_path / "fpb.jsonl"
    rows = [("good news", "positive"), ("bad news", "negative"), ("some news", "neutral"), ("odd news", "neutral")]
    data.write_text("".join(json.dumps({"instruction": "Sentiment?", "input": s, "output": y}) + "\n" for s, y in rows))
    examples = load_examples(str(data), tokenizer=evaluator.tokenizer)

    class Stub:
        def generate(self, prompts, **kwargs):
            return ["Positive!", "I'm sorry, negative", "neutral", "no idea"][: len(prompts)]

    result = evaluate(Stub(), examples, ["classification", "rouge", "refusal", "gsm8k"], progress=False)
    metrics = result["metrics"]
    assert metrics["accuracy"] == 0.75 and metrics["unparsed"] == 1
    assert metrics["macro_f1"] == pytest.approx((1 + 1 + 2 / 3) / 3)  # neutral: tp 1, fn 1 -> 2/3
    assert metrics["refusal_rate"] == 0.25 and metrics["exact_match"] == 0.0
    # ROUGE-1: "i m sorry negative" vs "negative" has P 1/4, R 1, F1 0.4; "no idea" vs "neutral" 0.
    assert metrics["rouge1"] == pytest.approx((1 + 0.4 + 1 + 0) / 4)
    assert [p["label"] for p in result["predictions"]] == ["positive", "negative", "neutral", None]


def test_evaluate_cli_writes_json(tiny_model_dir, held_out, tmp_path, capsys):
    output = tmp_path / "results.json"
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(held_out), "--metrics", "loss,rouge",
            "--max_samples", "5", "--max_new_tokens", "4", "--seq_length", "64", "--output_file", str(output),
            "--save_predictions", "true"]
    assert evaluate_cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(output.read_text())
    assert printed["metrics"] == written["metrics"] and written["metrics"]["examples"] == 5
    assert written["adapter"] is None and len(written["predictions"]) == 5
    assert math.isfinite(written["metrics"]["loss"]) and 0 <= written["metrics"]["rougeL"] <= 1
    assert evaluate_cli.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(held_out),
                              "--metrics", "bleu"]) == 2


@pytest.mark.skipif(not (SHARED_DATASETS / "financial_phrasebank").is_dir(), reason="../shared/datasets is absent")
def test_real_datasets_load_for_each_metric(evaluator):
    """FPB (classification), GSM8K (exact match, with a field map) and HH-RLHF prompts (refusal) read as examples."""
    fpb = load_examples(str(SHARED_DATASETS / "financial_phrasebank" / "fpb_50agree_instruction.jsonl"),
                        tokenizer=evaluator.tokenizer, max_samples=20)
    assert len(fpb) == 20 and {e.reference for e in fpb} <= {"negative", "neutral", "positive"}
    gsm = load_examples(str(SHARED_DATASETS / "gsm8k" / "test.jsonl"), tokenizer=evaluator.tokenizer,
                        field_map="question=instruction,answer=output", max_samples=5)
    assert all(extract_final_answer(e.reference) for e in gsm)
    hh = load_examples(str(SHARED_DATASETS / "hh_rlhf_harmless_base_test" / "test_prompt_chosen_rejected.jsonl"),
                       tokenizer=evaluator.tokenizer, max_samples=5)
    assert all(e.prompt.endswith("### Response:\n") for e in hh)
