"""The client's side of REST API v1: retries with backoff, ETag caching, verified downloads, progress bars."""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
from tqdm.auto import tqdm

from ..fsutil import atomic_write

log = logging.getLogger("fedllm.client")

CHUNK = 1 << 20


class ServerError(Exception):
    """The server refused a request (4xx): retrying the same request will not help."""

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
    ):
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
    def _request(self, method: str, path: str, *, body_factory=None, **kwargs: Any) -> requests.Response:
        """Send a request, retrying network errors and 5xx with exponential backoff and jitter."""
        url = self.base + path
        for attempt in range(self.max_retries + 1):
            body = body_factory() if body_factory else None
            retry_after = ""
            try:
                response = self.session.request(method, url, data=body, timeout=self.timeout, verify=self.verify,
                                                **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if isinstance(exc, requests.exceptions.SSLError):
                    raise
                failure = f"{type(exc).__name__}: {exc}"
            else:
                retryable = response.status_code >= 500 or response.status_code == 429
                if not retryable:
                    if response.status_code >= 400:
                        raise _server_error(response)
                    return response
                failure = f"HTTP {response.status_code}: {response.text[:200]}"
                retry_after = response.headers.get("Retry-After", "")
            finally:
                if body is not None:
                    body.close()
            if attempt == self.max_retries:
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
            return self.session.get(self.base + "/healthz", timeout=10, verify=self.verify).ok
        except requests.RequestException:
            return False

    def round_status(self) -> dict[str, Any]:
        return self._request("GET", "/v1/round").json()

    def config(self) -> dict[str, Any]:
        return self._request("GET", "/v1/config").json()

    def history(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/history").json()

    def join(self, num_samples: int) -> dict[str, Any]:
        return self._request("POST", "/v1/join", json={"num_samples": num_samples}).json()

    def download_global(self, cache_dir: Path) -> tuple[Path, int, str]:
        """The current global adapter as a local file ``(path, version, sha256)``.

        A cached copy is revalidated with If-None-Match. A download whose sha256 differs from
        the server's ETag is discarded and retried: a torn or tampered file is never used.
        """
        cache_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(self.max_retries + 1):
            cached = sorted(cache_dir.glob("global-*.safetensors"))
            headers = {"If-None-Match": f'"{cached[-1].stem.split("-")[-1]}"'} if cached else {}
            response = self._request("GET", "/v1/global", headers=headers, stream=True)
            etag = response.headers.get("ETag", "").strip('"')
            version = int(response.headers.get("X-FedLLM-Version", "-1"))
            if response.status_code == 304:
                return cached[-1], version, etag
            target = cache_dir / f"global-v{version:06d}-{etag}.safetensors"
            digest = hashlib.sha256()
            desc = f"download v{version}"
            try:
                atomic_write(target, functools.partial(self._save_body, response, digest, desc))
            except requests.RequestException as exc:
                log.warning("download of the global adapter broke off (%s); retrying", exc)
                continue
            if digest.hexdigest() != etag:
                target.unlink(missing_ok=True)
                log.warning("global adapter sha256 %s does not match the server's ETag %s (attempt %d)",
                            digest.hexdigest(), etag, attempt + 1)
                continue
            self.bytes_down += target.stat().st_size
            for old in cached:
                old.unlink(missing_ok=True)
            return target, version, etag
        raise ConnectionError("could not download an intact global adapter")

    def _save_body(self, response: requests.Response, digest: Any, desc: str, path: str) -> None:
        total = int(response.headers.get("Content-Length", 0))
        with open(path, "wb") as f, self._bar(total, desc) as bar:
            for chunk in response.iter_content(CHUNK):
                digest.update(chunk)
                f.write(chunk)
                bar.update(len(chunk))

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
        return response.json()


def _server_error(response: requests.Response) -> ServerError:
    try:
        body = response.json()
        return ServerError(response.status_code, body.get("error", ""), body.get("detail", ""))
    except ValueError:
        return ServerError(response.status_code, response.reason or "", response.text[:200])
