"""Prometheus metrics (``GET /metrics``), and each aggregated round sent to a tracker (``--report_to``).

Under gunicorn every worker is a process with its own counters, so the server runs
``prometheus_client`` in multiprocess mode: :func:`prepare_multiprocess_dir` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh ``STATE_DIR/prometheus`` before the library is imported
(it picks its mode at import; this module imports it lazily for that reason), each worker writes
its values to memory-mapped files there, and a scrape served by any worker sums them all. The
gunicorn master's ``child_exit`` hook (:func:`child_exit`) drops a dead worker's live gauges.

What is measured:

* per request: ``fedllm_http_requests_total{endpoint,method,status}``,
  ``fedllm_http_request_duration_seconds{endpoint,method}`` (``endpoint`` is the Flask URL rule,
  e.g. ``/v1/update``, never the raw path), ``fedllm_http_received_bytes_total{endpoint}`` (body bytes actually read),
  ``fedllm_http_sent_bytes_total{endpoint}``, ``fedllm_worker_requests{pid}`` (per worker);
* uploads: ``fedllm_updates_accepted_total``, ``fedllm_updates_duplicate_total`` (an identical
  retry) and ``fedllm_updates_rejected_total{reason,status}`` (reason: the API error, e.g. ``wrong_round``);
* aggregation: ``fedllm_aggregation_duration_seconds`` (histogram, observed by the process that aggregated);
* slow clients: ``fedllm_connections_cut_total{reason}`` (cut by the worker's deadlines, fedllm.server.worker);
* split learning (``--fed_mode split``): ``fedllm_split_batch_size`` (histogram: the clients' steps run as one
  forward of the middle, ``--split_batch_wait``);
* background progress: ``fedllm_background_failures_total`` (failed ticks, each retried with backoff) and
  ``fedllm_degraded`` (1 while ``/healthz`` says ``degraded``);
* read from the store at scrape time: ``fedllm_round``, ``fedllm_num_rounds``,
  ``fedllm_rounds_completed``, ``fedllm_phase{phase}``, ``fedllm_clients_known``,
  ``fedllm_clients_expected``, ``fedllm_clients_sampled``, ``fedllm_round_updates_received``,
  ``fedllm_global_version``, ``fedllm_paused``, ``fedllm_dp_epsilon`` (with ``--dp``), ``fedllm_last_train_loss``, ``fedllm_last_eval_loss``,
  ``fedllm_client_bytes_received{client}``, ``fedllm_client_bytes_sent{client}``, ``fedllm_communication_bytes``
  (the run's total) and ``fedllm_communication_budget_bytes`` (with ``--communication_budget_mb``);
  with ``--secure_aggregation``: ``fedllm_secagg_stage{stage}``, ``fedllm_secagg_dropped{stage}``,
  ``fedllm_secagg_clients_in_stage``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request

from ..trackers import Run, Tracker, open_tracker

log = logging.getLogger("fedllm.server")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
AGGREGATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
SPLIT_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
PHASES = ("waiting", "training", "aggregating", "finished")
UPDATE_ENDPOINT = "post_update"


def prepare_multiprocess_dir(state_dir: str | Path) -> Path:
    """Use a fresh ``STATE_DIR/prometheus`` for multiprocess metrics. Call before any worker starts."""
    path = Path(state_dir).resolve() / "prometheus"
    if "prometheus_client.values" in sys.modules and os.environ.get(MULTIPROC_ENV) != str(path):
        raise RuntimeError("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set; "
                           "call prepare_multiprocess_dir() first")
    shutil.rmtree(path, ignore_errors=True)  # counters of an earlier run would be summed in
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn ``child_exit`` hook (runs in the master): forget a dead worker's live gauges."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"


class Instruments:
    """The process's metric objects (created once per process, after gunicorn forked the worker)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("fedllm_http_requests", "HTTP requests served.", ["endpoint", "method", "status"])
        self.latency = Histogram("fedllm_http_request_duration_seconds", "Time to answer a request.",
                                 ["endpoint", "method"], buckets=LATENCY_BUCKETS)
        self.bytes_in = Counter("fedllm_http_received_bytes", "Request body bytes received.", ["endpoint"])
        self.bytes_out = Counter("fedllm_http_sent_bytes", "Response body bytes sent.", ["endpoint"])
        self.worker_requests = Gauge("fedllm_worker_requests", "Requests served by each live worker process.",
                                     multiprocess_mode="liveall")
        self.accepted = Counter("fedllm_updates_accepted", "Client updates accepted (each counted once).")
        self.duplicate = Counter("fedllm_updates_duplicate", "Identical retries of an accepted update.")
        self.rejected = Counter("fedllm_updates_rejected", "Uploads refused, by API error.", ["reason", "status"])
        self.aggregation = Histogram("fedllm_aggregation_duration_seconds", "Time to aggregate a round.",
                                     buckets=AGGREGATION_BUCKETS)
        self.connections_cut = Counter("fedllm_connections_cut", "Connections cut before their request arrived "
                                       "(header_timeout, body_too_slow).", ["reason"])
        self.split_batch_size = Histogram("fedllm_split_batch_size", "Clients' steps run as one forward of the "
                                          "split middle (--split_batch_wait).", buckets=SPLIT_BATCH_BUCKETS)
        self.background_failures = Counter("fedllm_background_failures",
                                           "Failed background ticks (deadlines, aggregation); each is retried.")


@functools.lru_cache(maxsize=1)
def instruments() -> Instruments:
    return Instruments()


class FederationCollector:
    """Gauges read from the shared store at scrape time (so every worker answers the same)."""

    def __init__(self, federation: Any, progress: Any = None):
        self.federation = federation
        self.progress = progress

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from .progress import health

        status = self.federation.status()
        history = self.federation.history()

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily | None:
            return GaugeMetricFamily(name, doc, value=value) if value is not None else None

        phase = GaugeMetricFamily("fedllm_phase", "1 for the federation's current phase.", labels=["phase"])
        for name in PHASES:
            phase.add_metric([name], 1.0 if status["phase"] == name else 0.0)
        last = history[-1] if history else {}
        families = [
            gauge("fedllm_round", "The current round (0 before the first).", status["round"]),
            gauge("fedllm_num_rounds", "Rounds the federation runs.", status["num_rounds"]),
            gauge("fedllm_rounds_completed", "Rounds aggregated so far.", len(history)),
            phase,
            gauge("fedllm_clients_known", "Clients that have joined.", status["clients_joined"]),
            gauge("fedllm_clients_expected", "Clients the federation waits for (--num_clients).",
                  status.get("num_clients")),
            gauge("fedllm_clients_sampled", "Clients sampled for the current round.",
                  len(status["sampled"]) if status["phase"] in ("training", "aggregating") else 0),
            gauge("fedllm_round_updates_received", "Updates received in the current round.", len(status["received"])),
            gauge("fedllm_global_version", "Version of the served global adapter.", status["global_version"]),
            gauge("fedllm_paused", "1 while an operator has paused the federation.", float(bool(status.get("paused")))),
            gauge("fedllm_dp_epsilon", "Differential privacy spent so far (ε at the federation's δ; --dp).",
                  (status.get("dp") or {}).get("epsilon")),
            gauge("fedllm_last_train_loss", "Weighted train loss of the last aggregated round.", last.get("train_loss")),
            gauge("fedllm_last_eval_loss", "Weighted federated eval loss of the last aggregated round.",
                  last.get("eval_loss")),
            gauge("fedllm_degraded", "1 while background progress is failing (see /healthz for the reason).",
                  float(health(self.federation.store, self.progress)["status"] != "ok")),
            *self._traffic(status["communication"]),
        ]
        secagg = status.get("secagg")
        if secagg is not None:  # --secure_aggregation: the open stage, and who dropped at which stage
            stage = GaugeMetricFamily("fedllm_secagg_stage", "1 for the round's open secure-aggregation stage.",
                                      labels=["stage"])
            for name in ("advertise", "share", "masked", "unmask", "done", "failed"):
                stage.add_metric([name], 1.0 if secagg["stage"] == name else 0.0)
            dropped = GaugeMetricFamily("fedllm_secagg_dropped", "Clients of the round's attempt that did not "
                                        "answer a secure-aggregation stage.", labels=["stage"])
            for name in ("advertise", "share", "masked", "unmask"):
                dropped.add_metric([name], float(secagg["dropped"].get(name, 0)))
            families += [stage, dropped, gauge("fedllm_secagg_clients_in_stage", "Clients the open secure-aggregation "
                                               "stage waits for.", secagg["clients_in_stage"])]
        yield from (f for f in families if f is not None)

    def _traffic(self, communication: dict[str, Any]) -> list[Any]:
        """Bytes per client (labels: joined clients only, so the series are bounded) and the run's total."""
        from prometheus_client.core import GaugeMetricFamily

        store = self.federation.store
        traffic = store.traffic(store.read())
        up = GaugeMetricFamily("fedllm_client_bytes_received", "Accepted upload bytes from each client.",
                               labels=["client"])
        down = GaugeMetricFamily("fedllm_client_bytes_sent", "Global adapter bytes served to each client.",
                                 labels=["client"])
        for client, totals in sorted(traffic.items()):
            up.add_metric([client], totals["received"])
            down.add_metric([client], totals["sent"])
        families = [up, down, GaugeMetricFamily("fedllm_communication_bytes", "Bytes sent and received in the run.",
                                                value=communication["total_bytes"])]
        if communication["budget_bytes"]:
            families.append(GaugeMetricFamily("fedllm_communication_budget_bytes", "--communication_budget_mb, in "
                                              "bytes.", value=communication["budget_bytes"]))
        return families


def render(federation: Any, progress: Any = None) -> Response:
    """The Prometheus text exposition for this server (all workers)."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    instruments()  # every metric exists (at zero) from the first scrape on
    registry = CollectorRegistry()
    registry.register(FederationCollector(federation, progress))
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY) + generate_latest(registry)
    return Response(body, mimetype=CONTENT_TYPE_LATEST.split(";")[0], headers={"Content-Type": CONTENT_TYPE_LATEST,
                                                                               "Cache-Control": "no-store"})


def install(app: Flask, federation: Any, progress: Any = None) -> None:
    """Measure every request of ``app``, add ``GET /metrics``, time aggregations, count background failures.

    Call right after creating the app so the timer starts before any other ``before_request``.
    """
    metrics = instruments()

    @app.before_request
    def _start_timer() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        try:
            _record(metrics, response)
        except Exception:  # metrics must never break a request
            log.exception("recording request metrics failed")
        return response

    app.add_url_rule("/metrics", "metrics", lambda: render(federation, progress), methods=["GET"])
    federation.rounds.after_aggregation.append(functools.partial(_observe_aggregation, federation, metrics))
    if progress is not None:
        progress.on_failure.append(lambda _reason: metrics.background_failures.inc())


def _record(metrics: Instruments, response: Response) -> None:
    endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
    status = response.status_code
    metrics.requests.labels(endpoint, request.method, str(status)).inc()
    started = g.get("metrics_started")
    if started is not None:
        metrics.latency.labels(endpoint, request.method).observe(time.perf_counter() - started)
    received = g.body_reader.total if "body_reader" in g else g.get("body_bytes", 0)  # bytes read, not announced
    if received:
        metrics.bytes_in.labels(endpoint).inc(received)
    if response.content_length:
        metrics.bytes_out.labels(endpoint).inc(response.content_length)
    metrics.worker_requests.inc()
    if request.endpoint == UPDATE_ENDPOINT:
        body = response.get_json(silent=True) if response.is_json else None
        body = body if isinstance(body, dict) else {}
        if status == 202:
            (metrics.duplicate if body.get("duplicate") else metrics.accepted).inc()
        elif status >= 400:
            metrics.rejected.labels(_slug(str(body.get("error") or "http error")), str(status)).inc()


def _round_record(federation: Any, round_number: int) -> dict[str, Any] | None:
    return next((r for r in reversed(federation.history()) if r.get("round") == round_number), None)


def _observe_aggregation(federation: Any, metrics: Instruments, round_number: int) -> None:
    try:
        record = _round_record(federation, round_number)
        if record is not None and isinstance(record.get("aggregation_seconds"), (int, float)):
            metrics.aggregation.observe(record["aggregation_seconds"])
    except Exception:
        log.exception("recording aggregation metrics failed")


# ------------------------------------------------------------------------------------------------- trackers
class RoundReporter:
    """Sends each aggregated round's record to a tracker (:mod:`fedllm.trackers`), from the process that aggregated.

    The tracker opens at the process's first aggregation, so a gunicorn worker that never aggregates opens
    no run (and starts no W&B service). A tracker that fails is logged and never fails the round.
    """

    def __init__(self, federation: Any, report_to: str, report_dir: str | Path):
        self.federation = federation
        self.report_to = report_to
        self.report_dir = Path(report_dir)
        self._tracker: Tracker | None = None

    def attach(self) -> RoundReporter:
        self.federation.rounds.after_aggregation.append(self.on_aggregated)
        return self

    def on_aggregated(self, round_number: int) -> None:
        try:
            record = _round_record(self.federation, round_number)
            if record is None:
                return
            if self._tracker is None:
                run = Run(key=self.federation.federation_id, config=dataclasses.asdict(self.federation.config))
                self._tracker = open_tracker(self.report_to, self.report_dir, run)
            self._tracker.log_round(record)
        except Exception:
            log.exception("reporting round %d to %s failed", round_number, self.report_to)
