"""Compressed updates without HTTP: codec round trips, error feedback, the server's strict checks, aggregation."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from fedllm.algorithms import InMemoryUpdate, get_algorithm, weighted_mean_delta
from fedllm.client import runner
from fedllm.client.http import FederationClient
from fedllm.client.runner import GlobalAdapterError, load_global
from fedllm.compression.codecs import (
    FP4_CODE,
    NF4_CODE,
    BlockwiseCodec,
    TopKCodec,
    get_codec,
    global_codec,
)
from fedllm.compression.updates import (
    COMPRESSION_METADATA,
    CompressedFileUpdate,
    compress_with_feedback,
    encode_body,
    encode_global,
    encode_parts,
    packed_layout,
    read_compressed_global,
    unpack,
    validate_compressed_file,
)
from fedllm.config import FederationArguments, federation_changes
from fedllm.server import errors
from fedllm.server.app import create_app
from fedllm.server.federation import Federation
from fedllm.server.store import Store
from fedllm.server.versions import compressed_paths, load_state
from fedllm.wire import WireError, decode_file, encode, sha256_file

from .conftest import joined_federation_dir
from .test_client_trust import global_app, serving

QUANTIZERS = ("int8", "nf4", "fp4")
CODECS = (*QUANTIZERS, "topk")


def codec_for(name: str, block_size: int = 64, fraction: float = 0.1):
    return get_codec(SimpleNamespace(update_compression=name, compression_block_size=block_size,
                                     topk_fraction=fraction))


def samples() -> list[torch.Tensor]:
    """Tensors a property must hold for: odd sizes, partial last blocks, zeros, outliers, tiny and large scales."""
    g = torch.Generator().manual_seed(0)
    heavy = torch.randn(333, generator=g)
    heavy[17] = 80.0
    return [torch.randn(64, 3, generator=g), torch.randn(1001, generator=g) * 1e-4, heavy, torch.zeros(130),
            torch.randn(7, generator=g) * 1e3, torch.randn(1, generator=g), torch.randn(4, 129, generator=g)]


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("block_size", [2, 64, 128])
def test_blockwise_round_trip_is_within_the_stated_error(name: str, block_size: int) -> None:
    codec = codec_for(name, block_size)
    assert codec.error_per_absmax == pytest.approx({"int8": 1 / 254, "nf4": (1 - 0.6961928009986877) / 2,
                                                    "fp4": 1 / 6}[name])
    for x in samples():
        parts = encode_parts(codec, {"x": x}, "float32")
        layout = codec.layout(x.numel(), "float32")
        assert {k: [str(v.dtype), list(v.shape)] for k, v in codec.encode(x, "float32").items()} == {
            k: [{"I8": "torch.int8", "U8": "torch.uint8", "F32": "torch.float32"}[code], shape]
            for k, (code, shape) in layout.items()}
        assert set(parts) == set(layout) and all(parts[p].shape == (layout[p][1][0],) for p in layout)
        decoded = unpack(codec, parts, {"x": tuple(x.shape)}, "float32")["x"]
        flat = x.reshape(-1)
        blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)
        bound = (blocks.abs().amax(1, keepdim=True) * codec.error_per_absmax).expand_as(blocks).reshape(-1)
        error = (decoded.reshape(-1) - flat).abs()
        assert bool((error <= bound[:flat.numel()] * (1 + 1e-5) + 1e-30).all()), (name, float(error.max()))
        assert decoded.shape == x.shape
        # Each block's largest value survives exactly (±1 is a code of every table), so zeros stay zeros.
        assert bool((decoded.reshape(-1)[flat == 0] == 0).all())


@settings(max_examples=60, deadline=None, derandomize=True)
@given(name=st.sampled_from(CODECS), block_size=st.integers(2, 300), fraction=st.floats(1e-3, 1.0),
       values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=700))
def test_every_codec_decodes_within_its_stated_error(name: str, block_size: int, fraction: float,
                                                    values: list[float]) -> None:
    """Hypothesis: any finite float32 vector, any block size and fraction: the codec's error bound holds, and the
    parts have exactly the layout the server checks (and pass its checks)."""
    codec = codec_for(name, block_size, fraction)
    x = torch.tensor(values, dtype=torch.float32)
    parts = codec.encode(x, "float32")
    assert {k: list(v.shape) for k, v in parts.items()} == {k: s for k, (_, s) in codec.layout(x.numel(), "float32").items()}
    codec.check("x", parts, x.numel())
    decoded = codec.decode(parts, tuple(x.shape))
    error = (decoded - x).abs()
    if name == "topk":
        k = codec.kept(x.numel())
        assert float((x - decoded).norm() ** 2) <= (1 - k / x.numel()) * float(x.norm() ** 2) * (1 + 1e-5) + 1e-6
    else:
        blocks = torch.nn.functional.pad(x, (0, -x.numel() % block_size)).view(-1, block_size)
        bound = (blocks.abs().amax(1, keepdim=True) * codec.error_per_absmax).expand_as(blocks).reshape(-1)[:x.numel()]
        assert bool((error <= bound * (1 + 1e-5) + 1e-30).all())


@pytest.mark.parametrize("fraction", [0.01, 0.1, 1.0])
def test_topk_keeps_the_largest_entries_exactly_and_contracts(fraction: float) -> None:
    codec = codec_for("topk", fraction=fraction)
    for x in samples():
        parts = codec.encode(x, "float32")
        k = max(1, math.ceil(fraction * x.numel()))
        assert parts["idx"].shape == (k,) and parts["val"].shape == (k,) and parts["idx"].dtype == torch.int32
        assert bool((parts["idx"][1:] > parts["idx"][:-1]).all())
        decoded = codec.decode(parts, tuple(x.shape)).reshape(-1)
        flat = x.reshape(-1)
        kept = torch.zeros_like(flat, dtype=torch.bool)
        kept[parts["idx"].long()] = True
        assert torch.equal(decoded[kept], flat[kept])
        if (~kept).any():
            assert float(flat[~kept].abs().max()) <= float(flat[kept].abs().min())
        assert float((flat - decoded).norm() ** 2) <= (1 - k / flat.numel()) * float(flat.norm() ** 2) + 1e-9


def test_packed_parts_are_each_tensors_slices_in_sorted_name_order() -> None:
    """One packed tensor per part name; tensor t's part is its own slice (blocks and indices per tensor), and a
    part whose per-tensor dtype varies is packed in the widest (top-k indices past 2³¹ − 1 entries: int64)."""
    g = torch.Generator().manual_seed(3)
    tensors = {"b": torch.randn(5, 7, generator=g), "a": torch.randn(130, generator=g), "c": torch.zeros(1)}
    spec = {k: tuple(v.shape) for k, v in tensors.items()}
    for name in CODECS:
        codec = codec_for(name)
        parts = encode_parts(codec, tensors, "float32")
        layout, slices = packed_layout(codec, spec, "float32")
        assert list(slices) == ["a", "b", "c"] and set(parts) == set(layout)
        for part, (_, [total]) in layout.items():
            assert parts[part].shape == (total,)
            assert torch.equal(parts[part], torch.cat([codec.encode(tensors[k], "float32")[part].to(parts[part].dtype)
                                                       for k in sorted(tensors)]))
        decoded = unpack(codec, parts, spec, "float32")
        assert all(torch.equal(decoded[k], codec.decode(codec.encode(tensors[k], "float32"), spec[k])) for k in spec)
    wide, _ = packed_layout(codec_for("topk", fraction=1e-9), {"a": (2**31,), "b": (10,)}, "float32")
    assert wide["idx"] == ("I64", [3 + 1]) and wide["val"] == ("F32", [3 + 1])  # ⌈2.15⌉ + 1


def test_topk_values_travel_in_the_wire_dtype() -> None:
    parts = codec_for("topk").encode(torch.randn(100), "bfloat16")
    assert parts["val"].dtype == torch.bfloat16 and codec_for("topk").layout(100, "bfloat16")["val"] == ("BF16", [10])


def test_code_tables_are_bitsandbytes() -> None:
    """NF4 codes are bitsandbytes' byte for byte; FP4 dequantizes to exactly bitsandbytes' values."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    assert tuple(bnb.get_4bit_type("nf4", device="cpu").tolist()) == pytest.approx(NF4_CODE, abs=0)
    assert tuple(bnb.get_4bit_type("fp4", device="cpu").tolist()) == pytest.approx(FP4_CODE, abs=1e-7)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    for name in ("nf4", "fp4"):
        codec = codec_for(name, block_size=64)
        try:
            packed, state = bnb.quantize_4bit(x, blocksize=64, quant_type=name)
        except (RuntimeError, NotImplementedError) as exc:  # a build without the CPU backend
            pytest.skip(f"bitsandbytes cannot quantize on CPU here: {exc}")
        ours = codec.encode(x, "float32")
        assert torch.equal(state.absmax, ours["absmax"])
        if name == "nf4":
            assert torch.equal(packed.view(-1), ours["q"])
        assert torch.equal(bnb.dequantize_4bit(packed, state).view(-1), codec.decode(ours, (4096,)))


@pytest.mark.parametrize("name", CODECS)
def test_error_feedback_residual_stays_bounded_over_100_rounds(name: str) -> None:
    """e_{t+1} = (Δ_t + e_t) − D(C(Δ_t + e_t)) stays within the codec's contraction bound, and what is sent
    adds up to what was trained: Σ_t D(C(·)) = Σ_t Δ_t − e_T exactly (nothing is lost, only delayed)."""
    codec = codec_for(name, block_size=32, fraction=0.1)
    g = torch.Generator().manual_seed(2)
    residual: dict[str, torch.Tensor] = {}
    sent_total = torch.zeros(40, 25)
    trained_total = torch.zeros(40, 25)
    largest_delta = 0.0
    norms = []
    for _ in range(100):
        delta = {"w": torch.randn(40, 25, generator=g) * 0.01}
        parts, residual = compress_with_feedback(codec, delta, residual, "float32")
        sent_total += unpack(codec, parts, {"w": (40, 25)}, "float32")["w"]
        trained_total += delta["w"]
        largest_delta = max(largest_delta, float(delta["w"].norm()) if name == "topk" else float(delta["w"].abs().max()))
        norms.append(float(residual["w"].norm()) if name == "topk" else float(residual["w"].abs().max()))
    if name == "topk":  # ‖C(x) − x‖ ≤ √(1−δ)‖x‖, δ = k/n  ⇒  ‖e‖ ≤ √(1−δ)/(1−√(1−δ)) · max‖Δ‖
        c = math.sqrt(1 - 0.1)
        bound = c / (1 - c) * largest_delta
    else:  # |e| ≤ ε (max|Δ| + max|e|)  ⇒  max|e| ≤ ε/(1−ε) · max|Δ|
        eps = codec.error_per_absmax
        bound = eps / (1 - eps) * largest_delta
    assert max(norms) <= bound * (1 + 1e-4)
    assert max(norms[50:]) <= 2 * max(norms[:50])  # no drift upwards
    torch.testing.assert_close(sent_total + residual["w"], trained_total, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- configuration
def test_compression_options_are_validated_and_classified(tiny_model_dir: Path) -> None:
    def config(**kw: Any) -> FederationArguments:
        return FederationArguments(model_name_or_path=str(tiny_model_dir), **kw)

    config(update_compression="nf4", compression_block_size=64).validate()
    for bad, message in [({"update_compression": "zip"}, "--update_compression must be one of"),
                         ({"compression_block_size": 1}, "--compression_block_size"),
                         ({"topk_fraction": 0.0}, "--topk_fraction"), ({"topk_fraction": 1.5}, "--topk_fraction"),
                         ({"communication_budget_mb": -1.0}, "--communication_budget_mb"),
                         ({"update_compression": "int8", "fed_alg": "scaffold"}, "with --fed_alg scaffold"),
                         ({"update_compression": "int8", "dp": "client"}, "with --dp client")]:
        with pytest.raises(ValueError, match=message):
            config(**bad).validate()
    stored = vars(config())
    identity, operational = federation_changes(stored, config(update_compression="int8", communication_budget_mb=5.0))
    assert set(identity) == {"update_compression"} and set(operational) == {"communication_budget_mb"}


# ---------------------------------------------------------------------------------------------- the server
CLIENTS = {"alice": 10, "bob": 30}


@pytest.fixture(scope="module")
def prepared(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One joined state dir per codec."""
    root = tmp_path_factory.mktemp("compression")
    for name in CODECS:
        config = FederationArguments(model_name_or_path=str(tiny_model_dir), num_clients=2, sample_clients=2,
                                     num_rounds=2, peft_lora_r=4, round_timeout=0, save_model_freq=0,
                                     update_compression=name, compression_block_size=64, topk_fraction=0.05)
        joined_federation_dir(config, root / name, CLIENTS)
    return root


@pytest.fixture
def open_federation(prepared: Path, federation_copy):
    return lambda name: federation_copy(prepared / name)


def deltas(fed: Federation, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.01 for k, shape in fed.upload_spec.items()}


def push(fed: Federation, client: str, body: bytes) -> dict[str, Any]:
    return fed.receive_update(client, fed.status()["round"], CLIENTS[client], io.BytesIO(body).read, len(body), None)


def stored_updates(fed: Federation) -> list[Path]:
    return [p for p in fed.store.root.joinpath("updates").rglob("*") if p.is_file()]


@pytest.mark.parametrize("name", CODECS)
def test_the_server_aggregates_the_decoded_updates(name: str, open_federation) -> None:
    fed = open_federation(name)
    codec = get_codec(fed.config)
    decoded = []
    for seed, client in enumerate(CLIENTS):
        parts, _ = compress_with_feedback(codec, deltas(fed, seed), {}, fed.config.wire_dtype)
        body = encode_body(codec, parts, {"train_loss": "1.5"})
        assert len(body) < 0.6 * len(encode(deltas(fed, seed), "float32"))  # the tiny adapter's header is large
        assert push(fed, client, body)["accepted"]
        assert set(parts) == set(codec.layout(1, "float32"))  # one packed tensor per part name
        decoded.append(InMemoryUpdate(client, CLIENTS[client], unpack(codec, parts, fed.upload_spec,
                                                                      fed.config.wire_dtype)))
    before = decode_file(fed.latest_global().path)
    assert fed.aggregate_if_needed()
    after = decode_file(fed.latest_global().path)
    mean = weighted_mean_delta(decoded, fed.spec)
    for k in fed.spec:
        torch.testing.assert_close(after[k], before[k] + mean[k], rtol=1e-5, atol=1e-7)
    assert fed.history()[0]["train_loss"] == pytest.approx(1.5)


def _first(codec, spec: dict[str, tuple[int, ...]], wire_dtype: str) -> SimpleNamespace:
    """The first adapter tensor (sorted names) of a packed file: its slices of each packed part and its size."""
    name = sorted(spec)[0]
    return SimpleNamespace(slices=packed_layout(codec, spec, wire_dtype)[1][name], numel=math.prod(spec[name]))


def _body_with(fed: Federation, change) -> bytes:
    codec = get_codec(fed.config)
    parts, _ = compress_with_feedback(codec, deltas(fed, 0), {}, fed.config.wire_dtype)
    metadata = {COMPRESSION_METADATA: codec.tag()}
    change(parts, _first(codec, fed.upload_spec, fed.config.wire_dtype), metadata)
    return save(parts, metadata=metadata)


def _set(part: str, index: int, value):
    """Set entry ``index`` of the first tensor's slice of ``part`` (negative: from the slice's end) to ``value``
    (a callable: of the first tensor's description)."""
    def change(parts, first, metadata):
        begin, end = first.slices[part]
        assert end - begin > abs(index)
        parts[part][(begin if index >= 0 else end) + index] = value(first) if callable(value) else value
    return change


def _flip_first(part: str):
    def change(parts, first, metadata):
        begin, end = first.slices[part]
        parts[part][begin:end] = parts[part][begin:end].flip(0).clone()
    return change


BAD_UPLOADS = {
    "int8": [("NaN absmax", _set("absmax", 0, float("nan")), "NaN or infinite"),
             ("negative absmax", _set("absmax", 1, -1.0), "negative"),
             ("code -128", _set("q", 3, -128), "-128"),
             ("one block too few", lambda p, f, m: p.__setitem__("absmax", p["absmax"][1:]), "has shape"),
             ("an extra, per-tensor part", lambda p, f, m: p.__setitem__("base_model::q", p["q"][:4].clone()), "unexpected")],
    "nf4": [("infinite absmax", _set("absmax", 0, float("inf")), "NaN or infinite"),
            ("a block too many", lambda p, f, m: p.__setitem__("absmax", torch.cat([p["absmax"], torch.ones(1)])),
             "has shape"),
            ("float32 codes", lambda p, f, m: p.__setitem__("q", p["q"].float()), "dtype")],
    "fp4": [("another codec's tag", lambda p, f, m: m.__setitem__(COMPRESSION_METADATA, "nf4/64"), "compression is"),
            ("no tag", lambda p, f, m: m.pop(COMPRESSION_METADATA), "compression is"),
            ("a part missing", lambda p, f, m: p.pop("absmax"), "missing")],
    "topk": [("repeated index", lambda p, f, m: p["idx"].__setitem__(f.slices["idx"][0] + 1, p["idx"][f.slices["idx"][0]]),
              "repeat"),
             ("index past the tensor", _set("idx", -1, 10**6), "outside"),
             # Inside the packed part's total but past its own tensor: the range is each tensor's, not the file's.
             ("index past its own tensor", _set("idx", -1, lambda first: first.numel), "outside"),
             ("negative index", _set("idx", 0, -1), "outside"),
             ("unordered", _flip_first("idx"), "increasing"),
             ("NaN value", _set("val", 2, float("nan")), "NaN"),
             ("int64 indices where int32 reach", lambda p, f, m: p.__setitem__("idx", p["idx"].long()), "dtype"),
             ("more values than the fraction", lambda p, f, m: p.update({
                 "idx": torch.arange(p["idx"].numel() + 1, dtype=torch.int32),
                 "val": torch.zeros(p["idx"].numel() + 1)}), "has shape")],
}


@pytest.mark.parametrize(("name", "case"), [(name, i) for name, cases in BAD_UPLOADS.items()
                                            for i in range(len(cases))],
                         ids=[f"{name}-{c[0]}" for name, cases in BAD_UPLOADS.items() for c in cases])
def test_a_bad_compressed_upload_is_refused_with_422_and_nothing_is_stored(name: str, case: int,
                                                                           open_federation) -> None:
    _, change, message = BAD_UPLOADS[name][case]
    fed = open_federation(name)
    body = _body_with(fed, change)
    with pytest.raises(errors.InvalidUpdate, match=message):
        push(fed, "alice", body)
    assert stored_updates(fed) == [] and fed.status()["received"] == []
    assert list(fed.store.incoming_dir.iterdir()) == []


def test_a_dense_upload_to_a_compressed_federation_is_refused(open_federation) -> None:
    fed = open_federation("int8")
    with pytest.raises(errors.InvalidUpdate, match="compression is None"):
        push(fed, "alice", encode(deltas(fed, 0), "float32"))


def test_the_reader_decodes_one_tensor_at_a_time(open_federation, tmp_path: Path) -> None:
    """Aggregation holds one decoded tensor of one update, never an update's dense whole."""
    fed = open_federation("nf4")
    codec = get_codec(fed.config)
    path = tmp_path / "u.safetensors"
    parts, _ = compress_with_feedback(codec, deltas(fed, 0), {}, "float32")
    path.write_bytes(encode_body(codec, parts, {}))
    assert validate_compressed_file(path, codec, fed.upload_spec, "float32") is not None
    update = CompressedFileUpdate("alice", 10, {}, path, codec, fed.upload_spec, "float32")
    reads: list[tuple[str, int, int]] = []
    original = update._file.get_range
    update._file.get_range = lambda name, begin, end: reads.append((name, begin, end)) or original(name, begin, end)
    first = sorted(fed.spec)[0]
    assert update.get(first).shape == tuple(fed.spec[first])
    slices = _first(codec, fed.upload_spec, "float32").slices
    assert reads == [("q", *slices["q"]), ("absmax", *slices["absmax"])]  # its slices only, not the packed whole
    with pytest.raises(WireError):
        validate_compressed_file(path, TopKCodec(0.1), fed.upload_spec, "float32")
    assert isinstance(codec, BlockwiseCodec) and get_algorithm("fedavg", fed.config).name == "fedavg"


# ---------------------------------------------------------------------------------------------- accounting
def _play_round(fed: Federation) -> int:
    """Both clients download and upload once; the round's bytes."""
    codec = get_codec(fed.config)
    total = 0
    for seed, client in enumerate(CLIENTS):
        fed.record_download(client, fed.latest_global().size)
        parts, _ = compress_with_feedback(codec, deltas(fed, seed), {}, fed.config.wire_dtype)
        body = encode_body(codec, parts, {})
        push(fed, client, body)
        total += len(body) + fed.latest_global().size
    fed.record_download("stranger", 10**9)  # not joined: not counted
    assert fed.aggregate_if_needed()
    return total


@pytest.mark.parametrize("fraction", [0.9, 1.0])
def test_bytes_are_accounted_and_the_budget_warns_then_stops_rounds(fraction: float, open_federation,
                                                                    tiny_model_dir: Path) -> None:
    fed = open_federation("int8")
    first = _play_round(fed)
    record = fed.history()[0]
    assert record["bytes_sent"] + record["bytes_received"] == first
    assert record["bytes_sent"] == 2 * fed.latest_global().size
    traffic = fed.store.traffic(fed.store.read())
    assert set(traffic) == set(CLIENTS) and all(t["sent"] > 0 and t["received"] > 0 for t in traffic.values())
    assert fed.status()["communication"]["budget_state"] == "unlimited"

    # Restart with a budget the first round used `fraction` of: round 2 (started already) runs, then 3 is decided.
    root = fed.store.root
    fed.store.close()
    config = dataclasses.replace(fed.config, num_rounds=3, communication_budget_mb=first / fraction / 1e6)
    Federation.initialize(config, root)
    store = Store(root)
    try:
        fed = Federation(store)
        assert fed.status()["communication"]["budget_state"] == ("warning" if fraction < 1 else "exhausted")
        _play_round(fed)  # round 2 had started before the budget existed
        status = fed.status()
        assert status["communication"]["budget_state"] == "exhausted" and status["phase"] == "finished"
        events = [e["action"] for e in fed.events()]
        assert "finished_early" in events
        assert any("communication budget" in str(e) for e in fed.events())
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------- the served global
def within_codec_error(codec: BlockwiseCodec, decoded: torch.Tensor, exact: torch.Tensor) -> bool:
    """|x̂ − x| ≤ ε · s_b for every value of every block of ``exact``."""
    flat = exact.reshape(-1)
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % codec.block_size)).view(-1, codec.block_size)
    bound = (blocks.abs().amax(1, keepdim=True) * codec.error_per_absmax).expand_as(blocks).reshape(-1)
    return bool(((decoded.reshape(-1) - flat).abs() <= bound[:flat.numel()] * (1 + 1e-5) + 1e-30).all())


@pytest.mark.parametrize("name", QUANTIZERS)
def test_the_served_global_is_quantized_once_per_version_and_decodes_within_the_error(name: str,
                                                                                        open_federation) -> None:
    """Each version's compressed global is written with it (before any row points to it), has its own sha256, and
    decodes to the exact float32 global within ε · s_b; the exact global keeps the aggregated decoded deltas."""
    fed = open_federation(name)
    codec = global_codec(fed.config)
    for seed, client in enumerate(CLIENTS):
        parts, _ = compress_with_feedback(codec, deltas(fed, seed), {}, fed.config.wire_dtype)
        assert push(fed, client, encode_body(codec, parts, {}))["accepted"]
    assert fed.aggregate_if_needed()
    for version in (0, 1):
        path, record = compressed_paths(fed.store, version)
        assert path.is_file() and record.is_file()
    served, dense = fed.served_global("compressed"), fed.served_global(None)
    assert served.version == dense.version == 1 and served.sha256 == sha256_file(served.path) != dense.sha256
    assert served.size == Path(served.path).stat().st_size < dense.size
    exact, _ = load_state(fed.latest_global().state_path)
    decoded = read_compressed_global(served.path, codec, fed.spec)
    assert set(decoded) == set(exact)
    assert all(within_codec_error(codec, decoded[k], exact[k]) for k in exact)
    assert Path(served.path).read_bytes() == encode_global(codec, exact)  # deterministic: the same bytes, one ETag


def test_an_old_version_gets_its_compressed_global_when_first_asked(open_federation) -> None:
    """A state dir written before compressed globals were served: the first request writes it, from the state."""
    fed = open_federation("int8")
    for path in compressed_paths(fed.store, 0):
        path.unlink()
    first = fed.served_global("compressed")
    assert first == fed.served_global("compressed") and Path(first.path).is_file()


def test_a_compressed_global_of_the_per_tensor_layout_is_rewritten_packed(open_federation) -> None:
    """A state dir whose compressed global has two entries per adapter tensor (``"<tensor>::<part>"``, its record
    without ``format``): the server serves the packed file instead, which the client's check accepts."""
    fed = open_federation("int8")
    codec = global_codec(fed.config)
    exact, _ = load_state(fed.latest_global().state_path)
    path, record = compressed_paths(fed.store, 0)
    old = save({f"{k}::{p}": v for k, t in exact.items() for p, v in codec.encode(t, "float32").items()},
               metadata={COMPRESSION_METADATA: codec.tag()})
    path.write_bytes(old)
    record.write_text(json.dumps({"sha256": hashlib.sha256(old).hexdigest(), "size": len(old)}))
    served = fed.served_global("compressed")
    assert Path(served.path).read_bytes() == encode_global(codec, exact) and served.sha256 == sha256_file(path)
    assert json.loads(record.read_text())["format"] == 2 and fed.served_global("compressed") == served
    assert read_compressed_global(path, codec, fed.spec).keys() == exact.keys()


@pytest.mark.parametrize(("name", "encoding", "message"), [
    ("topk", "compressed", "serves its global dense only"), ("int8", "zip", "must be one of"),
    ("int8", "", "must be one of")])
def test_a_compressed_global_is_refused_where_none_is_served(name: str, encoding: str, message: str,
                                                            open_federation) -> None:
    fed = open_federation(name)
    with pytest.raises(errors.InvalidEncoding, match=message):
        fed.served_global(encoding)
    assert fed.served_global("dense").sha256 == fed.latest_global().sha256


def test_get_global_serves_either_encoding_with_its_etag_and_counts_the_bytes_sent(open_federation) -> None:
    fed = open_federation("nf4")
    http = create_app(fed, start_ticker=False).test_client()
    headers = {"X-FedLLM-Client": "alice"}
    compressed = http.get("/v1/global?encoding=compressed", headers=headers)
    dense = http.get("/v1/global", headers={"X-FedLLM-Client": "bob"})
    assert compressed.status_code == dense.status_code == 200
    assert compressed.headers["ETag"] == f'"{fed.served_global("compressed").sha256}"' != dense.headers["ETag"]
    assert len(compressed.data) < 0.5 * len(dense.data)
    again = http.get("/v1/global?encoding=compressed", headers={**headers, "If-None-Match": compressed.headers["ETag"]})
    assert again.status_code == 304
    other = http.get("/v1/global", headers={**headers, "If-None-Match": compressed.headers["ETag"]})
    assert other.status_code == 200 and other.data == dense.data  # one encoding's ETag never matches the other
    refused = http.get("/v1/global?encoding=gzip", headers=headers)
    assert refused.status_code == 400 and refused.get_json()["error"] == "invalid encoding"
    traffic = fed.store.traffic(fed.store.read())
    assert traffic["alice"]["sent"] == len(compressed.data) + len(dense.data) and \
        traffic["bob"]["sent"] == len(dense.data)


def test_download_error_does_not_accumulate_across_rounds() -> None:
    """The server adds Δ_t (taken against ĝ_t = D(C(g_t))) to the exact g_t: after T rounds g_T = g_0 + Σ Δ_t
    exactly, and what clients see is within ε · s_b of it. Deltas far below a code step still add up; a server that
    kept ĝ instead rounds most of them away."""
    codec = codec_for("int8", block_size=32)
    g = torch.Generator().manual_seed(4)
    exact = torch.randn(320, generator=g)
    start = exact.clone()
    step = 0.01 * float(exact.abs().max()) / 127  # a hundredth of a code step
    kept_quantized = codec.decode(codec.encode(exact, "float32"), (320,))
    for _ in range(100):
        trained_from = codec.decode(codec.encode(exact, "float32"), (320,))
        assert within_codec_error(codec, trained_from, exact)
        delta = torch.full((320,), step)  # what the client moved from ĝ_t
        exact = exact + delta
        kept_quantized = codec.decode(codec.encode(kept_quantized + delta, "float32"), (320,))
    truth = start + 100 * step
    torch.testing.assert_close(exact, truth, rtol=0, atol=1e-4)  # float32 sums of 100 terms
    assert within_codec_error(codec, codec.decode(codec.encode(exact, "float32"), (320,)), truth)
    # Keeping ĝ: most of the movement is rounded away, and the error passes the one-round bound several times over.
    assert float((kept_quantized - truth).mean()) < -0.5 * 100 * step
    assert float((kept_quantized - truth).abs().max()) > 2 * codec.error_per_absmax * float(truth.abs().max())


HOSTILE_GLOBALS = [
    ("NaN scale", _set("absmax", 0, float("nan")), "NaN or infinite"),
    ("infinite scale", _set("absmax", 0, float("inf")), "NaN or infinite"),
    ("negative scale", _set("absmax", 1, -1.0), "negative"),
    ("bad code -128", _set("q", 0, -128), "-128"),
    ("one block too few", lambda p, f, m: p.__setitem__("absmax", p["absmax"][1:]), "has shape"),
    ("codes as float32", lambda p, f, m: p.__setitem__("q", p["q"].float()), "dtype"),
    ("a part missing", lambda p, f, m: p.pop("q"), "missing"),
    ("an extra tensor", lambda p, f, m: p.__setitem__("evil", torch.zeros(4, dtype=torch.int8)), "unexpected"),
    ("another codec's tag", lambda p, f, m: m.__setitem__(COMPRESSION_METADATA, "int8/128"), "compression is"),
    ("no tag: a dense file", lambda p, f, m: m.pop(COMPRESSION_METADATA), "compression is"),
]


def hostile_global(fed: Federation, change) -> bytes:
    codec = global_codec(fed.config)
    exact, _ = load_state(fed.latest_global().state_path)
    parts = encode_parts(codec, exact, "float32")
    metadata = {COMPRESSION_METADATA: codec.tag()}
    change(parts, _first(codec, fed.spec, "float32"), metadata)
    return save(parts, metadata=metadata)


@pytest.mark.parametrize("case", range(len(HOSTILE_GLOBALS)), ids=[c[0] for c in HOSTILE_GLOBALS])
def test_the_client_refuses_a_malformed_compressed_global(case: int, open_federation, tmp_path: Path) -> None:
    """The client checks a served compressed global with the server's validator of uploads (one implementation)."""
    _, change, message = HOSTILE_GLOBALS[case]
    fed = open_federation("int8")
    path = tmp_path / "global.safetensors"
    path.write_bytes(hostile_global(fed, change))
    with pytest.raises(GlobalAdapterError, match=f"compressed \\(int8/64\\) global adapter is refused.*{message}"):
        load_global(path, fed.client_config(), global_codec(fed.config))
    path.write_bytes(b"not safetensors")
    with pytest.raises(GlobalAdapterError, match="refused"):
        load_global(path, fed.client_config(), global_codec(fed.config))
    served = fed.served_global("compressed")
    good = load_global(Path(served.path), fed.client_config(), global_codec(fed.config))
    assert good.keys() == fed.spec.keys()


def test_a_hostile_server_s_compressed_global_trains_nothing(open_federation, tmp_path: Path) -> None:
    """Over HTTP: a server that serves NaN scales makes the round refuse before any training (the trainer and the
    client state are never touched: they are None here)."""
    fed = open_federation("int8")
    body = hostile_global(fed, _set("absmax", 0, float("nan")))
    with serving(global_app(lambda: body, hashlib.sha256(body).hexdigest())) as url:
        client = FederationClient(url, "alice", max_retries=0, quiet=True)
        with pytest.raises(GlobalAdapterError, match="NaN or infinite"):
            runner._play_round(client, None, None, fed.client_config(), 1, tmp_path)
    assert client.bytes_down == len(body)
