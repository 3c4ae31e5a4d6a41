"""Prometheus metrics summed across gunicorn workers, JSON logs, TensorBoard scalars, and the client's summary."""

from __future__ import annotations

import json
import os
import signal
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fedllm.logs import JsonFormatter
from fedllm.trackers import missing_package

from .test_dashboard import LiveFederation, live_server_args

Samples = dict[tuple[str, frozenset], float]


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    response = requests.get(url + "/metrics", headers={"Connection": "close", **(headers or {})}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def labelled(samples: Samples, name: str) -> dict[frozenset, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def test_json_log_lines_have_the_fields_machines_need() -> None:
    import logging

    record = logging.LogRecord("fedllm.server", logging.INFO, __file__, 1, "round %d aggregated", (3,), None,
                               func="aggregate")
    record.event = "round_aggregated"
    record.round = 3
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "round 3 aggregated" and line["event"] == "round_aggregated" and line["round"] == 3
    assert line["level"] == "INFO" and line["logger"] == "fedllm.server" and line["time"].endswith("+00:00")
    plain = logging.LogRecord("x", logging.WARNING, "/a/federation.py", 1, "hi", None, None, func="join")
    assert json.loads(JsonFormatter().format(plain))["event"] == "federation.join"


@pytest.mark.integration
def test_metrics_are_exact_across_gunicorn_workers(tiny_model_dir, tmp_path, start_server) -> None:
    state = tmp_path / "state"
    (state / "prometheus").mkdir(parents=True)
    (state / "prometheus" / "counter_999999.db").write_bytes(b"stale counters of an earlier run")
    server = start_server(live_server_args(tiny_model_dir, state, workers=3, num_clients=2, num_rounds=2,
                                           log_format="json", report_to="tensorboard"))
    assert not (state / "prometheus" / "counter_999999.db").exists()  # cleaned at start
    live = LiveFederation(server.url)
    samples = {"alice": 10, "bob": 30}
    for client, n in samples.items():
        live.join(client, n)

    # Many short connections from several threads, so that every worker serves some.
    polls = 150
    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(pool.map(lambda i: live.call("GET", "/v1/round", ("alice", "bob")[i % 2]).status_code,
                              range(polls)))
    assert codes == [200] * polls

    sent = 0  # bytes of update bodies the server read (a request refused from its headers is not read)

    def push(client: str, round_number: int, body: bytes, read: bool = True, **headers: str) -> requests.Response:
        nonlocal sent
        sent += len(body) if read else 0
        h = {"X-FedLLM-Num-Samples": str(samples[client]), **headers}
        return live.call("POST", f"/v1/update?round={round_number}", client, data=body, headers=h)

    alice1 = live.delta("alice", 0.01, {"train_loss": 2.0})
    assert push("alice", 1, alice1).status_code == 202
    assert push("alice", 1, alice1).json()["duplicate"] is True  # an identical retry
    assert push("bob", 2, live.delta("bob", 0.01, {"train_loss": 3.0}), read=False).status_code == 409  # wrong round
    assert push("bob", 1, b"not safetensors").status_code == 400  # malformed
    no_header = live.call("POST", "/v1/update?round=1", "bob", data=b"x")  # refused before its body is read
    assert no_header.status_code == 400 and no_header.json()["error"] == "missing header"
    assert push("bob", 1, live.delta("bob", 0.01, {"train_loss": 3.0})).status_code == 202
    live.wait_for_rounds("alice", 1)
    assert push("alice", 1, live.delta("alice", 0.02, {"train_loss": 2.5})).status_code == 409  # already submitted
    for client in samples:
        assert push(client, 2, live.delta(client, 0.01, {"train_loss": 1.0})).status_code == 202
    history = live.wait_for_rounds("alice", 2)

    scrapes = [scrape(server.url) for _ in range(6)]  # answered by different workers: all must agree
    for m in scrapes:
        assert value(m, "fedllm_updates_accepted_total") == 4
        assert value(m, "fedllm_updates_duplicate_total") == 1
        assert labelled(m, "fedllm_updates_rejected_total") == {
            frozenset({"reason": "wrong_round", "status": "409"}.items()): 1,
            frozenset({"reason": "malformed_update", "status": "400"}.items()): 1,
            frozenset({"reason": "missing_header", "status": "400"}.items()): 1,
            frozenset({"reason": "already_submitted", "status": "409"}.items()): 1,
        }
        assert value(m, "fedllm_http_requests_total", endpoint="/v1/round", method="GET", status="200") == polls
        assert value(m, "fedllm_http_request_duration_seconds_count", endpoint="/v1/round", method="GET") == polls
        assert value(m, "fedllm_http_requests_total", endpoint="/v1/update", method="POST", status="202") == 5
        assert value(m, "fedllm_http_received_bytes_total", endpoint="/v1/update") == sent
        assert value(m, "fedllm_http_received_bytes_total", endpoint="/v1/join") > 0
        assert value(m, "fedllm_http_sent_bytes_total", endpoint="/v1/round") > 0
        assert value(m, "fedllm_aggregation_duration_seconds_count") == 2
        assert value(m, "fedllm_aggregation_duration_seconds_sum") == pytest.approx(
            sum(r["aggregation_seconds"] for r in history))
        assert value(m, "fedllm_rounds_completed") == 2 and value(m, "fedllm_round") == 2
        assert value(m, "fedllm_phase", phase="finished") == 1 and value(m, "fedllm_phase", phase="training") == 0
        assert value(m, "fedllm_clients_known") == 2 and value(m, "fedllm_clients_sampled") == 0
        assert value(m, "fedllm_last_train_loss") == pytest.approx(1.0)

    # Requests were served by several worker processes, and their counts add up.
    last = scrape(server.url)
    per_worker = {dict(labels)["pid"]: v for labels, v in labelled(last, "fedllm_worker_requests").items()}
    busy = [pid for pid, v in per_worker.items() if v > 0]
    assert len(busy) >= 2, per_worker
    total = sum(v for (name, _labels), v in last.items() if name == "fedllm_http_requests_total")
    assert sum(per_worker.values()) == total  # neither counts the scrape being rendered

    # A worker killed by the OS: gunicorn replaces it, child_exit drops its live gauge, its counts stay summed.
    victim = busy[0]
    os.kill(int(victim), signal.SIGKILL)
    deadline = time.time() + 30
    while victim in {dict(labels)["pid"] for labels in labelled(scrape(server.url), "fedllm_worker_requests")}:
        assert time.time() < deadline, "the dead worker's gauge was not dropped"
        time.sleep(0.3)
    after = scrape(server.url)
    assert value(after, "fedllm_updates_accepted_total") == 4
    assert value(after, "fedllm_http_requests_total", endpoint="/v1/round", method="GET", status="200") == polls

    # Logs: one JSON object per line, from the first log record on (a library may print before logging is set up).
    lines = server.log().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("{"))
    records = [json.loads(line) for line in lines[first:] if line.strip()]
    assert all({"time", "level", "logger", "message", "event"} <= set(r) for r in records)
    events = {r["event"] for r in records}
    assert "federation.aggregate_if_needed" in events or any("aggregated" in r["message"] for r in records)
    assert any(r["logger"] == "gunicorn.error" for r in records)

    # TensorBoard: one scalar per round, or a clear message when tensorboardX is missing.
    if missing_package("tensorboard") is None:
        scalars = read_tensorboard_scalars(state / "tensorboard")
        assert scalars["federation/train_loss"] == {1: pytest.approx(2.75), 2: pytest.approx(1.0)}
        assert scalars["federation/participants"] == {1: 2.0, 2: 2.0}
        assert scalars["federation/bytes_received"] == {r["round"]: float(r["bytes_received"]) for r in history}
    else:
        assert "--report_to tensorboard needs tensorboardX" in server.log()


def read_tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from the event files in ``logdir`` (TFRecord framing, tensorboardX's protobufs)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    return scalars


# ------------------------------------------------------------------------------------------ the client's side
class FakeTrainer:
    """Stands in for LocalTrainer (no model): a fixed delta and loss per round."""

    def __init__(self, server_config: dict, args) -> None:
        self.spec = server_config["upload_tensors"]
        self.num_samples = 12
        self.quiet = args.quiet
        self.args = args

    def train_round(self, global_tensors, round_number: int, learning_rate: float, max_steps: int,
                    clip_norm: float | None = None, **kwargs):
        import torch

        from fedllm.client.trainer import RoundResult

        return RoundResult({k: torch.full(v, 0.01) for k, v in self.spec.items()},
                           {"train_loss": 3.0 / round_number, "steps": float(max_steps), "eval_loss": 4.0 / round_number})



def test_progress_bars_only_for_a_person_at_a_terminal(monkeypatch) -> None:
    import io
    import sys

    from fedllm.client.runner import show_progress
    from fedllm.config import ClientArguments

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert show_progress(ClientArguments()) is True
    assert show_progress(ClientArguments(quiet=True)) is False
    assert show_progress(ClientArguments(log_format="json")) is False
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a file: no bars
    assert show_progress(ClientArguments()) is False


def test_client_summary_table() -> None:
    from client_http import summary_table
    from fedllm.client.runner import ClientReport, RoundSummary

    report = ClientReport([RoundSummary(1, 3.0, 4, 1.5, 2048, 1024, 4.0), RoundSummary(3, None, 4, 2.5, 2048, 1024)],
                          num_rounds=3, seconds=9.0)
    table = summary_table(report).splitlines()
    assert table[0].split() == ["round", "loss", "eval", "steps", "seconds", "KiB", "down", "KiB", "up"]
    assert table[2].split() == ["1", "3.0000", "4.0000", "4", "1.5", "2.0", "1.0"]
    assert table[3].split() == ["3", "n/a", "n/a", "4", "2.5", "2.0", "1.0"]
    assert table[5].split() == ["total", "8", "4.0", "4.0", "2.0"]


@pytest.mark.integration
def test_client_json_log_lines_and_final_summary(tiny_model_dir, tmp_path, start_server, monkeypatch, capsys,
                                                 restore_logging) -> None:
    import client_http
    from fedllm.client import runner

    server = start_server(live_server_args(tiny_model_dir, tmp_path / "state", num_clients=1, sample_clients=1,
                                           num_rounds=2, workers=1))
    monkeypatch.setattr(runner, "trainer_class", lambda server_config: FakeTrainer)  # what run_client builds
    code = client_http.main(["--server_url", server.url, "--client_id", "alice", "--output_dir", str(tmp_path / "out"),
                             "--poll_interval", "0.1", "--max_poll_interval", "0.5", "--log_format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == f"final adapter: {tmp_path / 'out' / 'final_adapter'}"
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert len(records) == len([line for line in err.splitlines() if line.strip()])  # nothing but JSON
    assert all({"time", "level", "logger", "message", "event"} <= set(r) for r in records)
    done = [r for r in records if r["event"] == "round_done"]
    assert [(r["round"], r["train_loss"], r["eval_loss"], r["steps"]) for r in done] == [(1, 3.0, 4.0, 4), (2, 1.5, 2.0, 4)]
    assert done[0]["message"].startswith("round 1: loss 3.0000, eval loss 4.0000, 4 steps")
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in done)
    (summary,) = [r for r in records if r["event"] == "client_summary"]
    assert summary["message"].startswith("client alice: joined 2 of 2 rounds, 8 steps")
    assert summary["steps"] == 8 and [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in done)
    assert {"client_joined", "round_training", "federation_finished"} <= {r["event"] for r in records}
