"""Tests of the data layer: formats, templates, TRL compatibility, error messages, splitting, demo data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedllm.data import (
    TEMPLATES,
    DataFormatError,
    apply_template,
    detect_format,
    load_dpo_dataset,
    load_records,
    load_sft_dataset,
    write_demo_data,
)
from fedllm.data.split import main as split_main
from fedllm.data.split import split_records
from fedllm.data.templates import ALPACA_SYSTEM, ALPACA_SYSTEM_WITH_INPUT, VICUNA_SYSTEM
from fedllm.tiny import build_tiny_llama, build_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"real datasets not available at {SHARED} (only in the project's workspace)"
)

ALPACA_NO_INPUT = f"{ALPACA_SYSTEM}\n\n### Instruction:\n{{}}\n\n### Response:\n"
ALPACA_INPUT = f"{ALPACA_SYSTEM_WITH_INPUT}\n\n### Instruction:\n{{}}\n\n### Input:\n{{}}\n\n### Response:\n"

# One record of every format, with the prompt parts and response(s) it must give.
SFT_CASES = {
    "alpaca": {"instruction": "Add.", "input": "2 3", "output": "5"},
    "dolly": {"instruction": "Add.", "context": "2 3", "response": "5", "category": "math"},
    "conversations": {"conversations": [{"from": "human", "value": "Add."}, {"from": "gpt", "value": "5"}]},
    "messages": {"messages": [{"role": "user", "content": "Add."}, {"role": "assistant", "content": "5"}]},
    "prompt_completion": {"prompt": "Add.", "completion": "5"},
    "text": {"text": "one two three"},
}
DPO_CASES = {
    "dpo_pairs": {"prompt": "Add.", "chosen": "5", "rejected": "6"},
    "hh_rlhf": {"chosen": "\n\nHuman: Add.\n\nAssistant: 5", "rejected": "\n\nHuman: Add.\n\nAssistant: 6"},
    "llamafactory_dpo": {
        "conversations": [{"from": "human", "value": "Add."}],
        "chosen": {"from": "gpt", "value": "5"},
        "rejected": {"from": "gpt", "value": "6"},
    },
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


# --- detection and conversion ---


@pytest.mark.parametrize("fmt", [*SFT_CASES, *DPO_CASES])
def test_detect_format(fmt):
    assert detect_format({**SFT_CASES, **DPO_CASES}[fmt]) == fmt


def test_detect_format_variants():
    assert detect_format({"instruction": "q", "output": "a"}) == "alpaca"  # FinGPT-style, no input
    assert detect_format({"instruction": "q", "input": "x", "chosen": "a", "rejected": "b"}) == "llamafactory_dpo"
    implicit = {"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]}
    assert detect_format(implicit) == "dpo_pairs"
    with pytest.raises(DataFormatError, match=r"no known format; fields found: \['foo'\]"):
        detect_format({"foo": 1})


@pytest.mark.parametrize("fmt", [f for f in SFT_CASES if f != "text"])
def test_sft_formats_convert(tmp_path, tok, fmt):
    ds = load_sft_dataset(write_jsonl(tmp_path / "d.jsonl", [SFT_CASES[fmt]] * 2), tokenizer=tok)
    assert ds.column_names == ["prompt", "completion"] and len(ds) == 2
    with_input = fmt in ("alpaca", "dolly")
    assert ds[0]["prompt"] == (ALPACA_INPUT.format("Add.", "2 3") if with_input else ALPACA_NO_INPUT.format("Add."))
    assert ds[0]["completion"] == "5" + tok.eos_token


def test_text_format(tmp_path, tok):
    ds = load_sft_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}, {"text": "c</s>"}]), tokenizer=tok)
    assert ds.column_names == ["text"]
    assert ds["text"] == ["a b</s>", "c</s>"]


def test_multi_turn_conversation(tmp_path, tok):
    turns = [("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello"), ("human", "Add 2 3"), ("gpt", "5")]
    sharegpt = {"conversations": [{"from": r, "value": v} for r, v in turns]}
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    openai = {"messages": [{"role": roles[r], "content": v} for r, v in turns]}
    for record in (sharegpt, openai):
        path = write_jsonl(tmp_path / "c.jsonl", [record])
        alpaca = load_sft_dataset(path, tokenizer=tok)[0]
        assert alpaca["prompt"] == (
            "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello</s>\n\n"
            "### Instruction:\nAdd 2 3\n\n### Response:\n"
        )
        assert alpaca["completion"] == "5</s>"
        vicuna = load_sft_dataset(path, tokenizer=tok, template="vicuna_v1.1")[0]
        assert vicuna["prompt"] == "Be brief. USER: Hi ASSISTANT: Hello</s>USER: Add 2 3 ASSISTANT:"
        assert vicuna["completion"] == " 5</s>"
        chat = load_sft_dataset(path, tokenizer=tok, template="chat")[0]
        assert chat["prompt"] == tok.apply_chat_template(
            openai["messages"][:-1], tokenize=False, add_generation_prompt=True
        )
        assert chat["completion"] == "5</s>"


def test_alpaca_system_and_history(tmp_path, tok):
    row = {"instruction": "Add 2 3", "output": "5", "system": "Be brief.", "history": [["Hi", "Hello"]]}
    ds = load_sft_dataset(write_jsonl(tmp_path / "h.jsonl", [row]), tokenizer=tok, template="vicuna_v1.1")
    assert ds[0]["prompt"] == "Be brief. USER: Hi ASSISTANT: Hello</s>USER: Add 2 3 ASSISTANT:"


def test_turns_after_last_assistant_are_dropped(tmp_path, tok):
    messages = [{"role": r, "content": c} for r, c in (("user", "q"), ("assistant", "a"), ("user", "x"))]
    ds = load_sft_dataset(write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}]), tokenizer=tok)
    assert ds[0]["prompt"] == ALPACA_NO_INPUT.format("q") and ds[0]["completion"] == "a</s>"


def test_field_map_and_sample(tmp_path, tok):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(50)]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    records = load_records(path, field_map="question=instruction, answer=output", dataset_sample=10, seed=3)
    assert len(records) == 10 and set(records[0]) == {"instruction", "output"}
    assert records == load_records(path, field_map="question=instruction,answer=output", dataset_sample=10, seed=3)
    assert records != load_records(path, field_map="question=instruction,answer=output", dataset_sample=10, seed=4)
    assert [int(r["instruction"][1:]) for r in records] == sorted(int(r["instruction"][1:]) for r in records)
    ds = load_sft_dataset(path, tokenizer=tok, field_map="question=instruction,answer=output", dataset_sample=10,
                          seed=3)
    assert ds["completion"] == [r["output"] + "</s>" for r in records]  # same sample as load_records
    with pytest.raises(ValueError, match="bad field_map"):
        load_records(path, field_map="question")


def test_file_kinds_and_folder(tmp_path):
    rows = [{"instruction": "q1", "output": "a1"}, {"instruction": "q2", "output": "a2"}]
    (tmp_path / "a.json").write_text(json.dumps({"data": rows[:1]}))
    (tmp_path / "b.json").write_text(json.dumps({"train": rows[1:]}))
    (tmp_path / "c.csv").write_text("instruction,output\nq3,a3\n")
    write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q4", "output": "a4"}])
    import datasets

    datasets.Dataset.from_list([{"instruction": "q5", "output": "a5"}]).to_parquet(str(tmp_path / "e.parquet"))
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r["instruction"] for r in load_records(str(tmp_path))] == ["q1", "q2", "q3", "q4", "q5"]
    (tmp_path / "lines.json").write_text('{"text": "x"}\n{"text": "y"}\n')  # JSON Lines named .json
    assert load_records(str(tmp_path / "lines.json")) == [{"text": "x"}, {"text": "y"}]


def test_hub_dataset_name(monkeypatch, tok):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"instruction": "q", "output": "a"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_sft_dataset("someone/some-data", tokenizer=tok)["completion"] == ["a</s>"]
    assert calls == [("someone/some-data", "train")]


# --- templates ---


def test_templates(tok):
    assert set(TEMPLATES) == {"alpaca", "vicuna_v1.1", "chat"}
    assert apply_template("alpaca", "Do it.") == ALPACA_NO_INPUT.format("Do it.")
    assert apply_template("alpaca", "Do it.", "now") == ALPACA_INPUT.format("Do it.", "now")
    assert apply_template("vicuna_v1.1", "Do it.") == f"{VICUNA_SYSTEM} USER: Do it. ASSISTANT:"
    assert apply_template("vicuna_v1.1", "Do it.", "now") == f"{VICUNA_SYSTEM} USER: Do it.\nnow ASSISTANT:"
    chat = apply_template("chat", "Do it.", tokenizer=tok)
    assert chat == "<|user|>\nDo it.</s>\n<|assistant|>\n"
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert apply_template("vicuna_v1.1", "Do it.", history=history) == (
        f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello USER: Do it. ASSISTANT:"  # no tokenizer: no eos between turns
    )
    with pytest.raises(ValueError, match="unknown template"):
        apply_template("llama9", "x")
    with pytest.raises(ValueError, match="chat_template"):
        apply_template("chat", "x")


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_prompt_is_a_token_prefix(tmp_path, tok, template):
    """TRL masks the prompt by its token count: the prompt must tokenize the same alone and with the completion."""
    rows = [{"instruction": "Count from 3", "input": "", "output": "3 4 5 6"}, SFT_CASES["alpaca"],
            {"instruction": "Say hi", "output": " hi there\n"}]
    ds = load_sft_dataset(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer=tok, template=template)
    for example in ds:
        assert example["completion"].endswith(tok.eos_token)
        prompt_ids = tok(example["prompt"])["input_ids"]
        assert tok(example["prompt"] + example["completion"])["input_ids"][: len(prompt_ids)] == prompt_ids


def test_chat_template_needs_a_chat_tokenizer(tmp_path, tok):
    plain = build_tokenizer()
    plain.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        load_sft_dataset(write_jsonl(tmp_path / "a.jsonl", [SFT_CASES["alpaca"]]), tokenizer=plain, template="chat")


# --- DPO ---


@pytest.mark.parametrize("fmt", list(DPO_CASES))
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_dpo_formats(tmp_path, tok, fmt, template):
    ds = load_dpo_dataset(write_jsonl(tmp_path / "p.jsonl", [DPO_CASES[fmt]]), tokenizer=tok, template=template)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    prefix = TEMPLATES[template].response_prefix
    assert ds[0] == {
        "prompt": apply_template(template, "Add.", tokenizer=tok),
        "chosen": f"{prefix}5</s>",
        "rejected": f"{prefix}6</s>",
    }


def test_dpo_variants(tmp_path, tok):
    user, a5, a6 = ({"role": r, "content": c} for r, c in (("user", "Add."), ("assistant", "5"), ("assistant", "6")))
    rows = [
        {"prompt": [user], "chosen": [a5], "rejected": [a6]},  # conversational
        {"chosen": [user, a5], "rejected": [user, a6]},  # implicit prompt
        {"prompt": "\n\nHuman: Add.\n\nAssistant:", "chosen": " 5", "rejected": " 6"},  # hh prompt string
    ]
    for i, row in enumerate(rows):
        ds = load_dpo_dataset(write_jsonl(tmp_path / f"{i}.jsonl", [row]), tokenizer=tok)
        assert ds[0] == {"prompt": ALPACA_NO_INPUT.format("Add."), "chosen": "5</s>", "rejected": "6</s>"}, row
    lf = {"instruction": "Add.", "input": "2 3", "chosen": "5", "rejected": "6"}
    ds = load_dpo_dataset(write_jsonl(tmp_path / "lf.jsonl", [lf]), tokenizer=tok)
    assert ds[0]["prompt"] == ALPACA_INPUT.format("Add.", "2 3")


def test_hh_split_at_last_common_assistant(tmp_path, tok):
    shared = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Add 2 3\n\nAssistant:"
    diverging_early = {  # the dialogues differ from an earlier assistant turn on: split there
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Add\n\nAssistant: 5",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Go away",
    }
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": shared + " 5", "rejected": shared + " 6"}, diverging_early])
    ds = load_dpo_dataset(path, tokenizer=tok, template="vicuna_v1.1")
    assert ds[0]["prompt"] == f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello</s>USER: Add 2 3 ASSISTANT:"
    assert (ds[0]["chosen"], ds[0]["rejected"]) == (" 5</s>", " 6</s>")
    assert ds[1]["prompt"] == f"{VICUNA_SYSTEM} USER: Hi ASSISTANT:"
    assert ds[1]["chosen"] == " Hey\n\nHuman: Add\n\nAssistant: 5</s>"


def test_task_mismatch(tmp_path, tok):
    dpo = write_jsonl(tmp_path / "pairs.jsonl", [DPO_CASES["dpo_pairs"]])
    with pytest.raises(DataFormatError, match=r"pairs.jsonl row 1: format 'dpo_pairs' is DPO data"):
        load_sft_dataset(dpo, tokenizer=tok)
    sft = write_jsonl(tmp_path / "sft.jsonl", [SFT_CASES["alpaca"]])
    with pytest.raises(DataFormatError, match="is SFT data"):
        load_dpo_dataset(sft, tokenizer=tok)


# --- TRL ---


@pytest.mark.integration
def test_sft_trainer_completion_only_loss(tmp_path, tok, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = write_demo_data(tmp_path / "data", num_clients=2, rows_per_client=8)
    dataset = load_sft_dataset(str(data[1]), tokenizer=tokenizer)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, bf16=False,
        gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no", max_length=128,
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels, input_ids = batch["labels"][0].tolist(), batch["input_ids"][0].tolist()
    n_prompt = len(tokenizer(dataset[0]["prompt"])["input_ids"])
    assert n_prompt > 0 and labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == input_ids[n_prompt:] == tokenizer(dataset[0]["completion"])["input_ids"]
    assert labels[-1] == tokenizer.eos_token_id
    result = trainer.train()
    assert result.global_step == 2 and result.training_loss > 0


# --- errors: one DataFormatError naming the file, the row and the fields ---


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"foo": 1, "bar": 2}],
         r"bad.jsonl row 1: no known format; fields found: \['foo', 'bar'\]; expected one of alpaca \(instruction"),
        ([SFT_CASES["alpaca"], SFT_CASES["alpaca"], {"instruction": "", "output": None}],
         r"bad.jsonl row 3: empty row .*; fields found: \['instruction', 'output'\]"),
        ([SFT_CASES["alpaca"], {"instruction": 7, "output": "a"}],
         r"bad.jsonl row 2: field 'instruction' must be a string, got int .*fields found: \['instruction', 'output'\]"),
        ([SFT_CASES["alpaca"], {"instruction": None, "output": "a"}],
         r"row 2: field 'instruction' must be a string, got NoneType"),
        ([SFT_CASES["alpaca"], {"instruction": "q"}],
         r"row 2: missing field 'output'; fields found: \['instruction'\]"),
        ([{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}],
         r"row 1: messages\[1\] has unknown role 'robot'"),
        ([{"messages": [{"role": "user", "content": "q"}]}], r"row 1: 'messages' has no assistant turn"),
        ([{"conversations": "q"}], r"row 1: field 'conversations' must be a non-empty list"),
    ],
)
def test_errors_name_file_row_and_fields(tmp_path, tok, rows, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataFormatError, match=expected):
        load_sft_dataset(path, tokenizer=tok)


def test_bad_json_and_missing_files(tmp_path, tok):
    bad_lines = tmp_path / "lines.jsonl"
    bad_lines.write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    with pytest.raises(DataFormatError, match=r"lines.jsonl row 3: invalid JSON"):
        load_records(str(bad_lines))
    bad_json = tmp_path / "list.json"
    bad_json.write_text('[\n{"text": "a"},\n{"text" "b"}\n]')
    with pytest.raises(DataFormatError, match=r"list.json: invalid JSON at line 3"):
        load_sft_dataset(str(bad_json), tokenizer=tok)
    (tmp_path / "scalars.json").write_text("[1]")
    with pytest.raises(DataFormatError, match=r"scalars.json row 1: expected a JSON object, got int"):
        load_records(str(tmp_path / "scalars.json"))
    with pytest.raises(DataFormatError, match="missing.jsonl: no such file"):
        load_sft_dataset(str(tmp_path / "missing.jsonl"), tokenizer=tok)
    (tmp_path / "latin1.csv").write_bytes("text\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin1.csv: not UTF-8"):
        load_records(str(tmp_path / "latin1.csv"))
    (tmp_path / "wide.csv").write_text("text\na,b\n")
    with pytest.raises(DataFormatError, match=r"wide.csv row 1: 1 columns in the header but more values"):
        load_records(str(tmp_path / "wide.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="folder has no"):
        load_records(str(tmp_path / "empty"))


def test_error_in_folder_names_the_file(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", [SFT_CASES["alpaca"]])
    write_jsonl(tmp_path / "b.jsonl", [SFT_CASES["alpaca"], {"question": "q", "answer": "a"}])
    with pytest.raises(DataFormatError, match=r"b.jsonl row 2: missing field 'instruction'"):
        load_sft_dataset(str(tmp_path), tokenizer=tok, dataset_sample=1)  # every row is checked, not just the sample


def test_format_override(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [SFT_CASES["dolly"]])
    with pytest.raises(DataFormatError, match="missing field 'output'"):
        load_sft_dataset(path, tokenizer=tok, dataset_format="alpaca")
    with pytest.raises(ValueError, match="unknown dataset_format"):
        load_sft_dataset(path, tokenizer=tok, dataset_format="nope")


# --- split ---


def _records(n: int = 120) -> list[dict]:
    return [{"id": i, "category": "abcdef"[i % 6] if i % 5 else "a"} for i in range(n)]


@pytest.mark.parametrize("strategy", ["iid", "dirichlet", "by_field"])
def test_split_partitions_deterministically(strategy):
    records = _records()
    clients = split_records(records, 4, strategy, field="category", alpha=0.3, seed=1)
    assert len(clients) == 4 and all(clients)
    assert sorted(r["id"] for client in clients for r in client) == list(range(len(records)))
    assert clients == split_records(records, 4, strategy, field="category", alpha=0.3, seed=1)
    assert clients != split_records(records, 4, strategy, field="category", alpha=0.3, seed=2)
    if strategy == "iid":
        assert {len(c) for c in clients} == {30}
    if strategy == "by_field":  # whole categories: each category lives on exactly one client
        owners = Counter(cat for client in clients for cat in {r["category"] for r in client})
        assert set(owners.values()) == {1}


def test_dirichlet_alpha_controls_skew():
    records = _records(600)

    def categories_per_client(alpha: float) -> float:
        clients = split_records(records, 6, "dirichlet", field="category", alpha=alpha, seed=0)
        return sum(len({r["category"] for r in c}) for c in clients) / len(clients)

    assert categories_per_client(0.05) < categories_per_client(100.0) == 6


def test_split_errors():
    with pytest.raises(ValueError, match="needs field"):
        split_records(_records(), 2, "dirichlet")
    with pytest.raises(ValueError, match="only 6 categories"):
        split_records(_records(), 8, "by_field", field="category")
    with pytest.raises(DataFormatError, match=r"record 2 has no value for field 'label'; fields found: \['text'\]"):
        split_records([{"label": "x"}, {"text": "y"}], 2, "by_field", field="label")
    with pytest.raises(ValueError, match="unknown strategy"):
        split_records(_records(), 2, "random")


def test_split_cli(tmp_path, capsys):
    source = write_jsonl(tmp_path / "all.jsonl", _records(60))
    out = tmp_path / "clients"
    split_main([source, "--num_clients", "3", "--strategy", "by_field", "--field", "category",
                "--output_dir", str(out)])
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["client", "records", "a", "b", "c", "d", "e", "f"]
    files = sorted(out.glob("client_*.jsonl"))
    assert [f.name for f in files] == ["client_0.jsonl", "client_1.jsonl", "client_2.jsonl"]
    assert sum(len(load_records(str(f))) for f in files) == 60
    with pytest.raises(SystemExit):
        split_main([str(tmp_path / "nope.jsonl"), "--num_clients", "2", "--output_dir", str(out)])
    assert "nope.jsonl: no such file" in capsys.readouterr().err


# --- demo data ---


def test_demo_data(tmp_path, tok):
    paths = write_demo_data(tmp_path / "a", num_clients=4, rows_per_client=32, seed=5)
    again = write_demo_data(tmp_path / "b", num_clients=4, rows_per_client=32, seed=5)
    other = write_demo_data(tmp_path / "c", num_clients=4, rows_per_client=32, seed=6)
    assert [p.name for p in paths] == [f"client_{i}.jsonl" for i in range(4)]
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert [p.read_bytes() for p in paths] != [p.read_bytes() for p in other]
    assert (tmp_path / "a" / "held_out.jsonl").read_bytes() == (tmp_path / "b" / "held_out.jsonl").read_bytes()
    families = [{r["category"] for r in load_records(str(p))} for p in paths]
    assert all(len(f) == 1 for f in families) and len(set.union(*families)) == 4  # non-IID: one family per client
    held_out = load_records(str(tmp_path / "a" / "held_out.jsonl"))
    assert {r["category"] for r in held_out} == set.union(*families)
    for path in paths:
        ds = load_sft_dataset(str(path), tokenizer=tok)
        assert len(ds) == 32 and all(len(c.split()) <= 4 for c in ds["completion"])


# --- real datasets (only where ../shared/datasets exists) ---


@needs_shared
@pytest.mark.parametrize(
    ("path", "field_map"),
    [
        ("dolly15k_fed10/local_training_0.json", None),
        ("alpaca_5000/alpaca_5000.json", None),
        ("financial_phrasebank/fpb_50agree_instruction.jsonl", None),
        ("gsm8k/train.jsonl", "question=instruction,answer=output"),
    ],
)
def test_real_sft_datasets(tok, path, field_map):
    for template in TEMPLATES:
        ds = load_sft_dataset(str(SHARED / path), tokenizer=tok, template=template, field_map=field_map,
                              dataset_sample=20, seed=1)
        assert len(ds) == 20 and ds.column_names == ["prompt", "completion"]
        assert all(c.endswith(tok.eos_token) for c in ds["completion"])


@needs_shared
def test_real_hh_rlhf(tok):
    dialogues = load_dpo_dataset(str(SHARED / "hh_rlhf_harmless_base_test/test.jsonl"), tokenizer=tok,
                                 dataset_sample=20, seed=1)
    split = load_dpo_dataset(str(SHARED / "hh_rlhf_harmless_base_test/test_prompt_chosen_rejected.jsonl"),
                             tokenizer=tok, dataset_sample=20, seed=1)
    assert len(dialogues) == 20 and dialogues.column_names == ["prompt", "chosen", "rejected"]
    assert dialogues.to_list() == split.to_list()  # the full dialogues split the same way as the derived file
    assert all(p.endswith("### Response:\n") for p in dialogues["prompt"])
    assert all(c.endswith(tok.eos_token) for c in [*dialogues["chosen"], *dialogues["rejected"]])
