"""fedllm's gunicorn worker: a request reaches a thread only once it has fully arrived, within deadlines.

gunicorn's ``gthread`` worker hands a connection to a thread as soon as its first byte arrives; the
thread then blocks reading the rest, so ten clients sending a byte a second take a default server's
8 threads and every other request waits. This worker (a :class:`ThreadWorker` subclass) reads the
request line, the headers and the body in its event loop instead -- non-blocking, one socket each --
and gives the thread a request whose bytes are already here (small bodies in memory, large ones
spooled to ``STATE_DIR/incoming``). N slow connections cost N sockets, not N threads.

Deadlines (``--header_timeout``, ``--min_body_rate`` over ``--body_rate_window``): the request line and
headers must arrive within the header timeout; after that the body must keep an average of at least
the minimum rate over each window (64 KiB/s over 10 s by default, so a 160 MB upload on a 1 Mbit/s
link passes). A connection that misses one is answered 408 and closed, logged, and counted in
``fedllm_connections_cut_total{reason}``. Bodies larger than the server accepts are handed over at
once, for the app to refuse with 413 before reading them. A chunked body is refused with 411 (its
length must be known to enforce the rate); every error gunicorn writes itself is JSON too.
"""

from __future__ import annotations

import errno
import json
import logging
import selectors
import ssl
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from gunicorn import http, sock, util
from gunicorn.workers.gthread import TConn, ThreadWorker

log = logging.getLogger("fedllm.server")

READ_CHUNK = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024  # request line + headers held per connection while they arrive
MEMORY_BODY_BYTES = 1 << 20  # bodies up to this size stay in memory; larger ones are spooled to disk
SPOOL_SUFFIX = ".spool"


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection deadlines and sizes, set by the server before its workers fork."""

    header_timeout: float = 10.0
    min_body_rate: float = 64 * 1024  # bytes per second, averaged over body_rate_window
    body_rate_window: float = 10.0
    max_body_bytes: int = 1 << 30  # bodies over this are handed to the app unread (it answers 413)
    spool_dir: str | None = None


LIMITS = ConnectionLimits()


def configure(limits: ConnectionLimits) -> None:
    """Set the limits every worker forked from now on uses."""
    global LIMITS
    LIMITS = limits


def json_error(status: int, reason: str, detail: str) -> bytes:
    """A complete HTTP/1.1 error response with fedllm's JSON error body; the connection closes after it."""
    body = json.dumps({"error": reason.lower(), "detail": detail}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


def _write_json_error(client: Any, status_int: int, reason: str, mesg: str) -> None:
    """Replaces gunicorn's HTML error page (bad request line, headers too large, 500) with a JSON body."""
    util.write_nonblock(client, json_error(status_int, reason, mesg))


class ReplaySocket:
    """The connection's socket, whose first bytes are the request already read: the head and body, replayed."""

    def __init__(self, real: Any, head: bytes, body: bytes, spool: BinaryIO | None):
        self.real = real
        self._buffered = head + body
        self._spool = spool

    def recv(self, size: int) -> bytes:
        if self._buffered:
            chunk, self._buffered = self._buffered[:size], self._buffered[size:]
            return chunk
        if self._spool is not None:
            chunk = self._spool.read(size)
            if chunk:
                return chunk
            self._close_spool()
        return self.real.recv(size)

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()  # a NamedTemporaryFile: closing deletes it
            self._spool = None

    def close(self) -> None:
        self._close_spool()
        self.real.close()

    def __getattr__(self, name: str) -> Any:  # sendall, setblocking, fileno, shutdown, ...
        return getattr(self.real, name)


class _Arriving:
    """A request being read in the event loop: its head, then its body, and the clocks they run against."""

    def __init__(self, conn: TConn, real: Any):
        self.conn = conn
        self.real = real
        self.started = time.monotonic()
        self.head = bytearray()
        self.head_done = False
        self.handshake_done = not isinstance(real, ssl.SSLSocket)
        self.body = bytearray()
        self.body_length = 0
        self.body_received = 0
        self.spool: BinaryIO | None = None
        self.window_start = 0.0
        self.window_bytes = 0

    @property
    def complete(self) -> bool:
        return self.head_done and self.body_received >= self.body_length


class FedllmWorker(ThreadWorker):
    """gthread with request heads and bodies read off the thread pool, under per-connection deadlines."""

    def init_process(self) -> None:
        self._arriving: dict[int, _Arriving] = {}
        util.write_error = _write_json_error
        super().init_process()

    # ------------------------------------------------------------------ connections in
    def accept(self, listener: Any) -> None:
        try:
            client, addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client, addr, listener.getsockname())  # sets the socket non-blocking
        real = client
        if self.cfg.is_ssl:
            real = sock.ssl_context(self.cfg).wrap_socket(client, server_side=True, do_handshake_on_connect=False,
                                                          suppress_ragged_eofs=self.cfg.suppress_ragged_eofs)
        self._start_reading(conn, real)

    def on_client_socket_readable(self, conn: TConn, client: Any) -> None:
        """A kept-alive connection's next request: read it in the event loop as well."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._start_reading(conn, conn.sock.real if isinstance(conn.sock, ReplaySocket) else conn.sock)

    def _start_reading(self, conn: TConn, real: Any) -> None:
        real.setblocking(False)
        arriving = _Arriving(conn, real)
        self._arriving[real.fileno()] = arriving
        self.poller.register(real, selectors.EVENT_READ, partial(self._on_readable, arriving))

    def _on_readable(self, arriving: _Arriving, _fileobj: Any) -> None:
        try:
            self._read_available(arriving)
        except (OSError, ssl.SSLError) as exc:
            log.debug("connection from %s dropped while its request arrived: %s", arriving.conn.client, exc)
            self._close(arriving)
            return
        except _Refused as refusal:
            self._refuse(arriving, refusal.status, refusal.reason, refusal.detail, refusal.metric)
            return
        if arriving.complete or (arriving.head_done and arriving.body_length > LIMITS.max_body_bytes):
            self._hand_over(arriving)

    def _read_available(self, arriving: _Arriving) -> None:
        if not arriving.handshake_done:
            try:
                arriving.real.do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            arriving.handshake_done = True
        while not arriving.complete:
            try:
                data = arriving.real.recv(READ_CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            if not data:
                raise ConnectionResetError("the client closed the connection")
            if arriving.head_done:
                self._add_body(arriving, data)
            else:
                self._add_head(arriving, data)
                if arriving.head_done and arriving.body_length > LIMITS.max_body_bytes:
                    return

    def _add_head(self, arriving: _Arriving, data: bytes) -> None:
        arriving.head += data
        end = arriving.head.find(b"\r\n\r\n")
        limit = min(MAX_HEAD_BYTES, self.cfg.limit_request_line + self.cfg.limit_request_fields *
                    (self.cfg.limit_request_field_size + 2))
        first_line = arriving.head.split(b"\r\n", 1)[0]
        if len(first_line) > self.cfg.limit_request_line and (end < 0 or len(first_line) < end):
            raise _Refused(414, "URI Too Long", f"the request line is over {self.cfg.limit_request_line} bytes")
        if (end < 0 and len(arriving.head) > limit) or end + 4 > limit:
            raise _Refused(431, "Request Header Fields Too Large", f"the request head is over {limit} bytes")
        if end < 0:
            return
        head, rest = bytes(arriving.head[:end + 4]), bytes(arriving.head[end + 4:])
        arriving.head = bytearray(head)
        arriving.head_done = True
        arriving.body_length = _content_length(head)
        arriving.window_start = time.monotonic()
        if arriving.body_length > LIMITS.max_body_bytes:
            arriving.body = bytearray(rest)  # handed over unread: the app refuses it from Content-Length
            return
        if arriving.body_length > MEMORY_BODY_BYTES:
            arriving.spool = tempfile.NamedTemporaryFile(dir=LIMITS.spool_dir, suffix=SPOOL_SUFFIX)  # noqa: SIM115
        if rest:
            self._add_body(arriving, rest)

    def _add_body(self, arriving: _Arriving, data: bytes) -> None:
        arriving.body_received += len(data)
        arriving.window_bytes += len(data)
        if arriving.spool is not None:
            arriving.spool.write(data)
        else:
            arriving.body += data

    # ------------------------------------------------------------------ deadlines
    def murder_pending(self) -> None:
        """Also cut the arriving requests that missed their header deadline or fell below the body rate."""
        super().murder_pending()
        now = time.monotonic()
        for arriving in list(self._arriving.values()):
            if not arriving.head_done:
                if now - arriving.started > LIMITS.header_timeout:
                    self._refuse(arriving, 408, "Request Timeout",
                                 f"the request line and headers did not arrive within {LIMITS.header_timeout:g} s",
                                 "header_timeout")
            elif now - arriving.window_start >= LIMITS.body_rate_window:
                needed = min(LIMITS.min_body_rate * LIMITS.body_rate_window,
                             arriving.body_length - (arriving.body_received - arriving.window_bytes))
                if arriving.window_bytes < needed:
                    self._refuse(arriving, 408, "Request Timeout",
                                 f"the body arrived slower than {LIMITS.min_body_rate:g} bytes/s over "
                                 f"{LIMITS.body_rate_window:g} s", "body_too_slow")
                else:
                    arriving.window_start, arriving.window_bytes = now, 0

    # ------------------------------------------------------------------ connections out
    def _hand_over(self, arriving: _Arriving) -> None:
        """The request is here: a thread serves it from the bytes already read."""
        self._forget(arriving)
        if arriving.spool is not None:
            arriving.spool.flush()
            arriving.spool.seek(0)
        conn = arriving.conn
        arriving.real.setblocking(True)
        conn.sock = ReplaySocket(arriving.real, bytes(arriving.head), bytes(arriving.body), arriving.spool)
        conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.initialized = True
        conn.data_ready = True
        self.enqueue_req(conn)

    def _refuse(self, arriving: _Arriving, status: int, reason: str, detail: str, metric: str | None = None) -> None:
        log.warning("cut connection from %s: %d %s (%s)", arriving.conn.client[0] if arriving.conn.client else "?",
                    status, reason, detail)
        if metric is not None:
            from . import metrics

            metrics.instruments().connections_cut.labels(metric).inc()
        try:
            util.write_nonblock(arriving.real, json_error(status, reason, detail))
        except (OSError, ssl.SSLError):
            pass
        self._close(arriving)

    def _forget(self, arriving: _Arriving) -> None:
        self._arriving.pop(arriving.real.fileno(), None)
        try:
            self.poller.unregister(arriving.real)
        except (KeyError, ValueError, OSError):
            pass

    def _close(self, arriving: _Arriving) -> None:
        self._forget(arriving)
        if arriving.spool is not None:
            arriving.spool.close()
        self.nr_conns -= 1
        try:
            arriving.real.close()
        except OSError:
            pass


class _Refused(Exception):
    def __init__(self, status: int, reason: str, detail: str, metric: str | None = None):
        super().__init__(detail)
        self.status, self.reason, self.detail, self.metric = status, reason, detail, metric


def _content_length(head: bytes) -> int:
    """The body length a request head announces (0 without one); a chunked body is refused with 411."""
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            raise _Refused(411, "Length Required", "send the body with a Content-Length, not chunked")
        if name == b"content-length":
            value = value.strip()
            if not value.isdigit() or len(value) > 18:
                raise _Refused(400, "Bad Request", "Content-Length must be a non-negative integer")
            length = int(value)
    return length


def clear_spool(spool_dir: str | Path) -> None:
    """Remove bodies spooled by workers that died (call before workers start)."""
    for stale in Path(spool_dir).glob(f"*{SPOOL_SUFFIX}"):
        stale.unlink(missing_ok=True)
