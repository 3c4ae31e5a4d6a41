"""The Flask app: REST API v1 over a :class:`~fedllm.server.federation.Federation`.

This layer only parses requests and maps the service layer's typed errors to status codes, in one
table (:data:`ERROR_STATUS`); every error is JSON ``{"error": ..., "detail": ...}``. Each process
runs one :class:`~fedllm.server.progress.BackgroundProgress` thread that closes rounds at their
deadline and aggregates closed rounds (the upload that closes a round wakes it at once).
"""

from __future__ import annotations

import logging
import re
import time

from flask import Flask, Response, g, jsonify, request, send_file
from werkzeug.exceptions import HTTPException

from . import errors, metrics
from .auth import TokenRegistry
from .dashboard import PUBLIC_ENDPOINTS, client_states
from .dashboard import bp as dashboard_bp
from .federation import Federation
from .progress import BackgroundProgress, health
from .ratelimit import RateLimiter
from .store import storage_failure

log = logging.getLogger("fedllm.server")

CLIENT_HEADER = "X-FedLLM-Client"
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
# ASCII digits only (str.isdigit() also takes '²', which int() refuses), few enough to fit an SQLite INTEGER.
UINT_RE = re.compile(r"[0-9]{1,15}")
MAX_NUM_SAMPLES = 10**15 - 1
UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/readyz"})
STORAGE_RETRY_AFTER = "30"

# The one mapping from what went wrong to the HTTP status that says it.
ERROR_STATUS: dict[type[errors.FederationError], int] = {
    errors.MissingHeader: 400,
    errors.InvalidHeader: 400,
    errors.InvalidClientId: 400,
    errors.BadJson: 400,
    errors.InvalidNumSamples: 400,
    errors.InvalidRound: 400,
    errors.MalformedUpdate: 400,
    errors.ChecksumMismatch: 400,
    errors.TruncatedBody: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.AdminOnly: 403,
    errors.ClientRemoved: 403,
    errors.FederationFull: 403,
    errors.NotJoined: 403,
    errors.UnknownClient: 404,
    errors.NoOpenRound: 409,
    errors.WrongRound: 409,
    errors.NotSampled: 409,
    errors.RoundClosed: 409,
    errors.AlreadySubmitted: 409,
    errors.NoRoundToAbort: 409,
    errors.UploadTooLarge: 413,
    errors.InvalidUpdate: 422,
    errors.StorageUnavailable: 503,
}


def error_response(exc: errors.FederationError) -> tuple[Response, int]:
    status = ERROR_STATUS[type(exc)]
    response = jsonify(exc.to_json())
    if isinstance(exc, errors.StorageUnavailable):
        response.headers["Retry-After"] = STORAGE_RETRY_AFTER
    return response, status


def _json_body() -> object:
    """The request's JSON, or None when it is not JSON. ``silent`` covers ValueError, not deep nesting."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        return None


def _int_header(name: str, *, minimum: int) -> int:
    raw = request.headers.get(name)
    if raw is None:
        raise errors.MissingHeader(f"{name} is required")
    if not UINT_RE.fullmatch(raw.strip()) or int(raw) < minimum:
        raise errors.InvalidHeader(f"{name} must be an integer >= {minimum}, got {raw[:40]!r}")
    return int(raw)


def create_app(
    federation: Federation,
    tokens: TokenRegistry | None = None,
    *,
    start_ticker: bool = True,
    rate_limiter: RateLimiter | None = None,
) -> Flask:
    app = Flask("fedllm")
    app.json.sort_keys = False  # keys in the order the server builds them
    progress = BackgroundProgress(federation, start=start_ticker)
    metrics.install(app, federation, progress)  # first, so its request timer runs before any other before_request
    app.register_blueprint(dashboard_bp)  # GET / and /dashboard/static/*: no data, no auth
    app.extensions["fedllm"] = {"federation": federation, "progress": progress}

    @app.errorhandler(errors.FederationError)
    def _federation_error(exc: errors.FederationError):
        if ERROR_STATUS[type(exc)] >= 500:
            log.error("%s %s: %s", request.method, request.path, exc)
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return jsonify({"error": exc.name.lower(), "detail": exc.description or ""}), exc.code

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        reason = storage_failure(exc)  # a read of the state_dir, outside the service layer's transactions
        if reason is not None:
            log.error("storage failure on %s %s: %s", request.method, request.path, reason)
            return error_response(errors.StorageUnavailable(
                f"the server cannot read or write its state ({reason}); nothing was changed, retry later"))
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify({"error": "internal error", "detail": type(exc).__name__}), 500

    @app.before_request
    def _identify():
        if request.path in UNAUTHENTICATED_PATHS or request.endpoint in PUBLIC_ENDPOINTS:
            return
        if request.endpoint == "metrics":  # for scrapers: no client header; the admin token when auth is on
            if tokens is not None:
                auth = request.headers.get("Authorization", "")
                if not auth.startswith("Bearer ") or not tokens.identify(auth[7:].strip())[1]:
                    raise errors.Unauthorized("/metrics needs 'Authorization: Bearer <admin token>'")
            return
        client_id = request.headers.get(CLIENT_HEADER)
        if client_id is None:
            raise errors.MissingHeader(f"{CLIENT_HEADER} is required")
        if not CLIENT_ID_RE.fullmatch(client_id):
            raise errors.InvalidClientId(
                "client ids are 1-64 characters: letters, digits, '.', '_', '-', starting with a letter or digit")
        g.client_id = client_id
        g.is_admin = False
        if tokens is not None:
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or not auth[7:].strip():
                raise errors.Unauthorized("send 'Authorization: Bearer <token>'")
            owner, g.is_admin = tokens.identify(auth[7:].strip())
            # The admin token reads everything and runs operator actions; it never pushes or joins.
            admin_ok = g.is_admin and (request.method == "GET" or request.path.startswith("/v1/admin/"))
            if owner is None and g.is_admin and not admin_ok:
                raise errors.Forbidden("the admin token reads and runs operator actions; it cannot join or push "
                                       "as a client")
            if owner is None and not admin_ok:
                raise errors.Unauthorized("unknown token")
            if owner is not None and owner != client_id and not admin_ok:
                raise errors.Forbidden(f"this token does not belong to client {client_id!r}")
        if rate_limiter is not None:
            wait = rate_limiter.allow(client_id)
            if wait > 0:
                response = jsonify({"error": "rate limited", "detail": f"too many requests from {client_id!r}"})
                response.headers["Retry-After"] = str(max(1, round(wait)))
                return response, 429

    @app.get("/healthz")
    def healthz():
        """Liveness: 200 while the process answers; ``degraded`` with the reason while rounds cannot progress."""
        return jsonify(health(federation.store, progress))

    @app.get("/readyz")
    def readyz():
        """Readiness: 503 while the federation cannot progress (background ticks failing, storage unreadable)."""
        state = health(federation.store, progress)
        return jsonify(state), 200 if state["status"] == "ok" else 503

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
            raise errors.BadJson('expected a JSON object such as {"num_samples": 100}')
        num_samples = body.get("num_samples")
        if type(num_samples) is not int or not 1 <= num_samples <= MAX_NUM_SAMPLES:
            raise errors.InvalidNumSamples(f"num_samples must be an integer from 1 to {MAX_NUM_SAMPLES}")
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
            raise errors.InvalidRound("POST /v1/update?round=R with R the round number")
        num_samples = _int_header("X-FedLLM-Num-Samples", minimum=1)
        claimed = request.headers.get("X-Content-SHA256")
        if claimed is not None and not SHA256_RE.fullmatch(claimed):
            raise errors.InvalidHeader("X-Content-SHA256 must be 64 hex digits")
        result = federation.receive_update(
            g.client_id, int(raw_round), num_samples, request.stream.read, request.content_length, claimed
        )
        progress.wake.set()
        return jsonify(result), 202

    def _admin(action: str) -> str:
        if tokens is None or not g.is_admin:
            raise errors.AdminOnly("operator actions need the admin token (server_http.py add-admin) and a server "
                                   "started with --auth_tokens")
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
            raise errors.BadJson('expected {"client_id": "<id>"}')
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
