"""The client's loop: join, poll, pull the global adapter, train, push the delta, until finished.

A crash-safe detail: a round's update and the algorithm state it leaves are written to
``output_dir/pending/`` before the upload (:mod:`fedllm.client.state`); the state becomes the
client's only once the server accepted the update. A client restarted anywhere between training
and that answer re-sends the same update first thing (the server answers an identical retry as
accepted, never counting it twice) instead of training again, and commits or drops the state by
the answer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..adapter import save_peft_adapter
from ..compression.codecs import Codec, global_codec
from ..compression.updates import read_compressed_global
from ..config import ClientArguments, FederationArguments
from ..privacy.dp_sgd import LEDGER_FILE, DPSGDLedger
from ..wire import WireError, decode_file, parse_header
from .distributed import ProcessGroup, RoundOrder, join_process_group
from .http import FederationClient, ServerError
from .kseed import ZerothOrderTrainer, trainer_class
from .state import ClientState, FederationBinding, PendingUpdate
from .trainer import LocalTrainer, resolve_device
from .trust import check_clip_norm, check_round_config, check_round_status, check_server_config, download_limit

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
    dp_epsilon: float | None = None  # --dp: the federation's client-level ε at the end (at dp_delta)
    dp_delta: float | None = None
    dp_sgd_epsilon: float | None = None  # --dp_sgd: this client's own sample-level ε (at dp_sgd_delta)
    dp_sgd_delta: float | None = None

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


def quiet_libraries() -> None:
    """No progress bars from datasets (map/filter) and transformers (downloads) either."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def verify_global(tensors: dict[str, torch.Tensor], expected: dict[str, list[int]],
                  allowed: dict[str, list[int]]) -> None:
    """Refuse a global adapter that lacks a tensor of ``expected`` (the adapter), holds one not in ``allowed``
    (the adapter and its algorithm's extras, ``/v1/config``'s upload_tensors), has another shape, or non-finite
    values."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise GlobalAdapterError(f"global adapter lacks {len(missing)} tensors, e.g. {missing[:3]}")
    unexpected = sorted(set(tensors) - set(allowed))
    if unexpected:
        raise GlobalAdapterError(f"global adapter holds {len(unexpected)} unexpected tensors, e.g. "
                                 f"{[name[:80] for name in unexpected[:3]]}")
    for name, tensor in tensors.items():
        if list(tensor.shape) != list(allowed[name]):
            raise GlobalAdapterError(f"global tensor {name} has shape {list(tensor.shape)}, expected {allowed[name]}")
        if not torch.isfinite(tensor).all():
            raise GlobalAdapterError(f"global tensor {name} has NaN or infinite values; refusing to train on it")


def load_global(path: Path, server_config: dict[str, Any], codec: Codec | None = None) -> dict[str, torch.Tensor]:
    """The downloaded global adapter's tensors, once its structure, names, shapes and values are checked.

    With ``codec`` the file is the compressed global (``?encoding=compressed``): checked by the server's own
    validator of compressed uploads, then decoded, ``ĝ = D(C(g))``: what this client trains from and its delta is
    taken against (docs/compression.md)."""
    try:
        if codec is None:
            parse_header(path)
            tensors = decode_file(path)
        else:
            spec = {name: tuple(shape) for name, shape in server_config["adapter"].items()}
            tensors = read_compressed_global(path, codec, spec)
    except (WireError, SafetensorError) as exc:
        kind = f"compressed ({codec.tag()}) " if codec is not None else ""
        raise GlobalAdapterError(f"the {kind}global adapter is refused, nothing is trained on it: {exc}") from None
    verify_global(tensors, server_config["adapter"], server_config["upload_tensors"])
    return tensors


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


def wait_for_server(client: FederationClient, poller: Poller, timeout: float) -> dict[str, Any]:
    """The server's ``/v1/config``, polled for up to ``timeout`` seconds (``--server_wait_timeout``)."""
    deadline = time.time() + timeout
    while True:
        remaining = deadline - time.time()
        try:
            # One attempt at a time, none outliving the wait: the poller paces the retries.
            return client.config(retries=0, timeout=max(1.0, min(remaining, client.timeout)))
        except ConnectionError as exc:
            if time.time() >= deadline:
                raise ConnectionError(f"the server at {client.base} did not answer within --server_wait_timeout "
                                      f"{timeout:g} s ({exc})") from None
            log.info("waiting for the server at %s (for up to %.0f s more, --server_wait_timeout %g)", client.base,
                     max(0.0, deadline - time.time()), timeout,
                     extra={"event": "server_wait", "server_url": client.base, "timeout": timeout})
            poller.wait()


def run_client(args: ClientArguments) -> ClientReport:
    """Take part in the federation until it finishes; with several processes (torchrun, accelerate launch) rank 0
    does so and the others are its replicas (:mod:`fedllm.client.distributed`). The client's report, on every rank."""
    if not args.client_id:
        raise ValueError("--client_id is required")
    group = join_process_group(resolve_device(args.device))
    if group is not None:
        if args.dp_sgd:
            raise ValueError(f"--dp_sgd noises each step in one process; train it on one process, not "
                             f"{group.world_size}")
        if not group.is_main:
            return run_replica(args, group)
    started = time.time()
    args = dataclasses.replace(args, quiet=not show_progress(args))  # the trainer's progress bar follows too
    if args.quiet:
        quiet_libraries()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    client = FederationClient(args.server_url, args.client_id, token=args.resolved_token(), ca_bundle=args.ca_bundle,
                              timeout=args.request_timeout, max_retries=args.max_retries, quiet=args.quiet,
                              allow_insecure_http=args.allow_insecure_http)
    poller = Poller(args.poll_interval, args.max_poll_interval)
    server_config = wait_for_server(client, poller, args.server_wait_timeout)
    check_server_config(server_config, args)
    federation = server_config["federation"]
    # Refuses another federation's state files before the model is loaded.
    state = ClientState(output_dir, FederationBinding.of(server_config))
    if group is not None:
        group.share(server_config)
    # The client's own copy, when it names one, is the model; the server's name is then only a label.
    served_model = federation["model_name_or_path"]
    if args.model_name_or_path:
        log.info("using the local model %s (the server's: %s); its config must have the server's fingerprint",
                 args.model_name_or_path, served_model,
                 extra={"event": "base_model", "model": args.model_name_or_path, "served_model": served_model})
    else:
        log.info("using the server's model %s", served_model,
                 extra={"event": "base_model", "model": served_model, "served_model": served_model})
    if federation.get("fed_mode") == "split":  # the ends of the model here, the middle on the server
        if group is not None:
            raise ValueError("--fed_mode split trains on one process; start the client without torchrun/accelerate")
        from ..split.client import SplitTrainer

        trainer = SplitTrainer(server_config, args, client)
    else:
        trainer = trainer_class(server_config)(server_config, args)
    client.join(trainer.num_samples)
    log.info("%s joined: %d examples, %s/%s, %d rounds", args.client_id, trainer.num_samples,
             federation["task"], federation["fed_alg"], federation["num_rounds"],
             extra={"event": "client_joined", "client_id": args.client_id, "num_samples": trainer.num_samples,
                    "task": federation["task"], "fed_alg": federation["fed_alg"],
                    "num_rounds": federation["num_rounds"]})
    report = ClientReport(num_rounds=int(federation["num_rounds"]))
    pending = state.pending()
    if pending is not None:  # trained before a restart; the answer decides whether its state is ours
        summary = _resend(client, state, pending, _sender(client, server_config, output_dir, args.poll_interval))
        if summary is not None:
            report.rounds.append(summary)
    last_seen = None
    while True:
        status = client.round_status()
        check_round_status(status)
        if (status["phase"], status["round"]) != last_seen:
            poller.reset()
            last_seen = (status["phase"], status["round"])
        if status["phase"] == "finished":
            report.final_adapter = _save_final(client, server_config, output_dir, trainer)
            report.seconds = time.time() - started
            _report_privacy(report, status, state)
            log.info("federation finished after %d rounds; final adapter in %s", status["round"], report.final_adapter,
                     extra={"event": "federation_finished", "rounds": status["round"],
                            "final_adapter": str(report.final_adapter)})
            if group is not None:
                group.share(report)  # the replicas' last message
            return report
        if status["selected"] and not status["submitted"]:
            summary = _play_round(client, trainer, state, server_config, status["round"], output_dir, group,
                                  _sender(client, server_config, output_dir, args.poll_interval))
            if summary is not None:
                report.rounds.append(summary)
            continue
        poller.wait()


def run_replica(args: ClientArguments, group: ProcessGroup) -> ClientReport:
    """A rank > 0 of a multi-process client: train every round rank 0 trains, from what rank 0 sends; rank 0's
    report at the end. It never talks to the server and keeps no state: its trainer's folder is never written."""
    quiet_libraries()
    args = dataclasses.replace(args, quiet=True)
    server_config = group.share()
    trainer = LocalTrainer(server_config, args, state_dir=Path(args.output_dir) / f".replica-{group.rank}")
    while isinstance(order := group.share(), RoundOrder):
        tensors = group.share_tensors()
        hook_state = group.share_tensors()
        trainer.train_round(tensors, order.round, order.learning_rate, order.max_steps, order.clip_norm,
                            hook_state=hook_state)
    return order


def _play_round(client: FederationClient, trainer: LocalTrainer, state: ClientState, server_config: dict[str, Any],
                round_number: int, output_dir: Path, group: ProcessGroup | None = None,
                send: Callable[[PendingUpdate], bool] | None = None) -> RoundSummary | None:
    started = time.time()
    down0, up0 = client.bytes_down, client.bytes_up
    codec = global_codec(FederationArguments(**server_config["federation"]))  # the quantizers: a compressed download
    global_path, version, _sha = client.download_global(output_dir / "cache", download_limit(server_config),
                                                        compressed=codec is not None)
    if version != round_number - 1:
        return None  # the round moved on while we looked; poll again
    tensors = load_global(global_path, server_config, codec)
    served = client.config()
    learning_rate, max_steps = check_round_config(served, trainer.args)
    clip_norm = check_clip_norm(served)
    log.info("round %d of %d: selected; training %d steps at learning rate %.3g on global v%d",
             round_number, server_config["federation"]["num_rounds"], max_steps, learning_rate, version,
             extra={"event": "round_training", "round": round_number, "max_steps": max_steps,
                    "learning_rate": learning_rate, "global_version": version})
    if group is not None:  # the replicas train the same round alongside
        group.share(RoundOrder(round_number, learning_rate, max_steps, clip_norm))
        group.share_tensors(tensors)
        group.share_tensors(state.committed())
    result = trainer.train_round(tensors, round_number, learning_rate, max_steps, clip_norm)
    body = result.encode(server_config["federation"]["wire_dtype"])
    # num_samples after training: the examples TRL kept, which FedAvg weighs (also when re-sent after a restart).
    pending = state.write_pending(round_number, body, trainer.num_samples, result.state)
    if not state.deliver(pending, send or functools.partial(_upload, client)):
        return None
    return _summarise(client, round_number, result.metrics, started, down0, up0)


def _resend(client: FederationClient, state: ClientState, pending: PendingUpdate,
            send: Callable[[PendingUpdate], bool]) -> RoundSummary | None:
    """Re-send the update trained before a restart; its summary when accepted."""
    started = time.time()
    down0, up0 = client.bytes_down, client.bytes_up
    log.info("round %d: re-sending the update trained before a restart", pending.round,
             extra={"event": "update_resent", "round": pending.round})
    metrics = pending.metrics()
    if not state.deliver(pending, send):
        return None
    return _summarise(client, pending.round, metrics, started, down0, up0)


def _sender(client: FederationClient, server_config: dict[str, Any], output_dir: Path,
            poll_interval: float) -> Callable[[PendingUpdate], bool]:
    """How a pending update reaches the server: ``POST /v1/update``, or the SecAgg+ stages when the server says
    ``--secure_aggregation secagg+`` (no client flag: fedllm.client.secagg)."""
    if server_config["federation"].get("secure_aggregation", "off") == "off":
        return functools.partial(_upload, client)
    from .secagg import SecureUploader

    return SecureUploader(client, server_config, output_dir, poll_interval)


def _upload(client: FederationClient, pending: PendingUpdate) -> bool:
    """Upload ``pending``: True once the server accepted it, False when it refused it (409: the federation moved on)."""
    try:
        client.upload_update(pending.round, pending.update_path, pending.num_samples)
    except ServerError as exc:
        if exc.status != 409:
            raise
        log.warning("round %d: update not taken (%s); the federation moved on", pending.round, exc,
                    extra={"event": "update_refused", "round": pending.round, "status": exc.status})
        return False
    return True


def _summarise(client: FederationClient, round_number: int, metrics: dict[str, float], started: float, down0: int,
               up0: int) -> RoundSummary:
    summary = RoundSummary(round_number, metrics.get("train_loss"), int(metrics.get("steps", 0)),
                           time.time() - started, client.bytes_down - down0, client.bytes_up - up0,
                           metrics.get("eval_loss"))
    loss = f"{summary.train_loss:.4f}" if summary.train_loss is not None else "n/a"
    evaluated = f", eval loss {summary.eval_loss:.4f}" if summary.eval_loss is not None else ""
    log.info("round %d: loss %s%s, %d steps, %.1fs, %s down, %s up", round_number, loss, evaluated,
             summary.steps, summary.seconds, _kib(summary.bytes_down), _kib(summary.bytes_up),
             extra={"event": "round_done", **dataclasses.asdict(summary)})
    return summary


def _report_privacy(report: ClientReport, status: dict[str, Any], state: Any) -> None:
    """The (ε, δ) the federation spent (--dp) and this client's own DP-SGD ledger (--dp_sgd), for the summary."""
    dp = status.get("dp") if isinstance(status.get("dp"), dict) else None
    if dp is not None:
        report.dp_epsilon, report.dp_delta = dp.get("epsilon"), dp.get("delta")
    ledger = state.folder / LEDGER_FILE
    if ledger.exists():
        stored = json.loads(ledger.read_text())
        report.dp_sgd_epsilon = DPSGDLedger(**stored).epsilon()
        report.dp_sgd_delta = stored["delta"]
    for what, eps, delta in (("federation (client-level DP-FedAvg)", report.dp_epsilon, report.dp_delta),
                             ("this client (sample-level DP-SGD)", report.dp_sgd_epsilon, report.dp_sgd_delta)):
        if delta is not None:
            log.info("privacy spent by the %s: ε = %s at δ = %.3g", what, "n/a" if eps is None else f"{eps:.3f}", delta)


def _save_final(client: FederationClient, server_config: dict[str, Any], output_dir: Path,
                trainer: LocalTrainer | None = None) -> Path:
    from peft import LoraConfig

    from .trainer import LORA_KEYS

    # Dense: the exact global (as the server exports it), never the quantized copy a round trains from.
    global_path, _version, _sha = client.download_global(output_dir / "cache", download_limit(server_config))
    tensors = load_global(global_path, server_config)
    if isinstance(trainer, ZerothOrderTrainer):  # FedKSeed: the model rebuilt from the final scalars
        return trainer.save_final(tensors, output_dir / "final_model")
    adapter = {k: v for k, v in tensors.items() if k in server_config["adapter"]}
    if server_config["federation"].get("fed_mode") == "split":  # the head and tail; the middle is the server's
        from ..split.client import final_ends

        adapter = final_ends(server_config, output_dir, adapter)
    settings = {k: v for k, v in server_config["lora_config"].items() if k in LORA_KEYS}
    settings["base_model_name_or_path"] = server_config["federation"]["model_name_or_path"]
    return save_peft_adapter(output_dir / "final_adapter", adapter, LoraConfig(**settings))

