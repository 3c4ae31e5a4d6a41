"""The client's side of REST API v1: retries with backoff, ETag caching, verified downloads, progress bars.

Nothing the server sends is trusted (:mod:`fedllm.client.trust`): redirects are not followed (they could
carry the token elsewhere), JSON answers and downloads are read up to a bound, and the cached global
adapter is named by the client from a checked version and sha256.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from tqdm.auto import tqdm

from ..fsutil import atomic_write
from .trust import (
    UntrustedServerError,
    check_server_url,
    check_token_transport,
    download_limit,
    parse_etag,
    parse_version,
)

log = logging.getLogger("fedllm.client")

CHUNK = 1 << 20
MAX_JSON_BYTES = 64 << 20  # a JSON answer (the history of many rounds is the largest) is read up to this
ERROR_PEEK_BYTES = 4096  # of a failed answer's body, for the message
CACHED_GLOBAL = re.compile(r"global-v([0-9]{6,9})-([0-9a-f]{64})\.safetensors")


@dataclass(frozen=True)
class CachedGlobal:
    """A verified global adapter in the cache, as its client-made name ``global-vNNNNNN-<sha256>`` says."""

    path: Path
    version: int
    sha256: str


class _DigestMismatch(Exception):
    """A downloaded body whose sha256 is not the ETag: torn or tampered, so retried."""


class ServerError(Exception):
    """The server refused a request (4xx), or answered it unexpectedly: retrying the same request will not help."""

    def __init__(self, status: int, error: str, detail: str = ""):
        super().__init__(f"HTTP {status}: {error}" + (f" ({detail})" if detail else ""))
        self.status = status
        self.error = error
        self.detail = detail


class _ProgressReader:
    """A file body sent in ``CHUNK`` pieces that reports upload progress; ``len`` gives requests the Content-Length.

    Iterable rather than file-like on purpose: urllib3 reads a file-like body 16 KiB at a time, which
    made a 160 MB upload spend 2.7× longer in the client than 1 MiB pieces (bench/transfer.py).
    """

    def __init__(self, path: Path, bar: tqdm):
        self._file = open(path, "rb")
        self._size = path.stat().st_size
        self._bar = bar

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self._file.read(CHUNK):
            self._bar.update(len(chunk))
            yield chunk

    def close(self) -> None:
        self._file.close()


class FederationClient:
    def __init__(
        self,
        server_url: str,
        client_id: str,
        *,
        token: str | None = None,
        ca_bundle: str | None = None,
        timeout: float = 300.0,
        max_retries: int = 8,
        quiet: bool = False,
        allow_insecure_http: bool = False,
    ):
        check_server_url(server_url)
        check_token_transport(server_url, bool(token), allow_insecure_http)
        self.base = server_url.rstrip("/")
        self.client_id = client_id
        self.timeout = timeout
        self.max_retries = max_retries
        self.quiet = quiet
        self.session = requests.Session()
        self.session.headers["X-FedLLM-Client"] = client_id
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        # Passed on every request: requests would let $REQUESTS_CA_BUNDLE override a session-level setting.
        self.verify: str | bool = ca_bundle or True
        self.bytes_down = 0
        self.bytes_up = 0

    # --- plumbing ---
    def _request(self, method: str, path: str, *, body_factory=None, retries: int | None = None,
                 timeout: float | None = None, **kwargs: Any) -> requests.Response:
        """Send a request, retrying network errors and 5xx with exponential backoff and jitter.

        The answer is streamed: its body is read by the caller, up to a bound. ``retries`` and ``timeout``
        override ``max_retries`` and the client's timeout for this request.
        """
        url = self.base + path
        retries = self.max_retries if retries is None else retries
        timeout = self.timeout if timeout is None else timeout
        for attempt in range(retries + 1):
            body = body_factory() if body_factory else None
            retry_after = ""
            try:
                response = self.session.request(method, url, data=body, timeout=timeout, verify=self.verify,
                                                stream=True, allow_redirects=False, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if isinstance(exc, requests.exceptions.SSLError):
                    raise
                failure = f"{type(exc).__name__}: {exc}"
            else:
                retryable = response.status_code >= 500 or response.status_code == 429
                if not retryable:
                    if response.status_code >= 400:
                        raise _server_error(response)
                    if 300 <= response.status_code < 400 and response.status_code != 304:
                        location = response.headers.get("Location", "")[:200]
                        response.close()
                        raise ServerError(response.status_code, "redirect not followed", location)
                    return response
                failure = f"HTTP {response.status_code}: {_peek(response)[:200]}"
                retry_after = response.headers.get("Retry-After", "")
            finally:
                if body is not None:
                    body.close()
            if attempt == retries:
                raise ConnectionError(f"{method} {path} failed after {attempt + 1} attempts: {failure}")
            delay = min(30.0, 0.5 * 2**attempt) * (0.5 + random.random())
            if retry_after.isdigit():  # the server said when (429 rate limit, 503 storage)
                delay = max(delay, min(float(retry_after), 60.0))
            log.warning("%s %s failed (%s); retrying in %.1fs", method, path, failure, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False,
                    disable=self.quiet or None)

    # --- API ---
    def health(self) -> bool:
        try:
            response = self.session.get(self.base + "/healthz", timeout=10, verify=self.verify, allow_redirects=False)
            return response.ok
        except requests.RequestException:
            return False

    def round_status(self) -> dict[str, Any]:
        return _json(self._request("GET", "/v1/round"))

    def config(self, *, retries: int | None = None, timeout: float | None = None) -> dict[str, Any]:
        return _json(self._request("GET", "/v1/config", retries=retries, timeout=timeout))

    def history(self) -> list[dict[str, Any]]:
        return _json(self._request("GET", "/v1/history"))

    def join(self, num_samples: int) -> dict[str, Any]:
        return _json(self._request("POST", "/v1/join", json={"num_samples": num_samples}))

    @functools.cached_property
    def served_download_limit(self) -> int:
        """The largest global adapter the server's ``/v1/config`` implies (its tensors are fixed for a federation)."""
        return download_limit(self.config())

    def download_global(self, cache_dir: Path, max_bytes: int | None = None, *,
                        compressed: bool = False) -> tuple[Path, int, str]:
        """The current global adapter as a local file ``(path, version, sha256)``; with ``compressed`` the one the
        federation's quantizer encoded (``?encoding=compressed``, its own sha256: a 304 names that file only).

        A cached copy is revalidated with If-None-Match. A body over ``max_bytes`` (default: the bound the
        server's ``/v1/config`` implies) is refused unread or cut off there, and nothing is written. A download
        whose sha256 differs from the server's ETag is discarded and retried: a torn or tampered file is never
        used, and only a verified one takes its place in ``cache_dir``, under a name the client makes.
        """
        if max_bytes is None:
            max_bytes = self.served_download_limit
        cache_dir.mkdir(parents=True, exist_ok=True)
        conditional = True
        for attempt in range(self.max_retries + 1):
            cached = _cached_globals(cache_dir)
            newest = cached[-1] if cached else None
            headers = {"If-None-Match": f'"{newest.sha256}"'} if newest is not None and conditional else {}
            with self._request("GET", "/v1/global?encoding=compressed" if compressed else "/v1/global",
                               headers=headers) as response:
                etag = parse_etag(response.headers.get("ETag"))
                version = parse_version(response.headers.get("X-FedLLM-Version"))
                if response.status_code == 304:
                    if newest is not None and etag == newest.sha256:
                        return newest.path, version, etag
                    log.warning("the server answered 304 Not Modified for a copy this client does not hold; "
                                "downloading the global adapter afresh")
                    conditional = False
                    continue
                if response.status_code != 200:
                    raise ServerError(response.status_code, "unexpected answer to GET /v1/global")
                announced = response.headers.get("Content-Length", "")
                if announced.isdigit() and int(announced) > max_bytes:
                    raise _oversize(f"Content-Length {int(announced)}", max_bytes)
                target = cache_dir / f"global-v{version:06d}-{etag}.safetensors"
                try:
                    atomic_write(target, functools.partial(self._save_body, response, etag, max_bytes,
                                                           f"download v{version}"))
                except requests.RequestException as exc:
                    log.warning("download of the global adapter broke off (%s); retrying", exc)
                    continue
                except _DigestMismatch as exc:
                    log.warning("global adapter sha256 %s does not match the server's ETag %s (attempt %d)",
                                exc, etag, attempt + 1)
                    continue
            self.bytes_down += target.stat().st_size
            for old in cached:
                if old.path != target:
                    old.path.unlink(missing_ok=True)
            return target, version, etag
        raise ConnectionError("could not download an intact global adapter")

    def _save_body(self, response: requests.Response, etag: str, max_bytes: int, desc: str, path: str) -> None:
        """Write the body to ``path`` (a temporary file): at most ``max_bytes``, and only if its sha256 is ``etag``."""
        announced = response.headers.get("Content-Length", "")
        digest = hashlib.sha256()
        size = 0
        with open(path, "wb") as f, self._bar(int(announced) if announced.isdigit() else 0, desc) as bar:
            for chunk in response.iter_content(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise _oversize(f"cut off at {max_bytes} bytes", max_bytes)
                digest.update(chunk)
                f.write(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != etag:
            raise _DigestMismatch(digest.hexdigest())

    def upload_update(self, round_number: int, path: Path, num_samples: int) -> dict[str, Any]:
        size = path.stat().st_size
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        headers = {
            "Content-Type": "application/octet-stream",
            "X-FedLLM-Num-Samples": str(num_samples),
            "X-Content-SHA256": digest,
        }
        with self._bar(size, f"upload r{round_number}") as bar:
            def body() -> _ProgressReader:
                bar.reset(total=size)
                return _ProgressReader(path, bar)

            response = self._request("POST", f"/v1/update?round={round_number}", headers=headers, body_factory=body)
        self.bytes_up += size
        answer = _json(response)
        if response.status_code != 202 or not isinstance(answer, dict) or answer.get("accepted") is not True:
            # The client commits the round's algorithm state on a clear "accepted" only.
            raise ServerError(response.status_code, "unexpected answer to an upload", str(answer)[:200])
        return answer

    # --- split learning (--fed_mode split, fedllm.split) ---
    def split_step(self, round_number: int) -> dict[str, Any]:
        return _json(self._request("GET", f"/v1/split/step?round={round_number}"))

    def split_exchange(self, kind: str, round_number: int, step: int, body: bytes, max_answer_bytes: int) -> bytes:
        """POST one split message (``kind`` forward or backward) and return the server's safetensors answer, at most
        ``max_answer_bytes``; retried like every request (the server answers a repeated message the same)."""
        response = self._request("POST", f"/v1/split/{kind}?round={round_number}&step={step}",
                                 headers={"Content-Type": "application/octet-stream"},
                                 body_factory=lambda: io.BytesIO(body))
        answer = _read_capped(response, max_answer_bytes)
        self.bytes_up += len(body)
        self.bytes_down += len(answer)
        return answer


    # --- secure aggregation (fedllm.client.secagg) ---
    def secagg_view(self) -> dict[str, Any]:
        return _json(self._request("GET", "/v1/secagg"))

    def secagg_send(self, stage: str, round_number: int, attempt: int, *, message: dict[str, Any] | None = None,
                    body: bytes | None = None) -> dict[str, Any]:
        """POST one stage's message (JSON, or the masked input's safetensors ``body``); the server's answer."""
        path = f"/v1/secagg/{stage}?round={round_number}&attempt={attempt}"
        if body is None:
            response = self._request("POST", path, json=message)
        else:
            response = self._request("POST", path, body_factory=lambda: io.BytesIO(body),
                                     headers={"Content-Type": "application/octet-stream"})
            self.bytes_up += len(body)
        answer = _json(response)
        if not isinstance(answer, dict) or answer.get("accepted") is not True:
            raise ServerError(response.status_code, "unexpected answer to a secure-aggregation message",
                              str(answer)[:200])
        return answer


def _cached_globals(cache_dir: Path) -> list[CachedGlobal]:
    """The global adapters in ``cache_dir`` under the names the client gives them, oldest version first."""
    found = []
    for path in cache_dir.iterdir():
        match = CACHED_GLOBAL.fullmatch(path.name)
        if match:
            found.append(CachedGlobal(path, int(match[1]), match[2]))
    return sorted(found, key=lambda c: c.version)


def _oversize(detail: str, max_bytes: int) -> UntrustedServerError:
    return UntrustedServerError(f"the server's global adapter is larger than the {max_bytes} bytes its /v1/config "
                                f"implies ({detail}); refusing it")


def _read_capped(response: requests.Response, limit: int) -> bytes:
    """The body of ``response``, refused once it passes ``limit`` bytes."""
    with response:
        chunks, size = [], 0
        for chunk in response.iter_content(CHUNK):
            size += len(chunk)
            if size > limit:
                raise UntrustedServerError(f"the server's answer to {response.request.method} "
                                           f"{response.request.path_url} passes {limit} bytes; refusing it")
            chunks.append(chunk)
    return b"".join(chunks)


def _json(response: requests.Response) -> Any:
    body = _read_capped(response, MAX_JSON_BYTES)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise UntrustedServerError(f"the server's answer to {response.request.method} {response.request.path_url} "
                                   f"is not JSON ({type(exc).__name__})") from None


def _peek(response: requests.Response) -> str:
    """The start of a failed answer's body, for a message; the rest is not read."""
    with response:
        start = next(response.iter_content(ERROR_PEEK_BYTES), b"")
    return start.decode("utf-8", "replace")


def _server_error(response: requests.Response) -> ServerError:
    text = _peek(response)
    try:
        body = json.loads(text)
        return ServerError(response.status_code, str(body.get("error", ""))[:200], str(body.get("detail", ""))[:200])
    except (ValueError, AttributeError):
        return ServerError(response.status_code, response.reason or "", text[:200])
