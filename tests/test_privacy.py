"""Client-level DP-FedAvg: the noise is what the docstring says, clipping bounds every update, ε is the accountant
library's, adaptive clipping finds the quantile, the budget stops the federation, and bad settings are refused."""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from scipy import stats

from fedllm.algorithms import FedAvg, InMemoryUpdate
from fedllm.algorithms.base import ClippedUpdate
from fedllm.config import FederationArguments
from fedllm.privacy.accountant import ClientLevelAccountant
from fedllm.privacy.dp_fedavg import STATE_CLIP_NORM, DPFedAvg, clip_delta
from fedllm.server import errors
from fedllm.server.federation import Federation
from fedllm.server.store import Store
from fedllm.wire import encode

from .conftest import joined_copy

CLIENTS = {"alice": 10, "bob": 30, "carol": 60}


def config(**overrides: Any) -> FederationArguments:
    settings: dict[str, Any] = dict(model_name_or_path="m", num_clients=10, sample_clients=4, dp="server",
                                    dp_clip_norm="1.0", dp_noise_multiplier=1.0)
    settings.update(overrides)
    return FederationArguments(**settings)


def seeded(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return lambda: generator


def updates(norms: list[float], size: int = 8, seed: int = 0) -> list[InMemoryUpdate]:
    generator = torch.Generator().manual_seed(seed)
    result = []
    for i, norm in enumerate(norms):
        direction = torch.randn(size, generator=generator)
        result.append(InMemoryUpdate(f"c{i}", 1 + i, {"w": direction / direction.norm() * norm}))
    return result


# ------------------------------------------------------------------------------------------ the mechanism
def test_noise_added_to_the_mean_is_gaussian_with_std_sigma_c_over_m() -> None:
    """Over many draws with a fixed seed, (new global − mean of the clipped updates) ~ N(0, (σC/m)²) per
    coordinate: Kolmogorov–Smirnov against that normal, and the sample std within 3% of σC/m."""
    cfg = config(dp_noise_multiplier=1.3, dp_clip_norm="0.5")
    dp = DPFedAvg(FedAvg(cfg), cfg, generator=seeded(7))
    batch = updates([0.2, 3.0, 0.7, 9.0])
    clipped_mean = sum(ClippedUpdate(u, ["w"], 0.5).get("w") for u in batch) / len(batch)
    noise = []
    for _ in range(500):
        new_global, _ = dp.aggregate({"w": torch.zeros(8)}, batch, dp.init_state({"w": torch.zeros(8)}))
        noise.append(new_global["w"] - clipped_mean)
    samples = torch.cat(noise).double().numpy()
    expected = 1.3 * 0.5 / 4
    assert stats.kstest(samples, "norm", args=(0.0, expected)).pvalue > 0.01
    assert abs(samples.std() / expected - 1) < 0.03 and abs(samples.mean()) < 3 * expected / math.sqrt(len(samples))


def test_equal_weights_and_no_update_over_the_clip_norm() -> None:
    """σ = 0 isolates the clipped mean: equal weights (sample counts ignored), each update within C."""
    cfg = config(dp_noise_multiplier=0.0, dp_clip_norm="1.0")
    dp = DPFedAvg(FedAvg(cfg), cfg, generator=seeded())
    batch = updates([0.3, 2.0, 50.0])
    for update in batch:
        assert ClippedUpdate(update, ["w"], 1.0).get("w").norm() <= 1.0 + 1e-6
    new_global, _ = dp.aggregate({"w": torch.zeros(8)}, batch, {})
    expected = sum(ClippedUpdate(u, ["w"], 1.0).get("w") for u in batch) / 3
    torch.testing.assert_close(new_global["w"], expected)
    clipped, within = clip_delta({"w": torch.full((4,), 3.0), "control.w": torch.ones(4)}, ["w"], 1.0)
    assert not within and float(clipped["w"].norm()) == pytest.approx(1.0) and torch.equal(clipped["control.w"],
                                                                                        torch.ones(4))


def test_adaptive_clipping_tracks_the_target_quantile() -> None:
    """On synthetic log-normal norms the clip norm converges to the γ-quantile of their distribution."""
    for quantile in (0.3, 0.7):
        cfg = config(dp_clip_norm="auto", dp_target_quantile=quantile, dp_noise_multiplier=0.5,
                     dp_initial_clip_norm=0.1, dp_clip_learning_rate=0.2, sample_clients=50, num_clients=500)
        dp = DPFedAvg(FedAvg(cfg), cfg, generator=seeded(3))
        state = dp.init_state({"w": torch.zeros(8)})
        rng = torch.Generator().manual_seed(11)
        for round_number in range(150):
            norms = torch.exp(torch.randn(50, generator=rng) * 0.5).tolist()  # median 1.0
            _, state = dp.aggregate({"w": torch.zeros(8)}, updates(norms, seed=round_number), state)
        target = math.exp(0.5 * stats.norm.ppf(quantile))
        assert float(state[STATE_CLIP_NORM]) == pytest.approx(target, rel=0.2)


def test_adaptive_noise_split_costs_one_gaussian() -> None:
    """σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2): the mean and the count together are one mechanism of multiplier σ."""
    cfg = config(dp_clip_norm="auto", dp_noise_multiplier=1.0, dp_clipped_count_stddev=2.0)
    z_mean = DPFedAvg(FedAvg(cfg), cfg).mean_noise_multiplier()
    assert z_mean ** -2 + (2 * 2.0) ** -2 == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ accounting
@pytest.mark.parametrize(("sampling", "n", "m", "sigma", "rounds", "delta"), [
    ("uniform", 10, 3, 1.0, 20, 1e-3), ("uniform", 100, 10, 1.5, 50, 1e-5), ("uniform", 5, 5, 2.0, 10, 1e-2),
    ("poisson", 10, 3, 1.0, 20, 1e-3), ("poisson", 100, 10, 1.5, 50, 1e-5),
])
def test_epsilon_is_the_accountant_librarys(sampling: str, n: int, m: int, sigma: float, rounds: int,
                                            delta: float) -> None:
    if sampling == "poisson":
        independent = RdpAccountant()
        independent.compose(dp_event.PoissonSampledDpEvent(m / n, dp_event.GaussianDpEvent(sigma)), rounds)
    else:  # replace-one: sensitivity 2C of the sum, so the multiplier relative to it is σ/2
        independent = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        independent.compose(dp_event.SampledWithoutReplacementDpEvent(n, m, dp_event.GaussianDpEvent(sigma / 2)),
                            rounds)
    accountant = ClientLevelAccountant(n, m, sigma, delta, sampling)
    assert accountant.epsilon(rounds) == pytest.approx(independent.get_epsilon(delta), rel=1e-9)
    assert accountant.epsilon(0) == 0.0
    assert ClientLevelAccountant(n, m, 0.0, delta, sampling).epsilon(rounds) is None
    allowed = accountant.rounds_allowed(accountant.epsilon(rounds) * 1.0000001, 10 * rounds)
    assert allowed == rounds


# ------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(("overrides", "flag"), [
    ({"dp_noise_multiplier": -0.1}, "--dp_noise_multiplier"),
    ({"dp_clip_norm": "0"}, "--dp_clip_norm"),
    ({"dp_clip_norm": "-1"}, "--dp_clip_norm"),
    ({"dp_clip_norm": "big"}, "--dp_clip_norm"),
    ({"dp_delta": 0.0}, "--dp_delta"),
    ({"dp_delta": 1.0}, "--dp_delta"),
    ({"dp_target_epsilon": 0.0}, "--dp_target_epsilon"),
    ({"dp_clip_norm": "auto", "dp_target_quantile": 1.0}, "--dp_target_quantile"),
    ({"dp_clip_norm": "auto", "dp_clipped_count_stddev": 0.1}, "--dp_clipped_count_stddev"),
    ({"fed_alg": "krum", "sample_clients": 5}, "--fed_alg krum is refused"),
    ({"fed_alg": "fedmedian"}, "--fed_alg fedmedian is refused"),
    ({"fed_alg": "scaffold"}, "SCAFFOLD"),
    ({"max_update_norm": 1.0}, "--max_update_norm"),
    ({"dp": "off", "client_sampling": "poisson"}, "--client_sampling poisson needs --dp"),
])
def test_bad_privacy_settings_are_refused_naming_the_flag(overrides: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        config(**overrides).validate()


# ------------------------------------------------------------------------------------------ in a federation
@pytest.fixture(scope="module")
def dp_state(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dp")
    cfg = FederationArguments(model_name_or_path=str(tiny_model_dir), num_clients=3, sample_clients=2, num_rounds=5,
                              peft_lora_r=4, round_timeout=0, save_model_freq=0, dp="client", dp_clip_norm="0.5",
                              dp_noise_multiplier=2.0, dp_target_epsilon=None)
    Federation.initialize(cfg, root / "fresh")
    return joined_copy(root / "fresh", root / "joined", CLIENTS)


def delta(fed: Federation, norm: float, seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(s, generator=generator) for k, s in fed.upload_spec.items()}
    total = math.sqrt(sum(float(t.norm()) ** 2 for t in tensors.values()))
    return encode({k: t * norm / total for k, t in tensors.items()}, metadata={"dp_unclipped": "1"})


def push(fed: Federation, client: str, body: bytes) -> dict[str, Any]:
    return fed.receive_update(client, fed.status()["round"], CLIENTS[client], io.BytesIO(body).read, len(body), None)


def test_client_placement_refuses_an_update_over_the_clip_norm(dp_state: Path, tmp_path: Path) -> None:
    shutil.copytree(dp_state, tmp_path / "state")
    fed = Federation(Store(tmp_path / "state"))
    client = fed.status()["sampled"][0]
    assert fed.round_training_config(1)["dp_clip_norm"] == 0.5
    with pytest.raises(errors.InvalidUpdate, match="--dp_clip_norm 0.5"):
        push(fed, client, delta(fed, 0.6, 1))
    assert fed.status()["received"] == []
    assert push(fed, client, delta(fed, 0.5, 1))["accepted"] is True
    fed.store.close()


def test_epsilon_in_status_and_history_and_it_survives_a_restart(dp_state: Path, tiny_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    shutil.copytree(dp_state, tmp_path / "state")
    fed = Federation(Store(tmp_path / "state"))
    accountant = ClientLevelAccountant(3, 2, 2.0, 1 / 3 ** 1.1, "uniform")
    dp = fed.status()["dp"]
    assert dp == {"mode": "client", "epsilon": 0.0, "delta": pytest.approx(1 / 3 ** 1.1), "clip_norm": 0.5,
                  "noise_multiplier": 2.0, "rounds_allowed": 5}
    for round_number in (1, 2):
        for i, client in enumerate(fed.status()["sampled"]):
            push(fed, client, delta(fed, 0.4, 10 * round_number + i))
        assert fed.tick() is True
    history = fed.history()
    assert [r["dp_epsilon"] for r in history] == [pytest.approx(accountant.epsilon(1)),
                                                  pytest.approx(accountant.epsilon(2))]
    assert [r["dp_clip_norm"] for r in history] == [0.5, 0.5]
    fed.store.close()
    Federation.initialize(FederationArguments(**Federation(Store(tmp_path / "state")).config.__dict__),
                          tmp_path / "state")  # a restart with the same settings
    restarted = Federation(Store(tmp_path / "state"))
    assert restarted.status()["dp"]["epsilon"] == pytest.approx(accountant.epsilon(2))
    restarted.store.close()


def test_the_budget_stops_the_federation(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = dict(model_name_or_path=str(tiny_model_dir), num_clients=3, sample_clients=2, num_rounds=6, peft_lora_r=4,
               round_timeout=0, save_model_freq=0, dp="server", dp_clip_norm="1.0", dp_noise_multiplier=2.0)
    accountant = ClientLevelAccountant(3, 2, 2.0, 1 / 3 ** 1.1, "uniform")
    budget = (accountant.epsilon(2) + accountant.epsilon(3)) / 2  # two rounds fit, a third would not
    Federation.initialize(FederationArguments(**cfg, dp_target_epsilon=budget), tmp_path / "fresh")
    fed = Federation(Store(joined_copy(tmp_path / "fresh", tmp_path / "state", CLIENTS)))
    assert fed.status()["dp"]["rounds_allowed"] == 2
    for round_number in (1, 2):
        for i, client in enumerate(fed.status()["sampled"]):
            push(fed, client, delta(fed, 3.0, 10 * round_number + i))
        assert fed.tick() is True
    status = fed.status()
    assert status["phase"] == "finished" and status["dp"]["epsilon"] <= budget
    event = next(e for e in fed.events() if e["action"] == "finished_early")
    assert "privacy budget" in event["detail"]["reason"]
    fed.store.close()
    with pytest.raises(ValueError, match="--dp_target_epsilon .* exhausted before the first round"):
        Federation.initialize(FederationArguments(**cfg, dp_target_epsilon=accountant.epsilon(1) / 2),
                              tmp_path / "other")


def test_poisson_sampling_rounds_include_each_client_independently(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--client_sampling poisson: each round draws every client with probability q (an empty round is the noise
    alone, aggregated at once), and ε is the Poisson analysis'."""
    cfg = FederationArguments(model_name_or_path=str(tiny_model_dir), num_clients=3, sample_clients=1, num_rounds=8,
                              peft_lora_r=4, round_timeout=0, save_model_freq=0, dp="server", dp_clip_norm="1.0",
                              dp_noise_multiplier=1.0, client_sampling="poisson")
    Federation.initialize(cfg, tmp_path / "fresh")
    fed = Federation(Store(joined_copy(tmp_path / "fresh", tmp_path / "state", CLIENTS)))
    sizes = []
    while fed.status()["phase"] != "finished":
        sampled = fed.status()["sampled"]
        sizes.append(len(sampled))
        for i, client in enumerate(sampled):
            push(fed, client, delta(fed, 0.5, 100 * len(sizes) + i))
        assert fed.tick() is True
    assert len(sizes) == 8 and len(set(sizes)) > 1  # the round sizes vary (seeded)
    accountant = ClientLevelAccountant(3, 1, 1.0, 1 / 3 ** 1.1, "poisson")
    assert fed.status()["dp"]["epsilon"] == pytest.approx(accountant.epsilon(8))
    assert all(math.isfinite(r["dp_epsilon"]) for r in fed.history())
    fed.store.close()
