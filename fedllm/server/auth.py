"""Bearer tokens: stored only as sha256 hashes, compared in constant time.

The tokens file is JSON::

    {"clients": {"alice": "<sha256 hex>", ...}, "admin": "<sha256 hex>", "viewer": "<sha256 hex>"}

Three roles: a *client* token acts as its own client and sees only its own rows; the *viewer* token
(the dashboard's) reads everything and changes nothing; the *admin* token reads everything and runs
the operator actions. The file is re-read when it changes on disk (every worker checks it on each
request), so a client added or revoked while the server runs counts from the next request on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import atomic_write_bytes

CLIENT, VIEWER, ADMIN = "client", "viewer", "admin"


def hash_token(token: str) -> str:
    # Tokens are 256-bit random strings, so an unsalted sha256 is enough to make the file useless to a reader.
    return hashlib.sha256(token.encode()).hexdigest()


def _read(path: Path) -> dict:
    if not path.exists():
        return {"clients": {}, "admin": None, "viewer": None}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("clients", {}), dict):
        raise ValueError(f"{path}: expected {{'clients': {{id: sha256}}, 'admin': sha256, 'viewer': sha256}}")
    data.setdefault("clients", {})
    data.setdefault("admin", None)
    data.setdefault("viewer", None)
    return data


def _write(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    os.chmod(path, 0o600)


def add_token(path: str | Path, client_id: str | None, role: str = CLIENT) -> str:
    """Create a token for ``client_id`` (or the admin / viewer token, with ``client_id`` None); return it.

    Only its hash is kept; a new admin or viewer token replaces the previous one.
    """
    path = Path(path)
    data = _read(path)
    token = secrets.token_urlsafe(32)
    if client_id is not None:
        data["clients"][client_id] = hash_token(token)
    else:
        data[ADMIN if role == CLIENT else role] = hash_token(token)
    _write(path, data)
    return token


def revoke_token(path: str | Path, client_id: str) -> bool:
    """Delete ``client_id``'s token; True if it had one. Every worker refuses it from its next request on."""
    path = Path(path)
    data = _read(path)
    if data["clients"].pop(client_id, None) is None:
        return False
    _write(path, data)
    return True


@dataclass(frozen=True)
class Identity:
    role: str  # CLIENT, VIEWER or ADMIN
    client_id: str | None = None  # the client a CLIENT token belongs to


class TokenRegistry:
    """Looks up who a bearer token belongs to."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._clients: dict[str, str] = {}
        self._roles: dict[str, str | None] = {}
        self._reload()

    def _reload(self) -> None:
        # mtime_ns, size and inode: a rewrite (atomic rename) changes at least the inode.
        stat = self.path.stat() if self.path.exists() else None
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino) if stat else None
        with self._lock:
            if stamp == self._stamp and stamp is not None:
                return
            data = _read(self.path)
            self._clients = dict(data["clients"])
            self._roles = {ADMIN: data["admin"], VIEWER: data["viewer"]}
            self._stamp = stamp

    def client_ids(self) -> set[str]:
        self._reload()
        return set(self._clients)

    def identify(self, token: str) -> Identity | None:
        """Who ``token`` belongs to, or None; compares against every entry in constant time."""
        self._reload()
        digest = hash_token(token)
        found: Identity | None = None
        for client_id, stored in self._clients.items():
            if hmac.compare_digest(digest, stored):
                found = Identity(CLIENT, client_id)
        for role, stored in self._roles.items():
            if stored is not None and hmac.compare_digest(digest, stored):
                found = Identity(role)
        return found
