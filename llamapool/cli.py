"""`llamapool serve | check-config | bench`."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from pathlib import Path
from typing import IO

from llamapool.admin_client import add_admin_commands
from llamapool.config import Config, ConfigError, load_config

LEVELS = ["debug", "info", "warning", "error", "critical"]


def _setup_logging(args: argparse.Namespace) -> IO[bytes] | None:
    """Log to the console and, with --log-dir, to `llamapool.log` there; returns
    `workers.log` opened for the workers' output. Raises OSError for an unusable dir."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(args.log_level.upper())
    console.setFormatter(fmt)
    root.addHandler(console)
    level = logging.getLevelName(args.log_level.upper())
    worker_log = None
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        file_handler = logging.FileHandler(Path(args.log_dir) / "llamapool.log")
        file_handler.setLevel(args.file_log_level.upper())
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
        level = min(level, logging.getLevelName(args.file_log_level.upper()))
        worker_log = open(Path(args.log_dir) / "workers.log", "ab", buffering=0)  # noqa: SIM115
    root.setLevel(level)
    return worker_log


def _log_dir_error(path: str, exc: OSError) -> str:
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        return f"--log-dir {path} is not a directory"
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != path else ""
    return f"cannot write logs to --log-dir {path}{where}: {exc.strerror}"


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port`.

    One address, as uvicorn binds one for its own workers: a name's IPv4 address where it
    has one (so "localhost" is 127.0.0.1), else its first (an IPv6-only name, "::1").
    """
    try:
        families = [info[0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    except socket.gaierror:
        families = []  # create_server says why
    family = socket.AF_INET if socket.AF_INET in families or not families else families[0]
    # The backlog uvicorn listens with itself: a burst of connections (the 200-request
    # stress) must queue, not see its SYNs dropped and retried a second later.
    return socket.create_server((host, port), family=family, backlog=2048)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _serve(args: argparse.Namespace) -> int:
    from llamapool.router.auth import DEFAULT_STATE_DIR, load_admin_token

    try:
        worker_log = _setup_logging(args)
    except OSError as exc:
        print(f"llamapool: {_log_dir_error(args.log_dir, exc)}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"llamapool: {exc}", file=sys.stderr)
        return 2
    for model_id, reason in config.broken.items():
        print(f"llamapool: model {model_id!r} will not be served: {reason}", file=sys.stderr)
    # Bind before the token is written: a server that cannot listen (the port is another
    # server's) must leave that server's token file as it found it.
    try:
        sock = _listen(args.host, args.port)
    except OSError as exc:
        # create_server's message repeats the address; a positive errno names the cause alone.
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else str(exc)
        in_use = exc.errno == errno.EADDRINUSE
        print(
            f"llamapool: cannot listen on {args.host}:{args.port}: {reason}"
            + ("; is another server running there? Pick another --port" if in_use else ""),
            file=sys.stderr,
        )
        return 3
    with sock:
        try:
            admin = load_admin_token(
                config.admin.token_file,
                state_dir=config.admin.state_dir or DEFAULT_STATE_DIR,
                port=sock.getsockname()[1],
            )
        except ConfigError as exc:
            print(f"llamapool: {exc}", file=sys.stderr)
            return 2
        try:
            if admin.path is not None:
                _log_token_file(admin.path, sock)
            return _run(args, config, sock, admin_token=admin.token, worker_log=worker_log)
        finally:
            admin.release()


def _log_token_file(path: Path, sock: socket.socket) -> None:
    from llamapool.router.auth import ADMIN_TOKEN_FILE

    log = logging.getLogger("llamapool")
    log.warning("admin token generated and written to %s (mode 0600)", path)
    if path.name != ADMIN_TOKEN_FILE:
        log.warning(
            "%s belongs to another running server; talk to this one with "
            "`llamapool ps --url %s --token-file %s`",
            path.with_name(ADMIN_TOKEN_FILE),
            _url(sock),
            path,
        )


def _run(
    args: argparse.Namespace,
    config: Config,
    sock: socket.socket,
    *,
    admin_token: str,
    worker_log: IO[bytes] | None,
) -> int:
    """Serve the pool on `sock` until SIGTERM/SIGINT; 0 once stopped cleanly."""
    import uvicorn

    from llamapool.router.app import create_app

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            super().handle_exit(sig, frame)
            # A SIGTERM/SIGINT asks for a graceful stop: exit 0 when it is done
            # instead of uvicorn re-raising the signal (exit -15).
            captured = getattr(self, "_captured_signals", None)
            if captured is not None:
                captured.clear()

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            # uvicorn logs the address only of sockets it bound itself.
            logging.getLogger("llamapool").info("serving on %s (Ctrl-C to stop)", _url(sock))

    app = create_app(
        config, admin_token=admin_token, log_level=args.log_level.upper(), worker_log=worker_log
    )
    server = _Server(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=args.access_log,
            log_level=args.log_level,
            # uvicorn hands this to asyncio.wait_for, which takes float seconds: 0 cuts
            # running requests at once (None would wait for them forever).
            timeout_graceful_shutdown=config.pool.grace,  # type: ignore[arg-type]
        )
    )
    server.run(sockets=[sock])
    return 0 if server.started else 1


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"llamapool: {exc}", file=sys.stderr)
        return 2
    for model_id in config.models:
        print(f"ok: {model_id}")
    for reason in config.broken.values():
        print(f"error: {reason}", file=sys.stderr)
    return 1 if config.broken else 0


def _bench(args: argparse.Namespace) -> int:
    from benchmarks.cli import run

    return run(args)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0..65535; 0 picks a free one)")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamapool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the models of a models.yaml")
    serve.add_argument("--config", default="models.yaml", help="path to models.yaml")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument(
        "--port", type=_port, default=8080, help="TCP port, 0..65535 (0: any free port)"
    )
    serve.add_argument("--log-level", default="info", choices=LEVELS)
    serve.add_argument("--file-log-level", default="debug", choices=LEVELS)
    serve.add_argument("--log-dir", default=None, help="write llamapool.log and workers.log here")
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per HTTP request (off by default: it adds ~1.5 ms to every "
        "response's first byte; /metrics counts requests by model and status)",
    )
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate a models.yaml and exit")
    check.add_argument("--config", default="models.yaml")
    check.set_defaults(func=_check_config)

    add_admin_commands(sub)

    bench = sub.add_parser("bench", help="benchmark the pool against baselines")
    try:
        from benchmarks.cli import configure_parser
    except ImportError:
        configure_parser = None
    if configure_parser is not None:
        configure_parser(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
