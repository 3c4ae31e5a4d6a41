"""SecAgg+ through the server: the REST stages (Flask's test client), restarts at every stage, dropouts at the
deadline, bad input, and what the state_dir holds. The clients are the real fedllm client code
(:class:`~fedllm.client.secagg.SecureUploader`) over an adapter to the test client, with synthetic deltas."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedllm.client.http import ServerError
from fedllm.client.secagg import SecureUploader
from fedllm.config import FederationArguments
from fedllm.secagg.wire import masked_file
from fedllm.server.app import create_app
from fedllm.server.federation import Federation
from fedllm.server.store import Store
from fedllm.server.versions import load_state
from fedllm.wire import encode

SAMPLES = {"c0": 10, "c1": 20, "c2": 30, "c3": 40, "c4": 50}


@pytest.fixture(scope="module")
def fresh(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("secagg")
    config = FederationArguments(model_name_or_path=str(tiny_model_dir), num_clients=5, sample_clients=5,
                                 num_rounds=2, peft_lora_r=128, round_timeout=0, save_model_freq=0,
                                 target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                 secure_aggregation="secagg+")  # 278,528 coordinates: |corr| of noise ≈ 0.002
    Federation.initialize(config, root / "fresh")
    return root / "fresh"


class FlaskClientAdapter:
    """The two calls SecureUploader makes, over Flask's test client (JSON errors become ServerError as in http.py)."""

    def __init__(self, server: Server, client_id: str):
        self.server = server
        self.client_id = client_id

    def _answer(self, response) -> dict[str, Any]:
        body = response.get_json()
        if response.status_code >= 400:
            raise ServerError(response.status_code, body["error"], body["detail"])
        return body

    def secagg_view(self) -> dict[str, Any]:
        return self._answer(self.server.http.get("/v1/secagg", headers={"X-FedLLM-Client": self.client_id}))

    def history(self) -> list[dict[str, Any]]:
        return self._answer(self.server.http.get("/v1/history", headers={"X-FedLLM-Client": self.client_id}))

    def secagg_send(self, stage: str, round_number: int, attempt: int, *, message=None, body=None) -> dict[str, Any]:
        path = f"/v1/secagg/{stage}?round={round_number}&attempt={attempt}"
        headers = {"X-FedLLM-Client": self.client_id}
        if body is None:
            return self._answer(self.server.http.post(path, json=message, headers=headers))
        return self._answer(self.server.http.post(path, data=body, headers=headers,
                                                  content_type="application/octet-stream"))


@dataclass
class Pending:
    round: int
    update_path: Path


class Server:
    """A federation served by Flask's test client; :meth:`restart` drops it and opens the state_dir anew."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.federation: Federation | None = None
        self.restart()

    def restart(self) -> None:
        if self.federation is not None:
            self.federation.store.close()
        self.federation = Federation(Store(self.state_dir))
        self.http = create_app(self.federation, start_ticker=False).test_client()

    def status(self) -> dict[str, Any]:
        return self.http.get("/v1/round", headers={"X-FedLLM-Client": "observer"}).get_json()


def make_server(fresh: Path, tmp_path: Path, **changes: Any) -> Server:
    """The fresh federation (a copy), or with ``changes`` a new one initialised with them."""
    import shutil

    if changes:
        stored = Federation(Store(fresh)).config
        Federation.initialize(FederationArguments(**{**stored.__dict__, **changes}), tmp_path / "state")
    else:
        shutil.copytree(fresh, tmp_path / "state")
    server = Server(tmp_path / "state")
    for client, n in SAMPLES.items():
        server.federation.join(client, n)
    return server


def write_deltas(server: Server, tmp_path: Path, seed: int = 0) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """A synthetic delta per client, written as the pending update files the real client keeps."""
    spec = server.federation.upload_spec
    generator = torch.Generator().manual_seed(seed)
    deltas, pending = {}, {}
    for client in SAMPLES:
        deltas[client] = {n: torch.randn(s, generator=generator) * 0.01 for n, s in spec.items()}
        path = tmp_path / f"{client}.safetensors"
        save_file(deltas[client], str(path))
        pending[client] = Pending(server.status()["round"], path)
    return deltas, pending


def drive(server: Server, pending: dict[str, Pending], tmp_path: Path, *, stop: Callable[[], bool],
          absent: set[str] = frozenset(), between: Callable[[], None] = lambda: None, rounds: int = 50) -> dict:
    """Step every present client once per pass (each with its own state folder, ``between`` after each) and tick
    the server after each pass, until ``stop()``."""
    results: dict[str, bool] = {}
    for _ in range(rounds):
        if stop():
            return results
        for client in sorted(pending):
            if client in absent or client in results:
                continue
            uploader = SecureUploader(FlaskClientAdapter(server, client), server.federation.client_config(),
                                      tmp_path / client)
            finished = uploader.step(pending[client])
            if finished is not None:
                results[client] = finished
            between()  # after each client: in the middle of a stage
        server.federation.tick()
    raise AssertionError(f"not finished: {server.status()}")


def expire_stage(server: Server) -> None:
    """Move the secure-aggregation clock past the open stage's deadline (--round_timeout 60): no sleeping."""
    secure = server.federation.secure
    offset = getattr(secure, "test_offset", 0.0) + 61
    secure.test_offset = offset
    secure.clock = lambda: time.time() + offset


def aggregated(server: Server, round_number: int = 1) -> Callable[[], bool]:
    return lambda: any(h["round"] == round_number for h in server.federation.history())


def global_delta(server: Server) -> dict[str, torch.Tensor]:
    store = server.federation.store
    assert server.federation.versions.latest().version == 1
    new, _ = load_state(store.state_path(1))
    old, _ = load_state(store.state_path(0))
    return {k: new[k] - old[k] for k in new}


def plain_mean(deltas: dict, clients: list[str]) -> dict[str, torch.Tensor]:
    total = sum(SAMPLES[c] for c in clients)
    return {n: sum(deltas[c][n].double() * SAMPLES[c] / total for c in clients).float() for n in deltas[clients[0]]}


def assert_close(actual: dict, expected: dict, bound: float = 1e-6) -> None:
    for name in expected:
        assert torch.max(torch.abs(actual[name] - expected[name])).item() <= bound + 1e-6, name  # + float32 global


def correlation_check(state_dir: Path, deltas: dict) -> int:
    """|corr| < 0.01 between every tensor-sized file under state_dir (globals excepted) and every delta."""
    from fedllm.secagg.encoding import FixedPoint
    from fedllm.secagg.wire import parse_masked

    checked = 0
    plain = {c: np.concatenate([d[n].numpy().ravel() for n in sorted(d)]) for c, d in deltas.items()}
    for path in state_dir.rglob("*"):
        if not path.is_file() or "globals" in path.parts or "adapters" in path.parts or path.suffix == ".json":
            continue
        if path.suffix != ".safetensors":
            continue
        vector = FixedPoint(32, 1.0).signed(parse_masked(path.read_bytes())[0])[:-1]
        for delta in plain.values():
            assert abs(np.corrcoef(vector.astype(np.float64), delta.astype(np.float64))[0, 1]) < 0.01
        checked += 1
    return checked


def test_secure_round_equals_plain_fedavg_and_the_server_holds_nothing_correlated(fresh: Path, tmp_path: Path):
    server = make_server(fresh, tmp_path)
    deltas, pending = write_deltas(server, tmp_path)
    seen_masked = []

    def look() -> None:
        if server.status()["secagg"]["stage"] == "unmask":
            seen_masked.append(correlation_check(server.state_dir, deltas))
            mine = server.http.get("/v1/round", headers={"X-FedLLM-Client": "c0"}).get_json()
            assert mine["submitted"] and not mine["selected"]  # in, and past the stage where a client joins

    results = drive(server, pending, tmp_path, stop=aggregated(server), between=look)
    assert results == dict.fromkeys(SAMPLES, True) and seen_masked and seen_masked[0] == 5
    assert_close(global_delta(server), plain_mean(deltas, list(SAMPLES)))
    assert not list((server.state_dir / "updates").rglob("*.safetensors"))  # no plaintext update, ever
    assert correlation_check(server.state_dir, deltas) == 0  # the round's masked inputs are deleted
    record = server.federation.history()[0]
    assert record["participants"] == sorted(SAMPLES) and record["secagg"]["dropped"]["advertise"] == 0
    view = server.http.get("/v1/secagg", headers={"X-FedLLM-Client": "c1"}).get_json()
    assert view["setup"]["weights"] == {"c1": SAMPLES["c1"] / sum(SAMPLES.values())}  # not the others' sizes
    status = server.status()
    assert status["round"] == 2 and status["secagg"]["stage"] == "advertise"
    assert set(status["secagg"]) >= {"stage", "clients_in_stage", "dropped"}
    scraped = server.http.get("/metrics").get_data(as_text=True)
    assert 'fedllm_secagg_stage{stage="advertise"} 1.0' in scraped and "fedllm_secagg_dropped" in scraped


@pytest.mark.parametrize("stage", ["advertise", "share", "masked", "unmask"])
def test_a_restart_in_every_stage_continues_the_round(fresh: Path, tmp_path: Path, stage: str):
    server = make_server(fresh, tmp_path)
    deltas, pending = write_deltas(server, tmp_path, seed=1)
    restarted = []

    def restart_once() -> None:
        if not restarted and server.status()["secagg"]["stage"] == stage:
            server.restart()
            restarted.append(stage)

    drive(server, pending, tmp_path, stop=aggregated(server), between=restart_once)
    assert restarted == [stage]
    assert_close(global_delta(server), plain_mean(deltas, list(SAMPLES)))


@pytest.mark.parametrize(("stage", "count"), [("share", 1), ("masked", 2), ("unmask", 1)])
def test_clients_vanishing_in_a_stage_are_dropped_at_its_deadline(fresh: Path, tmp_path: Path, stage: str,
                                                                  count: int):
    server = make_server(fresh, tmp_path, round_timeout=60)
    deltas, pending = write_deltas(server, tmp_path, seed=2)
    vanished = set(sorted(SAMPLES)[:count])
    absent: set[str] = set()

    def vanish_then_expire() -> None:
        secagg = server.status()["secagg"]
        if secagg["stage"] == stage and not absent:
            absent.update(vanished)
        if absent and secagg["stage"] == stage and secagg["answered"] >= 5 - count:
            expire_stage(server)  # the others answered; the vanished never will

    drive(server, pending, tmp_path, stop=aggregated(server), between=vanish_then_expire, absent=absent)
    # Gone after its masked upload (absent from the unmasking), a client's update still counts.
    survivors = sorted(SAMPLES) if stage == "unmask" else sorted(set(SAMPLES) - vanished)
    record = server.federation.history()[0]
    assert record["participants"] == survivors
    assert record["secagg"]["dropped"][stage] == count
    assert_close(global_delta(server), plain_mean(deltas, survivors))


def test_below_threshold_the_round_reruns(fresh: Path, tmp_path: Path):
    server = make_server(fresh, tmp_path, round_timeout=60)
    deltas, pending = write_deltas(server, tmp_path, seed=3)
    absent: set[str] = set()
    phase = ["running"]

    def vanish_then_return() -> None:
        secagg = server.status()["secagg"]
        if phase[0] == "running" and secagg["stage"] == "share":
            absent.update({"c0", "c1", "c2"})  # 2 of 5 left: below t = 3
            phase[0] = "vanished"
        elif phase[0] == "vanished" and secagg["stage"] == "share" and secagg["answered"] == 2:
            expire_stage(server)
            phase[0] = "expired"
        elif phase[0] == "expired" and secagg["attempt"] == 1:
            absent.clear()  # 2 remaining are too few for a re-run of their own: a fresh draw of all 5
            phase[0] = "rerun"

    drive(server, pending, tmp_path, stop=aggregated(server), between=vanish_then_return, absent=absent)
    events = [e for e in server.federation.events() if e["action"] == "secagg_rerun"]
    assert phase[0] == "rerun" and len(events) == 1 and events[0]["detail"]["stage"] == "share"
    assert_close(global_delta(server), plain_mean(deltas, sorted(SAMPLES)))


def _post(server: Server, client: str, stage: str, query: str = "round=1&attempt=0", **kwargs):
    return server.http.post(f"/v1/secagg/{stage}?{query}", headers={"X-FedLLM-Client": client}, **kwargs)


def test_bad_stage_messages_are_refused_and_change_nothing(fresh: Path, tmp_path: Path):
    server = make_server(fresh, tmp_path)
    state = server.state_dir / "secagg" / "r000001" / "a00" / "state.json"
    server.http.get("/v1/secagg", headers={"X-FedLLM-Client": "c0"})
    before = state.read_bytes()
    keys = {"c_pk": "11" * 32, "s_pk": "22" * 32}
    assert _post(server, "c0", "shares", json={"shares": {}}).status_code == 409  # reordered
    assert _post(server, "c0", "keys", "round=1&attempt=3", json=keys).status_code == 409  # another attempt
    assert _post(server, "c0", "keys", "round=7&attempt=0", json=keys).status_code == 409
    assert _post(server, "c0", "keys", json={"c_pk": "zz"}).status_code == 422
    assert _post(server, "stranger", "keys", json=keys).status_code == 409
    assert _post(server, "c0", "keys", "round=x", json=keys).status_code == 400
    assert _post(server, "c0", "masked", data=b"not safetensors").status_code in (409, 422)
    assert state.read_bytes() == before
    upload = server.http.post("/v1/update?round=1", data=encode({}, "float32"),
                              headers={"X-FedLLM-Client": "c0", "X-FedLLM-Num-Samples": "10"})
    assert upload.status_code == 409 and upload.get_json()["error"] == "secure aggregation required"


def test_masked_input_of_wrong_length_twice_or_late_is_refused(fresh: Path, tmp_path: Path):
    server = make_server(fresh, tmp_path)
    deltas, pending = write_deltas(server, tmp_path, seed=4)
    drive(server, pending, tmp_path, stop=lambda: server.status()["secagg"]["stage"] == "masked")
    length = server.federation.secure.length
    assert _post(server, "c0", "masked", data=masked_file(np.zeros(length - 1, np.uint32), [])).status_code == 422
    assert _post(server, "c0", "masked", data=masked_file(np.zeros(length, np.uint64), [])).status_code == 422
    assert _post(server, "c0", "masked", data=masked_file(np.zeros(length, np.uint32), ["c9"])).status_code == 422
    first = _post(server, "c0", "masked", data=masked_file(np.zeros(length, np.uint32), []))
    assert first.status_code == 200
    assert _post(server, "c0", "masked", data=masked_file(np.zeros(length, np.uint32), [])).get_json()["duplicate"]
    assert _post(server, "c0", "masked", data=masked_file(np.ones(length, np.uint32), [])).status_code == 409
    masked_dir = server.state_dir / "secagg" / "r000001" / "a00" / "masked"
    assert len(list(masked_dir.iterdir())) == 1
    drive(server, {c: p for c, p in pending.items() if c != "c0"}, tmp_path,
          stop=lambda: server.status()["secagg"]["stage"] == "unmask")
    late = _post(server, "c1", "masked", data=masked_file(np.zeros(length, np.uint32), []))
    assert late.status_code == 409 and late.get_json()["error"] == "secagg stage"


@pytest.mark.parametrize(("changes", "reason"), [
    ({"fed_alg": "krum"}, "robust rules"), ({"fed_alg": "fedmedian"}, "individual updates"),
    ({"dp": "server"}, "cannot clip"),
    ({"sample_clients": 2, "min_fit_clients": 2}, "at least 3 clients"),
])
def test_incompatible_settings_are_refused_at_start(tiny_model_dir: Path, changes: dict, reason: str):
    settings = {"num_clients": 5, "sample_clients": 5, **changes}
    config = FederationArguments(model_name_or_path=str(tiny_model_dir), secure_aggregation="secagg+", **settings)
    with pytest.raises(ValueError, match=reason):
        config.validate()


def test_composes_with_fedadam_and_client_dp(fresh: Path, tmp_path: Path):
    """FedAdam's server step and --dp client's noise run on the secure mean (σ = 0: the step is checkable)."""
    server = make_server(fresh, tmp_path, fed_alg="fedadam", dp="client", dp_noise_multiplier=0.0,
                         dp_clip_norm="1.0")
    deltas, pending = write_deltas(server, tmp_path, seed=5)
    drive(server, pending, tmp_path, stop=aggregated(server))
    from fedllm.algorithms import InMemoryUpdate, run_aggregation

    old, state = load_state(server.federation.store.state_path(0))
    mean = {n: sum(deltas[c][n] for c in SAMPLES) / 5 for n in old}  # --dp: equal weights
    expected, _ = run_aggregation(server.federation.algorithm.inner, old, [InMemoryUpdate("m", 1, mean)], state)
    new, _ = load_state(server.federation.store.state_path(1))
    assert_close({k: new[k] for k in expected}, expected, bound=1e-5)
    assert json.dumps(server.status()["dp"])


@pytest.mark.parametrize("fed_alg", ["fedavg", "scaffold"])
def test_the_simulation_runs_the_same_stages(fresh: Path, tmp_path: Path, fed_alg: str):
    """run_federation (simulate.py's loop) with synthetic updates: the secure mean equals the plain one; with
    SCAFFOLD every client commits c_i⁺ = c_i + Δc_i (fedllm.client.state) and the server's c = (1/N) Σ_i c_i."""
    from fedllm.client.state import FederationBinding
    from fedllm.simulation import ClientPool, run_federation

    server = make_server(fresh, tmp_path, fed_alg=fed_alg)
    federation = server.federation
    deltas, _ = write_deltas(server, tmp_path, seed=6)

    class SyntheticClients(ClientPool):
        clients_dir = tmp_path / "clients"

        def num_samples(self, client_id: str) -> int:
            return SAMPLES[client_id]

        def play_round(self, federation, client_ids, global_tensors, round_number, learning_rate, max_steps,
                       clip_norm=None) -> None:
            binding = FederationBinding.of(federation.client_config())
            for client_id in client_ids:
                state = self.client_state(client_id, binding)
                update = {n: t * round_number for n, t in deltas[client_id].items()}
                committed = state.committed()
                c_i = {n: committed.get(n, torch.zeros_like(t)) + t for n, t in update.items() if n.startswith("control.")}
                pending = state.write_pending(round_number, encode(update, "float32"), SAMPLES[client_id], c_i)
                self.deliver(federation, client_id, pending)

    old, _ = load_state(federation.store.state_path(0))
    history = run_federation(federation, SyntheticClients(), sorted(SAMPLES), name="secagg",
                             history_file=tmp_path / "history.json")
    assert [h["participants"] for h in history] == [sorted(SAMPLES)] * 2
    new, _ = load_state(federation.store.state_path(2))
    mean = plain_mean(deltas, sorted(SAMPLES))
    assert_close({k: new[k] - old[k] for k in new}, {k: 3 * mean[k] for k in new}, bound=3e-6)  # rounds 1+2
    _, c = load_state(federation.store.state_path(2))
    assert bool(c) == (fed_alg == "scaffold")
    if fed_alg == "fedavg":
        return
    client_states = [load_file(str(tmp_path / "clients" / client / "client_state.safetensors")) for client in SAMPLES]
    for name, tensor in c.items():  # as tests/test_algorithms_http.py::assert_scaffold_controls_round_trip
        torch.testing.assert_close(tensor, sum(s[name] for s in client_states) / 5, atol=1e-7, rtol=0)


def test_inconsistent_unmasking_shares_rerun_the_round(fresh: Path, tmp_path: Path):
    """A revealed share that does not lie on its polynomial (5 answers, t = 3: the extra ones are checked) fails
    the attempt instead of producing a wrong aggregate; the round re-runs and then aggregates correctly."""
    server = make_server(fresh, tmp_path)
    deltas, pending = write_deltas(server, tmp_path, seed=7)
    real_tick = server.federation.tick
    server.federation.tick = lambda: None  # hold the aggregation back until the state is tampered with
    drive(server, pending, tmp_path, stop=lambda: server.status()["phase"] == "aggregating")
    path = server.state_dir / "secagg" / "r000001" / "a00" / "state.json"
    stored = json.loads(path.read_text())
    share = stored["state"]["unmask"]["c1"]["b"]["c0"]
    stored["state"]["unmask"]["c1"]["b"]["c0"] = f"{int(share, 16) ^ 1:0{len(share)}x}"
    path.write_text(json.dumps(stored))
    server.federation.tick = real_tick
    assert server.federation.tick() is False
    assert server.status()["phase"] == "training" and server.federation.secure.view("c0")["attempt"] == 1
    assert [e["detail"]["stage"] for e in server.federation.events() if e["action"] == "secagg_rerun"] == ["unmask"]
    drive(server, pending, tmp_path, stop=aggregated(server))
    assert_close(global_delta(server), plain_mean(deltas, sorted(SAMPLES)))


def test_an_operator_abort_starts_a_new_attempt(fresh: Path, tmp_path: Path):
    server = make_server(fresh, tmp_path)
    deltas, pending = write_deltas(server, tmp_path, seed=8)
    aborted = []

    def abort_in_share() -> None:
        if not aborted and server.status()["secagg"]["stage"] == "share":
            server.federation.abort_round("operator@test")
            aborted.append(True)

    drive(server, pending, tmp_path, stop=aggregated(server), between=abort_in_share)
    assert aborted and server.federation.history()[0]["secagg"]["attempt"] == 1
    assert_close(global_delta(server), plain_mean(deltas, sorted(SAMPLES)))


@pytest.mark.parametrize("vanished", [[], ["c1"]])
def test_scaffold_global_and_control_variate_equal_the_plain_aggregation(fresh: Path, tmp_path: Path,
                                                                         vanished: list[str]):
    """SCAFFOLD under SecAgg+: Δw by the weighted mean, Δc by the plain sum; a client gone after the share exchange
    is not counted and does not commit its c_i, so the server's c = (1/N) Σ_i c_i over the committed c_i."""
    from fedllm.algorithms import InMemoryUpdate, run_aggregation
    from fedllm.secagg.encoding import FixedPoint

    server = make_server(fresh, tmp_path, fed_alg="scaffold", round_timeout=60)
    deltas, pending = write_deltas(server, tmp_path, seed=6)
    assert any(n.startswith("control.") for n in deltas["c0"])
    absent: set[str] = set()

    def vanish_then_expire() -> None:
        secagg = server.status()["secagg"]
        if vanished and secagg["stage"] == "masked" and not absent:
            absent.update(vanished)  # answered the share exchange, never uploads its masked input
        if absent and secagg["stage"] == "masked" and secagg["answered"] >= 5 - len(vanished):
            expire_stage(server)

    results = drive(server, pending, tmp_path, stop=aggregated(server), between=vanish_then_expire, absent=absent)
    assert not results  # a client with state waits for the aggregate before it commits
    for client in SAMPLES:  # every client, the vanished one back too, looks once more: the round is aggregated
        uploader = SecureUploader(FlaskClientAdapter(server, client), server.federation.client_config(),
                                  tmp_path / client)
        results[client] = uploader.step(pending[client])
    survivors = sorted(set(SAMPLES) - set(vanished))
    assert results == {c: c in survivors for c in SAMPLES}  # commit exactly when counted (server's history)
    assert server.federation.history()[0]["participants"] == survivors

    old, state = load_state(server.federation.store.state_path(0))
    new, new_state = load_state(server.federation.store.state_path(1))
    plain_global, plain_state = run_aggregation(server.federation.algorithm, old, [
        InMemoryUpdate(c, SAMPLES[c], deltas[c]) for c in survivors], state)
    assert_close(new, plain_global)
    bound = FixedPoint(32, 1.0).sum_error_bound(len(survivors), len(SAMPLES)) / 5  # c errs by Σ's bound / N
    committed = {c: {n: t for n, t in deltas[c].items() if n.startswith("control.")} for c in survivors}
    assert set(new_state) == set(plain_state) and new_state
    for name, c in new_state.items():
        assert torch.max(torch.abs(c - plain_state[name])).item() <= bound + 1e-7, name
        mean_of_clients = sum(committed[client][name] for client in survivors) / 5  # uncommitted c_i stay 0
        torch.testing.assert_close(c, mean_of_clients, atol=bound + 1e-7, rtol=0)
    assert any(c.abs().sum() > 0 for c in new_state.values())
