"""The Flask app: REST API v1 over a :class:`~fedllm.server.federation.Federation`.

Every error is JSON ``{"error": ..., "detail": ...}`` with the right status code. Each
process runs one background ticker that closes rounds at their deadline and aggregates
closed rounds (the upload that closes a round wakes it at once).
"""

from __future__ import annotations

import logging
import re
import threading
import time

from flask import Flask, Response, g, jsonify, request, send_file
from werkzeug.exceptions import HTTPException

from .auth import TokenRegistry
from .errors import ApiError
from .federation import Federation

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


def _int_header(name: str, *, minimum: int) -> int:
    raw = request.headers.get(name)
    if raw is None:
        raise ApiError(400, "missing header", f"{name} is required")
    if not UINT_RE.fullmatch(raw.strip()) or int(raw) < minimum:
        raise ApiError(400, "invalid header", f"{name} must be an integer >= {minimum}, got {raw[:40]!r}")
    return int(raw)


def create_app(federation: Federation, tokens: TokenRegistry | None = None, *, start_ticker: bool = True) -> Flask:
    app = Flask("fedllm")
    app.config["JSON_SORT_KEYS"] = False
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
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify({"error": "internal error", "detail": type(exc).__name__}), 500

    @app.before_request
    def _identify():
        if request.path == "/healthz":
            return
        client_id = request.headers.get(CLIENT_HEADER)
        if client_id is None:
            raise ApiError(400, "missing header", f"{CLIENT_HEADER} is required")
        if not CLIENT_ID_RE.fullmatch(client_id):
            raise ApiError(400, "invalid client id",
                           "client ids are 1-64 characters: letters, digits, '.', '_', '-', starting with a letter or digit")
        g.client_id = client_id
        if tokens is not None:
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or not auth[7:].strip():
                raise ApiError(401, "unauthorized", "send 'Authorization: Bearer <token>'")
            owner, _is_admin = tokens.identify(auth[7:].strip())
            if owner is None:
                raise ApiError(401, "unauthorized", "unknown token")
            if owner != client_id:
                raise ApiError(403, "forbidden", f"this token does not belong to client {client_id!r}")

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/v1/round")
    def get_round():
        return jsonify(federation.status(g.client_id))

    @app.get("/v1/config")
    def get_config():
        return jsonify(federation.client_config())

    @app.get("/v1/history")
    def get_history():
        return jsonify(federation.history())

    @app.post("/v1/join")
    def join():
        body = request.get_json(silent=True)
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

    @app.after_request
    def _log(response):
        log.debug("%s %s %s %s", request.remote_addr, request.method, request.path, response.status_code)
        return response

    app.extensions["fedllm"]["started"] = time.time()
    return app
