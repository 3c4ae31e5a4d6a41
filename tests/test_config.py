"""Options: the algorithms' hyperparameter ranges, identity vs operational changes, parsing, ``python config.py``."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.algorithms import BUILTIN_CONFIGS, AlgorithmConfig, FedOptMomentsConfig, KrumConfig
from fedllm.config import (
    OPERATIONAL_OPTIONS,
    FederationArguments,
    FederationIdentityArguments,
    ServerArguments,
    federation_changes,
    parse_args,
)
from fedllm.privacy.config import PrivacyArguments
from fedllm.secagg.config import SecAggArguments
from fedllm.split.config import SplitArguments

ROOT = Path(__file__).resolve().parents[1]

# GET /v1/config's "federation" and the state DB hold these keys (and clients build FederationArguments from
# them): the options and defaults before the hyperparameters moved to the algorithms' dataclasses, plus
# max_control_norm and the privacy options (added later: a state dir without them reads as their defaults).
SERVED_DEFAULTS = {
    "model_name_or_path": None, "task": "sft", "template": "alpaca", "seq_length": 512, "peft_lora_r": 8,
    "peft_lora_alpha": 16, "peft_lora_dropout": 0.05, "target_modules": None, "fed_alg": "fedavg", "num_clients": 2,
    "sample_clients": 2, "num_rounds": 10, "round_timeout": 3600.0, "min_fit_clients": 1, "on_insufficient": "extend",
    "seed": 2023, "max_steps": 10, "learning_rate": 2e-05, "lr_schedule": "constant", "min_learning_rate": 1e-06,
    "wire_dtype": "float32", "prox_mu": 0.01, "server_momentum": 0.9, "server_lr": 1.0, "fedopt_eta": 0.001,
    "fedopt_tau": 0.001, "fedopt_beta1": 0.9, "fedopt_beta2": 0.99, "trim_ratio": 0.1, "krum_malicious": 1,
    "krum_keep": 1, "kseed_k": 4096, "kseed_epsilon": 1e-3, "kseed_pro": False, "kseed_lora": False,
    "max_update_norm": 0.0, "dpo_beta": 0.1, "dpo_reference": "global", "save_model_freq": 10,
    "max_control_norm": 1e6,
    # differential privacy (fedllm/privacy/config.py), off by default
    "secure_aggregation": "off", "secagg_threshold": 0.5, "secagg_neighbours": 0, "secagg_bits": 32,
    "secagg_clip": 1.0,
    "dp": "off", "dp_clip_norm": "1.0", "dp_noise_multiplier": 1.0, "dp_delta": None, "dp_target_epsilon": None,
    "dp_target_quantile": 0.5, "dp_clip_learning_rate": 0.2, "dp_initial_clip_norm": 0.1,
    "dp_clipped_count_stddev": None, "client_sampling": "uniform",
    "fed_mode": "lora", "split_head_layers": 2, "split_tail_layers": 2, "split_activation_noise": 0.0,
    "split_gradient_clip": 0.0, "split_gradient_noise": 0.0, "split_private_ends": False, "split_batch_wait": 0.0,
    "split_sequence_chunk": 0,
    # compressed updates and the communication budget (fedllm/compression/config.py), off by default
    "update_compression": "none", "compression_block_size": 128, "topk_fraction": 0.01, "communication_budget_mb": 0.0,
}


def federation(**overrides) -> FederationArguments:
    return FederationArguments(**{"model_name_or_path": "m", "num_clients": 10, "sample_clients": 5, **overrides})


def refused(config: FederationArguments) -> str:
    with pytest.raises(ValueError) as info:
        config.validate()
    return str(info.value)


# ---------------------------------------------------------------- ranges


@pytest.mark.parametrize(("fed_alg", "overrides", "message"), [
    ("fedadam", {"fedopt_tau": 0.0}, "--fedopt_tau must be > 0, got 0.0"),
    ("fedadagrad", {"fedopt_tau": -1e-3}, "--fedopt_tau must be > 0, got -0.001"),
    ("fedyogi", {"fedopt_tau": float("nan")}, "--fedopt_tau must be a finite number > 0, got nan"),
    ("fedadam", {"fedopt_eta": 0.0}, "--fedopt_eta must be > 0, got 0.0"),
    ("fedadagrad", {"fedopt_eta": float("inf")}, "--fedopt_eta must be a finite number > 0, got inf"),
    ("fedadam", {"fedopt_beta1": 1.0}, "--fedopt_beta1 must be in [0, 1), got 1.0"),
    ("fedyogi", {"fedopt_beta1": -0.1}, "--fedopt_beta1 must be in [0, 1), got -0.1"),
    ("fedadam", {"fedopt_beta2": 1.0}, "--fedopt_beta2 must be in [0, 1), got 1.0"),
    ("fedyogi", {"fedopt_beta2": 1.5}, "--fedopt_beta2 must be in [0, 1), got 1.5"),
    ("fedavgm", {"server_momentum": 1.0}, "--server_momentum must be in [0, 1), got 1.0"),
    ("fedavgm", {"server_momentum": -0.5}, "--server_momentum must be in [0, 1), got -0.5"),
    ("fedavgm", {"server_lr": 0.0}, "--server_lr must be > 0, got 0.0"),
    ("fedprox", {"prox_mu": -0.01}, "--prox_mu must be >= 0, got -0.01"),
    ("fedtrimmedavg", {"trim_ratio": 0.5}, "--trim_ratio must be in [0, 0.5), got 0.5"),
    ("fedtrimmedavg", {"trim_ratio": -0.1}, "--trim_ratio must be in [0, 0.5), got -0.1"),
    ("krum", {"krum_malicious": -1}, "--krum_malicious must be >= 0, got -1"),
    ("krum", {"krum_keep": 0}, "--krum_keep must be >= 1, got 0"),
    ("krum", {"sample_clients": 4}, "--sample_clients must be > 2 * --krum_malicious + 2 = 4 for --fed_alg krum"),
    ("krum", {"krum_malicious": 0, "sample_clients": 2}, "--sample_clients must be > 2 * --krum_malicious + 2 = 2"),
    ("krum", {"krum_keep": 5}, "--krum_keep must be <= --sample_clients - --krum_malicious = 4, got 5"),
    ("fedavg", {"max_update_norm": -1.0}, "--max_update_norm must be >= 0, got -1.0"),
    ("krum", {"max_update_norm": float("nan")}, "--max_update_norm must be a finite number >= 0, got nan"),
])
def test_out_of_range_hyperparameters_are_refused_naming_the_flag_and_the_range(fed_alg, overrides, message):
    assert message in refused(federation(fed_alg=fed_alg, **overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"task": "dpo", "dpo_beta": 0.0}, "--dpo_beta must be > 0, got 0.0"),
    ({"learning_rate": 0.0}, "--learning_rate must be > 0, got 0.0"),
    ({"min_learning_rate": -1e-6}, "--min_learning_rate must be >= 0, got -1e-06"),
    ({"peft_lora_r": 0}, "--peft_lora_r must be >= 1, got 0"),
    ({"peft_lora_alpha": 0}, "--peft_lora_alpha must be > 0, got 0"),
    ({"peft_lora_dropout": 1.0}, "--peft_lora_dropout must be in [0, 1), got 1.0"),
    ({"seq_length": 0}, "--seq_length must be >= 1, got 0"),
    ({"max_steps": 0}, "--max_steps must be >= 1, got 0"),
    ({"num_rounds": 0}, "--num_rounds must be >= 1, got 0"),
    ({"round_timeout": -1.0}, "--round_timeout must be >= 0, got -1.0"),
    ({"save_model_freq": -1}, "--save_model_freq must be >= 0, got -1"),
    ({"sample_clients": 11}, "--sample_clients must be in [1, --num_clients = 10], got 11"),
    ({"min_fit_clients": 6}, "--min_fit_clients must be in [1, --sample_clients = 5], got 6"),
    ({"model_name_or_path": None}, "--model_name_or_path is required"),
    ({"wire_dtype": "int8"}, "--wire_dtype must be one of float32, bfloat16, float16, got 'int8'"),
    ({"template": "llama"}, "--template must be one of alpaca, vicuna_v1.1, chat, got 'llama'"),
    ({"fed_alg": "fedsgd"}, "unknown --fed_alg 'fedsgd'; available: fedadagrad, fedadam, fedavg"),
])
def test_out_of_range_federation_settings_are_refused(overrides, message):
    assert message in refused(federation(**overrides))


def test_every_problem_is_reported_at_once():
    message = refused(federation(fed_alg="fedadam", learning_rate=0.0, fedopt_tau=0.0))
    assert "--learning_rate must be > 0" in message and "--fedopt_tau must be > 0" in message


@pytest.mark.parametrize(("fed_alg", "overrides"), [
    ("fedadam", {"fedopt_tau": 1e-12, "fedopt_beta1": 0.0, "fedopt_beta2": 0.0}),
    ("fedavgm", {"server_momentum": 0.0, "server_lr": 1e-9}),
    ("fedprox", {"prox_mu": 0.0}),
    ("fedtrimmedavg", {"trim_ratio": 0.0}),
    ("fedtrimmedavg", {"trim_ratio": 0.49}),
    ("krum", {"krum_malicious": 0, "sample_clients": 3, "krum_keep": 3}),
    ("krum", {"krum_malicious": 1, "sample_clients": 5, "krum_keep": 4}),
    ("fedavg", {"max_update_norm": 0.0}),
])
def test_values_at_the_edges_of_their_ranges_are_accepted(fed_alg, overrides):
    federation(fed_alg=fed_alg, **overrides).validate()


# Out of range for the algorithm they belong to; in force only when it is --fed_alg.
FOREIGN = {"fedopt_tau": 0.0, "fedopt_beta1": 1.0, "server_momentum": 1.0, "server_lr": 0.0, "prox_mu": -1.0,
           "trim_ratio": 0.7, "krum_keep": 0, "krum_malicious": -1}


def test_only_the_chosen_algorithms_hyperparameters_are_validated():
    # Krum's default f = 1 would need 5 clients per round; a FedAvg federation of 2 does not care.
    FederationArguments(model_name_or_path="m", fed_alg="fedavg", num_clients=2, sample_clients=2).validate()
    FederationArguments(model_name_or_path="m", fed_alg="fedavg", dpo_beta=0.0).validate()  # --task sft
    for fed_alg in BUILTIN_CONFIGS:
        config = federation(fed_alg=fed_alg, **FOREIGN)
        own = {f.name for f in dataclasses.fields(BUILTIN_CONFIGS[fed_alg])} & set(FOREIGN)
        if own:
            assert re.match(rf"--({'|'.join(own)}) must be", refused(config)), fed_alg
        else:
            config.validate()
    # FedAdagrad has no first moment, so no β's.
    federation(fed_alg="fedadagrad", fedopt_beta1=1.0, fedopt_beta2=1.0).validate()


def test_algorithm_hyperparameters_are_the_chosen_algorithms_dataclass():
    config = federation(fed_alg="fedyogi", fedopt_tau=0.02, fedopt_beta2=0.5, krum_keep=3)
    assert config.algorithm_hyperparameters() == FedOptMomentsConfig(
        max_update_norm=0.0, fedopt_eta=1e-3, fedopt_tau=0.02, fedopt_beta1=0.9, fedopt_beta2=0.5)
    assert federation(fed_alg="krum").algorithm_hyperparameters() == KrumConfig()
    assert type(federation(fed_alg="scaffold").algorithm_hyperparameters()) is AlgorithmConfig


def test_each_hyperparameter_is_a_federation_option_defined_once_by_its_algorithm():
    fields = {f.name: f for f in dataclasses.fields(FederationArguments)}
    for config in BUILTIN_CONFIGS.values():
        for f in dataclasses.fields(config):
            assert (fields[f.name].default, fields[f.name].metadata) == (f.default, f.metadata)


def test_a_refused_federation_leaves_no_state_dir(tmp_path):
    """server_http.py turns this ValueError into 'error: ...' and a non-zero exit."""
    from fedllm.server.federation import Federation

    with pytest.raises(ValueError, match=re.escape("--fedopt_tau must be > 0, got 0.0")):
        Federation.initialize(federation(fed_alg="fedadam", fedopt_tau=0.0), tmp_path / "state")
    assert not (tmp_path / "state").exists()


# ---------------------------------------------------------------- identity and operational changes


def stored(config: FederationArguments) -> dict:
    """The settings as the state DB holds them (JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def test_the_operational_options():
    assert OPERATIONAL_OPTIONS == {"num_rounds", "round_timeout", "min_fit_clients", "on_insufficient",
                                   "save_model_freq", "max_control_norm"}


def test_restarting_with_the_same_settings_changes_nothing():
    for fed_alg in BUILTIN_CONFIGS:
        config = federation(fed_alg=fed_alg)
        assert federation_changes(stored(config), config) == ({}, {})


def test_operational_changes():
    old = federation(fed_alg="fedadam")
    new = dataclasses.replace(old, num_rounds=20, round_timeout=60.0, min_fit_clients=2, on_insufficient="resample",
                              save_model_freq=5)
    assert federation_changes(stored(old), new) == ({}, {
        "num_rounds": (10, 20), "round_timeout": (3600.0, 60.0), "min_fit_clients": (1, 2),
        "on_insufficient": ("extend", "resample"), "save_model_freq": (10, 5),
    })


@pytest.mark.parametrize(("option", "value"), [
    ("model_name_or_path", "other"), ("task", "dpo"), ("template", "chat"), ("seq_length", 256), ("dpo_beta", 0.2),
    ("peft_lora_r", 16), ("peft_lora_alpha", 8), ("peft_lora_dropout", 0.1), ("target_modules", "q_proj"),
    ("fed_alg", "fedyogi"), ("num_clients", 12), ("sample_clients", 4), ("seed", 1), ("max_steps", 5),
    ("learning_rate", 1e-4), ("lr_schedule", "cosine"), ("min_learning_rate", 0.0), ("wire_dtype", "bfloat16"),
    ("max_update_norm", 1.0), ("fedopt_eta", 0.01), ("fedopt_tau", 0.01), ("fedopt_beta1", 0.5),
    ("fedopt_beta2", 0.5),
])
def test_identity_changes(option, value):
    old = federation(fed_alg="fedadam")
    new = dataclasses.replace(old, **{option: value})
    assert federation_changes(stored(old), new) == ({option: (getattr(old, option), value)}, {})


def test_another_algorithms_hyperparameters_change_nothing_computed():
    old = federation(fed_alg="fedadam")
    new = dataclasses.replace(old, prox_mu=0.5, krum_keep=3, trim_ratio=0.2, server_lr=0.5)
    identity, operational = federation_changes(stored(old), new)
    assert identity == {} and set(operational) == {"prox_mu", "krum_keep", "trim_ratio", "server_lr"}


def test_a_new_algorithm_brings_its_hyperparameters_into_identity():
    old = federation(fed_alg="fedavg")
    new = dataclasses.replace(old, fed_alg="fedprox", prox_mu=0.5, num_rounds=3)
    assert federation_changes(stored(old), new) == (
        {"fed_alg": ("fedavg", "fedprox"), "prox_mu": (0.01, 0.5)}, {"num_rounds": (10, 3)})


def test_options_an_older_state_dir_lacks_had_their_defaults():
    old = stored(federation())
    del old["dpo_reference"], old["save_model_freq"], old["max_update_norm"]
    assert federation_changes(old, federation()) == ({}, {})
    new = federation(dpo_reference="base", save_model_freq=1)
    assert federation_changes(old, new) == ({"dpo_reference": ("global", "base")}, {"save_model_freq": (10, 1)})


def test_every_option_is_identity_or_operational():
    identity = {f.name for f in dataclasses.fields(FederationIdentityArguments)}
    identity |= {f.name for f in dataclasses.fields(PrivacyArguments)}  # privacy changes what is computed
    identity |= {f.name for f in dataclasses.fields(SecAggArguments)}  # so does secure aggregation
    identity |= {f.name for f in dataclasses.fields(SplitArguments)}  # so does the cut of the model
    identity |= {"update_compression", "compression_block_size", "topk_fraction"}  # so does a lossy codec
    hyperparameters = {f.name for config in BUILTIN_CONFIGS.values() for f in dataclasses.fields(config)}
    assert identity | hyperparameters | OPERATIONAL_OPTIONS | {"communication_budget_mb"} == set(SERVED_DEFAULTS)
    assert not identity & OPERATIONAL_OPTIONS and not hyperparameters & (identity | OPERATIONAL_OPTIONS)
    assert federation_changes(stored(federation()), federation(dp="server")) == ({"dp": ("off", "server")}, {})
    assert federation_changes(stored(federation()), federation(fed_mode="split")) == (
        {"fed_mode": ("lora", "split")}, {})


# ---------------------------------------------------------------- parsing and the served dict


def test_the_served_dict_keeps_its_keys_and_defaults():
    assert dataclasses.asdict(FederationArguments()) == SERVED_DEFAULTS
    config = federation(fed_alg="krum", krum_keep=2, fedopt_tau=0.5)
    assert FederationArguments(**stored(config)) == config  # what a client builds from GET /v1/config


ALGORITHM_FLAGS = {
    "prox_mu": 0.5, "server_momentum": 0.5, "server_lr": 0.25, "fedopt_eta": 0.02, "fedopt_tau": 0.003,
    "fedopt_beta1": 0.8, "fedopt_beta2": 0.9, "trim_ratio": 0.2, "krum_malicious": 2, "krum_keep": 3,
    "max_update_norm": 1.5, "dpo_beta": 0.3, "dpo_reference": "base",
}
GENERAL_FLAGS = {"model_name_or_path": "some/model", "fed_alg": "fedyogi", "num_rounds": 7, "round_timeout": 60.0,
                 "sample_clients": 2}


def test_flags_and_config_files_give_the_same_values(tmp_path):
    values = {**GENERAL_FLAGS, **ALGORITHM_FLAGS}
    expected = FederationArguments(**values)
    argv = [token for name, value in values.items() for token in (f"--{name}", str(value))]
    from_flags, _ = parse_args((FederationArguments, ServerArguments), argv)
    assert from_flags == expected and isinstance(from_flags.krum_keep, int)

    yaml_file = tmp_path / "fed.yaml"
    yaml_file.write_text("".join(f"{name}: {value}\n" for name, value in values.items()))
    json_file = tmp_path / "fed.json"
    json_file.write_text(json.dumps(values))
    for path in (yaml_file, json_file):
        from_file, _ = parse_args((FederationArguments, ServerArguments), ["--config", str(path)])
        assert from_file == expected, path
    # PyYAML reads 3e-3 (no dot) as a string; it is converted like a flag.
    yaml_file.write_text("fedopt_tau: 3e-3\n")
    from_file, _ = parse_args((FederationArguments, ServerArguments), ["--config", str(yaml_file), "--prox_mu", "0"])
    assert (from_file.fedopt_tau, from_file.prox_mu) == (0.003, 0.0)
    assert parse_args((FederationArguments,), [])[0] == FederationArguments()


# ---------------------------------------------------------------- python config.py


def test_config_py_prints_every_option_grouped_without_importing_torch():
    script = "import runpy, sys; runpy.run_path('config.py', run_name='__main__'); sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    sections = re.split(r"^== ", done.stdout, flags=re.M)[1:]
    assert [s.split(" (")[0] for s in sections] == [
        "Federation identity", "Federation, operational", "Algorithm hyperparameters", "Differential privacy",
        "Compression and communication budget", "Server", "Client",
        "Simulation", "Evaluation"]
    option = re.compile(r" +--(\w+) [A-Z]+$")  # an option's line: --name TYPE (help text follows, indented)
    options = {s.split(" (")[0]: {m[1] for m in map(option.match, s.splitlines()) if m} for s in sections}
    assert options["Federation identity"] == {f.name for f in dataclasses.fields(FederationIdentityArguments)}
    assert options["Federation, operational"] == OPERATIONAL_OPTIONS
    assert options["Server"] == {f.name for f in dataclasses.fields(ServerArguments)}
    assert options["Differential privacy"] == {f.name for f in dataclasses.fields(PrivacyArguments)}
    # Each algorithm's hyperparameters under its name; FedYogi and FedAdam share FedOpt's, plus the β's.
    by_names: dict[str, list[str]] = {}
    for line in sections[2].splitlines():
        if re.match(r"  \S", line):
            heading = by_names.setdefault(re.split(r" \(|:", line.strip())[0], [])
        elif match := option.match(line):
            heading.append(match[1])
    assert by_names == {
        "every algorithm": ["max_update_norm"], "fedprox": ["prox_mu"], "fedavgm": ["server_momentum", "server_lr"],
        "fedadagrad": ["fedopt_eta", "fedopt_tau"],
        "fedyogi, fedadam": ["fedopt_eta", "fedopt_tau", "fedopt_beta1", "fedopt_beta2"],
        "fedtrimmedavg": ["trim_ratio"], "krum": ["krum_malicious", "krum_keep"], "fedavg, scaffold, fedmedian": [],
        "fedkseed": ["kseed_k", "kseed_epsilon", "kseed_pro", "kseed_lora"],
    }
    assert "adaptivity τ > 0" in sections[2]  # with the help text


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"secure_aggregation": "secagg+", "update_compression": "int8"}, "a masked upload is a vector of the ring"),
    ({"secure_aggregation": "secagg+", "fed_mode": "split"}, "would not learn only the sum"),
    ({"fed_mode": "split", "fed_alg": "fedkseed"}, "FedKSeed tunes the whole model"),
    ({"fed_mode": "split", "fed_alg": "scaffold"}, "is not applied to the split step"),
    ({"fed_mode": "split", "update_compression": "int8"}, "uploads its ends' delta dense"),
    ({"fed_mode": "split", "fed_alg": "fedprox"}, "is not applied to the split step"),
])
def test_features_not_built_to_run_together_are_refused(overrides, reason):
    assert reason in refused(federation(**overrides))
