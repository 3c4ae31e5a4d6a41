"""Every option of fedllm, in one documented place.

Parsed with ``transformers.HfArgumentParser`` from flags or from a YAML/JSON file given as
``--config FILE`` (flags given as well override the file):

* :class:`FederationArguments` -- the federation's shared settings, set once on the server and served
  to every client (``GET /v1/config``); a client never overrides them. One flat set of options in
  three groups:

  - :class:`FederationIdentityArguments`: what the federation computes (model, task, LoRA, algorithm,
    local training). A server restarted on its state_dir must be given the same values.
  - :data:`AlgorithmArguments`: every algorithm's hyperparameters (``--prox_mu``, ``--fedopt_tau`` ...),
    each defined, documented and range-checked by its algorithm's dataclass
    (``fedllm/algorithms/*_config.py``). Those of ``--fed_alg`` are identity too; only they are validated.
  - :class:`~fedllm.privacy.config.PrivacyArguments`: differential privacy (``--dp`` ...), identity too.
  - :class:`~fedllm.secagg.config.SecAggArguments`: secure aggregation (``--secure_aggregation`` ...), identity too.
  - :class:`~fedllm.split.config.SplitArguments`: split learning (``--fed_mode split`` ...), identity too.
  - :class:`~fedllm.compression.config.CompressionArguments`: compressed updates (``--update_compression`` ...,
    identity) and the communication budget (``--communication_budget_mb``, operational).
  - :class:`FederationOperationalArguments`: how the federation is run (rounds, deadlines), which an
    operator may change when restarting it. :func:`federation_changes` tells the two kinds of change apart.

* :class:`ServerArguments` -- how the parameter server runs (state, network, auth).
* :class:`ClientArguments` -- local-only settings of one data owner (data, batch size, device).
* :class:`SimulationArguments`, :class:`EvaluationArguments` -- simulate.py; evaluate.py and export.py.

Argument names follow OpenFedLLM where it has one (``--fed_alg``, ``--num_clients``,
``--sample_clients``, ``--num_rounds``, ``--max_steps``, ``--peft_lora_r`` ...). This module imports no
torch (the algorithms' dataclasses do not need it), so that reading options stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .algorithms import BUILTIN_CONFIGS, AlgorithmConfig, algorithm_config_class, range_problem
from .compression.config import COMPRESSION_OPERATIONAL, CompressionArguments
from .privacy.config import PrivacyArguments
from .secagg.config import SecAggArguments
from .split.config import SPLIT_OPERATIONAL, SplitArguments
from .trackers import REPORT_TO_CHOICES

FEDERATION_ARGUMENT_NAMES: tuple[str, ...]  # filled in below the class

T = TypeVar("T")


def _default_workers() -> int:
    # Like gunicorn itself: WEB_CONCURRENCY when set, else 2.
    return int(os.environ.get("WEB_CONCURRENCY", "2"))


@dataclass
class FederationIdentityArguments:
    """What the federation computes. Fixed for the life of a state_dir: a server restarted on it with other
    values refuses to start."""

    # --- model and task ---
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base model: a Hugging Face model id or a local directory. The server "
                          "reads only its config; each client loads the weights."},
    )
    task: str = field(default="sft", metadata={"help": "Local training task.", "choices": ["sft", "dpo"]})
    template: str = field(
        default="alpaca",
        metadata={"help": "Prompt template applied by every client.", "choices": ["alpaca", "vicuna_v1.1", "chat"]},
    )
    seq_length: int = field(default=512, metadata={"help": "Maximum tokens per training example (>= 1)."})
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO beta > 0 (with --task dpo)."})
    dpo_reference: str = field(
        default="global",
        metadata={"help": "DPO reference policy: 'global' (the round's global adapter, frozen) or 'base' "
                          "(the base model without adapter, as OpenFedLLM). See docs/dpo.md.",
                  "choices": ["global", "base"]},
    )

    # --- LoRA ---
    peft_lora_r: int = field(default=8, metadata={"help": "LoRA rank (>= 1)."})
    peft_lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha > 0 (scaling = alpha / r)."})
    peft_lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout, in [0, 1)."})
    target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module names to adapt; default depends on the "
                          "architecture (q_proj,v_proj for Llama/Mistral/Qwen, c_attn for GPT-2)."},
    )

    # --- federation ---
    fed_alg: str = field(
        default="fedavg",
        metadata={"help": "Federated algorithm (fedllm.algorithms); its hyperparameters are the algorithm options."},
    )
    num_clients: int = field(default=2, metadata={"help": "Clients in the federation; round 1 starts when this many have joined."})
    sample_clients: int = field(default=2, metadata={"help": "Clients sampled per round (seeded), in [1, --num_clients]."})
    seed: int = field(default=2023, metadata={"help": "Seed for client sampling and the initial adapter."})

    # --- local training, set per round by the server ---
    max_steps: int = field(default=10, metadata={"help": "Local optimizer steps per round (>= 1)."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Local learning rate (round 1), > 0."})
    lr_schedule: str = field(
        default="constant",
        metadata={"help": "Learning rate across rounds: constant, or cosine from --learning_rate "
                          "down to --min_learning_rate over --num_rounds (OpenFedLLM's schedule).",
                  "choices": ["constant", "cosine"]},
    )
    min_learning_rate: float = field(default=1e-6, metadata={"help": "Final learning rate of the cosine schedule (>= 0)."})

    # --- wire ---
    wire_dtype: str = field(
        default="float32",
        metadata={"help": "Dtype of tensors on the wire; aggregation is always float32.",
                  "choices": ["float32", "bfloat16", "float16"]},
    )


def _algorithm_arguments() -> type:
    """Every built-in algorithm's hyperparameters as one flat dataclass of federation options.

    Each option is defined once, by its algorithm's dataclass, and keeps its default and help there; one
    inherited (``--max_update_norm`` by all, FedOpt's by FedYogi's and FedAdam's) is the same field.
    """
    options: dict[str, tuple[dataclasses.Field, Any]] = {}  # name -> (its field, its type)
    for config in BUILTIN_CONFIGS.values():
        types = typing.get_type_hints(config)
        for f in dataclasses.fields(config):
            if options.setdefault(f.name, (f, types[f.name]))[0] is not f:
                raise TypeError(f"--{f.name} is defined by two algorithms' dataclasses; define it once and inherit it")
    cls = dataclasses.make_dataclass("AlgorithmArguments", [
        (name, type_, field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
        for name, (f, type_) in options.items()
    ])
    cls.__module__ = __name__
    cls.__doc__ = ("Every algorithm's hyperparameters. Only those of --fed_alg apply, and only they are validated; "
                   "they are identity settings.")
    return cls


AlgorithmArguments = _algorithm_arguments()


@dataclass
class FederationOperationalArguments:
    """How the federation is run: rounds, deadlines, outputs. An operator may change them when restarting the
    server on its state_dir."""

    num_rounds: int = field(
        default=10,
        metadata={"help": "Federated rounds (>= 1). Raising it on restart extends a federation (with --lr_schedule "
                          "cosine, the remaining rounds follow the schedule over the new count)."},
    )
    round_timeout: float = field(
        default=3600.0,
        metadata={"help": "Seconds after a round starts at which it closes with the updates it has "
                          "(at least --min_fit_clients); 0 waits forever."},
    )
    min_fit_clients: int = field(
        default=1, metadata={"help": "Fewest updates a round may close with at its deadline, in [1, --sample_clients]."}
    )
    on_insufficient: str = field(
        default="extend",
        metadata={"help": "At a deadline with fewer than --min_fit_clients updates: 'extend' the deadline, or "
                          "'resample' (keep the clients that submitted, replace the stragglers).",
                  "choices": ["extend", "resample"]},
    )
    save_model_freq: int = field(
        default=10,
        metadata={"help": "Write a PEFT adapter directory every N rounds (the final one always); 0 = only the final."},
    )
    max_control_norm: float = field(
        default=1e6,
        metadata={"help": "SCAFFOLD: largest L2 norm (over all control tensors together) of an upload's control "
                          "update Δc_i; an upload over it is refused with 422, so one client cannot swing the "
                          "server's c. 0 = no bound."},
    )


# A dataclass takes its bases' fields last base first: identity, the hyperparameters, then the operational ones.
@dataclass
class FederationArguments(FederationOperationalArguments, CompressionArguments, SplitArguments, SecAggArguments,
                          PrivacyArguments, AlgorithmArguments, FederationIdentityArguments):
    """Shared by the whole federation; owned by the server and served to clients.

    One flat set of options in three groups (identity, the algorithms' hyperparameters, operational), as
    flags, in --config files, in ``dataclasses.asdict`` served by ``GET /v1/config`` and kept in the state DB.
    """

    def validate(self) -> None:
        """Refuse settings a federation cannot run with, each problem naming its option and the range.

        Of the algorithms' hyperparameters only ``--fed_alg``'s apply and are validated: Krum's default
        ``--krum_malicious 1`` does not stop a FedAvg federation of two clients per round.
        """
        problems = []
        if not self.model_name_or_path:
            problems.append("--model_name_or_path is required")
        for f in dataclasses.fields(self):  # what argparse checks for flags, also for --config files and code
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value not in choices:
                problems.append(f"--{f.name} must be one of {', '.join(choices)}, got {value!r}")
        if not 1 <= self.sample_clients <= self.num_clients:
            problems.append(f"--sample_clients must be in [1, --num_clients = {self.num_clients}], "
                            f"got {self.sample_clients}")
        if not 1 <= self.min_fit_clients <= self.sample_clients:
            problems.append(f"--min_fit_clients must be in [1, --sample_clients = {self.sample_clients}], "
                            f"got {self.min_fit_clients}")
        problems += filter(None, [
            range_problem("seq_length", self.seq_length, at_least=1),
            range_problem("dpo_beta", self.dpo_beta, above=0) if self.task == "dpo" else None,
            range_problem("peft_lora_r", self.peft_lora_r, at_least=1),
            range_problem("peft_lora_alpha", self.peft_lora_alpha, above=0),
            range_problem("peft_lora_dropout", self.peft_lora_dropout, at_least=0, below=1),
            range_problem("num_clients", self.num_clients, at_least=1),
            range_problem("max_steps", self.max_steps, at_least=1),
            range_problem("learning_rate", self.learning_rate, above=0),
            range_problem("min_learning_rate", self.min_learning_rate, at_least=0),
            range_problem("num_rounds", self.num_rounds, at_least=1),
            range_problem("round_timeout", self.round_timeout, at_least=0),
            range_problem("save_model_freq", self.save_model_freq, at_least=0),
            range_problem("max_control_norm", self.max_control_norm, at_least=0),
        ])
        try:
            self.algorithm_hyperparameters().validate(self)
        except ValueError as exc:  # also an unknown --fed_alg
            problems.append(str(exc))
        problems += self.privacy_problems()
        problems += self.secagg_problems()
        problems += self.split_problems()
        problems += self.compression_problems()
        problems += self.combination_problems()
        if problems:
            raise ValueError("; ".join(problems))

    def combination_problems(self) -> list[str]:
        """Features that each work alone but were not built to run together, refused with the reason."""
        problems = []
        if self.secagg_enabled and self.compression_enabled:
            problems.append(f"--update_compression {self.update_compression} with --secure_aggregation is refused: "
                            "a masked upload is a vector of the ring Z_2^bits (--secagg_bits sets its size), "
                            "which the codecs do not apply to")
        if self.split_enabled and self.secagg_enabled:
            problems.append("--secure_aggregation with --fed_mode split is refused: the server runs the middle of "
                            "the model on each client's activations, so it would not learn only the sum")
        if self.split_enabled and self.compression_enabled:
            problems.append(f"--update_compression {self.update_compression} with --fed_mode split is refused: the "
                            "split client uploads its ends' delta dense (a step's activations dwarf it)")
        if self.split_enabled and self.fed_alg in ("fedprox", "scaffold"):
            problems.append(f"--fed_alg {self.fed_alg} with --fed_mode split is refused: its client-side term "
                            "(FedProx's proximal term, SCAFFOLD's control variates) is not applied to the split "
                            "step; use a server-side rule (fedavg, fedavgm, the FedOpt family, the robust ones)")
        if self.split_enabled and self.fed_alg == "fedkseed":
            problems.append("--fed_alg fedkseed with --fed_mode split is refused: FedKSeed tunes the whole model "
                            "by zeroth-order steps on one side, split learning trains LoRA on both")
        return problems

    def algorithm_hyperparameters(self) -> AlgorithmConfig:
        """``--fed_alg``'s hyperparameters, with this federation's values (not validated)."""
        return algorithm_config_class(self.fed_alg).from_federation(self)

    def target_module_list(self) -> list[str] | None:
        if not self.target_modules:
            return None
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


OPERATIONAL_OPTIONS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(FederationOperationalArguments))

Changes = dict[str, tuple[Any, Any]]


def federation_changes(stored: Mapping[str, Any], new: FederationArguments) -> tuple[Changes, Changes]:
    """What restarting the federation ``stored`` (its settings, as the state DB holds them) with ``new`` changes.

    Returns ``(identity_changes, operational_changes)``, each option -> ``(old, new)``. Identity options --
    :class:`FederationIdentityArguments` and the hyperparameters of its algorithm (the stored and the new
    ``--fed_alg``'s) -- decide what the federation computes and must not change. The others may: the
    :class:`FederationOperationalArguments`, and the hyperparameters of algorithms the federation does not
    run, which change nothing it computes. An option missing from ``stored`` (a state dir written before the
    option existed) ran with its default. ValueError if the stored ``--fed_alg`` is not installed.
    """
    old = {f.name: stored.get(f.name, _default(f)) for f in dataclasses.fields(FederationArguments)}
    changed = {name: (value, getattr(new, name)) for name, value in old.items() if value != getattr(new, name)}
    identity = {f.name for f in dataclasses.fields(FederationIdentityArguments)}
    identity.update(f.name for f in dataclasses.fields(PrivacyArguments))
    identity.update(f.name for f in dataclasses.fields(SecAggArguments))
    identity.update(f.name for f in dataclasses.fields(SplitArguments) if f.name not in SPLIT_OPERATIONAL)
    identity.update(f.name for f in dataclasses.fields(CompressionArguments) if f.name not in COMPRESSION_OPERATIONAL)
    for fed_alg in {old["fed_alg"], new.fed_alg}:
        identity.update(f.name for f in dataclasses.fields(algorithm_config_class(fed_alg)))
    return ({k: v for k, v in changed.items() if k in identity},
            {k: v for k, v in changed.items() if k not in identity})


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass
class ServerArguments:
    """How the parameter server runs."""

    state_dir: str = field(default="./fl-state", metadata={"help": "Directory holding all server state; restart on it to resume."})
    host: str = field(default="0.0.0.0", metadata={"help": "Address to listen on."})
    port: int = field(default=8080, metadata={"help": "Port to listen on."})
    workers: int = field(
        default_factory=_default_workers,
        metadata={"help": "gunicorn worker processes (default: $WEB_CONCURRENCY, else 2)."},
    )
    threads: int = field(default=4, metadata={"help": "Threads per gunicorn worker."})
    timeout: int = field(default=120, metadata={"help": "gunicorn worker timeout in seconds."})
    certfile: str | None = field(default=None, metadata={"help": "TLS certificate (PEM) for HTTPS."})
    keyfile: str | None = field(default=None, metadata={"help": "TLS private key (PEM) for HTTPS."})
    auth_tokens: str | None = field(
        default=None,
        metadata={"help": "JSON file of client id -> token hash. When set, every endpoint but "
                          "/healthz needs 'Authorization: Bearer <token>'. Add clients with "
                          "'server_http.py add-client'."},
    )
    max_upload_mb: float = field(
        default=0.0, metadata={"help": "Largest accepted upload in MiB; 0 = twice the adapter size plus 1 MiB."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where PEFT adapter directories are written (default: STATE_DIR/adapters)."}
    )
    rate_limit: float = field(
        default=20.0,
        metadata={"help": "Requests per second allowed per authenticated identity (on an open server: per peer "
                          "address), bursts of twice that, shared by all workers; 0 = off."},
    )
    allow_insecure_http: bool = field(
        default=False,
        metadata={"help": "Allow --auth_tokens on plain HTTP bound to a non-loopback address (tokens would cross "
                          "the network in cleartext). Without it such a server refuses to start: use --certfile/"
                          "--keyfile, or bind 127.0.0.1 behind a TLS front (deploy/nginx.conf)."},
    )
    header_timeout: float = field(
        default=10.0, metadata={"help": "Seconds a connection has to send its request line and headers; then 408."}
    )
    min_body_rate_kib: float = field(
        default=64.0,
        metadata={"help": "Slowest request body accepted, in KiB/s averaged over each --body_rate_window (64 KiB/s "
                          "lets a 160 MB upload pass on a 1 Mbit/s link); slower bodies are cut with 408."},
    )
    body_rate_window: float = field(
        default=10.0, metadata={"help": "Seconds over which --min_body_rate_kib is averaged."}
    )
    log_level: str = field(default="INFO", metadata={"help": "Logging level."})
    log_format: str = field(
        default="text",
        metadata={"help": "Log lines as text, or json: one object per line with time, level, logger, message, event.",
                  "choices": ["text", "json"]},
    )
    report_to: str = field(
        default="none",
        metadata={"help": "Also send each aggregated round's record (train/eval loss, participants, samples, bytes, "
                          "seconds) to a tracker, from the worker that aggregated it: tensorboard, mlflow (a local "
                          "file store) or wandb (offline), each needing its extra (pip install 'fedllm[mlflow]'); "
                          "without it the server says so and runs without. See --report_dir.",
                  "choices": list(REPORT_TO_CHOICES)},
    )
    report_dir: str | None = field(
        default=None,
        metadata={"help": "Where --report_to writes (default: --state_dir): REPORT_DIR/tensorboard, the MLflow file "
                          "store REPORT_DIR/mlflow (or $MLFLOW_TRACKING_URI), the W&B offline runs REPORT_DIR/wandb "
                          "(or W&B online with WANDB_MODE=online)."},
    )
    use_gunicorn: bool = field(
        default=False, metadata={"help": "Serve with gunicorn (run_server.sh sets this); otherwise Flask's development server."}
    )


@dataclass
class ClientArguments:
    """Local-only settings of one data owner."""

    server_url: str = field(default="http://127.0.0.1:8080", metadata={"help": "Base URL of the parameter server."})
    client_id: str | None = field(default=None, metadata={"help": "This client's id (letters, digits, '.', '_', '-')."})
    token: str | None = field(
        default=None, metadata={"help": "Bearer token (default: $FEDLLM_TOKEN). Prefer the environment to the command line."}
    )
    ca_bundle: str | None = field(default=None, metadata={"help": "CA bundle to verify an HTTPS server with."})
    allow_insecure_http: bool = field(
        default=False,
        metadata={"help": "Send the token over plain http:// to a server on another machine (in cleartext). Without "
                          "it the client refuses to; loopback servers (localhost, 127.0.0.0/8, ::1) need no flag."},
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Local data: a .json/.jsonl/.parquet/.csv file, a folder, or a Hugging Face dataset name."}
    )
    dataset_sample: int | None = field(default=None, metadata={"help": "Use at most this many examples (seeded sample)."})
    local_eval_fraction: float = field(
        default=0.0,
        metadata={"help": "Hold out this fraction of the local data (seeded); each round, before training, the "
                          "client reports the global adapter's loss on it as the metric eval_loss (for DPO "
                          "against the base model). 0 = off."},
    )
    dataset_format: str | None = field(default=None, metadata={"help": "Override the detected data format."})
    field_map: str | None = field(
        default=None, metadata={"help": "Rename fields before detection, e.g. 'question=instruction,answer=output'."}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local copy of the federation's base model (default: the server's). "
                          "Its config must match the server's fingerprint."},
    )
    output_dir: str = field(default="./fl-client-output", metadata={"help": "Where the final global adapter and client state go."})
    batch_size: int = field(default=16, metadata={"help": "Per-device training batch size."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    device: str = field(default="auto", metadata={"help": "auto (GPU when present), cpu, cuda, cuda:N."})
    bf16: bool | None = field(default=None, metadata={"help": "Train in bf16 (default: on GPUs that support it)."})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Gradient checkpointing (default: on GPU)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base model in 8 bits (bitsandbytes)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base model in 4 bits (bitsandbytes)."})
    poll_interval: float = field(default=2.0, metadata={"help": "Seconds between polls while waiting (grows with backoff)."})
    max_poll_interval: float = field(default=30.0, metadata={"help": "Longest wait between polls."})
    request_timeout: float = field(default=300.0, metadata={"help": "Seconds before an HTTP request is given up."})
    max_retries: int = field(default=8, metadata={"help": "Retries of a request on network errors and 5xx."})
    server_wait_timeout: float = field(
        default=600.0, metadata={"help": "Seconds to wait at start for a server that does not answer yet; then exit 2."}
    )
    # What the server may ask of this machine: a larger request is refused (exit 2) instead of trained with.
    max_local_steps: int = field(
        default=10000, metadata={"help": "Most local steps per round the client takes from the server (max_steps)."}
    )
    max_learning_rate: float = field(
        default=1.0, metadata={"help": "Highest local learning rate the client takes from the server."}
    )
    max_lora_rank: int = field(default=1024, metadata={"help": "Highest LoRA rank r the client takes from the server."})
    dp_sgd: bool = field(
        default=False,
        metadata={"help": "Sample-level DP-SGD in local training: per-example gradients of the LoRA parameters "
                          "clipped to --dp_sgd_clip_norm and noised (fedllm/privacy/dp_sgd.py); the client accounts "
                          "its own (ε, δ) over all its steps and reports it. SFT only, gradient accumulation 1."},
    )
    dp_sgd_noise_multiplier: float = field(default=1.0, metadata={"help": "DP-SGD: σ (noise std = σ·C per step)."})
    dp_sgd_clip_norm: float = field(default=1.0, metadata={"help": "DP-SGD: per-example gradient L2 norm C."})
    dp_sgd_delta: float | None = field(
        default=None, metadata={"help": "DP-SGD: δ of the client's guarantee (default 1 / n^1.1, n its examples)."}
    )
    quiet: bool = field(default=False, metadata={"help": "No progress bars (also off when stderr is not a terminal)."})
    log_format: str = field(
        default="text",
        metadata={"help": "Log lines as text, or json: one object per line with time, level, logger, message, event "
                          "(implies no progress bars).",
                  "choices": ["text", "json"]},
    )
    seed: int = field(default=42, metadata={"help": "Local seed (data sampling, dropout)."})

    def resolved_token(self) -> str | None:
        return self.token or os.environ.get("FEDLLM_TOKEN") or None


FEDERATION_ARGUMENT_NAMES = tuple(f.name for f in dataclasses.fields(FederationArguments))

# ClientArguments that only concern a client talking to a server over HTTP, or that the simulation takes
# from elsewhere (the base model from FederationArguments; output_dir and the clients' seed from SimulationArguments).
SIMULATION_SKIPPED_CLIENT_FIELDS = frozenset({
    "server_url", "client_id", "token", "ca_bundle", "poll_interval", "max_poll_interval", "request_timeout",
    "max_retries", "model_name_or_path", "output_dir", "seed", "allow_insecure_http", "server_wait_timeout",
    "max_local_steps", "max_learning_rate", "max_lora_rank",
})


def _simulated_client_arguments() -> type:
    """ClientArguments without :data:`SIMULATION_SKIPPED_CLIENT_FIELDS` (one definition of each client option)."""
    specs = []
    for f in dataclasses.fields(ClientArguments):
        if f.name not in SIMULATION_SKIPPED_CLIENT_FIELDS:
            specs.append((f.name, f.type, field(default=f.default, default_factory=f.default_factory,
                                                metadata=f.metadata)))
    cls = dataclasses.make_dataclass("SimulatedClientArguments", specs)
    cls.__module__ = __name__  # so the string annotations resolve here (HfArgumentParser reads them)
    cls.__doc__ = "The local-training options of ClientArguments, applied to every simulated client."
    return cls


SimulatedClientArguments = _simulated_client_arguments()


@dataclass
class SimulationArguments:
    """simulate.py: N clients in one process. FederationArguments and SimulatedClientArguments apply too."""

    client_data: str | None = field(
        default=None,
        metadata={"help": "Folder of per-client files, one client each: local_training_N.json (OpenFedLLM/FedIT) "
                          "or client_N.jsonl (python -m fedllm.data.split), in the order of N. Without it, "
                          "--dataset_name is split into --num_clients clients with --split_strategy."},
    )
    split_strategy: str = field(
        default="iid",
        metadata={"help": "How --dataset_name is split (fedllm.data.split).", "choices": ["iid", "dirichlet", "by_field"]},
    )
    split_field: str | None = field(default=None, metadata={"help": "Category field of the raw records for dirichlet/by_field."})
    split_alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration: smaller is more skewed."})
    mode: str = field(
        default="federated",
        metadata={"help": "federated: --fed_alg over the clients; local: each client trains alone (OpenFedLLM's "
                          "local{K}, every client, --max_steps per round); central: all clients' data pooled, "
                          "--max_steps x --sample_clients steps per round.",
                  "choices": ["federated", "local", "central"]},
    )
    output_dir: str = field(
        default="./fl-sim-output",
        metadata={"help": "Run folder: state/ (the server's state_dir format: adapters/round_N, adapters/final, "
                          "history), clients/, history.json."},
    )
    resume: bool = field(
        default=True,
        metadata={"help": "Continue the run found in --output_dir (same settings) from its last completed round; "
                          "false refuses to touch an existing run."},
    )
    client_seed: int = field(
        default=ClientArguments.seed,
        metadata={"help": "Local seed of every simulated client (client_http.py's --seed: data sample, data order, dropout)."},
    )
    report_to: str = field(
        default="none",
        metadata={"help": "Also send each round's record to a tracker: tensorboard, mlflow (a local file store) or "
                          "wandb (offline), one run per federation (--mode local: one per client); refused when its "
                          "extra is not installed (pip install 'fedllm[mlflow]'). See --report_dir.",
                  "choices": list(REPORT_TO_CHOICES)},
    )
    report_dir: str | None = field(
        default=None,
        metadata={"help": "Where --report_to writes (default: --output_dir): REPORT_DIR/tensorboard/<run>, the MLflow "
                          "file store REPORT_DIR/mlflow (or $MLFLOW_TRACKING_URI), the W&B offline runs "
                          "REPORT_DIR/wandb (or W&B online with WANDB_MODE=online)."},
    )
    backend: str = field(
        default="inprocess",
        metadata={"help": "Where the sampled clients of a round train: inprocess (one after another, one base model) "
                          "or ray (in parallel on Ray actors, one base model each; pip install -c constraints.txt "
                          "-e '.[ray]'). Same results, same run folder (docs/scaling.md).",
                  "choices": ["inprocess", "ray"]},
    )
    ray_address: str | None = field(
        default=None,
        metadata={"help": "--backend ray: the Ray cluster to join ('auto', or HOST:PORT of its head); default: start "
                          "a local one on 127.0.0.1 for this run."},
    )
    num_cpus_per_client: int | None = field(
        default=None,
        metadata={"help": "CPU threads each client trains with (torch.set_num_threads), and with --backend ray the CPUs "
                          "each Ray actor reserves. Default: in-process torch's own (one per core), ray 1. Give both "
                          "backends the same value for bit-identical results on CPU."},
    )
    num_gpus_per_client: float = field(
        default=0.0,
        metadata={"help": "--backend ray: GPUs each Ray actor reserves (0.5: two clients share a GPU)."},
    )


@dataclass
class EvaluationArguments:
    """evaluate.py and export.py: a base model plus an adapter, a dataset and what to measure or write."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model (default: the adapter's base_model_name_or_path, or the state_dir's)."}
    )
    adapter: str | None = field(default=None, metadata={"help": "A PEFT adapter directory."})
    state_dir: str | None = field(
        default=None, metadata={"help": "A server or simulation state_dir; --round picks the version (default: the latest)."}
    )
    round: int | None = field(default=None, metadata={"help": "Round (global version) to take from --state_dir; 0 = the initial adapter."})
    dataset_name: str | None = field(default=None, metadata={"help": "Evaluation data (any format of docs/data.md)."})
    dataset_format: str | None = field(default=None, metadata={"help": "Override the detected data format."})
    field_map: str | None = field(default=None, metadata={"help": "Rename fields first, e.g. 'question=instruction,answer=output'."})
    metrics: str = field(
        default="loss",
        metadata={"help": "Comma-separated: loss (and perplexity, response tokens only), classification "
                          "(accuracy, macro-F1 over --label_words), gsm8k (exact match of '#### N'), rouge "
                          "(ROUGE-1/2/L F1), refusal (rule-based refusal rate)."},
    )
    label_words: str = field(default="negative,neutral,positive", metadata={"help": "Class labels for classification."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate a seeded random subset of this many examples."})
    template: str | None = field(default=None, metadata={"help": "Prompt template (default: the state_dir's, else alpaca)."})
    seq_length: int | None = field(default=None, metadata={"help": "Tokens per example for the loss (default: the state_dir's, else 512)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per forward pass / generate call."})
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens generated per prompt (greedy)."})
    device: str = field(default="auto", metadata={"help": "auto (GPU when present), cpu, cuda, cuda:N."})
    output_file: str | None = field(default="eval_results.json", metadata={"help": "Where evaluate.py writes its JSON results."})
    save_predictions: bool = field(default=False, metadata={"help": "Include every prompt, generation and reference in the JSON."})
    output_dir: str | None = field(default=None, metadata={"help": "export.py adapter/merge: the directory to write."})
    client_output_dir: str | None = field(
        default=None,
        metadata={"help": "A --fed_mode split federation's --state_dir holds the middle's LoRA; the head and tail "
                          "come from this client's --output_dir (its final_adapter: needed with "
                          "--split_private_ends), else from the state_dir's global adapter."},
    )
    merge_dtype: str = field(
        default="float32", metadata={"help": "export.py merge: dtype of the saved model.", "choices": ["float32", "bfloat16", "float16"]}
    )
    prompt: str | None = field(default=None, metadata={"help": "export.py generate: one instruction (the template is applied)."})
    prompts_file: str | None = field(
        default=None, metadata={"help": "export.py generate: a file of instructions, one per line, or any data file (its prompts)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the --max_samples subset."})


def _load_config_file(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return data


def parse_args(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse flags (and an optional ``--config FILE``) into instances of ``dataclass_types``."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", default=None, help="YAML or JSON file of options; flags override it.")
    if "--config" in argv:
        i = argv.index("--config")
        file_values = _load_config_file(argv[i + 1])
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(file_values) - known)
        if unknown:
            raise SystemExit(f"--config {argv[i + 1]}: unknown options {unknown}")
        parser.set_defaults(**file_values)
    *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return tuple(p for p in parsed if not isinstance(p, type(None)) and dataclasses.is_dataclass(p))
