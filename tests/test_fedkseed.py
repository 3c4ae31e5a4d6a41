"""FedKSeed: deterministic directions, the zeroth-order step, the server's scalars and its checks of seed pools."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save

from fedllm.algorithms import InMemoryUpdate, get_algorithm
from fedllm.algorithms.fedkseed import (
    INDEX,
    POOL,
    PROBE,
    PROBS,
    SCALARS,
    VALUE,
    PoolUpdate,
    draw_seeds,
    perturb,
    pool_of,
    pro_probabilities,
    probe,
    rebuild,
    zeroth_order_step,
)
from fedllm.config import FederationArguments
from fedllm.server import errors
from fedllm.server.federation import Federation
from fedllm.wire import decode_file

from .conftest import joined_federation_dir


def params(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return sorted({"b.weight": torch.randn(5, 3, generator=g), "a.bias": torch.randn(7, generator=g)}.items())


def test_directions_are_reproducible_and_rebuild_is_w0_minus_the_scalars_times_z() -> None:
    first, second = params(), params()
    perturb(first, 1234, 0.5)
    perturb(second, 1234, 0.5)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, second, strict=True))
    assert torch.equal(probe(1234), probe(1234)) and not torch.equal(probe(1234), probe(1235))
    w0 = {name: t.clone() for name, t in params()}
    tuned = params()
    seeds = draw_seeds(8, 99)
    assert seeds == draw_seeds(8, 99) and len(set(seeds)) == 8
    scalars = torch.zeros(8)
    scalars[2], scalars[5] = 0.3, -0.1
    rebuild(tuned, w0, scalars, seeds)
    for name, tensor in tuned:  # the same sum, drawn directly: z(σ) is the tensors' normal draws in name order
        expected = w0[name].clone()
        for s in (2, 5):
            g = torch.Generator().manual_seed(seeds[s])
            draws = {n: torch.randn(t.shape, generator=g) for n, t in params()}
            expected -= float(scalars[s]) * draws[name]
        torch.testing.assert_close(tensor, expected)


def test_the_two_point_step_estimates_the_directional_derivative_and_descends() -> None:
    """On L(w) = ½‖w − w*‖², g = ⟨∇L, z⟩ exactly (the central difference of a quadratic), and the expected loss
    falls round after round."""
    target = {name: torch.zeros_like(t) for name, t in params()}

    def loss_of(tuned):
        return lambda: 0.5 * sum(float((t - target[n]).pow(2).sum()) for n, t in tuned)

    tuned = params(1)
    before = {n: t.clone() for n, t in tuned}
    scalar = zeroth_order_step(tuned, 7, 1e-3, 0.01, loss_of(tuned))
    g = torch.Generator().manual_seed(7)
    z = {n: torch.randn(t.shape, generator=g) for n, t in tuned}
    directional = sum(float((before[n] * z[n]).sum()) for n in before)
    assert scalar == pytest.approx(0.01 * directional, rel=1e-3)
    for name, tensor in tuned:
        torch.testing.assert_close(tensor, before[name] - scalar * z[name], atol=1e-5, rtol=0)
    losses = [loss_of(tuned)()]
    for step in range(300):
        zeroth_order_step(tuned, 1000 + step, 1e-3, 0.02, loss_of(tuned))
        losses.append(loss_of(tuned)())
    assert losses[-1] < 0.5 * losses[0]
    assert sum(losses[150:]) / 150 < sum(losses[:150]) / 150


def test_pro_probabilities_favour_loud_seeds_within_a_factor_e() -> None:
    amplitude = torch.tensor([0.0, 1.0, 4.0, 0.0])
    count = torch.tensor([0.0, 1.0, 2.0, 0.0])
    p = pro_probabilities(amplitude, count)
    assert float(p.sum()) == pytest.approx(1.0) and float(p[2]) > float(p[0]) > float(p[1])
    assert float(p.max() / p.min()) <= torch.e + 1e-6
    assert torch.allclose(pro_probabilities(torch.zeros(4), torch.zeros(4)), torch.full((4,), 0.25))


# ---------------------------------------------------------------------------------------------- the server
CLIENTS = {"alice": 10, "bob": 30}


def make_config(model_dir: Path, **overrides: Any) -> FederationArguments:
    settings: dict[str, Any] = dict(model_name_or_path=str(model_dir), num_clients=2, sample_clients=2, num_rounds=2,
                                    max_steps=4, round_timeout=0, save_model_freq=0, fed_alg="fedkseed", kseed_k=64)
    settings.update(overrides)
    return FederationArguments(**settings)


@pytest.fixture(scope="module")
def prepared(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fedkseed")
    for name, pro in (("plain", False), ("pro", True)):
        joined_federation_dir(make_config(tiny_model_dir, kseed_pro=pro), root / name, CLIENTS)
    return root


@pytest.fixture
def open_federation(prepared: Path, federation_copy):
    return lambda name="plain": federation_copy(prepared / name)


def push(fed: Federation, client: str, body: bytes) -> dict[str, Any]:
    return fed.receive_update(client, fed.status()["round"], CLIENTS[client], io.BytesIO(body).read, len(body), None)


def test_the_server_serves_the_pool_and_adds_the_weighted_scalars(open_federation) -> None:
    fed = open_federation("pro")
    served = decode_file(fed.latest_global().path)
    assert set(served) == {SCALARS, POOL, PROBE, PROBS} and served[SCALARS].shape == (64,)
    assert torch.equal(served[PROBE], probe(draw_seeds(64, int(served[POOL][0]))[0]))
    assert fed.latest_global().size < 2048 + 8 * 64 + 2 * 4 * 64  # K floats (twice with Pro) and a header
    pools = {"alice": {3: 0.5, 10: -1.0}, "bob": {10: 2.0, 63: 0.25}}
    for client, pool in pools.items():
        body = save(pool_of(pool), metadata={"train_loss": "3.0"})
        assert len(body) < 20_000
        assert push(fed, client, body)["accepted"]
    assert fed.aggregate_if_needed()
    after = decode_file(fed.latest_global().path)
    expected = torch.zeros(64)
    expected[3], expected[10], expected[63] = 0.5 * 0.25, -1.0 * 0.25 + 2.0 * 0.75, 0.25 * 0.75
    torch.testing.assert_close(after[SCALARS], expected)
    assert float(after[PROBS][10]) > float(after[PROBS][0])  # Pro: the loudest seed is now likelier
    assert fed.history()[0]["bytes_received"] < 1000
    assert (fed.store.root / "adapters" / "final").exists() is False  # round 1 of 2: no final export yet


def test_algorithm_aggregate_matches_in_memory_updates() -> None:
    algorithm = get_algorithm("fedkseed", FederationArguments(model_name_or_path="x", fed_alg="fedkseed", kseed_k=4))
    global_params = algorithm.initial_global({})
    new, _ = algorithm.aggregate(global_params, [InMemoryUpdate("a", 1, {SCALARS: torch.tensor([1.0, 0, 0, 2])})], {})
    assert new[SCALARS].tolist() == [1.0, 0, 0, 2] and torch.equal(new[POOL], global_params[POOL])


def _pool_body(index: list[int], value: list[float], index_dtype=torch.int32) -> bytes:
    return save({INDEX: torch.tensor(index, dtype=index_dtype), VALUE: torch.tensor(value, dtype=torch.float32)})


@pytest.mark.parametrize(("body", "message"), [
    (_pool_body([3, 64], [0.1, 0.2]), "not in the pool"),
    (_pool_body([-1, 3], [0.1, 0.2]), "not in the pool"),
    (_pool_body([3, 3], [0.1, 0.2]), "repeat"),
    (_pool_body([5, 3], [0.1, 0.2]), "increasing"),
    (_pool_body([1, 2], [float("nan"), 0.2]), "NaN or infinite"),
    (_pool_body([1, 2], [float("inf"), 0.2]), "NaN or infinite"),
    (_pool_body([1, 2, 3, 4, 5], [0.1] * 5), "1 to min"),  # more seeds than --max_steps
    (_pool_body([], []), "1 to min"),
    (_pool_body([1, 2], [0.1, 0.2], torch.int64), "must be I32"),
    (save({INDEX: torch.tensor([1], dtype=torch.int32), VALUE: torch.tensor([1.0, 2.0])}), "one length"),
    (save({SCALARS: torch.zeros(64)}), "exactly"),
], ids=["past-the-pool", "negative", "repeated", "unordered", "nan", "inf", "too-many", "empty", "int64",
        "lengths", "dense"])
def test_a_bad_seed_pool_is_refused_with_422_and_nothing_is_stored(body: bytes, message: str, open_federation) -> None:
    fed = open_federation()
    with pytest.raises(errors.InvalidUpdate, match=message):
        push(fed, "alice", body)
    assert fed.status()["received"] == [] and not any(p.is_file() for p in (fed.store.root / "updates").rglob("*"))


def test_pool_update_scatters_its_pairs(tmp_path: Path) -> None:
    path = tmp_path / "u.safetensors"
    path.write_bytes(_pool_body([0, 5], [1.5, -2.0]))
    update = PoolUpdate("a", 3, {}, path, 8)
    assert update.get(SCALARS).tolist() == [1.5, 0, 0, 0, 0, -2.0, 0, 0]


def test_fedkseed_options_are_validated(tiny_model_dir: Path) -> None:
    make_config(tiny_model_dir).validate()
    for bad, message in [({"kseed_k": 0}, "--kseed_k"), ({"kseed_epsilon": 0.0}, "--kseed_epsilon"),
                         ({"wire_dtype": "bfloat16"}, "--wire_dtype float32"),
                         ({"update_compression": "int8"}, "with --fed_alg fedkseed"),
                         ({"dp": "server"}, "--dp server with --fed_alg fedkseed")]:
        with pytest.raises(ValueError, match=message):
            make_config(tiny_model_dir, **bad).validate()


def test_a_client_drawing_other_directions_refuses(tmp_path: Path) -> None:
    from fedllm.client.kseed import DirectionMismatchError, seed_pool
    from fedllm.client.trainer import ModelMismatchError

    k = 16
    served = {SCALARS: torch.zeros(k), POOL: torch.tensor([77.0]), PROBE: probe(draw_seeds(k, 77)[0])}
    seeds, probs = seed_pool(served)
    assert seeds == draw_seeds(k, 77) and torch.allclose(probs, torch.full((k,), 1 / k))
    with pytest.raises(DirectionMismatchError, match="draws other directions"):
        seed_pool({**served, PROBE: served[PROBE] + 1e-7})
    for pool in (0.5, float("nan"), float(1 << 24)):
        with pytest.raises(ModelMismatchError, match="not an integer"):
            seed_pool({**served, POOL: torch.tensor([pool])})
    with pytest.raises(ModelMismatchError, match="distribution"):
        seed_pool({**served, PROBS: torch.full((k,), 1.0)})


def test_step_draws_are_the_clients_own_and_reproducible() -> None:
    from fedllm.algorithms.fedkseed import step_generator

    def draws(client: str, round_number: int, seed: int = 42) -> list[int]:
        return torch.randint(0, 4096, (32,), generator=step_generator(client, round_number, seed)).tolist()

    assert draws("alice", 3) == draws("alice", 3)  # a round trained again takes the same steps
    assert len({tuple(draws(*case)) for case in [("alice", 3), ("bob", 3), ("alice", 4), ("alice", 3, 7)]}) == 4


@pytest.mark.integration
def test_the_clients_of_a_round_step_on_their_own_seeds(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two simulated clients, one shared trainer and --seed, the same round: their uploads name other seeds."""
    import dataclasses

    from safetensors.torch import load_file

    from fedllm.config import ClientArguments, SimulatedClientArguments
    from fedllm.data import write_demo_data
    from fedllm.server.store import Store
    from fedllm.simulation import SimulatedClients

    Federation.initialize(make_config(tiny_model_dir, kseed_k=4096, max_steps=6, seq_length=64), tmp_path / "state")
    federation = Federation(Store(tmp_path / "state"))
    try:
        data = write_demo_data(tmp_path / "data", num_clients=2, rows_per_client=4, seed=3)
        sources = {f"client_{i}": str(data[i]) for i in range(2)}
        args = ClientArguments(**dataclasses.asdict(SimulatedClientArguments(batch_size=2, quiet=True)),
                               output_dir=str(tmp_path))
        clients = SimulatedClients.load(federation.client_config(), args, sources, tmp_path / "clients")
        served = decode_file(federation.latest_global().path)
        drawn = {cid: load_file(clients.train(cid, federation, served, 1, 1e-3, 6).update_path)[INDEX].tolist()
                 for cid in sources}
    finally:
        federation.store.close()
    assert all(1 <= len(d) <= 6 for d in drawn.values())
    assert drawn["client_0"] != drawn["client_1"]
