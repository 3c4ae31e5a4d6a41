"""Server rules, client hooks, clipping, schedule, registry and hyperparameters of fedllm.algorithms.

Every server rule is checked against a reference written out plainly below with Python floats
over the flattened adapter -- independent of the implementation's helpers.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
import torch
from safetensors.torch import load_file, save_file

import fedllm.algorithms as algorithms
from fedllm.algorithms import (
    BUILTIN,
    BUILTIN_CONFIGS,
    CONTROL_PREFIX,
    AlgorithmConfig,
    FedAlgorithm,
    InMemoryUpdate,
    algorithm_config_class,
    available_algorithms,
    check_range,
    cosine_learning_rate,
    get_algorithm,
    round_learning_rate,
    run_aggregation,
)
from fedllm.config import FederationArguments, federation_changes

ALL_NAMES = [
    "fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam",
    "fedmedian", "fedtrimmedavg", "krum",
]
SHAPES = {"layer.0.lora_A.weight": (2, 3), "layer.0.lora_B.weight": (3, 2), "layer.1.lora_A.weight": (1, 3)}
NUM_SAMPLES = [[3, 5, 2, 8, 1], [7, 1, 4, 2], [2, 6, 6, 3, 9]]  # K = 5, 4, 5 over the three rounds


def make_config(**overrides) -> FederationArguments:
    base = dict(
        model_name_or_path="tiny", num_clients=10, sample_clients=5, prox_mu=0.1, server_momentum=0.8, server_lr=0.7,
        fedopt_eta=0.05, fedopt_tau=0.01, fedopt_beta1=0.85, fedopt_beta2=0.95, trim_ratio=0.25, krum_malicious=1,
        krum_keep=2, max_update_norm=0.0,
    )
    base.update(overrides)
    return FederationArguments(**base)


def initial_global() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def make_rounds(with_control: bool) -> list[list[InMemoryUpdate]]:
    """Three rounds of updates; deltas mix small (1e-3) and large (0.3) coordinates so FedYogi's
    sign(v − Δ̄²) takes both signs."""
    g = torch.Generator().manual_seed(1)
    rounds = []
    for r, samples in enumerate(NUM_SAMPLES):
        updates = []
        for i, n in enumerate(samples):
            tensors = {}
            for name, shape in SHAPES.items():
                scale = torch.where(torch.rand(shape, generator=g) < 0.5, 1e-3, 0.3)
                tensors[name] = torch.randn(shape, generator=g) * scale
                if with_control:
                    tensors[CONTROL_PREFIX + name] = torch.randn(shape, generator=g)
            updates.append(InMemoryUpdate(f"c{r}{i}", n, tensors))
        rounds.append(updates)
    return rounds


def run(name, config, rounds, tmp_path=None, restart_after=()):
    """Aggregate ``rounds``; after each round index in ``restart_after``, simulate a server
    restart: persist global and state with safetensors, build a new algorithm, reload."""
    algo = get_algorithm(name, config)
    global_params = initial_global()
    state = algo.init_state(global_params)
    history = []
    for r, updates in enumerate(rounds):
        global_params, state = run_aggregation(algo, global_params, updates, state)
        history.append(global_params)
        if r in restart_after:
            save_file(global_params, str(tmp_path / "global.safetensors"))
            save_file(state, str(tmp_path / "state.safetensors"))
            del algo, global_params, state
            algo = get_algorithm(name, config)
            global_params = load_file(str(tmp_path / "global.safetensors"))
            state = load_file(str(tmp_path / "state.safetensors"))
    return history, state, algo


# ---------------------------------------------------------------- the plain reference


def flat(tensors: dict[str, torch.Tensor], prefix: str = "") -> list[float]:
    return [x for name in SHAPES for x in tensors[prefix + name].flatten().tolist()]


def reference_run(name: str, cfg: FederationArguments, rounds) -> tuple[list[list[float]], list[float] | None]:
    """Each rule written out coordinate by coordinate on the flattened adapter."""
    w = flat(initial_global())
    d = len(w)
    m = [0.0] * d
    v = [cfg.fedopt_tau ** 2] * d
    momentum = [0.0] * d
    c = [0.0] * d
    history = []
    for updates in rounds:
        deltas = [flat(u._tensors) for u in updates]
        ns = [u.num_samples for u in updates]
        k = len(updates)
        mean = [sum(n * delta[j] for n, delta in zip(ns, deltas, strict=True)) / sum(ns) for j in range(d)]
        if name in ("fedavg", "fedprox"):
            w = [w[j] + mean[j] for j in range(d)]
        elif name == "scaffold":
            w = [w[j] + mean[j] for j in range(d)]
            dcs = [flat(u._tensors, CONTROL_PREFIX) for u in updates]
            c = [c[j] + sum(dc[j] for dc in dcs) / cfg.num_clients for j in range(d)]
        elif name == "fedavgm":
            momentum = [cfg.server_momentum * momentum[j] + mean[j] for j in range(d)]
            w = [w[j] + cfg.server_lr * momentum[j] for j in range(d)]
        elif name == "fedadagrad":
            v = [v[j] + mean[j] ** 2 for j in range(d)]
            w = [w[j] + cfg.fedopt_eta * mean[j] / (math.sqrt(v[j]) + cfg.fedopt_tau) for j in range(d)]
        elif name in ("fedyogi", "fedadam"):
            b1, b2 = cfg.fedopt_beta1, cfg.fedopt_beta2
            m = [b1 * m[j] + (1 - b1) * mean[j] for j in range(d)]
            for j in range(d):
                sq = mean[j] ** 2
                if name == "fedyogi":
                    sign = (v[j] > sq) - (v[j] < sq)
                    v[j] = v[j] - (1 - b2) * sq * sign
                else:
                    v[j] = b2 * v[j] + (1 - b2) * sq
            w = [w[j] + cfg.fedopt_eta * m[j] / (math.sqrt(v[j]) + cfg.fedopt_tau) for j in range(d)]
        elif name == "fedmedian":
            w = [w[j] + statistics.median(delta[j] for delta in deltas) for j in range(d)]
        elif name == "fedtrimmedavg":
            t = int(cfg.trim_ratio * k)
            w = [w[j] + statistics.fmean(sorted(delta[j] for delta in deltas)[t:k - t]) for j in range(d)]
        elif name == "krum":
            dist = [[sum((a - b) ** 2 for a, b in zip(di, dj, strict=True)) for dj in deltas] for di in deltas]
            nb = k - cfg.krum_malicious - 2
            scores = [sum(sorted(dist[i][j] for j in range(k) if j != i)[:nb]) for i in range(k)]
            best = sorted(range(k), key=lambda i: scores[i])[:cfg.krum_keep]
            w = [w[j] + sum(deltas[i][j] for i in best) / len(best) for j in range(d)]
        history.append(w)
    return history, (c if name == "scaffold" else None)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_server_rule_matches_reference_and_resumes_bit_for_bit(name, tmp_path):
    cfg = make_config()
    rounds = make_rounds(with_control=name == "scaffold")
    history, state, algo = run(name, cfg, rounds)
    expected, expected_c = reference_run(name, cfg, rounds)
    for got, want in zip(history, expected, strict=True):
        assert flat(got) == pytest.approx(want, rel=1e-5, abs=1e-6)
    if expected_c is not None:
        assert flat(algo.global_extras(state), CONTROL_PREFIX) == pytest.approx(expected_c, rel=1e-5, abs=1e-6)
    assert all(t.dtype == torch.float32 for t in [*history[-1].values(), *state.values()])

    # A server restart after round 1 and after round 2 changes nothing, bit for bit.
    resumed_history, resumed_state, _ = run(name, cfg, rounds, tmp_path, restart_after=(0, 1))
    for got, want in zip(resumed_history, history, strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert resumed_state.keys() == state.keys() and all(torch.equal(resumed_state[k], state[k]) for k in state)


def test_fedopt_and_fedavgm_initial_state():
    cfg = make_config()
    g = initial_global()
    for name, prefixes in (("fedadagrad", ["v."]), ("fedyogi", ["m.", "v."]), ("fedadam", ["m.", "v."])):
        state = get_algorithm(name, cfg).init_state(g)
        assert sorted(state) == sorted(p + k for p in prefixes for k in g)
        for key, t in state.items():
            assert torch.equal(t, torch.full_like(t, 0.0 if key.startswith("m.") else cfg.fedopt_tau ** 2))
    state = get_algorithm("fedavgm", cfg).init_state(g)
    assert sorted(state) == sorted("momentum." + k for k in g) and all(not t.any() for t in state.values())


# ---------------------------------------------------------------- FedProx


def test_fedprox_hook_loss_and_gradient():
    mu = 0.3
    hook = get_algorithm("fedprox", make_config(prox_mu=mu)).client_hook()
    g = torch.Generator().manual_seed(2)
    params = {name: torch.nn.Parameter(torch.randn(shape, generator=g)) for name, shape in SHAPES.items()}
    global_values = {name: p.detach().clone() for name, p in params.items()}
    hook.begin_round(params, global_values)
    assert hook.extra_loss(params).item() == 0.0
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g))

    loss = hook.extra_loss(params)
    by_hand = mu / 2 * sum(((p.detach() - global_values[n]) ** 2).sum().item() for n, p in params.items())
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    loss.backward()
    for name, p in params.items():
        torch.testing.assert_close(p.grad, mu * (p.detach() - global_values[name]))


# ---------------------------------------------------------------- SCAFFOLD


def toy_problem():
    g = torch.Generator().manual_seed(3)
    inputs, targets = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    x = {"lin.weight": torch.randn(2, 3, generator=g), "lin.bias": torch.randn(2, generator=g)}
    c = {CONTROL_PREFIX + k: torch.randn(t.shape, generator=g) for k, t in x.items()}
    c_i = {CONTROL_PREFIX + k: torch.randn(t.shape, generator=g) for k, t in x.items()}
    return inputs, targets, x, c, c_i


def toy_loss(weight, bias, inputs, targets):
    return ((inputs @ weight.T + bias - targets) ** 2).mean()


def scaffold_client_round(hook, x, c, inputs, targets, steps, lr):
    """One local round through the hook with torch.optim.SGD on a tiny model."""
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(x["lin.weight"])
        model.bias.copy_(x["lin.bias"])
    params = {"lin.weight": model.weight, "lin.bias": model.bias}
    hook.begin_round(params, {**x, **c})
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        toy_loss(model.weight, model.bias, inputs, targets).backward()
        opt.step()
        hook.after_optimizer_step(params, lr)
    uploads = hook.end_round(params, steps, lr)
    return {k: p.detach().clone() for k, p in params.items()}, uploads


def test_scaffold_client_hook_matches_formulas():
    inputs, targets, x, c, c_i = toy_problem()
    steps, lr = 3, 0.1
    hook = get_algorithm("scaffold", make_config()).client_hook()
    hook.load_state_dict(c_i)
    y, uploads = scaffold_client_round(hook, x, c, inputs, targets, steps, lr)

    # By hand: y ← y − η·∇f(y) − η·(c − c_i), then c_i⁺ = c_i − c + (x − y)/(K·η).
    names = list(x)
    ref = {k: x[k].clone() for k in names}
    for _ in range(steps):
        leaf = {k: ref[k].clone().requires_grad_() for k in names}
        grads = torch.autograd.grad(toy_loss(leaf["lin.weight"], leaf["lin.bias"], inputs, targets), list(leaf.values()))
        for k, grad in zip(names, grads, strict=True):
            ref[k] = ref[k] - lr * grad - lr * (c[CONTROL_PREFIX + k] - c_i[CONTROL_PREFIX + k])
    c_plus = {k: c_i[CONTROL_PREFIX + k] - c[CONTROL_PREFIX + k] + (x[k] - ref[k]) / (steps * lr) for k in names}
    for k in names:
        torch.testing.assert_close(y[k], ref[k])
        torch.testing.assert_close(uploads[CONTROL_PREFIX + k], c_plus[k] - c_i[CONTROL_PREFIX + k])
        torch.testing.assert_close(hook.state_dict()[CONTROL_PREFIX + k], c_plus[k])
    assert set(uploads) == {CONTROL_PREFIX + k for k in names}

    # c_i persists: a hook restored from state_dict continues exactly like the original one.
    restored = get_algorithm("scaffold", make_config()).client_hook()
    restored.load_state_dict(hook.state_dict())
    _, again = scaffold_client_round(hook, x, c, inputs, targets, steps, lr)
    _, again_restored = scaffold_client_round(restored, x, c, inputs, targets, steps, lr)
    assert all(torch.equal(again[k], again_restored[k]) for k in again)


def test_scaffold_client_without_server_control_or_state_uses_zeros():
    inputs, targets, x, _, _ = toy_problem()
    steps, lr = 2, 0.05
    hook = get_algorithm("scaffold", make_config()).client_hook()
    y, uploads = scaffold_client_round(hook, x, {}, inputs, targets, steps, lr)
    for k in x:  # c = c_i = 0: plain SGD, and Δc_i = (x − y)/(K·η)
        torch.testing.assert_close(uploads[CONTROL_PREFIX + k], (x[k] - y[k]) / (steps * lr))
    with pytest.raises(ValueError):
        hook.end_round({k: torch.nn.Parameter(t) for k, t in x.items()}, 0, lr)


def test_scaffold_wire_format():
    algo = get_algorithm("scaffold", make_config())
    g = initial_global()
    state = algo.init_state(g)
    assert algo.upload_extras(g.keys()) == {CONTROL_PREFIX + k: k for k in g}
    extras = algo.global_extras(state)
    assert set(extras) == {CONTROL_PREFIX + k for k in g} and all(not t.any() for t in extras.values())
    for name in ALL_NAMES:
        if name != "scaffold":
            other = get_algorithm(name, make_config())
            assert other.global_extras(other.init_state(g)) == {} and other.upload_extras(g.keys()) == {}


# ---------------------------------------------------------------- robustness and clipping


def poisoned_round():
    g = torch.Generator().manual_seed(4)
    center = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    honest = [{k: t + 0.01 * torch.randn(t.shape, generator=g) for k, t in center.items()} for _ in range(4)]
    poisoned = {k: 100 * t for k, t in honest[0].items()}
    updates = [InMemoryUpdate(f"h{i}", 10, d) for i, d in enumerate(honest)] + [InMemoryUpdate("evil", 10, poisoned)]
    honest_mean = {k: torch.stack([d[k] for d in honest]).mean(0) for k in center}
    return updates, honest_mean


def distance_to(result, global_params, target) -> float:
    return math.sqrt(sum(((result[k] - global_params[k] - target[k]) ** 2).sum().item() for k in target))


@pytest.mark.parametrize(("name", "overrides"), [
    ("fedmedian", {}), ("fedtrimmedavg", {"trim_ratio": 0.2}), ("krum", {"krum_keep": 1}), ("krum", {"krum_keep": 3}),
])
def test_robust_aggregators_resist_a_poisoned_client(name, overrides):
    updates, honest_mean = poisoned_round()
    g = initial_global()
    scale = math.sqrt(sum((t ** 2).sum().item() for t in honest_mean.values()))
    algo = get_algorithm(name, make_config(**overrides))
    robust, _ = run_aggregation(algo, g, updates, algo.init_state(g))
    assert distance_to(robust, g, honest_mean) < 0.05 * scale
    fedavg, _ = run_aggregation(get_algorithm("fedavg", make_config()), g, updates, {})
    assert distance_to(fedavg, g, honest_mean) > 10 * scale


class Recorder(FedAlgorithm):
    """Records every tensor of every update it is given."""

    name = "recorder"

    def aggregate(self, global_params, updates, state):
        self.seen = [{k: u.get(k) for k in u.names()} for u in updates]
        return dict(global_params), dict(state)


def test_clipping_scales_large_updates_to_the_bound_and_leaves_the_rest():
    g = torch.Generator().manual_seed(5)
    big = {name: 3 * torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    small = {name: 0.01 * torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    control = {CONTROL_PREFIX + name: 50 * torch.ones(shape) for name, shape in SHAPES.items()}
    updates = [InMemoryUpdate("big", 2, {**big, **control}), InMemoryUpdate("small", 1, {**small, **control})]
    norm = lambda ts: math.sqrt(sum((t.double() ** 2).sum().item() for t in ts))  # noqa: E731
    bound = 1.5
    assert norm(big.values()) > bound > norm(small.values())

    recorder = Recorder(make_config(max_update_norm=bound))
    run_aggregation(recorder, initial_global(), updates, {})
    seen_big, seen_small = recorder.seen
    assert norm(seen_big[k] for k in SHAPES) == pytest.approx(bound, rel=1e-6)
    factor = bound / norm(big.values())
    for k in SHAPES:
        torch.testing.assert_close(seen_big[k], big[k] * factor)
        assert torch.equal(seen_small[k], small[k])
    for k in control:  # control variates are neither counted nor scaled
        assert torch.equal(seen_big[k], control[k]) and torch.equal(seen_small[k], control[k])

    # Clipping happens before the algorithm: FedAvg averages the clipped deltas.
    fedavg = get_algorithm("fedavg", make_config(max_update_norm=bound))
    w = initial_global()
    new, _ = run_aggregation(fedavg, w, updates, {})
    for k in SHAPES:
        torch.testing.assert_close(new[k], w[k] + (2 * big[k] * factor + small[k]) / 3)

    # 0 turns clipping off.
    recorder = Recorder(make_config(max_update_norm=0.0))
    run_aggregation(recorder, initial_global(), updates, {})
    assert all(torch.equal(recorder.seen[0][k], big[k]) for k in SHAPES)


# ---------------------------------------------------------------- schedule


def test_cosine_schedule():
    assert cosine_learning_rate(0, 10, 2e-5, 1e-6) == pytest.approx(2e-5, rel=1e-12)
    assert cosine_learning_rate(10, 10, 2e-5, 1e-6) == pytest.approx(1e-6, rel=1e-12)
    assert cosine_learning_rate(5, 10, 2e-5, 1e-6) == pytest.approx((2e-5 + 1e-6) / 2, rel=1e-12)
    cfg = dataclasses.replace(make_config(), learning_rate=1e-3, min_learning_rate=1e-5, num_rounds=4)
    assert round_learning_rate(cfg, 1) == 1e-3 and round_learning_rate(cfg, 4) == 1e-3
    cfg.lr_schedule = "cosine"
    lrs = [round_learning_rate(cfg, r) for r in range(1, 5)]
    assert lrs[0] == pytest.approx(1e-3) and lrs == sorted(lrs, reverse=True) and lrs[-1] > 1e-5
    assert lrs[2] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    cfg.lr_schedule = "linear"
    with pytest.raises(ValueError, match="lr_schedule"):
        round_learning_rate(cfg, 1)


# ---------------------------------------------------------------- registry


def test_registry_lists_all_eleven_and_rejects_unknown_names():
    assert sorted(BUILTIN) == sorted(BUILTIN_CONFIGS) == sorted([*ALL_NAMES, "fedkseed"])  # FedKSeed: test_fedkseed
    assert set(ALL_NAMES) <= set(available_algorithms())
    for name in ALL_NAMES:
        algo = get_algorithm(name, make_config())
        assert algo.name == name and type(algo).config_class is BUILTIN_CONFIGS[name] is algorithm_config_class(name)
        assert algo.hparams == BUILTIN_CONFIGS[name].from_federation(make_config())
    with pytest.raises(ValueError, match=r"unknown --fed_alg 'fedsgd'.*fedavg.*krum"):
        get_algorithm("fedsgd", make_config())


@pytest.mark.parametrize(("name", "overrides", "message"), [
    ("fedtrimmedavg", {"trim_ratio": 0.5}, r"--trim_ratio must be in \[0, 0\.5\), got 0\.5"),
    ("krum", {"krum_keep": 0}, r"--krum_keep must be >= 1, got 0"),
    ("krum", {"sample_clients": 4}, r"--sample_clients must be > 2 \* --krum_malicious \+ 2 = 4"),
    ("fedadam", {"fedopt_tau": 0.0}, r"--fedopt_tau must be > 0, got 0\.0"),
    ("fedavg", {"max_update_norm": -1.0}, r"--max_update_norm must be >= 0"),
])
def test_an_algorithm_is_not_built_with_out_of_range_hyperparameters(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        get_algorithm(name, make_config(**overrides))


class FakeEntryPoint:
    def __init__(self, name: str, target: type):
        self.name, self._target = name, target

    def load(self) -> type:
        return self._target


class HalfStep(FedAlgorithm):
    """A third-party algorithm without hyperparameters: w ← w + Δ̄/2."""

    name = "halfstep"

    def aggregate(self, global_params, updates, state):
        mean = algorithms.weighted_mean_delta(updates, global_params.keys())
        return {k: global_params[k] + 0.5 * mean[k] for k in global_params}, dict(state)


@dataclasses.dataclass
class ScaledStepConfig(AlgorithmConfig):
    """A plug-in's hyperparameter: it reuses the federation option --server_lr."""

    server_lr: float = 1.0

    def validate(self, federation) -> None:
        super().validate(federation)
        check_range("server_lr", self.server_lr, above=0)


class ScaledStep(FedAlgorithm):
    """A third-party algorithm with a hyperparameter: w ← w + η_s·Δ̄."""

    name = "scaledstep"
    config_class = ScaledStepConfig

    def aggregate(self, global_params, updates, state):
        mean = algorithms.weighted_mean_delta(updates, global_params.keys())
        return {k: global_params[k] + self.hparams.server_lr * mean[k] for k in global_params}, dict(state)


@dataclasses.dataclass
class UnknownOptionConfig(AlgorithmConfig):
    clip: float = 1.0  # no federation option sets it


class UnknownOption(HalfStep):
    name = "unknownoption"
    config_class = UnknownOptionConfig


def test_third_party_algorithm_via_entry_point(monkeypatch):
    groups = []

    def fake_entry_points(*, group):
        groups.append(group)
        return [FakeEntryPoint(cls.name, cls) for cls in (HalfStep, ScaledStep, UnknownOption)] + [
            FakeEntryPoint("fedavg", HalfStep)]

    monkeypatch.setattr(algorithms, "entry_points", fake_entry_points)
    assert groups == [] and "halfstep" in available_algorithms()
    assert groups == ["fedllm.algorithms"]
    algo = get_algorithm("halfstep", make_config())
    assert isinstance(algo, HalfStep) and type(algo.hparams) is AlgorithmConfig
    assert type(get_algorithm("fedavg", make_config())) is BUILTIN["fedavg"]  # built-ins win
    g = initial_global()
    delta = {k: torch.ones_like(t) for k, t in g.items()}
    new, _ = run_aggregation(algo, g, [InMemoryUpdate("a", 1, delta)], {})
    assert all(torch.equal(new[k], g[k] + 0.5) for k in g)

    # A plug-in's hyperparameters: read from --server_lr, validated when it is --fed_alg, identity settings.
    assert algorithm_config_class("scaledstep") is ScaledStepConfig
    scaled = get_algorithm("scaledstep", make_config(server_lr=0.25))
    assert scaled.hparams == ScaledStepConfig(max_update_norm=0.0, server_lr=0.25)
    new, _ = run_aggregation(scaled, g, [InMemoryUpdate("a", 1, delta)], {})
    assert all(torch.equal(new[k], g[k] + 0.25) for k in g)
    with pytest.raises(ValueError, match=r"--server_lr must be > 0, got 0\.0"):
        make_config(fed_alg="scaledstep", server_lr=0.0).validate()
    make_config(fed_alg="halfstep", server_lr=0.0).validate()
    config = make_config(fed_alg="scaledstep")
    changed = dataclasses.replace(config, server_lr=0.5)
    assert federation_changes(dataclasses.asdict(config), changed) == ({"server_lr": (0.7, 0.5)}, {})

    with pytest.raises(ValueError, match="UnknownOptionConfig declares clip, which are not federation options"):
        get_algorithm("unknownoption", make_config())
