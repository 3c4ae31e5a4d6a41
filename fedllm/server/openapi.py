"""The OpenAPI 3.1 description of REST API v1, served by ``GET /v1/openapi.json`` (no auth).

It is built from what the server itself runs on, so the two cannot drift apart: each operation lists the
error types it can raise and takes their statuses from :data:`fedllm.server.app.ERROR_STATUS` and their
``error`` names from :mod:`fedllm.server.errors`; headers, id formats and limits come from ``app.py``; the
federation's settings from :class:`~fedllm.config.FederationArguments`. Role-dependent views
(:mod:`fedllm.server.views`) are in the schemas as alternatives: a client token gets ``num_sampled`` and
``num_received`` where the viewer and admin tokens get the id lists.

``tests/test_openapi.py`` checks the document against the Flask URL map, validates it (openapi-spec-validator),
validates real responses of every role against it, and runs Schemathesis against a live gunicorn server.
"""

from __future__ import annotations

import dataclasses
import functools
import mimetypes
import types
import typing
from collections.abc import Iterable
from typing import Any

from .. import package_version
from ..config import FederationArguments
from . import app, errors
from .dashboard import STATIC
from .metrics import PHASES

JSON = "application/json"
Schema = dict[str, Any]
ErrorCause = type[errors.FederationError] | str  # an error type, or a key of NAMED_ERRORS

# --- who may call what (components.securitySchemes)
CLIENT_SECURITY = [{"bearerToken": [], "clientId": []}, {"clientId": []}]  # the second: a server without tokens
ADMIN_SECURITY = [{"bearerToken": [], "clientId": []}]
SCRAPER_SECURITY = [{"bearerToken": []}, {}]  # /metrics: the viewer or admin token, nothing on an open server
PUBLIC: list[dict[str, list[str]]] = []

# Errors of every request that names a client (app._identify), and of every request the server reads state for.
IDENTIFIED = (errors.MissingHeader, errors.InvalidClientId, errors.Unauthorized, errors.Forbidden,
              errors.ClientRemoved, errors.StorageUnavailable, "rate limited")
# Errors raised outside the service layer, by name: the rate limit and werkzeug's (app.py), and the gunicorn
# worker's (fedllm.server.worker), which it writes for any request before the app sees it (TRANSPORT).
NAMED_ERRORS = {"rate limited": 429, "request entity too large": 413, "not found": 404, "bad request": 400,
                "request timeout": 408, "length required": 411, "uri too long": 414,
                "request header fields too large": 431}
TRANSPORT = ("bad request", "request timeout", "length required", "uri too long", "request header fields too large")
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}

CLIENT_ID = {"type": "string", "pattern": f"^{app.CLIENT_ID_RE.pattern}$"}
SHA256 = {"type": "string", "pattern": f"^{app.SHA256_RE.pattern}$"}
COUNT = {"type": "integer", "minimum": 0}
NUMBER = {"type": "number"}
BINARY = {"type": "string", "format": "binary"}  # a safetensors file
GLOBAL_HEADERS = {
    "ETag": {"description": 'the version\'s sha256, quoted: "<sha256>"', "schema": {"type": "string"}},
    "X-FedLLM-Version": {"description": "the global version (the round it ends)", "schema": {"type": "string"}},
}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {**schema, "type": [schema["type"], "null"]}


def _status(cause: ErrorCause) -> int:
    return NAMED_ERRORS[cause] if isinstance(cause, str) else app.ERROR_STATUS[cause]


def _name(cause: ErrorCause) -> str:
    return cause if isinstance(cause, str) else cause.error


def _error_responses(causes: Iterable[ErrorCause]) -> dict[str, Any]:
    """One response per status, saying which ``error`` names it carries."""
    by_status: dict[int, list[str]] = {}
    for cause in causes:
        names = by_status.setdefault(_status(cause), [])
        if _name(cause) not in names:
            names.append(_name(cause))
    responses = {}
    for status, names in sorted(by_status.items()):
        response: dict[str, Any] = {"description": "`error` is " + " or ".join(f"`{n}`" for n in names),
                                    "content": {JSON: {"schema": _ref("Error")}}}
        if status in (429, 503):
            response["headers"] = RETRY_AFTER
        responses[str(status)] = response
    return responses


def _json(schema: Schema, description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _operation(operation_id: str, summary: str, security: list, responses: dict[str, Any],
               causes: Iterable[ErrorCause] = (), **extra: Any) -> dict[str, Any]:
    """An operation; its ``operationId`` is the Flask endpoint that serves it (the test matches them)."""
    for status, response in _error_responses([*causes, *TRANSPORT]).items():
        responses.setdefault(status, response)  # readyz's 503 keeps its own body (Health, not Error)
    return {"operationId": operation_id, "summary": summary, "security": security, **extra,
            "responses": dict(sorted(responses.items()))}


def _json_type(annotation: Any) -> Schema:
    """The JSON Schema type of a dataclass field's annotation (str, int, float, bool, or X | None)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _nullable(_json_type(inner))
    return {"type": {str: "string", int: "integer", float: "number", bool: "boolean"}[annotation]}


def federation_settings_schema() -> Schema:
    """``/v1/config``'s ``federation``: every option of FederationArguments (the algorithms' included)."""
    hints = typing.get_type_hints(FederationArguments)
    properties = {}
    for f in dataclasses.fields(FederationArguments):
        schema = _json_type(hints[f.name])
        if f.metadata.get("help"):
            schema["description"] = f.metadata["help"]
        if f.metadata.get("choices"):
            schema["enum"] = list(f.metadata["choices"])
        properties[f.name] = schema
    properties["seed"] = {**_nullable(properties["seed"]),
                          "description": "The sampling seed; null for a client token (views.config_view)."}
    return {"type": "object", "properties": properties, "required": [f.name for f in dataclasses.fields(
        FederationArguments)]}


def _schemas() -> dict[str, Schema]:
    client_id, sha256, count, number = CLIENT_ID, SHA256, COUNT, NUMBER
    phase = {"type": "string", "enum": list(PHASES)}
    tensor_shapes = {"type": "object", "additionalProperties": {"type": "array", "items": count},
                     "description": "tensor name -> shape"}
    return {
        "Error": {"type": "object", "required": ["error", "detail"],
                  "properties": {"error": {"type": "string", "description": "a short, stable name"},
                                 "detail": {"type": "string", "description": "what went wrong, what to do"}}},
        "Health": {"type": "object", "required": ["status"], "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded"]},
            "reason": {"type": ["string", "null"], "description": "why rounds cannot progress"},
            "failures": {**count, "description": "consecutive failed background ticks"}}},
        "RoundStatus": {
            "type": "object",
            "required": ["round", "num_rounds", "phase", "fed_alg", "task", "global_version", "global_sha256",
                         "deadline", "deadline_extensions", "clients_joined", "num_clients", "paused"],
            "properties": {
                "round": {**count, "description": "the current round; 0 before the first"},
                "num_rounds": count, "phase": phase, "fed_alg": {"type": "string"}, "task": {"type": "string"},
                "global_version": count, "global_sha256": sha256,
                "sampled": {"type": "array", "items": client_id, "description": "viewer and admin tokens"},
                "received": {"type": "array", "items": client_id, "description": "viewer and admin tokens"},
                "num_sampled": {**count, "description": "a client token: how many are sampled, not who"},
                "num_received": {**count, "description": "a client token"},
                "deadline": {"type": ["number", "null"], "description": "Unix seconds; null: no deadline"},
                "deadline_extensions": count, "clients_joined": count, "num_clients": count,
                "paused": {"type": "boolean"},
                "selected": {"type": "boolean", "description": "the calling client is to train now"},
                "submitted": {"type": "boolean", "description": "the calling client's update is in"},
                "joined": {"type": "boolean", "description": "the calling client has joined"},
                "secagg": {**_ref("SecAggStatus"), "description": "--secure_aggregation secagg+ only"},
                "communication": {
                    "type": "object", "description": "bytes of the run (fedllm.server.traffic)",
                    "required": ["bytes_sent", "bytes_received", "total_bytes", "budget_bytes", "budget_used",
                                 "budget_state"],
                    "properties": {
                        "bytes_sent": {**count, "description": "global downloads served to joined clients"},
                        "bytes_received": {**count, "description": "accepted upload bodies"},
                        "total_bytes": count, "budget_bytes": _nullable(count),
                        "budget_used": {**_nullable(number), "description": "fraction of the budget spent"},
                        "budget_state": {"type": "string", "enum": ["unlimited", "ok", "warning", "exhausted"],
                                         "description": "warning from 80%; exhausted: no new round starts"}}},
            },
            "anyOf": [{"required": ["sampled", "received"]}, {"required": ["num_sampled", "num_received"]}],
        },
        "Config": {
            "type": "object",
            "required": ["federation", "federation_id", "model_fingerprint", "lora_config", "adapter",
                         "upload_tensors", "max_upload_bytes", "round_config"],
            "properties": {
                "federation": _ref("FederationSettings"),
                "federation_id": {"type": "string"},
                "model_fingerprint": sha256,
                "lora_config": {"type": "object", "description": "the PEFT LoraConfig, as adapter_config.json"},
                "adapter": tensor_shapes,
                "upload_tensors": {**tensor_shapes, "description": "tensor name -> shape of an update's body"},
                "max_upload_bytes": count,
                "round_config": {"type": "object", "required": ["round", "learning_rate", "max_steps"],
                                 "properties": {"round": count, "learning_rate": number, "max_steps": count}},
            },
        },
        "FederationSettings": federation_settings_schema(),
        "JoinRequest": {"type": "object", "required": ["num_samples"], "properties": {
            "num_samples": {"type": "integer", "minimum": 1, "maximum": app.MAX_NUM_SAMPLES}}},
        "Joined": {"type": "object", "required": ["client_id", "clients_joined", "num_clients"],
                   "properties": {"client_id": client_id, "clients_joined": count, "num_clients": count}},
        "UpdateAccepted": {"type": "object", "required": ["accepted", "duplicate", "round", "sha256"], "properties": {
            "accepted": {"type": "boolean"},
            "duplicate": {"type": "boolean", "description": "an identical retry, counted once"},
            "round": count, "sha256": sha256}},
        "HistoryRecord": {
            "type": "object",
            "required": ["round", "num_samples", "train_loss", "eval_loss", "seconds", "bytes_received",
                         "global_sha256", "metrics"],
            "properties": {
                "round": count,
                "participants": {"type": "array", "items": client_id, "description": "viewer and admin tokens"},
                "sampled": {"type": "array", "items": client_id, "description": "viewer and admin tokens"},
                "num_participants": {**count, "description": "a client token"},
                "num_sampled": {**count, "description": "a client token"},
                "participated": {"type": "boolean", "description": "a client token: its update is in the aggregate"},
                "num_samples": count, "train_loss": _nullable(number), "eval_loss": _nullable(number),
                "seconds": number, "aggregation_seconds": number, "bytes_received": count,
                "bytes_sent": {**count, "description": "global downloads while the round was open"},
                "global_version": count,
                "global_sha256": sha256,
                "metrics": {"type": "object", "additionalProperties": {"type": "object",
                                                                        "additionalProperties": number},
                            "description": "client id -> its reported metrics; a client token: its own only"},
                "secagg": {"type": "object", "description": "--secure_aggregation: the round's last stage status "
                                                            "and the unmasked weight fraction"},
            },
            "anyOf": [{"required": ["participants"]}, {"required": ["num_participants"]}],
        },
        "Clients": {"type": "object", "required": ["time", "round", "phase", "clients"], "properties": {
            "time": {**number, "description": "the server's clock, Unix seconds"},
            "round": count, "phase": phase,
            "clients": {"type": "array", "description": "a client token: its own row only", "items": {
                "type": "object",
                "required": ["client_id", "state", "sampled", "num_samples", "joined_at", "last_seen"],
                "properties": {
                    "client_id": client_id,
                    "state": {"type": "string",
                              "enum": ["waiting", "idle", "training", "submitted", "late", "finished"]},
                    "sampled": {"type": "boolean"}, "num_samples": count, "joined_at": number,
                    "last_seen": number, "submitted_at": _nullable(number), "rounds_joined": count,
                    "last_train_loss": _nullable(number)}}}}},
        "RemoveClientRequest": {"type": "object", "required": ["client_id"], "properties": {"client_id": client_id}},
        "Event": {"type": "object", "required": ["time", "actor", "action", "detail"], "properties": {
            "time": number, "actor": {"type": "string"},
            "action": {"type": "string", "description": "pause, resume, abort_round, remove_client, rejoin, "
                                                        "settings_changed, finished_early, ..."},
            "detail": {"type": "object"}}},
        **_secagg_schemas(),
    }


def _secagg_schemas() -> dict[str, Schema]:
    stage = {"type": ["string", "null"], "enum": ["advertise", "share", "masked", "unmask", "done", "failed", None]}
    clients = {"type": "array", "items": CLIENT_ID}
    return {
        "SecAggStatus": {"type": "object", "required": ["stage", "clients_in_stage", "dropped"], "properties": {
            "stage": stage, "attempt": _nullable(COUNT), "clients_in_stage": COUNT, "answered": COUNT,
            "threshold": COUNT, "neighbours": COUNT,
            "dropped": {"type": "object", "additionalProperties": COUNT,
                        "description": "stage -> how many of its clients did not answer it"}}},
        "SecAggView": {"type": "object", "required": ["round", "stage"], "properties": {
            "round": COUNT, "stage": stage, "attempt": COUNT, "deadline": _nullable(NUMBER),
            "setup": {"type": "object", "description": "the attempt: clients, weights, neighbours k, threshold, "
                                                       "bits, clip, length"},
            "expected": {"type": "boolean", "description": "the open stage waits for the calling client"},
            "answered": {"type": "boolean"},
            "keys": {"type": "object", "description": "share stage: the public keys of the caller's neighbours"},
            "u2": {**clients, "description": "masked stage: the clients that sent shares"},
            "shares": {"type": "object", "description": "masked stage: sender -> ciphertext for the caller (hex)"},
            "u3": {**clients, "description": "unmask stage: the clients whose masked inputs are summed"}}},
        "SecAggAccepted": {"type": "object", "required": ["accepted", "duplicate", "round", "attempt", "stage"],
                           "properties": {"accepted": {"type": "boolean"},
                                          "duplicate": {"type": "boolean", "description": "an identical retry"},
                                          "round": COUNT, "attempt": COUNT, "stage": stage}},
    }


def _secagg_paths() -> dict[str, Any]:
    """``/v1/secagg/*``: the SecAgg+ stages (fedllm.server.secagg_http); 409 on a federation without them."""
    accepted = {"200": _json(_ref("SecAggAccepted"), "stored before this answer, or an identical retry")}
    posting = (*IDENTIFIED, errors.InvalidRound, errors.SecAggStage, errors.SecAggInvalid)
    parameters = [{"name": name, "in": "query", "required": True, "description": what,
                   "schema": {"type": "integer", "minimum": 0, "maximum": app.MAX_NUM_SAMPLES}}
                  for name, what in (("round", "the round"), ("attempt", "the round's attempt"))]
    json_body = {"required": True, "content": {JSON: {"schema": {"type": "object"}}}}

    def stage(operation_id: str, summary: str) -> dict[str, Any]:
        return {"post": _operation(operation_id, summary, CLIENT_SECURITY, dict(accepted),
                                   [*posting, errors.BadJson, "request entity too large"], parameters=parameters,
                                   requestBody=json_body)}

    return {
        "/v1/secagg": {"get": _operation(
            "secagg.secagg_view", "What the calling client needs for the open secure-aggregation stage",
            CLIENT_SECURITY, {"200": _json(_ref("SecAggView"), "the stage and the caller's part of it")},
            [*IDENTIFIED, errors.SecAggStage])},
        "/v1/secagg/keys": stage("secagg.secagg_keys", "Stage 1: the caller's two X25519 public keys "
                                                       '{"c_pk": hex, "s_pk": hex}'),
        "/v1/secagg/shares": stage("secagg.secagg_shares", 'Stage 2: {"shares": {neighbour: AES-GCM ciphertext '
                                                           "(hex)}} of the caller's Shamir shares"),
        "/v1/secagg/unmask": stage("secagg.secagg_unmask", 'Stage 4: {"b": {client: share}, "s": {client: share}} '
                                                           "for the survivors' self-masks and the dropped clients' "
                                                           "mask keys"),
        "/v1/secagg/masked": {"post": _operation(
            "secagg.secagg_masked", "Stage 3: the caller's masked input, a safetensors file of one ring tensor",
            CLIENT_SECURITY, dict(accepted), [*posting, errors.UploadTooLarge], parameters=parameters,
            requestBody={"required": True, "description": "tensor 'masked' (uint32 or uint64, the setup's length); "
                                                          "metadata 'excluded': neighbours whose shares failed "
                                                          "authentication",
                         "content": {"application/octet-stream": {"schema": BINARY}}})},
    }


def _paths() -> dict[str, Any]:
    health = _json(_ref("Health"), "`ok`, or `degraded` with the reason while background progress keeps failing")
    status = _json(_ref("RoundStatus"), "the round's status after the action (the full view)")
    admin = (*IDENTIFIED, errors.AdminOnly)
    json_limit = ("request entity too large",)  # a JSON body over app.MAX_JSON_BYTES (werkzeug's 413)
    round_link = {"GetRound": {"operationId": "get_round", "description": "where the federation is now"}}
    static_files = {p.name: mimetypes.guess_type(p.name)[0] for p in STATIC.iterdir() if p.is_file()}
    return {
        "/healthz": {"get": _operation("healthz", "Liveness (no auth)", PUBLIC, {"200": health})},
        "/readyz": {"get": _operation("readyz", "Readiness (no auth): 503 while the federation cannot progress",
                                      PUBLIC, {"200": health, "503": health})},
        "/": {"get": _operation("dashboard.index", "The live dashboard page (no data, no auth)", PUBLIC, {
            "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}})},
        "/dashboard/static/{filename}": {"get": _operation(
            "dashboard.static", "The dashboard's files: its page, script and stylesheet (no auth)", PUBLIC,
            {"200": {"description": "the file", "content": {
                media_type: {"schema": {"type": "string"}} for media_type in sorted(set(static_files.values()))}}},
            ["not found"],
            parameters=[{"name": "filename", "in": "path", "required": True,
                         "schema": {"type": "string", "enum": sorted(static_files)}}])},
        "/v1/openapi.json": {"get": _operation("openapi_json", "This document (no auth)", PUBLIC, {
            "200": _json({"type": "object"}, "OpenAPI 3.1")})},
        "/v1/round": {"get": _operation(
            "get_round", "Round status; for the calling client also selected, submitted, joined", CLIENT_SECURITY,
            {"200": {**_json(_ref("RoundStatus"), "the round's status"), "links": {"PostUpdate": {
                "operationId": "post_update", "parameters": {"round": "$response.body#/round"},
                "description": "upload an update for the current round"}}}}, IDENTIFIED)},
        "/v1/config": {"get": _operation(
            "get_config", "The federation's shared settings, adapter tensors and this round's training settings",
            CLIENT_SECURITY, {"200": _json(_ref("Config"), "the settings every client trains with")}, IDENTIFIED)},
        "/v1/join": {"post": _operation(
            "join", "Announce the calling client and its number of training examples", CLIENT_SECURITY,
            {"200": {**_json(_ref("Joined"), "joined (again: the new num_samples is audited)"),
                     "links": round_link}},
            [*IDENTIFIED, errors.BadJson, errors.InvalidNumSamples, errors.FederationFull, *json_limit],
            requestBody={"required": True, "content": {JSON: {"schema": _ref("JoinRequest")}}})},
        "/v1/global": {"get": _operation(
            "get_global", "The current global adapter, a safetensors file (dense, or quantized with "
                          "?encoding=compressed)", CLIENT_SECURITY, {
                "200": {"description": "the global adapter", "headers": GLOBAL_HEADERS,
                        "content": {"application/octet-stream": {"schema": BINARY}},
                        "links": {"NotModified": {"operationId": "get_global",
                                                  "parameters": {"header.If-None-Match": "$response.header.ETag"},
                                                  "description": "the same version again: 304"}}},
                "304": {"description": "If-None-Match names the current version", "headers": GLOBAL_HEADERS}},
            [*IDENTIFIED, errors.InvalidEncoding],
            parameters=[{"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"},
                         "description": "the ETag of the version the client holds"},
                        {"name": "encoding", "in": "query", "required": False,
                         "schema": {"type": "string", "enum": ["dense", "compressed"], "default": "dense"},
                         "description": "compressed: the global quantized with the federation's --update_compression "
                                        "(int8, nf4, fp4 only; its own ETag); docs/compression.md"}])},
        "/v1/update": {"post": _operation(
            "post_update", "Upload the calling client's update (its LoRA delta, local - global) for round R",
            CLIENT_SECURITY, {"202": _json(_ref("UpdateAccepted"), "accepted, or an identical retry")},
            [*IDENTIFIED, errors.InvalidRound, errors.InvalidHeader, errors.MalformedUpdate, errors.ChecksumMismatch,
             errors.TruncatedBody, errors.NotJoined, errors.NoOpenRound, errors.WrongRound, errors.NotSampled,
             errors.RoundClosed, errors.AlreadySubmitted, errors.UploadTooLarge, errors.InvalidUpdate,
             errors.TooManySamples, errors.SecAggRequired],
            parameters=[
                {"name": "round", "in": "query", "required": True, "description": "the round the update is for",
                 "schema": {"type": "integer", "minimum": 0, "maximum": app.MAX_NUM_SAMPLES}},
                {"name": "X-FedLLM-Num-Samples", "in": "header", "required": True,
                 "description": "training examples behind the update (at most the number joined with)",
                 "schema": {"type": "integer", "minimum": 1, "maximum": app.MAX_NUM_SAMPLES}},
                {"name": "X-Content-SHA256", "in": "header", "required": False,
                 "description": "the body's sha256, verified", "schema": SHA256}],
            requestBody={"required": True, "description": "a safetensors file: the tensors of /v1/config's "
                                                          "upload_tensors; metrics (train_loss, steps, ...) in its "
                                                          "metadata",
                         "content": {"application/octet-stream": {"schema": BINARY}}})},
        **_split_paths(),
        "/v1/history": {"get": _operation(
            "get_history", "One record per aggregated round", CLIENT_SECURITY,
            {"200": _json({"type": "array", "items": _ref("HistoryRecord")}, "oldest first")}, IDENTIFIED)},
        "/v1/clients": {"get": _operation(
            "get_clients", "Every known client and its state in the current round", CLIENT_SECURITY,
            {"200": {**_json(_ref("Clients"), "the clients"), "links": {"RemoveClient": {
                "operationId": "admin_remove_client",
                "requestBody": {"client_id": "$response.body#/clients/0/client_id"},
                "description": "remove a listed client (admin token)"}}}}, IDENTIFIED)},
        "/metrics": {"get": _operation(
            "metrics", "Prometheus text format, summed over every worker (viewer or admin token)", SCRAPER_SECURITY,
            {"200": {"description": "the exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}},
            [errors.Unauthorized, errors.Forbidden, errors.StorageUnavailable, "rate limited"])},
        "/v1/admin/pause": {"post": _operation(
            "admin_pause", "Stop the round clock: no new training, no closing or aggregating (admin)", ADMIN_SECURITY,
            {"200": status}, admin)},
        "/v1/admin/resume": {"post": _operation(
            "admin_resume", "Restart the round clock; the deadline moves by the paused time (admin)", ADMIN_SECURITY,
            {"200": status}, admin)},
        "/v1/admin/abort_round": {"post": _operation(
            "admin_abort_round", "Discard the current round's updates and re-sample it (admin)", ADMIN_SECURITY,
            {"200": status}, [*admin, errors.NoRoundToAbort])},
        "/v1/admin/remove_client": {"post": _operation(
            "admin_remove_client", "Remove a client: it can no longer join or push; it leaves the open round (admin)",
            ADMIN_SECURITY, {"200": status}, [*admin, errors.BadJson, errors.UnknownClient, *json_limit],
            requestBody={"required": True, "content": {JSON: {"schema": _ref("RemoveClientRequest")}}})},
        "/v1/admin/events": {"get": _operation(
            "admin_events", "The audit log, newest first (admin)", ADMIN_SECURITY,
            {"200": _json({"type": "array", "items": _ref("Event")}, "the latest 1000 events")}, admin)},
        **_secagg_paths(),
    }


SECURITY_SCHEMES = {
    "bearerToken": {
        "type": "http", "scheme": "bearer",
        "description": "A token from `fedllm server add-client|add-viewer|add-admin`, on a server started with "
                       "--auth_tokens: a client's token acts as that client only; the viewer token reads everything; "
                       "the admin token reads everything and runs /v1/admin/*. Neither joins nor pushes. A server "
                       "without --auth_tokens (open mode) needs none.",
    },
    "clientId": {
        "type": "apiKey", "in": "header", "name": app.CLIENT_HEADER,
        "description": f"The calling client's id, on every request but the public ones and /metrics: "
                       f"{app.CLIENT_ID_RE.pattern} (1-64 letters, digits, '.', '_', '-'). A client token must "
                       "name its own client; the dashboard sends `dashboard`.",
    },
}
DESCRIPTION = """Federated LoRA fine-tuning over HTTP: clients join, poll the round, download the global adapter, \
train locally and upload their delta; the server aggregates each round.

Every error is JSON `{"error": ..., "detail": ...}`; a refused request changed nothing. Besides the statuses \
listed per operation, an unknown path is answered 404 and an unknown method 405 (with `Allow`)."""


@functools.cache
def _split_paths() -> dict[str, Any]:
    """``--fed_mode split``'s step endpoints (fedllm.split.http); a LoRA federation answers them 409."""
    from ..split import errors as split_errors

    round_param = {"name": "round", "in": "query", "required": True, "description": "the open round",
                   "schema": {"type": "integer", "minimum": 1, "maximum": app.MAX_NUM_SAMPLES}}
    step_param = {"name": "step", "in": "query", "required": True,
                  "description": "the client's step in the round, 1 to max_steps",
                  "schema": {"type": "integer", "minimum": 1, "maximum": app.MAX_NUM_SAMPLES}}
    rounds = [errors.NoOpenRound, errors.WrongRound, errors.NotSampled, errors.RoundClosed]
    step_errors = [*IDENTIFIED, split_errors.NotSplitMode, split_errors.InvalidSplitStep, *rounds,
                   split_errors.StepOutOfOrder, split_errors.MalformedActivations, split_errors.InvalidActivations,
                   split_errors.SplitMessageTooLarge, errors.MissingHeader, split_errors.ChunkOutOfOrder]
    tensors = {"application/octet-stream": {"schema": BINARY}}
    chunked = (" With --split_sequence_chunk C (/v1/config) the body is one chunk of the message: C tokens of "
               "it (fewer in the last), the per-row tensors whole, bound by its safetensors metadata (kind, client, "
               "round, step, chunk, chunks); docs/split_learning.md.")
    receipt = _json({"type": "object", "required": ["round", "step", "chunk", "chunks"],
                     "properties": {"round": COUNT, "step": COUNT, "chunk": {"type": "integer", "minimum": 0},
                                    "chunks": COUNT}},
                    "--split_sequence_chunk: a chunk before the last, received (an identical resend is received "
                    "again)")

    def step(operation_id: str, summary: str, sent: str, answer: str, more: Iterable[ErrorCause] = ()) -> dict[str, Any]:
        answer += ("; with --split_sequence_chunk, answering the last chunk: the answer's chunks, each an 8-byte "
                   "little-endian length and a safetensors body bound like the request's (kind '<kind> answer')")
        return {"post": _operation(operation_id, summary, CLIENT_SECURITY,
                                   {"200": {"description": answer, "content": tensors}, "202": receipt},
                                   [*step_errors, *more],
                                   parameters=[round_param, step_param],
                                   requestBody={"required": True, "description": sent + chunked,
                                                "content": tensors})}

    return {
        "/v1/split/step": {"get": _operation(
            "split_step", "--fed_mode split: the calling client's next step in round R", CLIENT_SECURITY,
            {"200": _json({"type": "object", "required": ["round", "next_step", "max_steps"],
                           "properties": {"round": COUNT, "next_step": COUNT, "max_steps": COUNT}},
                          "the step to send next, of max_steps")},
            [*IDENTIFIED, split_errors.NotSplitMode, split_errors.InvalidSplitStep, *rounds],
            parameters=[round_param])},
        "/v1/split/forward": step(
            "split_forward", "--fed_mode split: run the middle blocks on the client's hidden states",
            "a safetensors file: hidden [B, T, hidden_size] in the wire dtype; starts [B], lengths [B], "
            "position_ids [B, T] as int64 (no token ids)", "a safetensors file: hidden [B, T, hidden_size]"),
        "/v1/split/backward": step(
            "split_backward", "--fed_mode split: backpropagate the client's gradient through the middle blocks",
            "a safetensors file: grad [B, T, hidden_size], the loss's gradient w.r.t. the forward's answer",
            "a safetensors file: grad [B, T, hidden_size], w.r.t. the forward's input", [split_errors.StepDropped]),
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of REST API v1 (built once per process)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "fedllm REST API", "version": package_version(), "description": DESCRIPTION,
                 "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"}},
        "security": CLIENT_SECURITY,
        "paths": _paths(),
        "components": {"schemas": _schemas(), "securitySchemes": SECURITY_SCHEMES},
    }
