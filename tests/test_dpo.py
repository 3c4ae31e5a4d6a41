"""Federated DPO, the local evaluation split, real data formats, and LoRA target modules per architecture."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import requests
import torch
from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, Qwen2MoeConfig

from fedllm.adapter import adapter_spec, build_lora_config, default_target_modules, get_adapter_tensors
from fedllm.algorithms import CONTROL_PREFIX, InMemoryUpdate, get_algorithm, run_aggregation
from fedllm.client.trainer import REFERENCE_ADAPTER, LocalTrainer
from fedllm.config import ClientArguments, FederationArguments
from fedllm.data import write_demo_data
from fedllm.server.federation import Federation
from fedllm.server.store import Store
from fedllm.wire import decode_file

from .conftest import SHARED_DATASETS, run_client_process
from .test_integration import server_args

ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam")
ANSWERS = {"Name a fruit.": "apple", "Name an animal.": "dog", "Name a color.": "blue", "Name a number.": "three"}
WRONG = ["cat", "fish", "bird", "red", "green", "house", "water", "world"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model trains faster on one thread than on cores shared with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_preferences(path: Path, rows: int, seed: int) -> Path:
    """Easy, consistent pairs: the right answer is chosen, a random other word rejected."""
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        prompt = rng.choice(sorted(ANSWERS))
        lines.append(json.dumps({"prompt": prompt, "chosen": ANSWERS[prompt], "rejected": rng.choice(WRONG)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def make_federation(model_dir: Path, state_dir: Path, **overrides) -> Federation:
    settings = dict(model_name_or_path=str(model_dir), num_clients=1, sample_clients=1, peft_lora_r=4,
                    seq_length=64, learning_rate=2e-2, task="dpo")
    settings.update(overrides)
    Federation.initialize(FederationArguments(**settings), state_dir)
    return Federation(Store(state_dir))


def local_trainer(federation: Federation, data: Path, output_dir: Path, **overrides) -> LocalTrainer:
    args = ClientArguments(dataset_name=str(data), batch_size=4, output_dir=str(output_dir), quiet=True, **overrides)
    return LocalTrainer(federation.client_config(), args)


@pytest.fixture(scope="module")
def preferences(tmp_path_factory) -> Path:
    return write_preferences(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows=24, seed=0)


# --- DPO through LocalTrainer ---------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("reference", ["global", "base"])
def test_dpo_reference_is_the_round_global_or_the_base_model(reference, tiny_model_dir, preferences, tmp_path):
    federation = make_federation(tiny_model_dir, tmp_path / "state", dpo_reference=reference)
    trainer = local_trainer(federation, preferences, tmp_path / "out")
    global_tensors = decode_file(federation.latest_global().path)
    for round_number in (1, 2):
        result = trainer.train_round(global_tensors, round_number, 2e-2, 3)
        assert set(result.tensors) == set(federation.upload_spec)  # the trained 'default' adapter only
        assert all(".ref." not in name and torch.isfinite(t).all() for name, t in result.tensors.items())
        assert result.metrics["steps"] == 3 and 0 <= result.metrics["reward_accuracy"] <= 1
        assert {"train_loss", "final_loss", "reward_margin", "final_reward_accuracy"} <= set(result.metrics)
        if reference == "global":
            # A frozen copy of this round's global (refreshed every round), untouched by training.
            assert REFERENCE_ADAPTER in trainer.model.peft_config
            ref = get_adapter_tensors(trainer.model, REFERENCE_ADAPTER)
            assert all(torch.equal(ref[name], global_tensors[name]) for name in ref)
            assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if f".{REFERENCE_ADAPTER}." in n)
        else:
            assert REFERENCE_ADAPTER not in trainer.model.peft_config  # TRL disables the adapters instead
        global_tensors = {name: t + result.tensors.get(name, 0) for name, t in global_tensors.items()}


@pytest.mark.integration
@pytest.mark.parametrize("fed_alg", ALGORITHMS)
def test_every_algorithm_runs_dpo_rounds(fed_alg, tiny_model_dir, preferences, tmp_path):
    federation = make_federation(tiny_model_dir, tmp_path / "state", fed_alg=fed_alg)
    trainer = local_trainer(federation, preferences, tmp_path / "out", local_eval_fraction=0.25)
    calls = {"extra_loss": 0}
    extra_loss = trainer.hook.extra_loss

    def counting_extra_loss(params):
        calls["extra_loss"] += 1
        return extra_loss(params)

    trainer.hook.extra_loss = counting_extra_loss
    global_tensors = decode_file(federation.latest_global().path)
    result = trainer.train_round(global_tensors, 1, 2e-2, 2)
    assert set(result.tensors) == set(federation.upload_spec)
    assert calls["extra_loss"] == 2  # every training step, never in the evaluation before training
    if fed_alg == "scaffold":
        assert any(name.startswith(CONTROL_PREFIX) and t.abs().sum() > 0 for name, t in result.tensors.items())
    # The server side aggregates a DPO update like any other.
    algorithm = get_algorithm(fed_alg, federation.config)
    adapter = {k: v for k, v in global_tensors.items() if k in federation.spec}
    new_global, _ = run_aggregation(algorithm, adapter, [InMemoryUpdate("c", trainer.num_samples, result.tensors)],
                                    algorithm.init_state(adapter))
    assert set(new_global) == set(adapter) and all(torch.isfinite(t).all() for t in new_global.values())


@pytest.mark.integration
def test_eval_loss_is_the_global_adapters_before_training(tiny_model_dir, tmp_path):
    federation = make_federation(tiny_model_dir, tmp_path / "state", task="sft")
    data = write_demo_data(tmp_path / "data", num_clients=1, rows_per_client=16)[0]
    trainer = local_trainer(federation, data, tmp_path / "out", local_eval_fraction=0.25)
    assert trainer.num_samples == 12  # the held-out quarter is not trained on, nor counted
    global_tensors = decode_file(federation.latest_global().path)
    first = trainer.train_round(global_tensors, 1, 2e-2, 2).metrics
    again = trainer.train_round(global_tensors, 2, 2e-2, 2).metrics
    assert first["eval_samples"] == 4 and math.isfinite(first["eval_loss"]) and first["eval_loss"] > 0
    # The same global gives the same held-out loss: it is measured before training, not after.
    assert again["eval_loss"] == pytest.approx(first["eval_loss"], abs=1e-5)


@pytest.mark.integration
def test_dpo_eval_loss_is_against_the_base_model(tiny_model_dir, preferences, tmp_path):
    federation = make_federation(tiny_model_dir, tmp_path / "state")  # dpo_reference=global
    trainer = local_trainer(federation, preferences, tmp_path / "out", local_eval_fraction=0.25)
    global_tensors = decode_file(federation.latest_global().path)
    first = trainer.train_round(global_tensors, 1, 2e-2, 4)
    # The initial global equals the base model (lora_B = 0): every margin is 0, the loss log 2.
    assert first.metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    trained = {name: t + first.tensors.get(name, 0) for name, t in global_tensors.items()}
    second = trainer.train_round(trained, 2, 2e-2, 4).metrics
    # Against the round's own reference it would be log 2 again; against the base it shows the learning.
    assert second["eval_loss"] < math.log(2) - 0.1 and second["eval_reward_accuracy"] > 0.5


def test_hold_out_fraction_must_be_below_one(tiny_model_dir, preferences, tmp_path):
    federation = make_federation(tiny_model_dir, tmp_path / "state")
    with pytest.raises(ValueError, match="local_eval_fraction"):
        local_trainer(federation, preferences, tmp_path / "out", local_eval_fraction=1.0)


# --- real data (../shared/datasets) ---------------------------------------------------------------------------

HH_RLHF = SHARED_DATASETS / "hh_rlhf_harmless_base_test"
SFT_DATA = {
    "dolly": ("dolly15k_fed10/local_training_0.json", None),
    "alpaca": ("alpaca_5000/alpaca_5000.json", None),
    "fpb": ("financial_phrasebank/fpb_50agree_instruction.jsonl", None),
    "gsm8k": ("gsm8k/train.jsonl", "question=instruction,answer=output"),
}


@pytest.fixture(scope="module")
def sft_federations(tiny_model_dir, tmp_path_factory) -> dict[str, Federation]:
    """One SFT federation per template (the template is a federation setting)."""
    return {template: make_federation(tiny_model_dir, tmp_path_factory.mktemp(f"sft-{template}"), task="sft",
                                      template=template, seq_length=512)
            for template in ("alpaca", "vicuna_v1.1", "chat")}


@pytest.mark.integration
@pytest.mark.parametrize("template", ["alpaca", "vicuna_v1.1", "chat"])
@pytest.mark.parametrize("name", sorted(SFT_DATA))
def test_sft_round_on_real_data(name, template, sft_federations, tmp_path):
    relative, field_map = SFT_DATA[name]
    path = SHARED_DATASETS / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (the real datasets live in ../shared/datasets)")
    federation = sft_federations[template]
    trainer = local_trainer(federation, path, tmp_path, dataset_sample=8, field_map=field_map)
    result = trainer.train_round(decode_file(federation.latest_global().path), 1, 1e-2, 2)
    assert set(result.tensors) == set(federation.upload_spec)
    assert all(torch.isfinite(t).all() for t in result.tensors.values())
    assert result.metrics["steps"] == 2 and math.isfinite(result.metrics["train_loss"])


@pytest.mark.integration
@pytest.mark.parametrize("file_name", ["test.jsonl", "test_prompt_chosen_rejected.jsonl"])
def test_dpo_round_on_hh_rlhf(file_name, tiny_model_dir, tmp_path):
    if not HH_RLHF.exists():
        pytest.skip(f"{HH_RLHF} is absent (the real datasets live in ../shared/datasets)")
    federation = make_federation(tiny_model_dir, tmp_path / "state", seq_length=128)
    trainer = local_trainer(federation, HH_RLHF / file_name, tmp_path / "out", dataset_sample=16)
    result = trainer.train_round(decode_file(federation.latest_global().path), 1, 1e-2, 2)
    assert set(result.tensors) == set(federation.upload_spec)
    assert all(torch.isfinite(t).all() for t in result.tensors.values())
    assert any(t.abs().sum() > 0 for t in result.tensors.values())
    assert math.isfinite(result.metrics["train_loss"]) and "reward_accuracy" in result.metrics


# --- LoRA target modules per architecture (meta device, no weights) -------------------------------------------

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=128)


def _targets(model_config, target_modules=None) -> set[str]:
    lora = build_lora_config(model_config, r=2, alpha=4, dropout=0.0, target_modules=target_modules)
    return {name.split(".")[-3] for name in adapter_spec(model_config, lora)}


@pytest.mark.parametrize(("model_config", "expected"), [
    (LlamaConfig(**TINY), {"q_proj", "v_proj"}),
    (MistralConfig(**TINY), {"q_proj", "v_proj"}),
    (Qwen2Config(**TINY), {"q_proj", "v_proj"}),
    (GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0),
     {"c_attn"}),
    # Not in our table: PEFT's own mapping decides.
    (OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=128,
               word_embed_proj_dim=32), {"q_proj", "v_proj"}),
])
@pytest.mark.filterwarnings("ignore:fan_in_fan_out")  # PEFT sets it itself for GPT-2's Conv1D
def test_default_target_modules_per_architecture(model_config, expected):
    assert _targets(model_config) == expected


def test_target_modules_override_and_unknown_architectures():
    assert _targets(LlamaConfig(**TINY), ["q_proj", "k_proj", "o_proj"]) == {"q_proj", "k_proj", "o_proj"}
    assert default_target_modules(LlamaConfig(**TINY)) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="--target_modules"):
        default_target_modules(Qwen2MoeConfig(**TINY))  # in neither our table nor PEFT's


# --- over HTTP: run_server.sh (gunicorn) and real client processes ----------------------------------------------


def client_command(server, name: str, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--server_url", server.url, "--client_id", name, "--dataset_name", str(data), "--batch_size", "4",
            "--output_dir", str(output_dir), "--quiet", "true", "--poll_interval", "0.2", "--max_poll_interval", "1",
            *extra]


@pytest.mark.integration
def test_two_client_dpo_federation_learns_the_preferences(tiny_model_dir, tmp_path, start_server):
    server = start_server(server_args(tiny_model_dir, tmp_path / "state", task="dpo", num_clients=2, sample_clients=2,
                                      num_rounds=2, max_steps=4, learning_rate=2e-2, seq_length=64))
    names = ["alice", "bob"]
    procs = [
        run_client_process(
            client_command(server, name, write_preferences(tmp_path / f"{name}.jsonl", rows=24, seed=i),
                           tmp_path / name, "--local_eval_fraction", "0.25"),
            tmp_path / f"{name}.log", env={"OMP_NUM_THREADS": "1"},
        )
        for i, name in enumerate(names)
    ]
    # A third data owner with a malformed file stops before joining: a clear message and exit code 2.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Name a fruit.", "chosen": "apple", "rejected": "cat"}) + "\n"
                   + json.dumps({"prompt": "Name a fruit.", "chosen": 5, "rejected": "cat"}) + "\n")
    mallory = run_client_process(client_command(server, "mallory", bad, tmp_path / "mallory"), tmp_path / "mallory.log",
                                 env={"OMP_NUM_THREADS": "1"})
    assert mallory.wait(timeout=300) == 2
    log = (tmp_path / "mallory.log").read_text()
    assert "bad.jsonl row 2: field 'chosen'" in log and "fields found" in log, log[-2000:]
    assert "Traceback" not in log
    for name, proc in zip(names, procs, strict=True):
        assert proc.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:] + server.log()[-3000:]

    history = requests.get(server.url + "/v1/history", headers={"X-FedLLM-Client": "alice"}, timeout=30).json()
    assert [h["round"] for h in history] == [1, 2]
    for record in history:
        assert sorted(record["metrics"]) == names
        for metrics in record["metrics"].values():
            assert {"train_loss", "reward_accuracy", "reward_margin", "final_reward_accuracy", "eval_loss",
                    "eval_samples"} <= set(metrics)
    first, second = ([record["metrics"][name] for name in names] for record in history)
    # Held-out DPO loss of the global adapter against the base model: log 2 at the start, lower after a round.
    assert all(m["eval_loss"] == pytest.approx(math.log(2), abs=1e-4) for m in first)
    assert all(m["eval_loss"] < math.log(2) - 0.1 and m["eval_reward_accuracy"] > 0.5 for m in second)
    # Within each round the pairs are learnt: the last step prefers the chosen answers.
    assert all(m["final_loss"] < m["train_loss"] < math.log(2) + 1e-3 for m in first)
    assert (tmp_path / "state" / "adapters" / "final" / "adapter_model.safetensors").exists()
