"""`llamapool ps | scale | reload`: talk to a running server's admin API.

Exit status: 0 done, 1 the server refused or could not be reached, 2 no usable admin token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import httpx

from llamapool.config import header_safe
from llamapool.router.auth import ADMIN_TOKEN_ENV, ADMIN_TOKEN_FILE, DEFAULT_STATE_DIR

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TOKEN_FILE = DEFAULT_STATE_DIR / ADMIN_TOKEN_FILE


class AdminError(Exception):
    """The admin call failed; `message` is what to show the user."""

    def __init__(self, message: str, *, details: Sequence[str] = ()):
        super().__init__(message)
        self.message = message
        self.details = list(details)


class TokenError(AdminError):
    """No admin token in the flag, the environment or the default file, or one that an
    HTTP header cannot carry."""


def resolve_token(token_file: str | None) -> str:
    """The admin token: `--token-file` if given, else `$LLAMAPOOL_ADMIN_TOKEN`, else the
    file the server writes by default."""
    if token_file is None:
        from_env = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
        if from_env:
            return _sendable(from_env, f"${ADMIN_TOKEN_ENV}")
    path = Path(token_file) if token_file is not None else DEFAULT_TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise TokenError(
            f"no admin token: {path} does not exist; set {ADMIN_TOKEN_ENV} or pass "
            "--token-file (the server logs where it wrote its token at start)"
        ) from None
    except OSError as exc:
        raise TokenError(f"cannot read admin token file {path}: {exc.strerror}") from None
    if not token:
        raise TokenError(f"admin token file {path} is empty")
    return _sendable(token, f"admin token file {path}")


def _sendable(token: str, source: str) -> str:
    # httpx encodes header values as ASCII; a control character would break the header.
    if not header_safe(token):
        raise TokenError(
            f"the admin token in {source} is not printable ASCII, so it cannot be sent in "
            "an Authorization header; use a token of letters, digits, - and _"
        )
    return token


class AdminClient:
    """A thin client for the `/admin` API; `transport` lets tests inject one."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def pool(self) -> dict[str, Any]:
        """`GET /admin/pool`: models and workers."""
        return self._call("GET", "/admin/pool")

    def scale(self, model: str, instances: int) -> dict[str, Any]:
        """`POST /admin/models/{model}/scale`."""
        path = f"/admin/models/{quote(model, safe='')}/scale"
        return self._call("POST", path, json={"instances": instances})

    def reload(self) -> dict[str, Any]:
        """`POST /admin/reload`: re-read models.yaml on the server."""
        return self._call("POST", "/admin/reload")

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise AdminError(
                f"cannot connect to {self.url} ({_reason(exc)}); is `llamapool serve` "
                "running there? Pass --url to point elsewhere"
            ) from None
        except httpx.TimeoutException:
            raise AdminError(f"{self.url} did not answer {method} {path} in time") from None
        except httpx.HTTPError as exc:
            raise AdminError(f"{method} {path} failed: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success and isinstance(body, dict):
            return body
        if response.is_success:
            raise AdminError(f"{method} {path}: the server sent something other than JSON")
        raise _error_from(response, body)


def _reason(exc: httpx.ConnectError) -> str:
    text = str(exc)
    return "connection refused" if "refused" in text.lower() or not text else text


def _error_from(response: httpx.Response, body: Any) -> AdminError:
    status = response.status_code
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or err.get("code") or "no message")
        raw = err.get("errors") or err.get("details") or []
    elif isinstance(err, str):
        message, raw = err, []
    else:
        message, raw = response.text.strip()[:500] or response.reason_phrase, []
    if isinstance(body, dict) and not raw:
        raw = body.get("errors") or []
    details = [raw] if isinstance(raw, str) else [str(d) for d in raw]
    if status == 401:
        message += f"; check {ADMIN_TOKEN_ENV} or --token-file"
    return AdminError(f"HTTP {status}: {message}", details=details)


# -- formatting -----------------------------------------------------------------


def format_bytes(n: Any) -> str:
    """`1536` → `1.5 KiB`; `-` when unknown."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: Any) -> str:
    """`3725` → `1h02m`; `-` when unknown."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_cores(cores: Any) -> str:
    """`[0, 1, 2, 5]` → `0-2,5`."""
    if not isinstance(cores, list) or not cores:
        return "-"
    nums = sorted(c for c in cores if isinstance(c, int))
    runs: list[str] = []
    start = prev = None
    for c in [*nums, None]:
        if start is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            runs.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = c
    return ",".join(runs)


def worker_cores(w: dict[str, Any]) -> str:
    """A worker's CORES cell: its own cores, `+` the ones it borrows (`(unused)` when its
    widened decodes were slower than at home), or `(lent)`."""
    home = format_cores(w.get("cores"))
    elastic = w.get("elastic")
    if not isinstance(elastic, dict):
        return home
    if elastic.get("state") == "lent":
        return f"{home} (lent)"
    now = elastic.get("cores")
    if isinstance(now, list) and isinstance(w.get("cores"), list):
        extra = [c for c in now if c not in w["cores"]]
        if extra:
            unused = elastic.get("decode_threads", 0) == w.get("n_threads")
            return f"{home}+{format_cores(extra)}" + (" (unused)" if unused else "")
    return home


def _transition(t: Any, now: float) -> str:
    if not isinstance(t, dict):
        return "-"
    text = str(t.get("state") or "?")
    if t.get("reason"):
        text += f": {t['reason']}"
    at = t.get("at")
    if isinstance(at, (int, float)) and not isinstance(at, bool):
        text += f" ({format_duration(now - at)} ago)"
    return text


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned plain-text columns; the last column is never padded."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = []
    for row in (headers, *rows):
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _format_vram(vram: Any) -> str:
    """A worker's VRAM: one GPU's bytes, or `gpu:bytes` for each of several."""
    if not isinstance(vram, dict) or not vram:
        return "-"
    if len(vram) == 1:
        return format_bytes(next(iter(vram.values())))
    return " ".join(f"{gpu}:{format_bytes(n)}" for gpu, n in sorted(vram.items()))


def render_pool(pool: dict[str, Any], *, now: float | None = None) -> str:
    """The `llamapool ps` text for a `GET /admin/pool` body: models, then workers."""
    now = time.time() if now is None else now
    models = pool.get("models") or []
    workers = pool.get("workers") or []
    model_rows = []
    for m in models:
        inst = m.get("instances") or {}
        model_rows.append(
            [
                _cell(m.get("id")),
                _cell(m.get("state")),
                f"{_cell(inst.get('live'))}/{_cell(inst.get('wanted'))}",
                _cell(m.get("queue_depth")),
                format_duration(m.get("oldest_wait_s")),
                _cell(m.get("last_error")),
            ]
        )
    # GPU columns only where a worker has a GPU or VRAM to show: CPU pools read as before.
    gpus = any(w.get("gpu") is not None or w.get("vram") for w in workers)
    worker_rows = [
        [
            _cell(w.get("id")),
            _cell(w.get("model")),
            _cell(w.get("pid")),
            _cell(w.get("state")),
            worker_cores(w),
            format_bytes(w.get("rss")),
            format_bytes(w.get("pss")),
            *([_cell(w.get("gpu")), _format_vram(w.get("vram"))] if gpus else []),
            format_duration(w.get("uptime_s")),
            _cell(w.get("served")),
            _cell(w.get("restarts")),
            _transition(w.get("last_transition"), now),
        ]
        for w in workers
    ]
    parts = []
    if model_rows:
        headers = ["MODEL", "STATE", "LIVE/WANTED", "QUEUE", "OLDEST WAIT", "LAST ERROR"]
        parts.append(render_table(headers, model_rows))
    else:
        parts.append("no models")
    if worker_rows:
        headers = [
            *("WORKER", "MODEL", "PID", "STATE", "CORES", "RSS", "PSS"),
            *(("GPU", "VRAM") if gpus else ()),
            *("UPTIME", "SERVED", "RESTARTS", "LAST TRANSITION"),
        ]
        parts.append(render_table(headers, worker_rows))
    else:
        parts.append("no workers")
    return "\n\n".join(parts)


def render_reload(result: dict[str, Any]) -> str:
    """One line per kind of change in a `POST /admin/reload` body, then its warnings."""
    lines = []
    for key in ("added", "removed", "changed", "unchanged"):
        names = result.get(key) or []
        lines.append(f"{key + ':':<10} {', '.join(map(str, names)) if names else '-'}")
    if result.get("retried"):  # FAILED models tried again
        lines.append(f"{'retried:':<10} {', '.join(map(str, result['retried']))}")
    warnings = result.get("warnings") or []
    for warning in [warnings] if isinstance(warnings, str) else warnings:
        lines.append(f"{'warning:':<10} {warning}")
    return "\n".join(lines)


# -- commands -------------------------------------------------------------------


def _run(
    args: argparse.Namespace,
    action: Callable[[AdminClient], str],
    out: TextIO | None,
    err: TextIO | None,
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        token = resolve_token(args.token_file)
        with AdminClient(args.url, token, timeout=args.timeout) as client:
            text = action(client)
    except TokenError as exc:
        print(f"llamapool: {exc.message}", file=err)
        return 2
    except AdminError as exc:
        print(f"llamapool: {exc.message}", file=err)
        for line in exc.details:
            print(f"  {line}", file=err)
        return 1
    print(text, file=out)
    return 0


def cmd_ps(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`llamapool ps`: list models and workers."""

    def action(client: AdminClient) -> str:
        pool = client.pool()
        return json.dumps(pool, indent=2) if args.json else render_pool(pool)

    return _run(args, action, out, err)


def cmd_scale(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """`llamapool scale MODEL N`: set a model's wanted instance count."""

    def action(client: AdminClient) -> str:
        result = client.scale(args.model, args.instances)
        inst = result.get("instances")
        if isinstance(inst, dict):
            live = f", {inst['live']} live now" if "live" in inst else ""
            return f"{args.model}: {inst.get('wanted', args.instances)} instances wanted{live}"
        return f"{args.model}: {args.instances} instances wanted"

    return _run(args, action, out, err)


def cmd_reload(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """`llamapool reload`: make the server re-read its models.yaml."""
    return _run(args, lambda client: render_reload(client.reload()), out, err)


def _non_negative(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError("instances must be 0 or more")
    return n


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the timeout must be a finite number of seconds above 0"
        )
    return seconds


def add_admin_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `ps`, `scale` and `reload` to a CLI's subparsers; each sets `func(args) -> int`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    common.add_argument(
        "--token-file",
        default=None,
        help=f"admin token file (default: ${ADMIN_TOKEN_ENV}, else {DEFAULT_TOKEN_FILE})",
    )
    common.add_argument("--timeout", type=_seconds, default=30.0, help="seconds (default 30)")

    ps = subparsers.add_parser("ps", parents=[common], help="list the pool's models and workers")
    ps.add_argument("--json", action="store_true", help="print the raw JSON")
    ps.set_defaults(func=cmd_ps)

    scale = subparsers.add_parser("scale", parents=[common], help="set a model's instances")
    scale.add_argument("model", help="model id")
    scale.add_argument("instances", type=_non_negative, help="wanted instance count")
    scale.set_defaults(func=cmd_scale)

    reload = subparsers.add_parser("reload", parents=[common], help="re-read models.yaml")
    reload.set_defaults(func=cmd_reload)
