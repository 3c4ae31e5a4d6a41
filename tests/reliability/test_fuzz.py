"""Property-based fuzzing of every endpoint through the Flask app, in-process.

The target federation's round 1 is open and has a sampled client that has not submitted, so upload
bodies from that client get past the round checks and reach validation. For every generated request:

* no response is a 5xx;
* every error response (status >= 400) is JSON ``{"error": ..., "detail": ...}``;
* nothing changes in state_dir (every row of every SQLite table, every file, nothing left in incoming/),
  except by a successful ``POST /v1/join`` of a member, which may only touch that member's row;
* no upload is accepted: every body is garbage, a truncated valid delta, or a valid delta mutated so
  that it is certainly broken;
* a body over the limit is refused with 413 before it is read.

CI runs a fixed (derandomised) set of about 3,000 cases. ``FEDLLM_FUZZ_EXAMPLES=N`` scales every test
(N examples for the main ones; default 1000), ``FEDLLM_FUZZ_SEED=S`` draws other cases than CI's, and
the totals are printed at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st
from safetensors.torch import load, save
from werkzeug.test import EnvironBuilder, TestResponse
from werkzeug.wrappers import Request

from fedllm.server.app import create_app
from fedllm.server.auth import TokenRegistry
from fedllm.server.federation import Federation
from fedllm.server.ingest import BODY_CHUNK
from fedllm.server.ratelimit import RateLimiter
from fedllm.server.store import Store
from fedllm.wire import KNOWN_DTYPE_SIZES

from ..test_api import CLIENTS, Api, assert_error, snapshot
from .conftest import copy_joined, issue_tokens

pytestmark = pytest.mark.reliability

EXAMPLES = int(os.environ.get("FEDLLM_FUZZ_EXAMPLES", "1000"))
SEED = int(os.environ["FEDLLM_FUZZ_SEED"]) if os.environ.get("FEDLLM_FUZZ_SEED") else None
TALLY: Counter[str] = Counter()  # requests, 5xx, state changes, per test


def fuzz(weight: float) -> Callable:
    """Hypothesis settings for a test that runs ``weight * FEDLLM_FUZZ_EXAMPLES`` cases."""

    def decorate(test: Callable) -> Callable:
        test = settings(max_examples=max(1, int(EXAMPLES * weight)), deadline=None, derandomize=SEED is None,
                        database=None, suppress_health_check=list(HealthCheck))(test)
        return test if SEED is None else seed(SEED)(test)

    return decorate


# ------------------------------------------------------------------------------------------------ the target
@dataclass
class Target:
    """One state_dir (round 1 open) behind three apps: open, with --auth_tokens, and rate-limited."""

    state_dir: Path
    apps: dict[str, Api]
    tokens: dict[str, str]  # client -> token, and "admin" -> the admin token
    sampled: str  # sampled in round 1, has not submitted
    valid: bytes  # a delta that `sampled` could upload (proved in test_valid_delta_reaches_acceptance)
    before: Any = None

    def state(self) -> Any:
        return snapshot(self.state_dir), sorted(os.listdir(self.state_dir / "incoming"))


@pytest.fixture(scope="module")
def target(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("fuzz")
    state_dir = copy_joined(prepared, root / "state")
    tokens, admin = issue_tokens(root / "tokens.json")
    registry = TokenRegistry(root / "tokens.json")

    def app(tokens: TokenRegistry | None, **kwargs: Any) -> Api:
        federation = Federation(Store(state_dir))
        return Api(federation, create_app(federation, tokens, start_ticker=False, **kwargs).test_client())

    apps = {"open": app(None), "secured": app(registry), "limited": app(None, rate_limiter=RateLimiter(root / "ratelimit.db", rate=0.01))}
    sampled = apps["open"].sampled()[0]
    result = Target(state_dir, apps, {**tokens, "admin": admin}, sampled, apps["open"].delta())
    result.before = result.state()
    yield result
    for api in apps.values():
        api.federation.store.close()
    totals = {key: TALLY[key] for key in ("requests", "5xx", "state changes")}
    print(f"\nfuzz totals: {totals}")


# ------------------------------------------------------------------------------------------------ requests
def wsgi_str(text: str) -> str:
    """What a WSGI server puts in the environ for ``text`` sent as UTF-8 (bytes decoded as latin-1)."""
    return text.encode("utf-8", "surrogatepass").decode("latin-1")


@dataclass
class Fuzzed:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    content_length: str | None = "auto"  # "auto": the body's length; None: no header (a chunked upload)
    terminated: bool = False  # wsgi.input_terminated, as gunicorn sets it


def send(client: FlaskClient, request: Fuzzed, stream: io.RawIOBase | None = None) -> TestResponse:
    environ = EnvironBuilder(method=request.method, data=request.body).get_environ()
    environ["PATH_INFO"] = wsgi_str(request.path)
    environ["QUERY_STRING"] = wsgi_str(request.query)
    if stream is not None:
        environ["wsgi.input"] = stream
    environ.pop("CONTENT_TYPE", None)
    for name, value in request.headers.items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"] = wsgi_str(value)
    if request.content_length is None:
        environ.pop("CONTENT_LENGTH", None)
    elif request.content_length != "auto":
        environ["CONTENT_LENGTH"] = wsgi_str(request.content_length)
    if request.terminated:
        environ["wsgi.input_terminated"] = True
    return client.open(Request(environ))


ODD = [
    "", " ", "..", "../x", "../../etc/passwd", "..\\..\\x", "a/b", "/", "x\x00y", "x\x01y", "\x7f", "\t", "\x1c5",
    "é", "日本", "😀", "\u202e", "\ufeff", "a" * 64, "a" * 65, "a" * 10_000, "-1", "0", "1", "10", "+5", " 5", "5 ",
    "5\x85", "1.5", "1e3", "0x10", "²", "١٠", "NaN", "inf", "null", "true", "[]", "{}", "%00", "%2e%2e%2f",
    "9" * 16, "9" * 5000, "alice", "bob", "carol", "zed", "dashboard", "admin", "alice\n", "Bearer", "Bearer ",
]
odd_text = st.one_of(
    st.sampled_from(ODD),
    st.text(max_size=40),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    st.text(alphabet="abc./-_%\\", min_size=1, max_size=80),
)
client_ids = st.one_of(st.sampled_from([*CLIENTS, "zed", "dashboard"]), odd_text)
# ("raw", value) or ("token", role, scheme): the role's token is looked up when sending.
authorization = st.one_of(
    st.none(),
    st.tuples(st.just("raw"), odd_text),
    st.tuples(st.just("raw"), odd_text.map(lambda t: "Bearer " + t)),
    st.tuples(st.just("token"), st.sampled_from([*CLIENTS, "admin"]),
              st.sampled_from(["Bearer ", "Bearer ", "Bearer  ", "bearer ", "Basic ", ""])),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
join_like = st.dictionaries(st.sampled_from(["num_samples", "client_id", "x"]), json_values, max_size=3)
PATHS = {
    "/healthz": "GET", "/v1/round": "GET", "/v1/config": "GET", "/v1/global": "GET", "/v1/history": "GET",
    "/v1/clients": "GET", "/metrics": "GET", "/": "GET", "/dashboard/static/dashboard.css": "GET",
    "/v1/join": "POST", "/v1/update": "POST", "/v1/admin/pause": "POST", "/v1/admin/resume": "POST",
    "/v1/admin/abort_round": "POST", "/v1/admin/remove_client": "POST", "/v1/admin/events": "GET",
}
ODD_PATHS = [
    "/v1/nothing", "/v1/admin/", "/v1/admin/nothing", "/v1//round", "/v1/round/", "/v1/update/", "/../etc/passwd",
    "/dashboard/static/../../../../etc/passwd", "/dashboard/static/%2e%2e/x", "//", "/v2/round", "/V1/ROUND",
    "/v1/update/../round", "/v1/global\x00", "/healthz/", "/v1/admin/events/x",
]
METHODS = ["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"]


@functools.cache
def bodies(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.just(b""),
        st.binary(max_size=2000),
        json_values.map(lambda v: json.dumps(v).encode()),
        join_like.map(lambda v: json.dumps(v).encode()),
        st.integers(1, 100_000).map(lambda n: b"[" * n),
        st.integers(1, 100_000).map(lambda n: b'{"a":' * n),
        st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),  # a truncated valid delta
        st.tuples(st.integers(0, len(valid) - 1), st.binary(min_size=1, max_size=64)).map(
            lambda t: valid[: t[0]] + t[1] if valid[: t[0]] + t[1] != valid else t[1]),
    )


@st.composite
def fuzzed_requests(draw: st.DrawFn, target: Target, paths: list[str] | None = None) -> tuple[str, Fuzzed]:
    """``(app name, request)`` for any endpoint: a known path (mostly with its own method) or an odd one."""
    path = draw(st.sampled_from(paths) if paths else st.one_of(
        st.sampled_from(list(PATHS)), st.sampled_from(ODD_PATHS), odd_text.map(lambda t: "/" + t)))
    natural = PATHS.get(path)
    method = draw(st.sampled_from(METHODS)) if natural is None or draw(st.integers(0, 4)) == 0 else natural
    headers: dict[str, str] = {}
    if draw(st.integers(0, 5)):
        headers["X-FedLLM-Client"] = target.sampled if draw(st.booleans()) else draw(client_ids)
    body = draw(bodies(target.valid)) if method not in ("GET", "HEAD") or draw(st.integers(0, 9)) == 0 else b""
    if draw(st.booleans()):
        headers["X-FedLLM-Num-Samples"] = draw(st.one_of(st.sampled_from(["10", "1", "999999999999999"]), odd_text,
                                                        st.integers().map(str)))
    sha = draw(st.one_of(st.none(), st.just(hashlib.sha256(body).hexdigest()), odd_text,
                         st.text(alphabet="0123456789abcdefABCDEF", min_size=64, max_size=64)))
    if sha is not None:
        headers["X-Content-SHA256"] = sha
    if draw(st.integers(0, 3)):  # the body's own type, mostly
        headers["Content-Type"] = "application/octet-stream" if path == "/v1/update" else "application/json"
    for name, values in (
        ("Content-Type", st.sampled_from(["application/json", "application/octet-stream", "text/plain",
                                          "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"])),
        ("If-None-Match", st.sampled_from(["*", '"x"', "W/", ",,,"])),
        ("Transfer-Encoding", st.sampled_from(["chunked", "gzip, chunked", "identity"])),
        ("X-Forwarded-For", odd_text),
    ):
        if draw(st.integers(0, 3)) == 0:
            headers[name] = draw(st.one_of(values, odd_text))
    auth = draw(authorization)
    app = draw(st.sampled_from(["open", "secured", "secured", "limited"]))
    if auth is not None:
        if auth[0] == "token":
            role = auth[1]
            if role == "admin" and path.startswith("/v1/admin/") and method != "GET":
                role = draw(st.sampled_from(list(CLIENTS)))  # operator actions succeed by design; fuzzed below
            headers["Authorization"] = auth[2] + target.tokens[role]
        else:
            headers["Authorization"] = auth[1]
    if app == "secured" and headers.get("X-FedLLM-Client") in CLIENTS and draw(st.booleans()):
        headers["Authorization"] = "Bearer " + target.tokens[headers["X-FedLLM-Client"]]  # the caller's own token
    query = draw(st.one_of(st.just("round=1"), odd_text.map(lambda t: "round=" + t), odd_text,
                           st.sampled_from(["round=1&round=2", "round=2", "round=0", "x=1", "round=%C2%B2"])))
    content_length = draw(st.one_of(st.just("auto"), st.just("auto"), st.none(), odd_text,
                                    st.integers(-10, len(body) + 10).map(str)))
    return app, Fuzzed(method, path, query, headers, body, content_length, draw(st.booleans()))


def check(target: Target, response: TestResponse, request: Fuzzed, *, may_join: bool = True) -> None:
    """The properties every fuzzed request must keep."""
    TALLY["requests"] += 1
    status = response.status_code
    note(f"{request.method} {request.path!r} -> {status} {response.get_data()[:300]!r}")
    if status >= 500:
        TALLY["5xx"] += 1
    assert status < 500, (status, response.get_data(as_text=True))
    if status >= 400:
        if request.method == "HEAD":
            assert response.mimetype == "application/json"
        else:
            assert isinstance(assert_error(response, status)["error"], str)
    elif 300 <= status < 400:
        assert status == 304 or response.headers.get("Location"), status
    response.close()
    after = target.state()
    if after == target.before:
        return
    joined = may_join and status == 200 and request.path == "/v1/join" and request.method == "POST"
    (rows, files), incoming = after
    (rows_before, files_before), incoming_before = target.before
    changed_clients = set(rows["clients"]) ^ set(rows_before["clients"])
    only_its_row = files == files_before and incoming == incoming_before and all(
        rows[t] == rows_before[t] for t in rows if t != "clients") and {
        row[0] for row in changed_clients} == {request.headers.get("X-FedLLM-Client")}
    if not (joined and only_its_row):
        TALLY["state changes"] += 1
        pytest.fail(f"{request.method} {request.path} answered {status} and changed the state")
    target.before = after  # a member re-joined: its num_samples and last_seen moved, nothing else


# ------------------------------------------------------------------------------------------------ tests
def test_valid_delta_reaches_acceptance(api: Api) -> None:
    """Control: the fuzz target's client, headers and delta are accepted, so the fuzzed rejections below are
    caused by what was fuzzed, not by the harness."""
    client = api.sampled()[0]
    body = api.delta()
    response = send(api.http, Fuzzed("POST", "/v1/update", "round=1", {
        "X-FedLLM-Client": client, "X-FedLLM-Num-Samples": "10", "X-Content-SHA256": hashlib.sha256(body).hexdigest(),
        "Content-Type": "application/octet-stream"}, body))
    assert response.status_code == 202, response.get_json()


@fuzz(1.0)
@given(data=st.data())
def test_fuzz_any_request(target: Target, data: st.DataObject) -> None:
    """Any method, path, headers, query and body on any of the three apps: no 5xx, JSON errors, no state
    change (but a member's successful re-join)."""
    app, request = data.draw(fuzzed_requests(target))
    check(target, send(target.apps[app].http, request), request)


@fuzz(0.5)
@given(data=st.data())
def test_fuzz_uploads(target: Target, data: st.DataObject) -> None:
    """``POST /v1/update`` with fuzzed headers, query and body: never accepted, nothing changes."""
    app, request = data.draw(fuzzed_requests(target, paths=["/v1/update"]))
    request.method = "POST"
    response = send(target.apps[app].http, request)
    check(target, response, request)
    assert response.status_code != 202


@fuzz(0.3)
@given(data=st.data())
def test_fuzz_join(target: Target, data: st.DataObject) -> None:
    """``POST /v1/join`` with fuzzed headers and JSON (deeply nested, wrong types, huge numbers): no 5xx, JSON
    errors; only a member's valid re-join changes anything, and only its own row."""
    app, request = data.draw(fuzzed_requests(target, paths=["/v1/join"]))
    request.method = "POST"
    check(target, send(target.apps[app].http, request), request)


# ------------------------------------------------------------------------------------------------ crafted files
def split(body: bytes) -> tuple[dict[str, Any], bytes]:
    (header_len,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8:8 + header_len]), body[8 + header_len:]


def assemble(header: dict[str, Any] | bytes, data: bytes, header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        return False


@functools.cache
def mutations(valid: bytes, spec: tuple[tuple[str, tuple[int, ...]], ...]) -> st.SearchStrategy[tuple[str, bytes]]:
    """``(what, body)``: ``valid`` broken in one of many ways; each way breaks it for certain."""
    expected = dict(spec)
    header, data = split(valid)
    names = sorted(k for k in header if k != "__metadata__")
    header_len = len(valid) - 8 - len(data)
    tensors = load(valid)
    name = st.sampled_from(names)
    new_name = st.text(min_size=1, max_size=30).filter(lambda n: n not in header)
    big = st.integers(-(2**70), 2**70)
    offsets_garbage = st.one_of(
        st.lists(big, max_size=4).filter(lambda o: len(o) != 2),
        st.tuples(big, big).map(list).filter(lambda o: not 0 <= o[0] <= o[1] <= len(data)),
        json_values.filter(lambda v: not (isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v))),
    )
    shapes = st.one_of(st.lists(st.integers(0, 2**41), max_size=4), st.lists(big, min_size=1, max_size=3), json_values)
    dtypes = st.one_of(st.sampled_from(sorted(set(KNOWN_DTYPE_SIZES) - {"F32"})), st.text(max_size=8))

    def edit(what: str, change: Callable[[dict[str, Any], str, Any], None], values: st.SearchStrategy) -> Any:
        def apply(args: tuple[str, Any]) -> dict[str, Any]:
            edited = json.loads(json.dumps(header))
            change(edited, *args)
            return edited

        # An edit that leaves the header as it was (e.g. the same shape drawn) is no mutation.
        return st.tuples(name, values).map(apply).filter(lambda h: h != header).map(lambda h: (what, assemble(h, data)))

    def entry_set(key: str) -> Callable[[dict[str, Any], str, Any], None]:
        def change(h: dict[str, Any], n: str, value: Any) -> None:
            h[n][key] = value
        return change

    def overlap(h: dict[str, Any], n: str, other: str) -> None:
        h[n]["data_offsets"] = list(h[other]["data_offsets"])

    def rename(h: dict[str, Any], n: str, to: str) -> None:
        h[to] = h.pop(n)

    def drop(h: dict[str, Any], n: str, _: Any) -> None:
        del h[n]

    def replace_entry(h: dict[str, Any], n: str, value: Any) -> None:
        h[n] = value

    def extra_key(h: dict[str, Any], n: str, kv: tuple[str, Any]) -> None:
        h[n][kv[0]] = kv[1]

    def drop_key(h: dict[str, Any], n: str, key: str) -> None:
        del h[n][key]

    def add_entry(h: dict[str, Any], _: str, entry: tuple[str, str, Any, Any]) -> None:
        h[entry[0]] = {"dtype": entry[1], "shape": entry[2], "data_offsets": entry[3]}

    def duplicate(args: tuple[str, bool]) -> tuple[str, bytes]:
        n, same = args
        items = [(k, v) for k, v in header.items()]
        entry = header[n] if same else {**header[n], "data_offsets": [0, 0]}
        items.insert(len(items) // 2, (n, entry))
        raw = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in items) + "}").encode()
        return "duplicate tensor name", assemble(raw, data)

    def reencode(what: str, change: Callable[[dict[str, torch.Tensor], Any], None], values: st.SearchStrategy) -> Any:
        def apply(value: Any) -> tuple[str, bytes]:
            edited = dict(tensors)
            change(edited, value)
            return what, save(edited, metadata={"train_loss": "1.5"})
        return values.map(apply)

    def wrong_shape(t: dict[str, torch.Tensor], args: tuple[str, list[int]]) -> None:
        t[args[0]] = torch.zeros(args[1])

    def non_finite(t: dict[str, torch.Tensor], args: tuple[str, int, float]) -> None:
        n, index, value = args
        t[n] = t[n].clone()
        t[n].view(-1)[index % t[n].numel()] = value

    def cast(t: dict[str, torch.Tensor], args: tuple[list[str], torch.dtype]) -> None:
        for n in args[0]:
            t[n] = t[n].to(args[1])

    small_shapes = st.lists(st.integers(0, 9), min_size=1, max_size=3)
    return st.one_of(
        # the 8-byte header length
        st.integers(1, 2**64 - 1 - (len(valid) - 8)).map(
            lambda k: ("header length past the body", struct.pack("<Q", len(valid) - 8 + k) + valid[8:])),
        st.integers(-header_len, len(data)).filter(bool).map(
            lambda k: ("header length shifted", struct.pack("<Q", header_len + k) + valid[8:])),
        st.binary(max_size=7).map(lambda b: ("shorter than 8 bytes", b)),
        # the header's JSON
        st.binary(min_size=header_len, max_size=header_len).filter(lambda b: not _is_json_object(b)).map(
            lambda b: ("garbage header", assemble(b, data))),
        st.binary(max_size=300).filter(lambda b: not _is_json_object(b)).map(
            lambda b: ("garbage header of another length", assemble(b, data))),
        json_values.filter(lambda v: not isinstance(v, dict)).map(
            lambda v: ("header not an object", assemble(json.dumps(v).encode(), data))),
        st.integers(1, 100_000).map(lambda n: ("deeply nested header", assemble(b"[" * n + b"]" * n, data))),
        st.tuples(name, st.booleans()).map(duplicate),
        edit("overlapping offsets", overlap, name),
        edit("offsets out of range", entry_set("data_offsets"),
             st.tuples(st.integers(0, len(data)), st.integers(len(data) + 1, 2**66)).map(list)),
        edit("offsets reversed", entry_set("data_offsets"),
             st.tuples(st.integers(1, len(data)), st.integers(0, len(data))).filter(lambda o: o[0] > o[1]).map(list)),
        edit("offsets garbage", entry_set("data_offsets"), offsets_garbage),
        edit("other dtype", entry_set("dtype"), dtypes),
        edit("dtype not a string", entry_set("dtype"), json_values.filter(lambda v: not isinstance(v, str))),
        edit("other shape", entry_set("shape"), shapes),
        edit("gigantic shape", entry_set("shape"), st.lists(st.integers(2**20, 2**62), min_size=1, max_size=6)),
        edit("renamed tensor", rename, new_name),
        edit("dropped entry", drop, st.none()),
        edit("entry not an object", replace_entry, json_values.filter(lambda v: not isinstance(v, dict))),
        edit("entry with an extra key", extra_key,
             st.tuples(st.text(max_size=10).filter(lambda k: k not in ("dtype", "shape", "data_offsets")), json_values)),
        edit("entry missing a key", drop_key, st.sampled_from(["dtype", "shape", "data_offsets"])),
        edit("added entry", add_entry, st.tuples(new_name.filter(lambda n: n != "__metadata__"),
                                                 st.one_of(st.just("F32"), dtypes), st.one_of(small_shapes, shapes),
                                                 st.one_of(st.tuples(st.integers(0, len(data)),
                                                                     st.integers(0, len(data))).map(list),
                                                           offsets_garbage))),
        st.one_of(
            json_values.filter(lambda v: v is not None and not isinstance(v, dict)),
            st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=3).filter(
                lambda d: not all(isinstance(v, str) for v in d.values())),
        ).map(lambda m: ("bad __metadata__", assemble({**header, "__metadata__": m}, data))),
        # the data
        st.integers(0, len(valid) - 1).map(lambda n: ("truncated", valid[:n])),
        st.binary(min_size=1, max_size=4096).map(lambda b: ("trailing bytes", valid + b)),
        # well-formed files with the wrong content
        reencode("missing tensors", lambda t, drop: [t.pop(n) for n in drop],
                 st.lists(name, min_size=1, unique=True)),
        reencode("extra tensor", lambda t, args: t.update({args[0]: torch.zeros(args[1])}),
                 st.tuples(new_name.filter(lambda n: n != "__metadata__"), small_shapes)),
        reencode("wrong shape", wrong_shape,
                 st.tuples(name, small_shapes).filter(lambda a: tuple(a[1]) != tuple(expected[a[0]]))),
        reencode("zero-size tensor", wrong_shape,
                 st.tuples(name, st.lists(st.integers(0, 4), min_size=1, max_size=3).filter(lambda s: 0 in s))),
        reencode("NaN or Inf", non_finite,
                 st.tuples(name, st.integers(0, 2**31), st.sampled_from([float("nan"), float("inf"), float("-inf")]))),
        reencode("other dtype", cast, st.tuples(
            st.lists(name, min_size=1, unique=True),
            st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.uint8,
                             torch.bool, torch.int64]))),
    )


@fuzz(1.0)
@given(data=st.data())
def test_fuzz_crafted_safetensors(target: Target, data: st.DataObject) -> None:
    """A valid delta broken in one way (header length, JSON, offsets, dtypes, names, shapes, metadata, data,
    values) from the sampled client, with every header right: refused with 400 or 422, nothing changes."""
    federation = target.apps["open"].federation
    what, body = data.draw(mutations(target.valid, tuple(sorted(federation.upload_spec.items()))))
    note(what)
    assert body != target.valid  # a mutation never gives the valid file back
    headers = {"X-FedLLM-Client": target.sampled, "X-FedLLM-Num-Samples": "10",
               "Content-Type": "application/octet-stream"}
    if data.draw(st.booleans()):
        headers["X-Content-SHA256"] = hashlib.sha256(body).hexdigest()
    request = Fuzzed("POST", "/v1/update", "round=1", headers, body)
    response = send(target.apps["open"].http, request)
    check(target, response, request, may_join=False)
    assert response.status_code in (400, 422), (what, response.get_json())
    assert response.get_json()["error"] in ("malformed update", "invalid update"), (what, response.get_json())


@fuzz(0.3)
@given(data=st.data())
def test_fuzz_operator_endpoints(target: Target, data: st.DataObject) -> None:
    """``/v1/admin/*`` with no, garbage, client or admin tokens and fuzzed bodies: no 5xx, JSON errors, nothing
    changes (the admin token is only paired with requests that must fail or only read)."""
    action = data.draw(st.sampled_from(["pause", "resume", "abort_round", "remove_client", "events", "nothing", ""]))
    app, request = data.draw(fuzzed_requests(target, paths=[f"/v1/admin/{action}"]))
    if data.draw(st.booleans()):
        request.headers["X-FedLLM-Client"] = data.draw(client_ids)
    if app == "secured" and data.draw(st.booleans()):  # the admin token, on requests that must not act
        request.headers["Authorization"] = "Bearer " + target.tokens["admin"]
        if action in ("pause", "resume", "abort_round"):
            request.method = data.draw(st.sampled_from([m for m in METHODS if m != "POST"]))
        elif action == "remove_client":
            body = data.draw(st.one_of(bodies(target.valid), join_like.map(lambda v: json.dumps(v).encode())))
            try:
                claimed = json.loads(body).get("client_id")
            except (ValueError, RecursionError, AttributeError):
                claimed = None
            named = isinstance(claimed, str) and claimed in CLIENTS
            request.body = json.dumps({"client_id": "zed"}).encode() if named else body
            request.content_length = "auto"
    check(target, send(target.apps[app].http, request), request, may_join=False)


# ------------------------------------------------------------------------------------------------ size limit
class CountingStream(io.RawIOBase):
    """A request body that counts the bytes the server reads from it."""

    def __init__(self, size: int):
        self.size = size
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self.read_bytes)
        buffer[:n] = b"\0" * n
        self.read_bytes += n
        return n


@pytest.fixture(scope="module")
def small_limit(target: Target) -> Iterator[FlaskClient]:
    federation = Federation(Store(target.state_dir), max_upload_bytes=4096)
    yield create_app(federation, None, start_ticker=False).test_client()
    federation.store.close()


@fuzz(0.2)
@given(data=st.data())
def test_fuzz_over_limit_is_refused_unread(target: Target, small_limit: FlaskClient, data: st.DataObject) -> None:
    """A body whose Content-Length is over --max_upload_mb gets 413 JSON without a byte of it read; one
    without Content-Length is read no further than the limit plus one chunk."""
    size = data.draw(st.integers(4097, 64 << 20))
    sized = data.draw(st.booleans())
    declared = str(data.draw(st.one_of(st.just(size), st.integers(4097, 2**62)))) if sized else None
    # Without Content-Length only the size read tells; a client that may not push is refused before any read.
    client = data.draw(st.sampled_from([target.sampled, *CLIENTS])) if sized else target.sampled
    headers = {"X-FedLLM-Client": client, "X-FedLLM-Num-Samples": "10", "Content-Type": "application/octet-stream"}
    request = Fuzzed("POST", "/v1/update", "round=1", headers, b"", declared, terminated=not sized)
    stream = CountingStream(size)
    response = send(small_limit, request, stream)
    check(target, response, request, may_join=False)
    assert_error(response, 413, "upload too large")
    assert stream.read_bytes == 0 if sized else stream.read_bytes <= 4096 + BODY_CHUNK


def test_fuzz_target_was_not_disturbed(target: Target) -> None:
    """After all the fuzzing the round is still open, nobody submitted, and the valid delta would be taken."""
    status = target.apps["open"].federation.status(target.sampled)
    assert status["phase"] == "training" and status["received"] == [] and status["selected"] is True
    scratch = target.state_dir.parent / "scratch"
    shutil.copytree(target.state_dir, scratch)
    federation = Federation(Store(scratch))
    api = Api(federation, create_app(federation, None, start_ticker=False).test_client())
    body = target.valid
    response = api.upload(target.sampled, body, headers={"X-Content-SHA256": hashlib.sha256(body).hexdigest()})
    assert response.status_code == 202, response.get_json()
    federation.store.close()
