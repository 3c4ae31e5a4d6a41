"""Guarantee 1: kill -9 at any point loses no accepted update, aggregates no round twice, tears no file.

A fault-injection loop: for every named crash point (fedllm.faults.POINTS) the server is started
with FEDLLM_FAULT_POINT set, driven until it kills itself there (the gunicorn master and all
workers, as ``kill -9`` of the process group would; or one worker only), restarted on the same
state_dir without the fault, and driven to the end. Then: every update answered 202 is in the
aggregate of its round, each round was aggregated once, the final adapter equals the FedAvg of
the known deltas, and every state file parses.
"""

from __future__ import annotations

import sqlite3

import pytest
import requests
import torch
from safetensors.torch import load, load_file

from fedllm.faults import POINTS

from ..test_integration import server_args
from .driver import HttpFederationDriver

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

CLIENTS = {"alice": 10, "bob": 20, "carol": 30}
CASES = [(point, "group") for point in POINTS]
# atomic_write's 1st and 2nd hits are the master writing version 0 at start-up; the 3rd and 4th are a
# worker writing version 1 (global, then state) during the first aggregation.
CASES += [("atomic_write.before_rename:2", "group"), ("atomic_write.before_rename:3", "group"),
          ("atomic_write.before_rename:4", "group")]
CASES += [("upload.committed", "worker"), ("aggregate.files_written", "worker"), ("aggregate.committed", "worker")]


@pytest.mark.parametrize(("point", "scope"), CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_kill_at_point_then_restart(point, scope, tiny_model_dir, tmp_path, start_server):
    state_dir = tmp_path / "state"
    args = server_args(tiny_model_dir, state_dir, num_clients=3, sample_clients=3, num_rounds=2)
    driver = HttpFederationDriver(CLIENTS)
    try:
        env = {"FEDLLM_FAULT_POINT": point, "FEDLLM_FAULT_SCOPE": scope, "FEDLLM_FAULT_ONCE": str(tmp_path / "fired")}
        server = start_server(args, env=env)
    except RuntimeError:
        server = None  # it died while starting (a crash point in the initial writes)
    if server is not None:
        finished = driver.run(server.url, alive=lambda: server.proc.poll() is None)
        if scope == "group":
            assert not finished, f"crash point {point} was never reached"
            server.kill()
        else:
            assert finished  # gunicorn replaced the killed worker; the federation went on
            assert (tmp_path / "fired").exists()
    if scope == "group" or server is None:
        server = start_server(args)
        assert driver.run(server.url)

    headers = {"X-FedLLM-Client": "alice"}
    history = requests.get(server.url + "/v1/history", headers=headers).json()
    assert [h["round"] for h in history] == [1, 2]
    for record in history:
        assert driver.accepted[record["round"]] <= set(record["participants"])  # no accepted update lost
        assert sorted(record["participants"]) == sorted(CLIENTS)
    with sqlite3.connect(state_dir / "state.db") as db:
        versions = [v for (v,) in db.execute("SELECT version FROM globals ORDER BY version")]
    assert versions == [0, 1, 2]  # each round aggregated exactly once
    final = load(requests.get(server.url + "/v1/global", headers=headers).content)
    for name, tensor in driver.expected_final(history).items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-6)
    for path in (state_dir / "globals").glob("*.safetensors"):
        load_file(path)  # never torn
    assert not list((state_dir / "incoming").iterdir())
