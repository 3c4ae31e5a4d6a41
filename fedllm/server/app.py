"""The Flask app: REST API v1 over a :class:`~fedllm.server.federation.Federation`.

Every error is JSON ``{"error": ..., "detail": ...}`` with the right status code. Each
process runs one background ticker that closes rounds at their deadline and aggregates
closed rounds (the upload that closes a round wakes it at once).
"""

from __future__ import annotations

import errno
import logging
import re
import sqlite3
import threading
import time

from flask import Flask, Response, g, jsonify, request, send_file
from werkzeug.exceptions import HTTPException

from . import metrics
from .auth import TokenRegistry
from .dashboard import PUBLIC_ENDPOINTS, client_states
from .dashboard import bp as dashboard_bp
from .errors import ApiError
from .federation import Federation
from .ratelimit import RateLimiter

log = logging.getLogger("fedllm.server")

CLIENT_HEADER = "X-FedLLM-Client"
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
# ASCII digits only (str.isdigit() also takes '²', which int() refuses), few enough to fit an SQLite INTEGER.
UINT_RE = re.compile(r"[0-9]{1,15}")
MAX_NUM_SAMPLES = 10**15 - 1


class Ticker:
    """Drives deadlines and aggregation in the background of one worker process."""

    def __init__(self, federation: Federation, interval: float = 1.0):
        self.federation = federation
        self.interval = interval
        self.wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedllm-ticker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failures = 0
        while True:
            self.wake.wait(timeout=self.interval * (2 ** min(failures, 5)))
            self.wake.clear()
            try:
                while self.federation.tick():
                    pass
                failures = 0
            except Exception:
                failures += 1
                log.exception("background round progress failed (attempt %d); will retry", failures)


def _json_body() -> object:
    """The request's JSON, or None when it is not JSON. ``silent`` covers ValueError, not deep nesting."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        return None


def _int_header(name: str, *, minimum: int) -> int:
    raw = request.headers.get(name)
    if raw is None:
        raise ApiError(400, "missing header", f"{name} is required")
    if not UINT_RE.fullmatch(raw.strip()) or int(raw) < minimum:
        raise ApiError(400, "invalid header", f"{name} must be an integer >= {minimum}, got {raw[:40]!r}")
    return int(raw)


# Storage failures the operator can fix (free space, remount): answered 503, the request changed nothing.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


def _storage_error(exc: BaseException) -> str | None:
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return exc.strerror or str(exc)
    if isinstance(exc, sqlite3.OperationalError) and any(
        s in str(exc) for s in ("disk is full", "readonly database", "disk I/O error", "unable to open")
    ):
        return str(exc)
    return None


def create_app(
    federation: Federation,
    tokens: TokenRegistry | None = None,
    *,
    start_ticker: bool = True,
    rate_limiter: RateLimiter | None = None,
) -> Flask:
    app = Flask("fedllm")
    app.config["JSON_SORT_KEYS"] = False
    metrics.install(app, federation)  # first, so its request timer runs before any other before_request
    app.register_blueprint(dashboard_bp)  # GET / and /dashboard/static/*: no data, no auth
    ticker = Ticker(federation) if start_ticker else None
    app.extensions["fedllm"] = {"federation": federation, "ticker": ticker}

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.path, exc)
        return jsonify(exc.to_json()), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return jsonify({"error": exc.name.lower(), "detail": exc.description or ""}), exc.code

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        reason = _storage_error(exc)
        if reason is not None:
            log.error("storage failure on %s %s: %s", request.method, request.path, reason)
            response = jsonify({"error": "storage unavailable",
                                "detail": f"the server cannot write its state ({reason}); nothing was changed, "
                                          "retry later"})
            response.headers["Retry-After"] = "30"
            return response, 503
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify({"error": "internal error", "detail": type(exc).__name__}), 500

    @app.before_request
    def _identify():
        if request.path == "/healthz" or request.endpoint in PUBLIC_ENDPOINTS:
            return
        if request.endpoint == "metrics":  # for scrapers: no client header; the admin token when auth is on
            if tokens is not None:
                auth = request.headers.get("Authorization", "")
                if not auth.startswith("Bearer ") or not tokens.identify(auth[7:].strip())[1]:
                    raise ApiError(401, "unauthorized", "/metrics needs 'Authorization: Bearer <admin token>'")
            return
        client_id = request.headers.get(CLIENT_HEADER)
        if client_id is None:
            raise ApiError(400, "missing header", f"{CLIENT_HEADER} is required")
        if not CLIENT_ID_RE.fullmatch(client_id):
            raise ApiError(400, "invalid client id",
                           "client ids are 1-64 characters: letters, digits, '.', '_', '-', starting with a letter or digit")
        g.client_id = client_id
        g.is_admin = False
        if tokens is not None:
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or not auth[7:].strip():
                raise ApiError(401, "unauthorized", "send 'Authorization: Bearer <token>'")
            owner, g.is_admin = tokens.identify(auth[7:].strip())
            # The admin token reads everything and runs operator actions; it never pushes or joins.
            admin_ok = g.is_admin and (request.method == "GET" or request.path.startswith("/v1/admin/"))
            if owner is None and g.is_admin and not admin_ok:
                raise ApiError(403, "forbidden", "the admin token reads and runs operator actions; it cannot "
                                                 "join or push as a client")
            if owner is None and not admin_ok:
                raise ApiError(401, "unauthorized", "unknown token")
            if owner is not None and owner != client_id and not admin_ok:
                raise ApiError(403, "forbidden", f"this token does not belong to client {client_id!r}")
        if rate_limiter is not None:
            wait = rate_limiter.allow(client_id)
            if wait > 0:
                response = jsonify({"error": "rate limited", "detail": f"too many requests from {client_id!r}"})
                response.headers["Retry-After"] = str(max(1, round(wait)))
                return response, 429

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/v1/round")
    def get_round():
        federation.seen(g.client_id)
        return jsonify(federation.status(g.client_id))

    @app.get("/v1/config")
    def get_config():
        return jsonify(federation.client_config())

    @app.get("/v1/history")
    def get_history():
        return jsonify(federation.history())

    @app.get("/v1/clients")
    def get_clients():
        return jsonify(client_states(federation))

    @app.post("/v1/join")
    def join():
        body = _json_body()
        if not isinstance(body, dict):
            raise ApiError(400, "bad json", 'expected a JSON object such as {"num_samples": 100}')
        num_samples = body.get("num_samples")
        if type(num_samples) is not int or not 1 <= num_samples <= MAX_NUM_SAMPLES:
            raise ApiError(400, "invalid num_samples", f"num_samples must be an integer from 1 to {MAX_NUM_SAMPLES}")
        return jsonify(federation.join(g.client_id, num_samples))

    @app.get("/v1/global")
    def get_global():
        latest = federation.latest_global()
        etag = latest.sha256
        if etag in {t.strip().strip('"').removeprefix("W/").strip('"') for t in request.headers.get("If-None-Match", "").split(",")}:
            response = Response(status=304)
        else:
            response = send_file(latest.path, mimetype="application/octet-stream", conditional=False, etag=False,
                                 max_age=0)
        response.headers["ETag"] = f'"{etag}"'
        response.headers["X-FedLLM-Version"] = str(latest.version)
        return response

    @app.post("/v1/update")
    def post_update():
        raw_round = request.args.get("round", "")
        if not UINT_RE.fullmatch(raw_round):
            raise ApiError(400, "invalid round", "POST /v1/update?round=R with R the round number")
        num_samples = _int_header("X-FedLLM-Num-Samples", minimum=1)
        claimed = request.headers.get("X-Content-SHA256")
        if claimed is not None and not SHA256_RE.fullmatch(claimed):
            raise ApiError(400, "invalid header", "X-Content-SHA256 must be 64 hex digits")
        result = federation.receive_update(
            g.client_id, int(raw_round), num_samples, request.stream.read, request.content_length, claimed
        )
        if ticker is not None:
            ticker.wake.set()
        return jsonify(result), 202

    def _admin(action: str) -> str:
        if tokens is None or not g.is_admin:
            raise ApiError(403, "admin only", "operator actions need the admin token (server_http.py add-admin) "
                                              "and a server started with --auth_tokens")
        actor = f"admin@{request.remote_addr}"
        log.warning("admin action %s by %s", action, actor)
        return actor

    @app.post("/v1/admin/pause")
    def admin_pause():
        return jsonify(federation.pause(_admin("pause")))

    @app.post("/v1/admin/resume")
    def admin_resume():
        return jsonify(federation.resume(_admin("resume")))

    @app.post("/v1/admin/abort_round")
    def admin_abort_round():
        return jsonify(federation.abort_round(_admin("abort_round")))

    @app.post("/v1/admin/remove_client")
    def admin_remove_client():
        actor = _admin("remove_client")
        body = _json_body()
        client_id = body.get("client_id") if isinstance(body, dict) else None
        if not isinstance(client_id, str) or not CLIENT_ID_RE.fullmatch(client_id):
            raise ApiError(400, "bad json", 'expected {"client_id": "<id>"}')
        return jsonify(federation.remove_client(actor, client_id))

    @app.get("/v1/admin/events")
    def admin_events():
        _admin("events")
        return jsonify(federation.events())

    @app.after_request
    def _log(response):
        log.debug("%s %s %s %s", request.remote_addr, request.method, request.path, response.status_code)
        return response

    app.extensions["fedllm"]["started"] = time.time()
    return app
