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
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ..split.errors import SPLIT_ERROR_STATUS
from ..split.http import register_split_routes
from . import errors, metrics, views
from .auth import ADMIN, CLIENT, VIEWER, Identity, TokenRegistry
from .dashboard import PUBLIC_ENDPOINTS, client_states
from .dashboard import bp as dashboard_bp
from .federation import Federation
from .progress import BackgroundProgress, health
from .ratelimit import RateLimiter
from .secagg_http import secagg_blueprint
from .store import storage_failure

log = logging.getLogger("fedllm.server")

CLIENT_HEADER = "X-FedLLM-Client"
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
# ASCII digits only (str.isdigit() also takes '²', which int() refuses), few enough to fit an SQLite INTEGER.
UINT_RE = re.compile(r"[0-9]{1,15}")
MAX_NUM_SAMPLES = 10**15 - 1
MAX_JSON_BYTES = 64 * 1024  # every JSON body of the API is a few hundred bytes
UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/readyz", "/v1/openapi.json"})
STORAGE_RETRY_AFTER = "30"

# The one mapping from what went wrong to the HTTP status that says it.
ERROR_STATUS: dict[type[errors.FederationError], int] = {
    errors.MissingHeader: 400,
    errors.InvalidHeader: 400,
    errors.InvalidClientId: 400,
    errors.BadJson: 400,
    errors.InvalidNumSamples: 400,
    errors.InvalidRound: 400,
    errors.InvalidEncoding: 400,
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
    errors.SecAggStage: 409,
    errors.SecAggRequired: 409,
    errors.UploadTooLarge: 413,
    errors.InvalidUpdate: 422,
    errors.TooManySamples: 422,
    errors.SecAggInvalid: 422,
    errors.StorageUnavailable: 503,
    **SPLIT_ERROR_STATUS,
}


def error_response(exc: errors.FederationError) -> tuple[Response, int]:
    status = ERROR_STATUS[type(exc)]
    response = jsonify(exc.to_json())
    if isinstance(exc, errors.StorageUnavailable):
        response.headers["Retry-After"] = STORAGE_RETRY_AFTER
    return response, status


class StrictJSONProvider(DefaultJSONProvider):
    """JSON responses in the order the server builds them, and never NaN or Infinity (not JSON; parsers refuse it)."""

    sort_keys = False

    def dumps(self, obj, **kwargs):
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)


class CountingReader:
    """``read`` of the request body, counting the bytes actually read (what /metrics reports as received)."""

    def __init__(self, read):
        self._read = read
        self.total = 0

    def __call__(self, size: int = -1) -> bytes:
        chunk = self._read(size)
        self.total += len(chunk)
        return chunk


def _json_body() -> object:
    """The request's JSON (at most MAX_JSON_BYTES, else 413), or None when it is not JSON.

    ``silent`` covers ValueError, not deep nesting.
    """
    request.max_content_length = MAX_JSON_BYTES
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        return None
    g.body_bytes = request.content_length or 0
    return body


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
    app = Flask("fedllm", static_folder=None)  # no /static route: the dashboard's blueprint serves its files
    app.json = StrictJSONProvider(app)
    progress = BackgroundProgress(federation, start=start_ticker)
    metrics.install(app, federation, progress)  # first, so its request timer runs before any other before_request
    app.register_blueprint(dashboard_bp)  # GET / and /dashboard/static/*: no data, no auth
    app.register_blueprint(secagg_blueprint(federation, progress))  # /v1/secagg/*: the secure-aggregation stages
    app.extensions["fedllm"] = {"federation": federation, "progress": progress}

    @app.errorhandler(errors.FederationError)
    def _federation_error(exc: errors.FederationError):
        if ERROR_STATUS[type(exc)] >= 500:
            log.error("%s %s: %s", request.method, request.path, exc)
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        response = jsonify({"error": exc.name.lower(), "detail": exc.description or ""})
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # a 405 must say what is allowed
        return response, exc.code

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        reason = storage_failure(exc)  # a read of the state_dir, outside the service layer's transactions
        if reason is not None:
            log.error("storage failure on %s %s: %s", request.method, request.path, reason)
            return error_response(errors.StorageUnavailable(
                f"the server cannot read or write its state ({reason}); nothing was changed, retry later"))
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify({"error": "internal error", "detail": type(exc).__name__}), 500

    def _authenticate() -> Identity:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            raise errors.Unauthorized("send 'Authorization: Bearer <token>'")
        identity = tokens.identify(auth[7:].strip())
        if identity is None:
            raise errors.Unauthorized("unknown token")
        return identity

    def _rate_limited(identity: Identity | None):
        if rate_limiter is None:
            return None
        # The authenticated identity, or on an open server the peer: never an id the request merely claims.
        key = f"{identity.role}:{identity.client_id or ''}" if identity else f"addr:{request.remote_addr}"
        wait = rate_limiter.allow(key)
        if wait <= 0:
            return None
        response = jsonify({"error": "rate limited", "detail": "too many requests; retry after Retry-After seconds"})
        response.headers["Retry-After"] = str(max(1, round(wait)))
        return response, 429

    @app.before_request
    def _identify():
        if request.routing_exception is not None:  # an unknown path or method: its 404/405 serves nothing
            return None
        if request.path in UNAUTHENTICATED_PATHS or request.endpoint in PUBLIC_ENDPOINTS:
            return None
        identity = _authenticate() if tokens is not None else None
        g.is_admin = identity is not None and identity.role == ADMIN
        g.full_view = identity is None or identity.role in (ADMIN, VIEWER)
        if request.endpoint == "metrics":  # for scrapers: no client header; the viewer or admin token
            if identity is not None and identity.role == CLIENT:
                raise errors.Forbidden("/metrics needs the viewer or the admin token")
            return _rate_limited(identity)
        client_id = request.headers.get(CLIENT_HEADER)
        if client_id is None:
            raise errors.MissingHeader(f"{CLIENT_HEADER} is required")
        if not CLIENT_ID_RE.fullmatch(client_id):
            raise errors.InvalidClientId(
                "client ids are 1-64 characters: letters, digits, '.', '_', '-', starting with a letter or digit")
        g.client_id = client_id
        if identity is not None and identity.role == CLIENT:
            if identity.client_id != client_id:
                raise errors.Forbidden(f"this token does not belong to client {client_id!r}")
            if federation.is_removed(client_id):  # every worker refuses a removed client from now on
                raise errors.ClientRemoved(f"the operator removed {client_id!r} from the federation")
        elif identity is not None:
            # The viewer and admin tokens read everything; only the admin runs operator actions; neither
            # joins nor pushes as a client.
            acting = request.method != "GET" and not (identity.role == ADMIN and request.path.startswith("/v1/admin/"))
            if acting:
                raise errors.Forbidden(f"the {identity.role} token reads" + (
                    " and runs operator actions" if identity.role == ADMIN else "") + "; it cannot join or push "
                    "as a client")
        return _rate_limited(identity)

    @app.get("/healthz")
    def healthz():
        """Liveness: 200 while the process answers; ``degraded`` with the reason while rounds cannot progress."""
        return jsonify(health(federation.store, progress))

    from .openapi import openapi_document  # it reads this module's tables, so it is imported once they exist

    @app.get("/v1/openapi.json")
    def openapi_json():
        """The OpenAPI 3.1 document of this API (fedllm.server.openapi)."""
        return jsonify(openapi_document())

    @app.get("/readyz")
    def readyz():
        """Readiness: 503 while the federation cannot progress (background ticks failing, storage unreadable)."""
        state = health(federation.store, progress)
        return jsonify(state), 200 if state["status"] == "ok" else 503

    @app.get("/v1/round")
    def get_round():
        federation.seen(g.client_id)
        status = federation.status(g.client_id)
        return jsonify(status if g.full_view else views.round_view(status, g.client_id))

    @app.get("/v1/config")
    def get_config():
        config = federation.client_config()
        return jsonify(config if g.full_view else views.config_view(config))

    @app.get("/v1/history")
    def get_history():
        history = federation.history()
        return jsonify(history if g.full_view else views.history_view(history, g.client_id))

    @app.get("/v1/clients")
    def get_clients():
        states = client_states(federation)
        return jsonify(states if g.full_view else views.clients_view(states, g.client_id))

    @app.post("/v1/join")
    def join():
        body = _json_body()
        if not isinstance(body, dict):
            raise errors.BadJson('expected a JSON object such as {"num_samples": 100}')
        num_samples = body.get("num_samples")
        if type(num_samples) is float and num_samples.is_integer():  # JSON's 100.0 is the integer 100
            num_samples = int(num_samples)
        if type(num_samples) is not int or not 1 <= num_samples <= MAX_NUM_SAMPLES:
            raise errors.InvalidNumSamples(f"num_samples must be an integer from 1 to {MAX_NUM_SAMPLES}")
        return jsonify(federation.join(g.client_id, num_samples))

    @app.get("/v1/global")
    def get_global():
        """The newest global: dense, or with ``?encoding=compressed`` quantized by the federation's codec."""
        latest = federation.served_global(request.args.get("encoding"))
        etag = latest.sha256
        if etag in {t.strip().strip('"').removeprefix("W/").strip('"') for t in request.headers.get("If-None-Match", "").split(",")}:
            response = Response(status=304)
        else:
            response = send_file(latest.path, mimetype="application/octet-stream", conditional=False, etag=False,
                                 max_age=0)
            federation.record_download(g.client_id, latest.size)
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
        g.body_reader = CountingReader(request.stream.read)
        result = federation.receive_update(g.client_id, int(raw_round), num_samples, g.body_reader,
                                           request.content_length, claimed)
        progress.wake.set()
        return jsonify(result), 202

    def _admin(action: str) -> str:
        if not g.is_admin:
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

    register_split_routes(app, federation, UINT_RE)

    @app.after_request
    def _log(response):
        log.debug("%s %s %s %s", request.remote_addr, request.method, request.path, response.status_code)
        return response

    app.extensions["fedllm"]["started"] = time.time()
    return app
