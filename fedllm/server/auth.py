"""Bearer tokens: stored only as sha256 hashes, compared in constant time.

The tokens file is JSON: ``{"clients": {"alice": "<sha256 hex>", ...}, "admin": "<sha256 hex>"}``.
It is re-read when it changes on disk, so clients can be added while the server runs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from pathlib import Path

from ..fsutil import atomic_write_bytes


def hash_token(token: str) -> str:
    # Tokens are 256-bit random strings, so an unsalted sha256 is enough to make the file useless to a reader.
    return hashlib.sha256(token.encode()).hexdigest()


def _read(path: Path) -> dict:
    if not path.exists():
        return {"clients": {}, "admin": None}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("clients", {}), dict):
        raise ValueError(f"{path}: expected {{'clients': {{id: sha256}}, 'admin': sha256}}")
    data.setdefault("clients", {})
    data.setdefault("admin", None)
    return data


def add_token(path: str | Path, client_id: str | None) -> str:
    """Create a token for ``client_id`` (or the admin token when None); return it. Only its hash is kept."""
    path = Path(path)
    data = _read(path)
    token = secrets.token_urlsafe(32)
    if client_id is None:
        data["admin"] = hash_token(token)
    else:
        data["clients"][client_id] = hash_token(token)
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    os.chmod(path, 0o600)
    return token


class TokenRegistry:
    """Looks up who a bearer token belongs to."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._clients: dict[str, str] = {}
        self._admin: str | None = None
        self._reload()

    def _reload(self) -> None:
        mtime = self.path.stat().st_mtime if self.path.exists() else None
        with self._lock:
            if mtime == self._mtime:
                return
            data = _read(self.path)
            self._clients = dict(data["clients"])
            self._admin = data["admin"]
            self._mtime = mtime

    def client_ids(self) -> set[str]:
        self._reload()
        return set(self._clients)

    def identify(self, token: str) -> tuple[str | None, bool]:
        """``(client_id or None, is_admin)`` for a token; compares against every entry in constant time."""
        self._reload()
        digest = hash_token(token)
        owner = None
        for client_id, stored in self._clients.items():
            if hmac.compare_digest(digest, stored):
                owner = client_id
        is_admin = self._admin is not None and hmac.compare_digest(digest, self._admin)
        return owner, is_admin
