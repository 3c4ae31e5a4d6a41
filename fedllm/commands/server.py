"""``fedllm server``: the parameter server (``server_http.py``, ``run_server.sh``).

    fedllm server --model_name_or_path DIR --fed_alg fedavg --num_clients 3 ...   # gunicorn (production)
    fedllm server ... --use_gunicorn false                                      # Flask's development server
    fedllm server add-client --auth_tokens tokens.json --client_id alice        # prints alice's token once
    fedllm server add-admin  --auth_tokens tokens.json                           # prints the admin token once
    fedllm server add-viewer --auth_tokens tokens.json                           # the dashboard's read-only token
    fedllm server revoke     --auth_tokens tokens.json --client_id alice        # alice's token stops working

``fedllm server`` serves with gunicorn, as ``run_server.sh`` does; ``python server_http.py`` (:func:`main`)
defaults to Flask's development server. Every option is documented in fedllm/config.py (``fedllm config``).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from ..config import FederationArguments, ServerArguments
from ..logs import gunicorn_logconfig, setup_logging
from ..server.app import CLIENT_ID_RE, create_app
from ..server.auth import ADMIN, CLIENT, VIEWER, TokenRegistry, add_token, revoke_token
from ..server.federation import Federation
from ..server.metrics import RoundReporter, child_exit, prepare_multiprocess_dir
from ..server.ratelimit import RateLimiter
from ..server.store import StateDirInUse, Store, lock_state_dir
from ..trackers import missing_package
from . import EXIT_OK, EXIT_USAGE, parse_options

log = logging.getLogger("fedllm.server")

TOKEN_COMMANDS = ("add-client", "add-admin", "add-viewer", "revoke")


def report_dir(server: ServerArguments) -> Path:
    return Path(server.report_dir or server.state_dir)


def build_app(server: ServerArguments):
    """The WSGI app over ``server.state_dir`` (called once in each worker process)."""
    federation = Federation(Store(server.state_dir), output_dir=server.output_dir,
                            max_upload_bytes=int(server.max_upload_mb * (1 << 20)))
    tokens = TokenRegistry(server.auth_tokens) if server.auth_tokens else None
    limiter = RateLimiter(federation.store.root / "ratelimit.db", server.rate_limit)
    app = create_app(federation, tokens, rate_limiter=limiter)
    if server.report_to != "none":
        RoundReporter(federation, server.report_to, report_dir(server)).attach()
    return app


def split_max_body_bytes(config: FederationArguments) -> int:
    """--fed_mode split: the largest split message (hidden states of MAX_ROWS full rows); 0 otherwise."""
    if not config.split_enabled:
        return 0
    from ..split.server import message_shape

    return message_shape(config).max_bytes()


def connection_limits(server: ServerArguments):
    """The workers' per-connection deadlines, and the largest body worth reading (the federation's upload limit)."""
    from ..server.worker import ConnectionLimits, clear_spool

    store = Store(server.state_dir)
    try:
        federation = Federation(store, max_upload_bytes=int(server.max_upload_mb * (1 << 20)))
        clear_spool(store.incoming_dir)
        return ConnectionLimits(header_timeout=server.header_timeout, min_body_rate=server.min_body_rate_kib * 1024,
                                body_rate_window=server.body_rate_window,
                                max_body_bytes=max(federation.max_upload_bytes, split_max_body_bytes(federation.config)),
                                spool_dir=str(store.incoming_dir))
    finally:
        store.close()


def manage_tokens(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"fedllm server {argv[0]}")
    parser.add_argument("--auth_tokens", required=True, help="tokens file (created if missing)")
    if argv[0] in ("add-client", "revoke"):
        parser.add_argument("--client_id", required=True)
    args = parser.parse_args(argv[1:])
    client_id = getattr(args, "client_id", None)
    if client_id is not None and not CLIENT_ID_RE.fullmatch(client_id):
        parser.error("client ids are 1-64 characters: letters, digits, '.', '_', '-'")
    if argv[0] == "revoke":
        if not revoke_token(args.auth_tokens, client_id):
            print(f"error: {args.auth_tokens} has no token for client {client_id!r}", file=sys.stderr)
            return EXIT_USAGE
        print(f"revoked the token of client {client_id!r}; every worker refuses it from its next request on",
              file=sys.stderr)
        return EXIT_OK
    role = {"add-admin": ADMIN, "add-viewer": VIEWER}.get(argv[0], CLIENT)
    token = add_token(args.auth_tokens, client_id, role)
    who = f"client {client_id!r}" if client_id else f"the {role}"
    print(f"Token for {who} (shown once; only its hash is stored in {args.auth_tokens}):", file=sys.stderr)
    print(token)
    return EXIT_OK


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


def main(argv: list[str] | None = None) -> int:
    """``server_http.py``: the token commands, or the server (Flask's development server unless --use_gunicorn)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOKEN_COMMANDS:
        return manage_tokens(argv)
    federation_args, server = parse_options((FederationArguments, ServerArguments), argv)
    setup_logging(server.log_level, server.log_format)
    try:
        check_transport(server)
        lock_state_dir(server.state_dir)  # held until this process (the gunicorn master) exits
        config = Federation.initialize(federation_args, server.state_dir)
    except (ValueError, StateDirInUse) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if config.split_enabled and server.workers != 1:
        # The middle model, its optimizer and the steps' graphs live in one process; its threads serve the clients.
        log.warning("--fed_mode split: serving with 1 gunicorn worker (not --workers %d) and %d threads",
                    server.workers, server.threads)
        server.workers = 1
    if server.auth_tokens and not server.certfile and not is_loopback(server.host):
        log.warning("--allow_insecure_http: tokens cross the network to %s in cleartext", server.host)
    if not server.auth_tokens:
        log.warning("!" * 72)
        log.warning("NO AUTHENTICATION: anyone who reaches %s:%d can join and push updates.", server.host, server.port)
        log.warning("Use --auth_tokens FILE (and 'fedllm server add-client') for anything but a closed network.")
        log.warning("!" * 72)
    log.info("federation: %s, %d clients, %d sampled per round, %d rounds, state in %s",
             config.fed_alg, config.num_clients, config.sample_clients, config.num_rounds, server.state_dir)
    # Before any worker imports prometheus_client: every worker's counters go to one fresh folder.
    prepare_multiprocess_dir(server.state_dir)
    if server.report_to != "none":
        problem = missing_package(server.report_to)
        if problem:
            log.warning("%s; not reporting rounds", problem)
            server.report_to = "none"  # before the workers fork: none of them opens a tracker
        else:
            log.info("reporting each aggregated round to %s in %s", server.report_to, report_dir(server))
    if server.use_gunicorn:
        from ..server import worker
        from ..server.gunicorn_app import GunicornServer

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
    return EXIT_OK


def gunicorn_main(argv: list[str] | None = None) -> int:
    """``fedllm server``: :func:`main` serving with gunicorn unless told otherwise (``--use_gunicorn false``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main(argv if argv and argv[0] in TOKEN_COMMANDS else ["--use_gunicorn", *argv])
