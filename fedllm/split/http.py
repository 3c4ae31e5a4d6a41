"""The split-learning endpoints of REST API v1 (registered on every server; a LoRA federation answers 409).

* ``GET  /v1/split/step?round=R``             -> ``{"round", "next_step", "max_steps"}``
* ``POST /v1/split/forward?round=R&step=S``   safetensors h_A + mask info -> safetensors h_B
* ``POST /v1/split/backward?round=R&step=S``  safetensors ∂loss/∂h_B      -> safetensors ∂loss/∂h_A

With ``--split_sequence_chunk C`` each message is sent as its chunks (fedllm.split.chunks): every chunk but the last
is answered 202 with a JSON receipt, the last with the answer's chunks, framed.

The caller is the authenticated client (``X-FedLLM-Client`` and its token, checked by ``app._identify``).
"""

from __future__ import annotations

from flask import Flask, Response, g, jsonify, request

from ..server import errors
from .errors import InvalidSplitStep, NotSplitMode, SplitMessageTooLarge

SAFETENSORS = "application/octet-stream"


def register_split_routes(app: Flask, federation, uint_re) -> None:
    """Add the split endpoints to ``app``; with ``--fed_mode split`` its one process builds the middle here."""
    service = None
    if federation.config.split_enabled:
        from .server import MiddleService

        service = MiddleService(federation)
        app.extensions["fedllm"]["split"] = service

    def _service():
        if service is None:
            raise NotSplitMode("this federation trains with --fed_mode lora; the split endpoints serve "
                               "--fed_mode split")
        return service

    def _number(name: str, minimum: int) -> int:
        raw = request.args.get(name, "")
        if not uint_re.fullmatch(raw) or int(raw) < minimum:
            raise InvalidSplitStep(f"?{name}= must be an integer >= {minimum}, got {raw[:20]!r}")
        return int(raw)

    def _body() -> bytes:
        limit = service.shape.max_bytes(service.chunk_size or None)
        length = request.content_length
        if length is None:
            raise errors.MissingHeader("Content-Length is required")
        if length > limit:
            what = f"a chunk of {service.chunk_size} tokens" if service.chunk_size else "a split message"
            raise SplitMessageTooLarge(f"{length} bytes; {what} of this federation is at most {limit}")
        body = request.stream.read(length)
        g.body_bytes = len(body)
        return body

    def _exchange(kind: str):
        split = _service()
        round_number, step = _number("round", 1), _number("step", 1)
        binding, whole = split.receive(kind, g.client_id, round_number, step, _body())
        if whole is None:  # a chunk of a message still being received
            return jsonify({"round": round_number, "step": step, "chunk": binding.chunk,
                            "chunks": binding.chunks}), 202
        answer = (split.forward if kind == "forward" else split.backward)(g.client_id, round_number, step, whole)
        return Response(split.respond(kind, g.client_id, round_number, step, answer), mimetype=SAFETENSORS)

    @app.get("/v1/split/step")
    def split_step():
        split = _service()
        return jsonify(split.next_step(g.client_id, _number("round", 1)))

    @app.post("/v1/split/forward")
    def split_forward():
        return _exchange("forward")

    @app.post("/v1/split/backward")
    def split_backward():
        return _exchange("backward")
