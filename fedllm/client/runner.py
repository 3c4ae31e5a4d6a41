"""The client's loop: join, poll, pull the global adapter, train, push the delta, until finished.

A crash-safe detail: the delta of a round is written to ``output_dir/pending/`` before it is
uploaded, so a client restarted after training re-sends the same update (the server answers
an identical retry as accepted, never counting it twice) instead of training again.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapter import save_peft_adapter
from ..config import ClientArguments
from ..fsutil import atomic_write
from ..wire import decode_file, encode
from .http import FederationClient, ServerError
from .trainer import LocalTrainer

log = logging.getLogger("fedllm.client")


class GlobalAdapterError(RuntimeError):
    """The downloaded global adapter does not fit this client's model, or is not finite."""


@dataclass
class RoundSummary:
    round: int
    train_loss: float | None
    steps: int
    seconds: float
    bytes_down: int
    bytes_up: int
    eval_loss: float | None = None


@dataclass
class ClientReport:
    rounds: list[RoundSummary] = field(default_factory=list)
    final_adapter: Path | None = None
    num_rounds: int = 0  # the federation's
    seconds: float = 0.0  # wall time of the whole run

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.rounds)

    @property
    def bytes_down(self) -> int:
        return sum(r.bytes_down for r in self.rounds)

    @property
    def bytes_up(self) -> int:
        return sum(r.bytes_up for r in self.rounds)


def show_progress(args: ClientArguments) -> bool:
    """Progress bars only for a person: not with --quiet, --log_format json, or stderr that is not a terminal."""
    return not args.quiet and getattr(args, "log_format", "text") != "json" and sys.stderr.isatty()


def _quiet_libraries() -> None:
    """No progress bars from datasets (map/filter) and transformers (downloads) either."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def verify_global(tensors: dict[str, torch.Tensor], expected: dict[str, list[int]]) -> None:
    """Refuse a global adapter with other names or shapes than the federation's, or non-finite values."""
    adapter = {k: v for k, v in tensors.items() if k in expected}
    missing = sorted(set(expected) - set(adapter))
    if missing:
        raise GlobalAdapterError(f"global adapter lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for name, tensor in adapter.items():
        if list(tensor.shape) != list(expected[name]):
            raise GlobalAdapterError(f"global tensor {name} has shape {list(tensor.shape)}, expected {expected[name]}")
        if not torch.isfinite(tensor).all():
            raise GlobalAdapterError(f"global tensor {name} has NaN or infinite values; refusing to train on it")


class Poller:
    """Exponential backoff with jitter between polls; reset when something changes."""

    def __init__(self, base: float, maximum: float):
        self.base = base
        self.maximum = maximum
        self.delay = base

    def wait(self) -> None:
        time.sleep(self.delay * (0.75 + 0.5 * random.random()))
        self.delay = min(self.maximum, self.delay * 1.5)

    def reset(self) -> None:
        self.delay = self.base


def wait_for_server(client: FederationClient, poller: Poller, timeout: float = 600.0) -> dict[str, Any]:
    deadline = time.time() + timeout
    while True:
        try:
            return client.config()
        except ConnectionError:
            if time.time() > deadline:
                raise
            log.info("waiting for the server at %s", client.base)
            poller.wait()


def run_client(args: ClientArguments) -> ClientReport:
    if not args.client_id:
        raise ValueError("--client_id is required")
    started = time.time()
    args = dataclasses.replace(args, quiet=not show_progress(args))  # the trainer's progress bar follows too
    if args.quiet:
        _quiet_libraries()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    client = FederationClient(args.server_url, args.client_id, token=args.resolved_token(), ca_bundle=args.ca_bundle,
                              timeout=args.request_timeout, max_retries=args.max_retries, quiet=args.quiet)
    poller = Poller(args.poll_interval, args.max_poll_interval)
    server_config = wait_for_server(client, poller)
    federation = server_config["federation"]
    trainer = LocalTrainer(server_config, args)
    client.join(trainer.num_samples)
    log.info("%s joined: %d examples, %s/%s, %d rounds", args.client_id, trainer.num_samples,
             federation["task"], federation["fed_alg"], federation["num_rounds"],
             extra={"event": "client_joined", "client_id": args.client_id, "num_samples": trainer.num_samples,
                    "task": federation["task"], "fed_alg": federation["fed_alg"],
                    "num_rounds": federation["num_rounds"]})
    report = ClientReport(num_rounds=int(federation["num_rounds"]))
    last_seen = None
    while True:
        status = client.round_status()
        if (status["phase"], status["round"]) != last_seen:
            poller.reset()
            last_seen = (status["phase"], status["round"])
        if status["phase"] == "finished":
            report.final_adapter = _save_final(client, server_config, output_dir)
            report.seconds = time.time() - started
            log.info("federation finished after %d rounds; final adapter in %s", status["round"], report.final_adapter,
                     extra={"event": "federation_finished", "rounds": status["round"],
                            "final_adapter": str(report.final_adapter)})
            return report
        if status["selected"] and not status["submitted"]:
            summary = _play_round(client, trainer, server_config, status["round"], output_dir)
            if summary is not None:
                report.rounds.append(summary)
            continue
        poller.wait()


def _play_round(client: FederationClient, trainer: LocalTrainer, server_config: dict[str, Any], round_number: int,
                output_dir: Path) -> RoundSummary | None:
    started = time.time()
    down0, up0 = client.bytes_down, client.bytes_up
    global_path, version, sha = client.download_global(output_dir / "cache")
    if version != round_number - 1:
        return None  # the round moved on while we looked; poll again
    pending = output_dir / "pending" / f"round-{round_number:06d}-{sha[:16]}.safetensors"
    for stale in pending.parent.glob("round-*.safetensors"):
        if stale != pending:
            stale.unlink()
    metrics: dict[str, float] = {}
    if not pending.exists():
        tensors = decode_file(global_path)
        verify_global(tensors, server_config["adapter"])
        round_config = client.config()["round_config"]
        log.info("round %d of %d: selected; training %d steps at learning rate %.3g on global v%d",
                 round_number, server_config["federation"]["num_rounds"], round_config["max_steps"],
                 round_config["learning_rate"], version,
                 extra={"event": "round_training", "round": round_number, "max_steps": round_config["max_steps"],
                        "learning_rate": round_config["learning_rate"], "global_version": version})
        result = trainer.train_round(tensors, round_number, round_config["learning_rate"], round_config["max_steps"])
        metrics = result.metrics
        body = encode(result.tensors, server_config["federation"]["wire_dtype"],
                      metadata={k: repr(float(v)) for k, v in metrics.items()})
        atomic_write(pending, lambda tmp: Path(tmp).write_bytes(body))
    else:
        log.info("round %d: re-sending the update trained before a restart", round_number,
                 extra={"event": "update_resent", "round": round_number})
    try:
        client.upload_update(round_number, pending, trainer.num_samples)
    except ServerError as exc:
        if exc.status != 409:
            raise
        log.warning("round %d: update not taken (%s); the federation moved on", round_number, exc,
                    extra={"event": "update_refused", "round": round_number, "status": exc.status})
        return None
    finally:
        for done in pending.parent.glob("round-*.safetensors"):
            done.unlink(missing_ok=True)
    summary = RoundSummary(round_number, metrics.get("train_loss"), int(metrics.get("steps", 0)),
                           time.time() - started, client.bytes_down - down0, client.bytes_up - up0,
                           metrics.get("eval_loss"))
    loss = f"{summary.train_loss:.4f}" if summary.train_loss is not None else "n/a"
    evaluated = f", eval loss {summary.eval_loss:.4f}" if summary.eval_loss is not None else ""
    log.info("round %d: loss %s%s, %d steps, %.1fs, %s down, %s up", round_number, loss, evaluated,
             summary.steps, summary.seconds, _kib(summary.bytes_down), _kib(summary.bytes_up),
             extra={"event": "round_done", **dataclasses.asdict(summary)})
    return summary


def _save_final(client: FederationClient, server_config: dict[str, Any], output_dir: Path) -> Path:
    from peft import LoraConfig

    from .trainer import LORA_KEYS

    global_path, _version, _sha = client.download_global(output_dir / "cache")
    tensors = decode_file(global_path)
    verify_global(tensors, server_config["adapter"])
    adapter = {k: v for k, v in tensors.items() if k in server_config["adapter"]}
    settings = {k: v for k, v in server_config["lora_config"].items() if k in LORA_KEYS}
    settings["base_model_name_or_path"] = server_config["federation"]["model_name_or_path"]
    return save_peft_adapter(output_dir / "final_adapter", adapter, LoraConfig(**settings))

