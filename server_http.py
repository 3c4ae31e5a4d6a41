#!/usr/bin/env python
"""fedllm parameter server.

    python server_http.py --model_name_or_path DIR --fed_alg fedavg --num_clients 3 ...   # development server
    ./run_server.sh  --model_name_or_path DIR ...                                          # gunicorn (production)
    python server_http.py add-client --auth_tokens tokens.json --client_id alice           # prints alice's token once
    python server_http.py add-admin  --auth_tokens tokens.json                              # prints the admin token once
    python server_http.py add-viewer --auth_tokens tokens.json                              # the dashboard's read-only token
    python server_http.py revoke     --auth_tokens tokens.json --client_id alice           # alice's token stops working

Every option is documented in fedllm/config.py (``python config.py --help``).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from fedllm.config import FederationArguments, ServerArguments, parse_args
from fedllm.logs import gunicorn_logconfig, setup_logging
from fedllm.server.app import CLIENT_ID_RE, create_app
from fedllm.server.auth import ADMIN, CLIENT, VIEWER, TokenRegistry, add_token, revoke_token
from fedllm.server.federation import Federation
from fedllm.server.metrics import TensorBoardReporter, child_exit, prepare_multiprocess_dir, tensorboard_available
from fedllm.server.ratelimit import RateLimiter
from fedllm.server.store import StateDirInUse, Store, lock_state_dir

log = logging.getLogger("fedllm.server")


def build_app(server: ServerArguments):
    """The WSGI app over ``server.state_dir`` (called once in each worker process)."""
    federation = Federation(Store(server.state_dir), output_dir=server.output_dir,
                            max_upload_bytes=int(server.max_upload_mb * (1 << 20)))
    tokens = TokenRegistry(server.auth_tokens) if server.auth_tokens else None
    limiter = RateLimiter(federation.store.root / "ratelimit.db", server.rate_limit)
    app = create_app(federation, tokens, rate_limiter=limiter)
    if server.report_to == "tensorboard":
        TensorBoardReporter(federation, Path(server.state_dir) / "tensorboard").attach()
    return app


def connection_limits(server: ServerArguments):
    """The workers' per-connection deadlines, and the largest body worth reading (the federation's upload limit)."""
    from fedllm.server.worker import ConnectionLimits, clear_spool

    store = Store(server.state_dir)
    try:
        federation = Federation(store, max_upload_bytes=int(server.max_upload_mb * (1 << 20)))
        clear_spool(store.incoming_dir)
        return ConnectionLimits(header_timeout=server.header_timeout, min_body_rate=server.min_body_rate_kib * 1024,
                                body_rate_window=server.body_rate_window, max_body_bytes=federation.max_upload_bytes,
                                spool_dir=str(store.incoming_dir))
    finally:
        store.close()


TOKEN_COMMANDS = ("add-client", "add-admin", "add-viewer", "revoke")


def manage_tokens(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog=f"server_http.py {argv[0]}")
    parser.add_argument("--auth_tokens", required=True, help="tokens file (created if missing)")
    if argv[0] in ("add-client", "revoke"):
        parser.add_argument("--client_id", required=True)
    args = parser.parse_args(argv[1:])
    client_id = getattr(args, "client_id", None)
    if client_id is not None and not CLIENT_ID_RE.fullmatch(client_id):
        parser.error("client ids are 1-64 characters: letters, digits, '.', '_', '-'")
    if argv[0] == "revoke":
        if not revoke_token(args.auth_tokens, client_id):
            raise SystemExit(f"error: {args.auth_tokens} has no token for client {client_id!r}")
        print(f"revoked the token of client {client_id!r}; every worker refuses it from its next request on",
              file=sys.stderr)
        return
    role = {"add-admin": ADMIN, "add-viewer": VIEWER}.get(argv[0], CLIENT)
    token = add_token(args.auth_tokens, client_id, role)
    who = f"client {client_id!r}" if client_id else f"the {role}"
    print(f"Token for {who} (shown once; only its hash is stored in {args.auth_tokens}):", file=sys.stderr)
    print(token)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_transport(server: ServerArguments) -> None:
    """Tokens never cross a network in cleartext unless the operator says so."""
    if server.auth_tokens and not server.certfile and not is_loopback(server.host) and not server.allow_insecure_http:
        raise ValueError(
            f"--auth_tokens on plain HTTP bound to {server.host} would send every token in cleartext. Give "
            "--certfile/--keyfile (HTTPS), or bind --host 127.0.0.1 behind a TLS front (deploy/nginx.conf), or "
            "accept the risk with --allow_insecure_http")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOKEN_COMMANDS:
        manage_tokens(argv)
        return
    federation_args, server = parse_args((FederationArguments, ServerArguments), argv)
    setup_logging(server.log_level, server.log_format)
    try:
        check_transport(server)
        lock_state_dir(server.state_dir)  # held until this process (the gunicorn master) exits
        config = Federation.initialize(federation_args, server.state_dir)
    except (ValueError, StateDirInUse) as exc:
        raise SystemExit(f"error: {exc}") from None
    if server.auth_tokens and not server.certfile and not is_loopback(server.host):
        log.warning("--allow_insecure_http: tokens cross the network to %s in cleartext", server.host)
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
        from fedllm.server import worker
        from fedllm.server.gunicorn_app import GunicornServer

        worker.configure(connection_limits(server))
        options = {
            "bind": f"{server.host}:{server.port}",
            "workers": server.workers,
            "threads": server.threads,
            "worker_class": "fedllm.server.worker.FedllmWorker",
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
