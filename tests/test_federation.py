"""Round logic of the parameter server, without HTTP: joins, sampling, uploads, deadlines, aggregation, restarts."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedllm.config import FederationArguments
from fedllm.server import errors
from fedllm.server.federation import Federation
from fedllm.server.sampler import ClientSampler
from fedllm.server.store import Store
from fedllm.wire import decode_file, encode

from .conftest import joined_copy

CLIENTS = {"alice": 10, "bob": 30, "carol": 60}
ROUND_TIMEOUT = 0.5  # seconds; short, yet long enough for a busy CI machine to act within a round


def make_config(model_dir: Path, **overrides: Any) -> FederationArguments:
    settings: dict[str, Any] = dict(model_name_or_path=str(model_dir), num_clients=3, sample_clients=2, num_rounds=3,
                                    peft_lora_r=4, round_timeout=0, max_steps=2, save_model_freq=0)
    settings.update(overrides)
    return FederationArguments(**settings)


@pytest.fixture(scope="module")
def prepared(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """State dirs built once: ``fresh`` (initialised), ``joined`` (all three joined), ``deadline`` (short rounds)."""
    root = tmp_path_factory.mktemp("federation")
    Federation.initialize(make_config(tiny_model_dir), root / "fresh")
    joined_copy(root / "fresh", root / "joined", CLIENTS)
    Federation.initialize(make_config(tiny_model_dir, round_timeout=ROUND_TIMEOUT, min_fit_clients=1),
                          root / "deadline")
    return root


@pytest.fixture
def open_federation(prepared: Path, tmp_path: Path) -> Iterator:
    """``open_federation(name)``: a Federation on a private copy of a prepared state dir."""
    stores: list[Store] = []

    def _open(name: str = "joined", target: Path | None = None) -> Federation:
        state_dir = target or tmp_path / f"state-{len(stores)}"
        if not state_dir.exists():
            shutil.copytree(prepared / name, state_dir)
        store = Store(state_dir)
        stores.append(store)
        return Federation(store)

    yield _open
    for store in stores:
        store.close()


def make_delta(fed: Federation, seed: int, loss: str | None = "2.0") -> tuple[bytes, dict[str, torch.Tensor]]:
    """A valid upload body (and its tensors) for ``fed``."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(shape, generator=generator) * 0.01 for k, shape in fed.upload_spec.items()}
    metadata = {"train_loss": loss} if loss is not None else None
    return encode(tensors, fed.config.wire_dtype, metadata=metadata), tensors


def push(fed: Federation, client: str, body: bytes, round_number: int | None = None,
         num_samples: int | None = None, sha256: str | None = None) -> dict[str, Any]:
    if round_number is None:
        round_number = fed.status()["round"]
    return fed.receive_update(client, round_number, num_samples or CLIENTS.get(client, 1), io.BytesIO(body).read,
                              len(body), sha256)


def sampled(fed: Federation) -> list[str]:
    return fed.status()["sampled"]


def not_sampled(fed: Federation) -> str:
    return next(c for c in CLIENTS if c not in sampled(fed))


def update_count(fed: Federation) -> int:
    return fed.store.read().execute("SELECT COUNT(*) FROM updates").fetchone()[0]


def files(state_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(state_dir)) for p in state_dir.rglob("*") if p.is_file())


def play_round(fed: Federation, seed: int) -> None:
    """Every sampled client pushes; the round aggregates."""
    for i, client in enumerate(sampled(fed)):
        push(fed, client, make_delta(fed, seed + i)[0])
    assert fed.tick() is True


def expect_error(kind: type[errors.FederationError], call, *args, **kwargs) -> errors.FederationError:
    with pytest.raises(kind) as info:
        call(*args, **kwargs)
    return info.value


def sample_clients(client_ids: list[str], k: int, seed: int, round_number: int) -> list[str]:
    return ClientSampler(seed, k).sample(client_ids, round_number)


# ---------------------------------------------------------------- joining and sampling
def test_waiting_until_all_clients_joined(open_federation) -> None:
    fed = open_federation("fresh")
    status = fed.status()
    assert status["phase"] == "waiting" and status["round"] == 0 and status["global_version"] == 0
    assert fed.tick() is False
    assert fed.join("alice", 10) == {"client_id": "alice", "clients_joined": 1, "num_clients": 3}
    assert fed.join("alice", 11)["clients_joined"] == 1  # re-joining is not a new place
    fed.join("bob", 30)
    assert fed.status()["phase"] == "waiting"
    assert fed.status("bob")["selected"] is False
    fed.join("carol", 60)
    status = fed.status()
    assert status["phase"] == "training" and status["round"] == 1
    assert len(status["sampled"]) == 2 and set(status["sampled"]) <= set(CLIENTS)
    assert status["deadline"] is None  # round_timeout=0 waits forever
    assert fed.store.clients(fed.store.read())["alice"]["num_samples"] == 11


def test_sample_is_seeded_and_reproducible(open_federation, tiny_model_dir: Path, tmp_path: Path) -> None:
    first, second = open_federation("fresh"), open_federation("fresh")
    for client in CLIENTS:
        first.join(client, 1)
    for client in reversed(list(CLIENTS)):
        second.join(client, 1)
    assert sampled(first) == sampled(second) == sample_clients(list(CLIENTS), 2, first.config.seed, 1)
    assert sample_clients(["c", "a", "b"], 2, 7, 3) == sample_clients(["a", "b", "c"], 2, 7, 3)
    draws = {tuple(sample_clients(list(CLIENTS), 2, seed, 1)) for seed in range(20)}
    assert len(draws) > 1  # the seed matters
    assert all(len(set(d)) == 2 for d in draws)
    # A whole federation with another seed, initialised from scratch, still samples sample_clients.
    state_dir = tmp_path / "other-seed"
    Federation.initialize(make_config(tiny_model_dir, seed=1, sample_clients=3), state_dir)
    other = Federation(Store(state_dir))
    for client in CLIENTS:
        other.join(client, 1)
    assert sampled(other) == sorted(CLIENTS)
    other.store.close()


def test_join_when_full_is_forbidden(open_federation) -> None:
    fed = open_federation()
    before = fed.status()
    error = expect_error(errors.FederationFull, fed.join, "dave", 5)
    assert "full" in error.error
    assert fed.status() == before
    assert "dave" not in fed.store.clients(fed.store.read())
    fed.join("bob", 31)  # a member may re-join; the round does not restart
    assert fed.status()["round"] == 1 and sampled(fed) == before["sampled"]


# ---------------------------------------------------------------- a round of FedAvg
def test_fedavg_round(open_federation) -> None:
    fed = open_federation()
    first, second = sampled(fed)
    global0 = decode_file(fed.latest_global().path)
    body1, delta1 = make_delta(fed, 1, loss="2.0")
    body2, delta2 = make_delta(fed, 2, loss="4.0")

    result = push(fed, first, body1, num_samples=10)
    assert result == {"accepted": True, "duplicate": False, "round": 1, "sha256": hashlib.sha256(body1).hexdigest()}
    status = fed.status(first)
    assert status["phase"] == "training" and status["received"] == [first] and status["submitted"] is True
    assert fed.aggregate_if_needed() is False and fed.tick() is False

    push(fed, second, body2, num_samples=30)
    assert fed.status()["phase"] == "aggregating"
    assert fed.status(second)["selected"] is False
    assert fed.history() == []

    assert fed.aggregate_if_needed() is True
    assert fed.aggregate_if_needed() is False
    assert fed.tick() is False

    history = fed.history()
    assert len(history) == 1
    record = history[0]
    assert record["round"] == 1 and record["participants"] == sorted([first, second])
    assert record["sampled"] == [first, second]
    assert record["num_samples"] == 40
    assert record["train_loss"] == pytest.approx((2.0 * 10 + 4.0 * 30) / 40)
    assert record["bytes_received"] == len(body1) + len(body2)
    latest = fed.latest_global()
    assert latest.version == 1 and record["global_version"] == 1 and record["global_sha256"] == latest.sha256
    assert hashlib.sha256(Path(latest.path).read_bytes()).hexdigest() == latest.sha256

    new_global = decode_file(latest.path)
    assert set(new_global) == set(global0)
    for name in global0:
        expected = global0[name] + (10 * delta1[name] + 30 * delta2[name]) / 40
        torch.testing.assert_close(new_global[name], expected, rtol=1e-6, atol=1e-7)

    status = fed.status()
    assert status["round"] == 2 and status["phase"] == "training" and status["global_version"] == 1
    assert status["received"] == [] and len(status["sampled"]) == 2
    assert not fed.store.update_dir(1).exists()  # consumed updates are dropped


def test_metrics_without_loss(open_federation) -> None:
    fed = open_federation()
    for i, client in enumerate(sampled(fed)):
        push(fed, client, make_delta(fed, i, loss=None)[0])
    assert fed.tick() is True
    assert fed.history()[0]["train_loss"] is None


# ---------------------------------------------------------------- idempotency and conflicts
def test_identical_retry_is_accepted_once(open_federation) -> None:
    fed = open_federation()
    first, second = sampled(fed)
    body, _ = make_delta(fed, 1)
    assert push(fed, first, body)["duplicate"] is False
    listing = files(fed.store.root)
    again = push(fed, first, body)
    assert again["accepted"] is True and again["duplicate"] is True
    assert update_count(fed) == 1 and fed.status()["phase"] == "training"
    assert files(fed.store.root) == listing

    # The last update closes the round; its retry (say the response was lost) is still accepted.
    body2, _ = make_delta(fed, 2)
    push(fed, second, body2)
    assert fed.status()["phase"] == "aggregating"
    assert push(fed, second, body2)["duplicate"] is True
    assert fed.tick() is True
    # ... and so it is after the aggregation, without leaving a file behind.
    listing = files(fed.store.root)
    assert push(fed, second, body2, round_number=1)["duplicate"] is True
    assert files(fed.store.root) == listing
    assert fed.history()[0]["num_samples"] == sum(CLIENTS[c] for c in (first, second))
    assert update_count(fed) == 2


def test_different_second_update_conflicts(open_federation) -> None:
    fed = open_federation()
    first = sampled(fed)[0]
    push(fed, first, make_delta(fed, 1)[0])
    listing = files(fed.store.root)
    error = expect_error(errors.AlreadySubmitted, push, fed, first, make_delta(fed, 2)[0])
    assert "already" in error.error
    assert files(fed.store.root) == listing  # the rejected file is not left in updates/
    assert update_count(fed) == 1


def test_wrong_round_not_sampled_not_joined(open_federation) -> None:
    fed = open_federation()
    body, _ = make_delta(fed, 1)
    listing = files(fed.store.root)
    client = sampled(fed)[0]
    assert expect_error(errors.WrongRound, push, fed, client, body, round_number=2).error == "wrong round"
    expect_error(errors.WrongRound, push, fed, client, body, round_number=0)
    assert expect_error(errors.NotSampled, push, fed, not_sampled(fed), body).error == "not sampled"
    expect_error(errors.NotJoined, push, fed, "zed", body)
    assert update_count(fed) == 0 and files(fed.store.root) == listing
    assert not list(fed.store.incoming_dir.iterdir())


def test_no_round_yet(open_federation) -> None:
    fed = open_federation("fresh")
    fed.join("alice", 1)
    expect_error(errors.NoOpenRound, push, fed, "alice", make_delta(fed, 1)[0], round_number=1, num_samples=1)


def test_invalid_uploads_leave_nothing(open_federation) -> None:
    fed = open_federation()
    client = sampled(fed)[0]
    listing = files(fed.store.root)
    assert expect_error(errors.MalformedUpdate, push, fed, client, b"not a safetensors file").error == "malformed update"
    bad = {k: torch.zeros(s) for k, s in fed.upload_spec.items()}
    bad[next(iter(bad))][0, 0] = float("nan")
    assert expect_error(errors.InvalidUpdate, push, fed, client, encode(bad)).error == "invalid update"
    body, _ = make_delta(fed, 1)
    expect_error(errors.ChecksumMismatch, push, fed, client, body, sha256="0" * 64)
    expect_error(errors.TruncatedBody, fed.receive_update, client, 1, 1, io.BytesIO(body).read, len(body) + 10, None)  # truncated
    small = Federation(fed.store, max_upload_bytes=100)
    expect_error(errors.UploadTooLarge, push, small, client, body)  # declared length
    expect_error(errors.UploadTooLarge, small.receive_update, client, 1, 1, io.BytesIO(body).read, None, None)  # streamed
    assert files(fed.store.root) == listing and update_count(fed) == 0
    assert push(fed, client, body, sha256=hashlib.sha256(body).hexdigest().upper())["accepted"] is True


# ---------------------------------------------------------------- deadlines
def wait_past_deadline(fed: Federation) -> None:
    deadline = fed.status()["deadline"]
    assert deadline is not None
    time.sleep(max(0.0, deadline - time.time()) + 0.05)


def joined(fed: Federation) -> Federation:
    for client, n in CLIENTS.items():
        fed.join(client, n)
    return fed


def test_deadline_closes_round_with_min_fit_clients(open_federation) -> None:
    fed = joined(open_federation("deadline"))
    first, second = sampled(fed)
    push(fed, first, make_delta(fed, 1)[0])
    if time.time() < fed.status()["deadline"] - 0.2:
        assert fed.tick() is False  # before the deadline nothing happens
    wait_past_deadline(fed)
    assert fed.tick() is True
    record = fed.history()[0]
    assert record["participants"] == [first] and record["num_samples"] == CLIENTS[first]
    status = fed.status()
    assert status["round"] == 2 and status["phase"] == "training" and status["deadline"] > time.time()
    expect_error(errors.WrongRound, push, fed, second, make_delta(fed, 2)[0], round_number=1)


def test_deadline_extended_without_updates(open_federation) -> None:
    fed = joined(open_federation("deadline"))
    first_deadline = fed.status()["deadline"]
    wait_past_deadline(fed)
    assert fed.tick() is False
    status = fed.status()
    assert status["phase"] == "training" and status["round"] == 1
    assert status["deadline_extensions"] == 1 and status["deadline"] > first_deadline
    wait_past_deadline(fed)
    assert fed.tick() is False
    assert fed.status()["deadline_extensions"] == 2
    push(fed, sampled(fed)[0], make_delta(fed, 1)[0])  # still open
    wait_past_deadline(fed)
    assert fed.tick() is True


def test_update_after_round_closed(open_federation, monkeypatch: pytest.MonkeyPatch) -> None:
    fed = joined(open_federation("deadline"))
    first, second = sampled(fed)
    push(fed, first, make_delta(fed, 1)[0])
    monkeypatch.setattr(fed.rounds, "aggregate_if_needed", lambda: False)
    wait_past_deadline(fed)
    fed.tick()
    assert fed.status()["phase"] == "aggregating"
    listing = files(fed.store.root)
    expect_error(errors.RoundClosed, push, fed, second, make_delta(fed, 2)[0])
    assert files(fed.store.root) == listing and update_count(fed) == 1


# ---------------------------------------------------------------- restarts and settings
def test_restart_continues_the_round(open_federation, tiny_model_dir: Path) -> None:
    fed = open_federation()
    first, second = sampled(fed)
    push(fed, first, make_delta(fed, 1)[0])
    fed.store.close()

    Federation.initialize(make_config(tiny_model_dir), fed.store.root)  # same settings: resumes
    restarted = Federation(Store(fed.store.root))
    status = restarted.status()
    assert status["round"] == 1 and status["received"] == [first] and status["phase"] == "training"
    assert push(restarted, first, make_delta(fed, 1)[0])["duplicate"] is True
    push(restarted, second, make_delta(fed, 2)[0])
    assert restarted.tick() is True
    for round_number in (2, 3):
        assert restarted.status()["round"] == round_number
        play_round(restarted, 10 * round_number)
    status = restarted.status()
    assert status["phase"] == "finished" and status["round"] == 3 and status["global_version"] == 3
    assert [r["round"] for r in restarted.history()] == [1, 2, 3]
    restarted.store.close()


def test_initialize_with_other_settings_fails(open_federation, tiny_model_dir: Path) -> None:
    fed = open_federation()
    sha = fed.latest_global().sha256
    with pytest.raises(ValueError, match="--peft_lora_r"):
        Federation.initialize(make_config(tiny_model_dir, peft_lora_r=8), fed.store.root)
    with pytest.raises(ValueError, match="--sample_clients"):
        Federation.initialize(make_config(tiny_model_dir, sample_clients=4), fed.store.root)
    Federation.initialize(make_config(tiny_model_dir), fed.store.root)
    assert fed.latest_global().sha256 == sha and fed.status()["round"] == 1
    with pytest.raises(RuntimeError):
        Federation(Store(fed.store.root.parent / "never-initialised"))


def test_state_dir_can_move(open_federation, tmp_path: Path) -> None:
    """Recorded paths are relative: a state_dir copied or moved elsewhere keeps working."""
    fed = open_federation()
    first, second = sampled(fed)
    push(fed, first, make_delta(fed, 1)[0])
    fed.store.close()
    moved = tmp_path / "moved"
    shutil.move(fed.store.root, moved)
    fed2 = open_federation(target=moved)
    assert Path(fed2.latest_global().path).is_file()
    push(fed2, second, make_delta(fed2, 2)[0])
    assert fed2.tick() is True
    assert fed2.latest_global().path.startswith(str(moved.resolve()))
    paths = [r[0] for r in sqlite3.connect(moved / "state.db").execute("SELECT path FROM globals UNION SELECT path FROM updates")]
    assert paths and not any(Path(p).is_absolute() for p in paths)


def test_final_adapter_loads_with_peft(open_federation, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedllm.adapter import get_adapter_tensors

    fed = open_federation()
    for round_number in (1, 2, 3):
        play_round(fed, 10 * round_number)
    status = fed.status("alice")
    assert status["phase"] == "finished" and status["selected"] is False
    assert fed.tick() is False and fed.aggregate_if_needed() is False
    expect_error(errors.WrongRound, push, fed, sampled(fed)[0], make_delta(fed, 99)[0], round_number=4)
    assert [r["round"] for r in fed.history()] == [1, 2, 3]

    final = fed.store.root / "adapters" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(final))
    loaded = get_adapter_tensors(model)
    served = decode_file(fed.latest_global().path)
    assert set(loaded) == set(served)
    for name in served:
        torch.testing.assert_close(loaded[name], served[name])
    assert any(v.abs().sum() > 0 for k, v in loaded.items() if "lora_B" in k)  # training moved B off zero
    # Old global versions are pruned; the latest two stay.
    assert sorted(p.name for p in (fed.store.root / "globals").glob("v*[0-9].safetensors")) == [
        "v000002.safetensors", "v000003.safetensors"]


# ---------------------------------------------------------------- crash safety
def test_crash_before_commit_is_redone_once(open_federation, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fed = open_federation()
    for i, client in enumerate(sampled(fed)):
        push(fed, client, make_delta(fed, i)[0])
    fed.store.close()
    shutil.copytree(fed.store.root, tmp_path / "reference")
    reference = open_federation(target=tmp_path / "reference")  # the same round, aggregated without a crash
    assert reference.tick() is True
    expected = reference.latest_global()

    crashing = open_federation(target=fed.store.root)
    calls = {"n": 0}
    original = Store.insert_history

    def crash_once(db: sqlite3.Connection, round_number: int, record: dict[str, Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated crash before the commit")
        original(db, round_number, record)

    monkeypatch.setattr(Store, "insert_history", staticmethod(crash_once))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.tick()
    status = crashing.status()
    assert status["phase"] == "aggregating" and status["round"] == 1 and status["global_version"] == 0
    assert crashing.history() == []
    assert crashing.store.global_path(1).exists()  # files written, not committed

    assert crashing.tick() is True
    assert crashing.tick() is False
    assert len(crashing.history()) == 1 and calls["n"] == 2
    latest = crashing.latest_global()
    assert (latest.version, latest.sha256) == (expected.version, expected.sha256)
    assert crashing.status()["round"] == 2


# ---------------------------------------------------------------- the sampler and removals
def test_sampler_never_asks_for_more_than_eligible() -> None:
    sampler = ClientSampler(seed=3, sample_size=3)
    assert sampler.sample(["a", "b"], 1) == ["a", "b"]
    assert sampler.sample([], 1) == []
    assert sampler.redraw(["c", "a"], 2, attempt=1) == ["a", "c"]
    assert len(sampler.sample(list("abcdef"), 1)) == 3
    # Stragglers are replaced by fresh clients first; with too few fresh ones they keep their places.
    kept = sampler.replace_stragglers(["a", "b", "c", "d"], ["a", "b", "c"], ["a"], 1, 0)
    assert "a" in kept and "d" in kept and len(kept) == 3
    assert sampler.replace_stragglers(["a", "b"], ["a", "b", "c"], [], 1, 0) == ["a", "b"]  # c is no longer eligible


@pytest.fixture(scope="module")
def all_sampled(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir with --sample_clients = --num_clients = 3, every client joined (round 1 open)."""
    root = tmp_path_factory.mktemp("all-sampled")
    Federation.initialize(make_config(tiny_model_dir, sample_clients=3), root / "fresh")
    return joined_copy(root / "fresh", root / "joined", CLIENTS)


def open_copy(source: Path, tmp_path: Path, name: str = "state") -> Federation:
    shutil.copytree(source, tmp_path / name)
    return Federation(Store(tmp_path / name))


def test_removed_client_leaves_the_round_with_its_update(all_sampled: Path, tmp_path: Path) -> None:
    """All three sampled; alice pushes and is removed: her update is dropped, the round closes on bob and
    carol, every later round samples only them, and the federation runs to its end."""
    fed = open_copy(all_sampled, tmp_path)
    assert sampled(fed) == sorted(CLIENTS)
    global0 = decode_file(fed.latest_global().path)
    push(fed, "alice", make_delta(fed, 1)[0])
    fed.remove_client("admin", "alice")
    assert fed.status()["received"] == [] and sampled(fed) == ["bob", "carol"]
    assert not list(fed.store.update_dir(1).glob("alice.*"))  # its file went with its row
    body_b, delta_b = make_delta(fed, 2)
    push(fed, "bob", body_b)
    assert fed.status()["phase"] == "training"
    body_c, delta_c = make_delta(fed, 3)
    push(fed, "carol", body_c)
    assert fed.status()["phase"] == "aggregating"
    assert fed.tick() is True
    record = fed.history()[0]
    assert record["participants"] == ["bob", "carol"] and record["num_samples"] == 90
    new_global = decode_file(fed.latest_global().path)
    for name in global0:
        expected = global0[name] + (30 * delta_b[name] + 60 * delta_c[name]) / 90
        torch.testing.assert_close(new_global[name], expected, rtol=1e-6, atol=1e-7)
    for round_number in (2, 3):
        assert fed.status()["round"] == round_number and sampled(fed) == ["bob", "carol"]
        play_round(fed, 10 * round_number)
    assert fed.status()["phase"] == "finished"
    assert all("alice" not in r["participants"] for r in fed.history())
    expect_error(errors.ClientRemoved, fed.join, "alice", 10)
    fed.store.close()


def test_removing_the_last_missing_client_closes_the_round(all_sampled: Path, tmp_path: Path) -> None:
    fed = open_copy(all_sampled, tmp_path)
    push(fed, "bob", make_delta(fed, 2)[0])
    push(fed, "carol", make_delta(fed, 3)[0])
    fed.remove_client("admin", "alice")
    assert fed.status()["phase"] == "aggregating"
    assert fed.tick() is True and fed.history()[0]["participants"] == ["bob", "carol"]
    fed.store.close()


def test_removal_that_empties_the_round_redraws_it(prepared: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    Federation.initialize(make_config(tiny_model_dir, sample_clients=1, min_fit_clients=1), tmp_path / "one")
    fed = Federation(Store(joined_copy(tmp_path / "one", tmp_path / "state", CLIENTS)))
    (first,) = sampled(fed)
    push(fed, first, make_delta(fed, 1)[0])
    fed.remove_client("admin", first)
    (drawn,) = sampled(fed)
    status = fed.status()
    assert drawn != first and status["phase"] == "training" and status["received"] == []
    push(fed, drawn, make_delta(fed, 2)[0])
    assert fed.tick() is True and fed.history()[0]["participants"] == [drawn]
    fed.store.close()


def test_removing_every_client_finishes_the_federation(all_sampled: Path, tmp_path: Path) -> None:
    fed = open_copy(all_sampled, tmp_path)
    play_round(fed, 1)
    for client in CLIENTS:
        fed.remove_client("admin", client)
    status = fed.status("bob")
    assert status["phase"] == "finished" and status["selected"] is False
    event = next(e for e in fed.events() if e["action"] == "finished_early")
    assert event["actor"] == "federation" and "no eligible client" in event["detail"]["reason"]
    assert fed.tick() is False  # exports the newest global as the final adapter
    final = fed.output_dir / "final"
    assert (final / "adapter_model.safetensors").is_file()
    expect_error(errors.NoRoundToAbort, fed.abort_round, "admin")
    fed.store.close()


def test_removal_while_aggregating_is_redone_without_it(all_sampled: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A removal that lands between reading the updates and committing the aggregate: that attempt commits
    nothing; the next one aggregates without the removed client."""
    from fedllm.server import rounds

    fed = open_copy(all_sampled, tmp_path)
    for i, client in enumerate(sampled(fed)):
        push(fed, client, make_delta(fed, i)[0])
    real = rounds.run_aggregation
    removed: list[str] = []

    def remove_meanwhile(*args: Any, **kwargs: Any):
        if not removed:
            removed.append("carol")
            fed.remove_client("admin", "carol")
        return real(*args, **kwargs)

    monkeypatch.setattr(rounds, "run_aggregation", remove_meanwhile)
    assert fed.aggregate_if_needed() is False and fed.history() == []
    assert fed.status()["phase"] == "aggregating"
    assert fed.aggregate_if_needed() is True
    assert fed.history()[0]["participants"] == ["alice", "bob"]
    fed.store.close()


# ---------------------------------------------------------------- restarts with changed settings
def test_restart_applies_and_audits_operational_changes(prepared: Path, tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    """A longer --round_timeout applies to the open round; more --num_rounds continue a finished federation."""
    state_dir = tmp_path / "state"
    shutil.copytree(prepared / "joined", state_dir)
    Federation.initialize(make_config(tiny_model_dir, round_timeout=600), state_dir)
    fed = Federation(Store(state_dir))
    assert fed.config.round_timeout == 600
    assert fed.status()["deadline"] == pytest.approx(time.time() + 600, abs=30)
    event = fed.events()[0]
    assert event["action"] == "settings_changed" and event["actor"] == "operator@restart"
    assert event["detail"] == {"round_timeout": {"old": 0.0, "new": 600}}
    for round_number in (1, 2, 3):
        play_round(fed, 10 * round_number)
    assert fed.status()["phase"] == "finished"
    fed.store.close()

    Federation.initialize(make_config(tiny_model_dir, round_timeout=600, num_rounds=5), state_dir)
    fed = Federation(Store(state_dir))
    assert fed.events()[0]["detail"] == {"num_rounds": {"old": 3, "new": 5}}
    assert fed.status()["phase"] == "training" and fed.tick() is False  # the tick opens round 4
    for round_number in (4, 5):
        assert fed.status()["round"] == round_number
        play_round(fed, 10 * round_number)
    assert fed.status()["phase"] == "finished" and [r["round"] for r in fed.history()] == [1, 2, 3, 4, 5]
    fed.store.close()
    with pytest.raises(ValueError, match="5 rounds are already aggregated"):
        Federation.initialize(make_config(tiny_model_dir, round_timeout=600, num_rounds=4), state_dir)


def test_restart_refuses_identity_changes_naming_them(prepared: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    shutil.copytree(prepared / "joined", state_dir)
    with pytest.raises(ValueError, match=r"--fed_alg 'fedprox' \(state_dir has 'fedavg'\).*--seed 7"):
        Federation.initialize(make_config(tiny_model_dir, fed_alg="fedprox", seed=7, num_rounds=9), state_dir)
    fed = Federation(Store(state_dir))
    assert fed.config.num_rounds == 3 and fed.events() == []  # nothing applied, not even the operational change
    fed.store.close()


# ---------------------------------------------------------------- background failures
def test_background_failure_is_visible_and_recovers(prepared: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A tick that keeps failing: retried, counted, logged; /healthz says degraded (200) in every worker,
    /readyz is 503; once a tick succeeds both are back to ok."""
    from fedllm.server.app import create_app

    shutil.copytree(prepared / "joined", tmp_path / "state")
    fed, other_worker = Federation(Store(tmp_path / "state")), Federation(Store(tmp_path / "state"))
    app, other_app = create_app(fed, start_ticker=False), create_app(other_worker, start_ticker=False)
    progress = app.extensions["fedllm"]["progress"]
    http, other_http = app.test_client(), other_app.test_client()
    assert http.get("/readyz").status_code == 200 and http.get("/healthz").get_json() == {"status": "ok"}

    def broken() -> bool:
        raise OSError("the aggregation disk went away")

    monkeypatch.setattr(fed.rounds, "tick", broken)
    progress.run_once()
    progress.run_once()
    for client in (http, other_http):
        healthz = client.get("/healthz")
        assert healthz.status_code == 200
        assert healthz.get_json()["status"] == "degraded"
        assert "the aggregation disk went away" in healthz.get_json()["reason"]
        assert client.get("/readyz").status_code == 503
    assert http.get("/healthz").get_json()["failures"] == 2
    scrape = http.get("/metrics").get_data(as_text=True)
    assert "fedllm_degraded 1.0" in scrape
    assert re.search(r"^fedllm_background_failures_total [1-9]", scrape, re.M)

    monkeypatch.undo()
    progress.run_once()
    for client in (http, other_http):
        assert client.get("/healthz").get_json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
    fed.store.close()
    other_worker.store.close()


def test_scaffold_abort_keeps_the_control_variates_consistent(prepared: Path, tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    """An update answered 202 and then discarded by an abort: its client already committed c_i + Δc_i, so the
    server's c still absorbs Δc_i / N at the next aggregation (c = (1/N) Σ c_i), and a retry of it counts once."""
    from fedllm.server.versions import load_state

    Federation.initialize(make_config(tiny_model_dir, fed_alg="scaffold"), tmp_path / "fresh")
    fed = Federation(Store(joined_copy(tmp_path / "fresh", tmp_path / "state", CLIENTS)))
    first, _ = sampled(fed)
    aborted_body, aborted = make_delta(fed, 1)
    push(fed, first, aborted_body)
    fed.abort_round("admin")
    assert push(fed, first, aborted_body)["duplicate"] is True  # the lost-response retry is not a new update
    assert fed.status()["received"] == []
    contributions = [aborted]
    for i, client in enumerate(sampled(fed)):  # the new sample (it may draw the first client again)
        body, tensors = make_delta(fed, 10 + i)
        assert push(fed, client, body)["duplicate"] is False
        contributions.append(tensors)
    assert fed.tick() is True
    _, state = load_state(fed.latest_global().state_path)
    for name in (k for k in fed.upload_spec if k.startswith("control.")):
        expected = sum(c[name] for c in contributions) / 3
        torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-7)
    assert fed.store.carried(fed.store.read()) == []
    fed.store.close()
