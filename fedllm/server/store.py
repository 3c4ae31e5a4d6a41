"""Durable server state: an SQLite database plus immutable safetensors files in ``state_dir``.

Layout::

    state_dir/
      state.db                      rounds, clients, updates, global versions, history (WAL, fsync)
      globals/v000003.safetensors   the served global adapter of version 3 (plus extras, e.g. control.*)
      globals/v000003.state.safetensors   the algorithm's state after version 3
      updates/r000004/<client>.<sha>.safetensors   accepted deltas of round 4
      incoming/                     uploads while they stream in (never read as updates)
      aggregate.lock                flock held by the one process aggregating

Every file is written with write-then-rename; a row that points to a file is committed only
after the file is durable, so a crash at any moment leaves a consistent state. SQLite
transactions (``BEGIN IMMEDIATE``) serialise the gunicorn workers.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StorageUnavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY, num_samples INTEGER NOT NULL, joined_at REAL NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, status TEXT NOT NULL, sampled TEXT NOT NULL, started_at REAL NOT NULL,
    deadline REAL, extensions INTEGER NOT NULL DEFAULT 0, closed_at REAL);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL, client_id TEXT NOT NULL, sha256 TEXT NOT NULL, num_samples INTEGER NOT NULL,
    path TEXT NOT NULL, metrics TEXT NOT NULL, size INTEGER NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (round, client_id));
-- Updates accepted but discarded from their round's aggregate (an aborted round) whose client-side state the
-- server state must still absorb (SCAFFOLD's Δc_i); folded in by the next aggregation.
CREATE TABLE IF NOT EXISTS carried (
    round INTEGER NOT NULL, client_id TEXT NOT NULL, sha256 TEXT NOT NULL, num_samples INTEGER NOT NULL,
    path TEXT NOT NULL, metrics TEXT NOT NULL, size INTEGER NOT NULL, received_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS globals (
    version INTEGER PRIMARY KEY, sha256 TEXT NOT NULL, path TEXT NOT NULL, state_path TEXT NOT NULL,
    size INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS history (round INTEGER PRIMARY KEY, record TEXT NOT NULL);
-- Bytes of global adapters served to each joined client, by the round open when it downloaded.
CREATE TABLE IF NOT EXISTS downloads (
    round INTEGER NOT NULL, client_id TEXT NOT NULL, bytes INTEGER NOT NULL, PRIMARY KEY (round, client_id));
-- When each client last polled: telemetry for operators, not federation state.
CREATE TABLE IF NOT EXISTS presence (client_id TEXT PRIMARY KEY, last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS removed_clients (client_id TEXT PRIMARY KEY, removed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    detail TEXT NOT NULL);
"""


LOCK_FILE = "server.lock"
# Failures the operator can fix (free space, remount, permissions): the request changed nothing and may be retried.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM})
# SQLite's primary result codes for the same causes: PERM, READONLY, IOERR, FULL, CANTOPEN.
STORAGE_SQLITE_CODES = frozenset({3, 8, 10, 13, 14})


def storage_failure(exc: BaseException) -> str | None:
    """Why ``exc`` is a storage failure (disk full, read-only, I/O error), or None when it is not one.

    Classified by errno and by SQLite's result code, never by message text.
    """
    if isinstance(exc, StorageUnavailable):
        return exc.detail
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return exc.strerror or str(exc)
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in STORAGE_SQLITE_CODES:
        return str(exc)
    return None


@contextmanager
def storage_errors() -> Iterator[None]:
    """Turn a storage failure raised inside the block into :class:`StorageUnavailable`."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        reason = storage_failure(exc)
        if reason is None:
            raise
        raise StorageUnavailable(f"the server cannot write its state ({reason}); nothing was changed, "
                                 "retry later") from exc


class StateDirInUse(RuntimeError):
    """Another server holds the state_dir."""


def lock_state_dir(state_dir: str | Path) -> int:
    """Take the state_dir's exclusive lock (``server.lock``, holding the owner's pid) before anything in it is
    touched; returns the file descriptor, held for the life of the process (and of the workers it forks).

    A second server on the same state_dir raises :class:`StateDirInUse` naming the pid that holds it.
    """
    root = Path(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirInUse(f"state_dir {root.resolve()} is in use by pid {holder}; stop that server first, or "
                            "use another --state_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    return fd


@dataclass(frozen=True)
class RoundRow:
    round: int
    status: str  # "training" | "closed" | "aggregated"
    sampled: list[str]
    started_at: float
    deadline: float | None
    extensions: int
    closed_at: float | None


@dataclass(frozen=True)
class UpdateRow:
    round: int
    client_id: str
    sha256: str
    num_samples: int
    path: str
    metrics: dict[str, Any]
    size: int
    received_at: float


@dataclass(frozen=True)
class GlobalRow:
    version: int
    sha256: str
    path: str
    state_path: str
    size: int
    created_at: float


class Store:
    """Thread- and process-safe access to ``state_dir``. One connection per thread."""

    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir).resolve()
        for sub in ("globals", "updates", "incoming"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connection().executescript(SCHEMA)  # idempotent; executescript manages its own transaction

    # --- connections and transactions ---
    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.root / "state.db", timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss
            conn.execute("PRAGMA busy_timeout=60000")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; the gunicorn workers take turns through it.

        A storage failure inside it (of SQLite or of a file written in it) becomes :class:`StorageUnavailable`.
        """
        with storage_errors():
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:  # SQLite rolls back by itself on some errors (SQLITE_FULL, SQLITE_IOERR)
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def read(self) -> sqlite3.Connection:
        return self._connection()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- paths ---
    def relative(self, path: str | Path) -> str:
        """How a file under ``state_dir`` is recorded in the database: relative, so the directory can move."""
        return str(Path(path).resolve().relative_to(self.root))

    def resolve(self, recorded: str) -> Path:
        """The file a recorded path names (absolute paths, as older databases hold, stay as they are)."""
        return self.root / recorded

    def global_path(self, version: int) -> Path:
        return self.root / "globals" / f"v{version:06d}.safetensors"

    def state_path(self, version: int) -> Path:
        return self.root / "globals" / f"v{version:06d}.state.safetensors"

    def update_dir(self, round_number: int) -> Path:
        return self.root / "updates" / f"r{round_number:06d}"

    @property
    def incoming_dir(self) -> Path:
        return self.root / "incoming"

    @property
    def aggregate_lock_path(self) -> Path:
        return self.root / "aggregate.lock"

    # --- meta ---
    @staticmethod
    def get_meta(db: sqlite3.Connection, key: str, default: Any = None) -> Any:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    @staticmethod
    def set_meta(db: sqlite3.Connection, key: str, value: Any) -> None:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # --- rows ---
    @staticmethod
    def get_round(db: sqlite3.Connection, round_number: int) -> RoundRow | None:
        row = db.execute(
            "SELECT round, status, sampled, started_at, deadline, extensions, closed_at FROM rounds WHERE round = ?",
            (round_number,),
        ).fetchone()
        if row is None:
            return None
        return RoundRow(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5], row[6])

    @staticmethod
    def current_round(db: sqlite3.Connection) -> RoundRow | None:
        row = db.execute("SELECT MAX(round) FROM rounds").fetchone()
        return Store.get_round(db, row[0]) if row and row[0] is not None else None

    @staticmethod
    def insert_round(db: sqlite3.Connection, round_number: int, sampled: list[str], deadline: float | None) -> None:
        db.execute(
            "INSERT INTO rounds (round, status, sampled, started_at, deadline) VALUES (?, 'training', ?, ?, ?)",
            (round_number, json.dumps(sampled), time.time(), deadline),
        )

    @staticmethod
    def set_round_status(db: sqlite3.Connection, round_number: int, status: str) -> None:
        closed_at = time.time() if status == "closed" else None
        db.execute(
            "UPDATE rounds SET status = ?, closed_at = COALESCE(closed_at, ?) WHERE round = ?",
            (status, closed_at, round_number),
        )

    @staticmethod
    def set_sampled(db: sqlite3.Connection, round_number: int, sampled: list[str], deadline: float | None) -> None:
        db.execute(
            "UPDATE rounds SET sampled = ?, deadline = ?, extensions = extensions + 1 WHERE round = ?",
            (json.dumps(sampled), deadline, round_number),
        )

    @staticmethod
    def set_deadline(db: sqlite3.Connection, round_number: int, deadline: float | None) -> None:
        """Move a round's deadline without counting it as an extension (a pause, a changed --round_timeout)."""
        db.execute("UPDATE rounds SET deadline = ? WHERE round = ?", (deadline, round_number))

    @staticmethod
    def delete_update(db: sqlite3.Connection, round_number: int, client_id: str) -> str | None:
        """Drop one client's update row of a round; returns its file (to delete after the commit)."""
        row = db.execute("SELECT path FROM updates WHERE round = ? AND client_id = ?",
                         (round_number, client_id)).fetchone()
        db.execute("DELETE FROM updates WHERE round = ? AND client_id = ?", (round_number, client_id))
        return row[0] if row else None

    @staticmethod
    def delete_updates(db: sqlite3.Connection, round_number: int) -> list[str]:
        """Drop a round's update rows; returns their files (to delete after the commit)."""
        paths = [r[0] for r in db.execute("SELECT path FROM updates WHERE round = ?", (round_number,))]
        db.execute("DELETE FROM updates WHERE round = ?", (round_number,))
        return paths

    @staticmethod
    def carry_updates(db: sqlite3.Connection, round_number: int) -> int:
        """Move a round's update rows to ``carried`` (their files stay); returns how many."""
        count = db.execute("INSERT INTO carried SELECT round, client_id, sha256, num_samples, path, metrics, size, "
                           "received_at FROM updates WHERE round = ?", (round_number,)).rowcount
        db.execute("DELETE FROM updates WHERE round = ?", (round_number,))
        return count

    @staticmethod
    def carried(db: sqlite3.Connection) -> list[UpdateRow]:
        rows = db.execute("SELECT round, client_id, sha256, num_samples, path, metrics, size, received_at FROM carried "
                          "ORDER BY rowid")
        return [UpdateRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7]) for r in rows]

    @staticmethod
    def clear_carried(db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM carried")

    @staticmethod
    def remove_client(db: sqlite3.Connection, client_id: str) -> None:
        db.execute("DELETE FROM clients WHERE client_id = ?", (client_id,))
        db.execute("INSERT OR REPLACE INTO removed_clients (client_id, removed_at) VALUES (?, ?)", (client_id, time.time()))

    @staticmethod
    def is_removed(db: sqlite3.Connection, client_id: str) -> bool:
        return db.execute("SELECT 1 FROM removed_clients WHERE client_id = ?", (client_id,)).fetchone() is not None

    @staticmethod
    def add_event(db: sqlite3.Connection, actor: str, action: str, detail: dict[str, Any]) -> None:
        db.execute("INSERT INTO events (time, actor, action, detail) VALUES (?, ?, ?, ?)",
                   (time.time(), actor, action, json.dumps(detail)))

    @staticmethod
    def events(db: sqlite3.Connection, limit: int = 1000) -> list[dict[str, Any]]:
        rows = db.execute("SELECT time, actor, action, detail FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [{"time": r[0], "actor": r[1], "action": r[2], "detail": json.loads(r[3])} for r in rows]

    @staticmethod
    def extend_deadline(db: sqlite3.Connection, round_number: int, deadline: float) -> None:
        db.execute(
            "UPDATE rounds SET deadline = ?, extensions = extensions + 1 WHERE round = ?", (deadline, round_number)
        )

    @staticmethod
    def clients(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
        rows = db.execute(
            "SELECT c.client_id, c.num_samples, c.joined_at, MAX(c.last_seen, COALESCE(p.last_seen, 0)) "
            "FROM clients c LEFT JOIN presence p ON p.client_id = c.client_id ORDER BY c.client_id"
        )
        return {r[0]: {"num_samples": r[1], "joined_at": r[2], "last_seen": r[3]} for r in rows}

    @staticmethod
    def add_download(db: sqlite3.Connection, round_number: int, client_id: str, size: int) -> None:
        db.execute("INSERT INTO downloads (round, client_id, bytes) VALUES (?, ?, ?) "
                   "ON CONFLICT(round, client_id) DO UPDATE SET bytes = bytes + excluded.bytes",
                   (round_number, client_id, size))

    @staticmethod
    def round_bytes_sent(db: sqlite3.Connection, round_number: int) -> int:
        return int(db.execute("SELECT COALESCE(SUM(bytes), 0) FROM downloads WHERE round = ?",
                              (round_number,)).fetchone()[0])

    @staticmethod
    def traffic(db: sqlite3.Connection) -> dict[str, dict[str, int]]:
        """client -> bytes ``sent`` to it (global downloads) and ``received`` from it (accepted upload bodies)."""
        totals: dict[str, dict[str, int]] = {}
        for client, size in db.execute("SELECT client_id, SUM(bytes) FROM downloads GROUP BY client_id"):
            totals.setdefault(client, {"sent": 0, "received": 0})["sent"] = int(size)
        for client, size in db.execute("SELECT client_id, SUM(size) FROM updates GROUP BY client_id"):
            totals.setdefault(client, {"sent": 0, "received": 0})["received"] = int(size)
        return totals

    @staticmethod
    def record_presence(db: sqlite3.Connection, client_id: str) -> None:
        db.execute("INSERT OR REPLACE INTO presence (client_id, last_seen) VALUES (?, ?)", (client_id, time.time()))

    @staticmethod
    def upsert_client(db: sqlite3.Connection, client_id: str, num_samples: int) -> None:
        now = time.time()
        db.execute(
            "INSERT INTO clients (client_id, num_samples, joined_at, last_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(client_id) DO UPDATE SET num_samples = excluded.num_samples, last_seen = excluded.last_seen",
            (client_id, num_samples, now, now),
        )

    @staticmethod
    def touch_client(db: sqlite3.Connection, client_id: str) -> None:
        db.execute("UPDATE clients SET last_seen = ? WHERE client_id = ?", (time.time(), client_id))

    @staticmethod
    def updates(db: sqlite3.Connection, round_number: int) -> list[UpdateRow]:
        rows = db.execute(
            "SELECT round, client_id, sha256, num_samples, path, metrics, size, received_at FROM updates "
            "WHERE round = ? ORDER BY client_id",
            (round_number,),
        )
        return [UpdateRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7]) for r in rows]

    @staticmethod
    def get_update(db: sqlite3.Connection, round_number: int, client_id: str) -> UpdateRow | None:
        r = db.execute(
            "SELECT round, client_id, sha256, num_samples, path, metrics, size, received_at FROM updates "
            "WHERE round = ? AND client_id = ?",
            (round_number, client_id),
        ).fetchone()
        return UpdateRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7]) if r else None

    @staticmethod
    def insert_update(db: sqlite3.Connection, row: UpdateRow) -> None:
        db.execute(
            "INSERT INTO updates (round, client_id, sha256, num_samples, path, metrics, size, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row.round, row.client_id, row.sha256, row.num_samples, row.path, json.dumps(row.metrics), row.size,
             row.received_at),
        )

    @staticmethod
    def latest_global(db: sqlite3.Connection) -> GlobalRow | None:
        r = db.execute(
            "SELECT version, sha256, path, state_path, size, created_at FROM globals ORDER BY version DESC LIMIT 1"
        ).fetchone()
        return GlobalRow(*r) if r else None

    @staticmethod
    def insert_global(db: sqlite3.Connection, row: GlobalRow) -> None:
        db.execute(
            "INSERT INTO globals (version, sha256, path, state_path, size, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (row.version, row.sha256, row.path, row.state_path, row.size, row.created_at),
        )

    @staticmethod
    def history(db: sqlite3.Connection) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in db.execute("SELECT record FROM history ORDER BY round")]

    @staticmethod
    def insert_history(db: sqlite3.Connection, round_number: int, record: dict[str, Any]) -> None:
        db.execute("INSERT INTO history (round, record) VALUES (?, ?)", (round_number, json.dumps(record)))
