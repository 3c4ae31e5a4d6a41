"""HTTP of the secure-aggregation stages: ``GET /v1/secagg`` and ``POST /v1/secagg/{keys,shares,masked,unmask}``.

Each POST names its round and attempt (``?round=R&attempt=A``); the service is
:class:`~fedllm.server.secure_rounds.SecureRounds`, which stores the message before the 200 is sent.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify, request

from . import errors

STAGE_ENDPOINTS = ("keys", "shares", "unmask")  # the JSON stages; "masked" takes a safetensors body


def secagg_blueprint(federation: Any, progress: Any) -> Blueprint:
    from .app import UINT_RE, CountingReader, _json_body  # app.py imports this module first

    bp = Blueprint("secagg", __name__)

    def _secure():
        if federation.secure is None:
            raise errors.SecAggStage("this federation runs without --secure_aggregation; POST /v1/update")
        return federation.secure

    def _round_attempt() -> tuple[int, int]:
        raw_round, raw_attempt = request.args.get("round", ""), request.args.get("attempt", "")
        if not UINT_RE.fullmatch(raw_round) or not UINT_RE.fullmatch(raw_attempt):
            raise errors.InvalidRound("POST /v1/secagg/<stage>?round=R&attempt=A with R the round, A its attempt")
        return int(raw_round), int(raw_attempt)

    @bp.get("/v1/secagg")
    def secagg_view():
        """What the calling client needs for the open stage of the round's secure aggregation."""
        return jsonify(_secure().view(g.client_id))

    def _json_stage(stage: str):
        secure = _secure()
        round_number, attempt = _round_attempt()
        body = _json_body()
        if not isinstance(body, dict):
            raise errors.BadJson(f"POST /v1/secagg/{stage} takes a JSON object")
        receive = {"keys": secure.receive_keys, "shares": secure.receive_shares,
                   "unmask": secure.receive_unmask}[stage]
        result = receive(g.client_id, round_number, attempt, body)
        progress.wake.set()
        return jsonify(result)

    @bp.post("/v1/secagg/keys")
    def secagg_keys():
        return _json_stage("keys")

    @bp.post("/v1/secagg/shares")
    def secagg_shares():
        return _json_stage("shares")

    @bp.post("/v1/secagg/unmask")
    def secagg_unmask():
        return _json_stage("unmask")

    @bp.post("/v1/secagg/masked")
    def secagg_masked():
        secure = _secure()
        round_number, attempt = _round_attempt()
        g.body_reader = CountingReader(request.stream.read)
        result = secure.receive_masked(g.client_id, round_number, attempt, g.body_reader, request.content_length)
        progress.wake.set()
        return jsonify(result)

    return bp
