#!/usr/bin/env python
"""fedllm parameter server.

    python server_http.py --model_name_or_path DIR --fed_alg fedavg --num_clients 3 ...   # development server
    ./run_server.sh  --model_name_or_path DIR ...                                          # gunicorn (production)
    python server_http.py add-client --auth_tokens tokens.json --client_id alice           # prints alice's token once
    python server_http.py add-admin  --auth_tokens tokens.json                              # prints the admin token once

Every option is documented in fedllm/config.py (``python config.py --help``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedllm.config import FederationArguments, ServerArguments, parse_args
from fedllm.logs import gunicorn_logconfig, setup_logging
from fedllm.server.app import CLIENT_ID_RE, create_app
from fedllm.server.auth import TokenRegistry, add_token
from fedllm.server.federation import Federation
from fedllm.server.metrics import TensorBoardReporter, child_exit, prepare_multiprocess_dir, tensorboard_available
from fedllm.server.ratelimit import RateLimiter
from fedllm.server.store import Store

log = logging.getLogger("fedllm.server")


def build_app(server: ServerArguments):
    """The WSGI app over ``server.state_dir`` (called once in each worker process)."""
    federation = Federation(Store(server.state_dir), output_dir=server.output_dir,
                            max_upload_bytes=int(server.max_upload_mb * (1 << 20)))
    tokens = TokenRegistry(server.auth_tokens) if server.auth_tokens else None
    workers = server.workers if server.use_gunicorn else 1
    app = create_app(federation, tokens, rate_limiter=RateLimiter(server.rate_limit, workers))
    if server.report_to == "tensorboard":
        TensorBoardReporter(federation, Path(server.state_dir) / "tensorboard").attach()
    return app


def manage_tokens(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog=f"server_http.py {argv[0]}")
    parser.add_argument("--auth_tokens", required=True, help="tokens file (created if missing)")
    if argv[0] == "add-client":
        parser.add_argument("--client_id", required=True)
    args = parser.parse_args(argv[1:])
    client_id = getattr(args, "client_id", None)
    if client_id is not None and not CLIENT_ID_RE.fullmatch(client_id):
        parser.error("client ids are 1-64 characters: letters, digits, '.', '_', '-'")
    token = add_token(args.auth_tokens, client_id)
    who = f"client {client_id!r}" if client_id else "the admin"
    print(f"Token for {who} (shown once; only its hash is stored in {args.auth_tokens}):", file=sys.stderr)
    print(token)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("add-client", "add-admin"):
        manage_tokens(argv)
        return
    federation_args, server = parse_args((FederationArguments, ServerArguments), argv)
    setup_logging(server.log_level, server.log_format)
    try:
        config = Federation.initialize(federation_args, server.state_dir)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not server.auth_tokens:
        log.warning("!" * 72)
        log.warning("NO AUTHENTICATION: anyone who reaches %s:%d can join and push updates.", server.host, server.port)
        log.warning("Use --auth_tokens FILE (and 'server_http.py add-client') for anything but a closed network.")
        log.warning("!" * 72)
    log.info("federation: %s, %d clients, %d sampled per round, %d rounds, state in %s",
             config.fed_alg, config.num_clients, config.sample_clients, config.num_rounds, server.state_dir)
    # Before any worker imports prometheus_client: every worker's counters go to one fresh folder.
    prepare_multiprocess_dir(server.state_dir)
    if server.report_to == "tensorboard" and not tensorboard_available():
        log.warning("--report_to tensorboard needs tensorboardX (pip install 'fedllm[tensorboard]'); "
                    "not writing TensorBoard scalars")
        server.report_to = "none"
    elif server.report_to == "tensorboard":
        log.info("writing per-round scalars for TensorBoard to %s", Path(server.state_dir) / "tensorboard")
    if server.use_gunicorn:
        from fedllm.server.gunicorn_app import GunicornServer

        options = {
            "bind": f"{server.host}:{server.port}",
            "workers": server.workers,
            "threads": server.threads,
            "worker_class": "gthread",
            "timeout": server.timeout,
            "certfile": server.certfile,
            "keyfile": server.keyfile,
            "loglevel": server.log_level.lower(),
            "accesslog": None,
            # gunicorn 27's runtime control socket defaults to one path per user; fedllm does not use it.
            "control_socket_disable": True,
            "logconfig_dict": gunicorn_logconfig(server.log_level, server.log_format),
        }
        GunicornServer(lambda: build_app(server), options, hooks={"child_exit": child_exit}).run()
    else:
        ssl_context = (server.certfile, server.keyfile) if server.certfile else None
        build_app(server).run(host=server.host, port=server.port, threaded=True, ssl_context=ssl_context)


if __name__ == "__main__":
    main()
