"""`llamapool serve | check-config | bench`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from llamapool.admin_client import add_admin_commands
from llamapool.config import ConfigError, load_config

LEVELS = ["debug", "info", "warning", "error", "critical"]


def _setup_logging(args: argparse.Namespace) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(args.log_level.upper())
    console.setFormatter(fmt)
    root.addHandler(console)
    level = logging.getLevelName(args.log_level.upper())
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        file_handler = logging.FileHandler(Path(args.log_dir) / "llamapool.log")
        file_handler.setLevel(args.file_log_level.upper())
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
        level = min(level, logging.getLevelName(args.file_log_level.upper()))
    root.setLevel(level)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            super().handle_exit(sig, frame)
            # A SIGTERM/SIGINT asks for a graceful stop: exit 0 when it is done
            # instead of uvicorn re-raising the signal (exit -15).
            captured = getattr(self, "_captured_signals", None)
            if captured is not None:
                captured.clear()

    from llamapool.router.app import create_app
    from llamapool.router.auth import DEFAULT_STATE_DIR, load_admin_token

    _setup_logging(args)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"llamapool: {exc}", file=sys.stderr)
        return 2
    for model_id, reason in config.broken.items():
        print(f"llamapool: model {model_id!r} will not be served: {reason}", file=sys.stderr)
    try:
        admin_token, token_path = load_admin_token(
            config.admin.token_file,
            state_dir=config.admin.state_dir or DEFAULT_STATE_DIR,
        )
    except ConfigError as exc:
        print(f"llamapool: {exc}", file=sys.stderr)
        return 2
    if token_path is not None:
        logging.getLogger("llamapool").warning(
            "admin token generated and written to %s (mode 0600)", token_path
        )
    worker_log = None
    if args.log_dir:
        worker_log = open(Path(args.log_dir) / "workers.log", "ab", buffering=0)  # noqa: SIM115
    app = create_app(
        config, admin_token=admin_token, log_level=args.log_level.upper(), worker_log=worker_log
    )
    server = _Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_config=None,
            access_log=args.access_log,
            log_level=args.log_level,
            timeout_graceful_shutdown=int(config.pool.grace) or None,
        )
    )
    server.run()
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamapool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the models of a models.yaml")
    serve.add_argument("--config", default="models.yaml", help="path to models.yaml")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
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
