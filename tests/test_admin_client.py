"""The admin CLI against a fake admin API served by a real uvicorn on a free port."""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

import pytest
import uvicorn
from serverutil import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llamapool import admin_client
from llamapool.admin_client import (
    add_admin_commands,
    format_bytes,
    format_cores,
    format_duration,
    render_pool,
    worker_cores,
)
from llamapool.router.auth import ADMIN_TOKEN_ENV, BearerAuth

TOKEN = "test-admin-token"
NOW = 1_700_000_000.0

POOL: dict[str, Any] = {
    "models": [
        {
            "id": "tiny",
            "state": "READY",
            "instances": {"wanted": 2, "live": 2},
            "queue_depth": 3,
            "oldest_wait_s": 1.25,
            "last_error": None,
        },
        {
            "id": "broken",
            "state": "FAILED",
            "instances": {"wanted": 1, "live": 0},
            "queue_depth": 0,
            "oldest_wait_s": None,
            "last_error": "cannot load /nope.gguf: no such file",
        },
    ],
    "workers": [
        {
            "id": "w1",
            "model": "tiny",
            "pid": 4242,
            "state": "BUSY",
            "cores": [0, 1, 2, 5],
            "rss": 300 * 1024 * 1024,
            "pss": 120 * 1024 * 1024,
            "uptime_s": 3725,
            "served": 17,
            "restarts": 1,
            "last_transition": {"state": "BUSY", "reason": "serving r-9", "at": NOW - 4},
        }
    ],
}

MODELS = {"tiny", "a/b"}


async def pool(request: Request) -> JSONResponse:
    return JSONResponse(POOL)


async def scale(request: Request) -> JSONResponse:
    model = request.path_params["model"]
    request.app.state.calls.append((model, await request.json()))
    if model not in MODELS:
        body = {"message": f"model {model!r} is not configured", "code": "model_not_found"}
        return JSONResponse({"error": {**body, "type": "invalid_request_error"}}, 404)
    instances = (await request.json())["instances"]
    return JSONResponse({"id": model, "instances": {"wanted": instances, "live": 1}})


async def reload(request: Request) -> JSONResponse:
    if request.app.state.reload_fails:
        error = {
            "message": "models.yaml has 2 problems; nothing was changed",
            "type": "invalid_request_error",
            "code": "invalid_config",
            "errors": ["model 'x': unknown key 'n_cxt'", "model 'y': missing model_path"],
        }
        return JSONResponse({"error": error}, 400)
    result = {"added": ["new"], "removed": [], "changed": ["tiny"], "unchanged": ["b"]}
    return JSONResponse({**result, "warnings": request.app.state.reload_warnings})


@pytest.fixture(scope="module")
def server():
    """A fake admin API behind the real BearerAuth, served on a free port in a thread."""
    app = Starlette(
        routes=[
            Route("/admin/pool", pool),
            Route("/admin/models/{model:path}/scale", scale, methods=["POST"]),
            Route("/admin/reload", reload, methods=["POST"]),
        ]
    )
    app.state.calls = []
    app.state.reload_fails = False
    app.state.reload_warnings = []
    port = free_port()
    config = uvicorn.Config(
        BearerAuth(app, admin_token=TOKEN), port=port, lifespan="off", ws="none", log_config=None
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "fake admin server did not start"
        time.sleep(0.01)
    yield app, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def token_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    path = tmp_path / "admin.token"
    path.write_text(TOKEN + "\n")
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="llamapool")
    add_admin_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_ps_prints_models_then_workers(server, token_file, capsys):
    _, url = server
    code, out, err = run(capsys, "ps", "--url", url, "--token-file", str(token_file))
    assert (code, err) == (0, "")
    models, workers = out.strip().split("\n\n")
    assert models.splitlines()[0].split() == [
        *("MODEL", "STATE", "LIVE/WANTED", "QUEUE", "OLDEST", "WAIT", "LAST", "ERROR"),
    ]
    assert models.splitlines()[1].split() == ["tiny", "READY", "2/2", "3", "1.2s", "-"]
    assert "broken  FAILED  0/1" in models
    assert "cannot load /nope.gguf: no such file" in models
    row = workers.splitlines()[1]
    assert row.split()[:10] == [
        *("w1", "tiny", "4242", "BUSY", "0-2,5", "300.0", "MiB", "120.0", "MiB", "1h02m"),
    ]
    assert "BUSY: serving r-9 (" in row


def test_ps_json_and_env_token(server, monkeypatch, capsys):
    _, url = server
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    monkeypatch.setattr(admin_client, "DEFAULT_TOKEN_FILE", admin_client.Path("/nonexistent"))
    code, out, _ = run(capsys, "ps", "--url", url, "--json")
    assert code == 0
    assert json.loads(out) == POOL


def test_wrong_token_is_an_error(server, tmp_path, capsys):
    _, url = server
    bad = tmp_path / "bad.token"
    bad.write_text("nope")
    code, out, err = run(capsys, "ps", "--url", url, "--token-file", str(bad))
    assert code == 1 and out == ""
    assert "HTTP 401: invalid token" in err
    assert f"check {ADMIN_TOKEN_ENV} or --token-file" in err
    assert "nope" not in err


def test_no_token_anywhere(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    missing = tmp_path / "admin.token"
    monkeypatch.setattr(admin_client, "DEFAULT_TOKEN_FILE", missing)
    code, out, err = run(capsys, "ps", "--url", "http://127.0.0.1:9")
    assert code == 2 and out == ""
    assert f"no admin token: {missing} does not exist" in err
    assert ADMIN_TOKEN_ENV in err


def test_scale(server, token_file, capsys):
    app, url = server
    code, out, err = run(
        capsys, "scale", "tiny", "3", "--url", url, "--token-file", str(token_file)
    )
    assert (code, err) == (0, "")
    assert out.strip() == "tiny: 3 instances wanted, 1 live now"
    assert app.state.calls[-1] == ("tiny", {"instances": 3})


def test_scale_quotes_the_model_id(server, token_file, capsys):
    app, url = server
    code, _, _ = run(capsys, "scale", "a/b", "0", "--url", url, "--token-file", str(token_file))
    assert code == 0
    assert app.state.calls[-1] == ("a/b", {"instances": 0})


def test_scale_unknown_model_prints_the_server_message(server, token_file, capsys):
    _, url = server
    code, out, err = run(
        capsys, "scale", "nope", "1", "--url", url, "--token-file", str(token_file)
    )
    assert code == 1 and out == ""
    assert err.strip() == "llamapool: HTTP 404: model 'nope' is not configured"


def test_scale_refuses_a_negative_count(capsys):
    with pytest.raises(SystemExit) as exc:
        run(capsys, "scale", "tiny", "-1")
    assert exc.value.code == 2
    assert "instances must be 0 or more" in capsys.readouterr().err


def test_reload(server, token_file, capsys):
    app, url = server
    app.state.reload_fails = False
    code, out, err = run(capsys, "reload", "--url", url, "--token-file", str(token_file))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "added:     new",
        "removed:   -",
        "changed:   tiny",
        "unchanged: b",
    ]


def test_reload_prints_the_warnings(server, token_file, capsys):
    app, url = server
    warning = "the pool: block changed; it takes effect at the next restart"
    app.state.reload_warnings = [warning]
    try:
        code, out, err = run(capsys, "reload", "--url", url, "--token-file", str(token_file))
    finally:
        app.state.reload_warnings = []
    assert (code, err) == (0, "")
    assert out.splitlines()[-2:] == ["unchanged: b", f"warning:   {warning}"]


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_timeout_must_be_positive(capsys, value):
    with pytest.raises(SystemExit) as exc:
        run(capsys, "ps", "--timeout", value)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --timeout: '{value}': the timeout must be a finite number of" in err


def test_timeout_must_be_a_number(capsys):
    with pytest.raises(SystemExit) as exc:
        run(capsys, "ps", "--timeout", "soon")
    assert exc.value.code == 2
    assert "argument --timeout: 'soon' is not a number of seconds" in capsys.readouterr().err


def test_a_fractional_timeout(server, token_file, capsys):
    _, url = server
    code, _, err = run(
        capsys, "ps", "--url", url, "--token-file", str(token_file), "--timeout", "2.5"
    )
    assert (code, err) == (0, "")


def test_a_non_ascii_token_is_a_clear_error(server, monkeypatch, tmp_path, capsys):
    _, url = server
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "tökén")
    code, out, err = run(capsys, "ps", "--url", url)
    assert (code, out) == (2, "")
    assert f"the admin token in ${ADMIN_TOKEN_ENV} is not printable ASCII" in err
    monkeypatch.delenv(ADMIN_TOKEN_ENV)
    path = tmp_path / "admin.token"
    path.write_text("tök\x07én\n")
    code, out, err = run(capsys, "ps", "--url", url, "--token-file", str(path))
    assert (code, out) == (2, "")
    assert f"the admin token in admin token file {path} is not printable ASCII" in err


def test_reload_validation_errors(server, token_file, capsys):
    app, url = server
    app.state.reload_fails = True
    try:
        code, out, err = run(capsys, "reload", "--url", url, "--token-file", str(token_file))
    finally:
        app.state.reload_fails = False
    assert code == 1 and out == ""
    assert err.splitlines() == [
        "llamapool: HTTP 400: models.yaml has 2 problems; nothing was changed",
        "  model 'x': unknown key 'n_cxt'",
        "  model 'y': missing model_path",
    ]


def test_connection_refused_gives_a_hint(token_file, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "ps", "--url", url, "--token-file", str(token_file))
    assert code == 1 and out == ""
    assert f"cannot connect to {url} (connection refused)" in err
    assert "is `llamapool serve` running there?" in err


def test_formatters():
    assert format_bytes(None) == "-"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"
    assert format_duration(None) == "-"
    assert format_duration(2.34) == "2.3s"
    assert format_duration(42) == "42s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3725) == "1h02m"
    assert format_duration(90000) == "1d01h"
    assert format_cores([3, 0, 1, 2, 7, 9, 10]) == "0-3,7,9-10"
    assert format_cores([4]) == "4"
    assert format_cores(None) == "-"


def test_render_pool_tolerates_missing_fields():
    text = render_pool({"models": [{"id": "m"}], "workers": [{"id": "w"}]}, now=NOW)
    assert text.splitlines()[1].split() == ["m", "-", "-/-", "-", "-", "-"]
    assert text.splitlines()[-1].split()[0] == "w"
    assert render_pool({}, now=NOW) == "no models\n\nno workers"


def test_reload_names_the_failed_models_it_retried():
    from llamapool.admin_client import render_reload

    body = {"added": [], "removed": [], "changed": [], "unchanged": ["a", "b"], "retried": ["b"]}
    assert render_reload(body).splitlines()[-1] == "retried:   b"
    assert "retried" not in render_reload({**body, "retried": []})


def test_render_pool_shows_gpus_only_where_there_are_some():
    assert "VRAM" not in render_pool(POOL, now=NOW)
    worker = {**POOL["workers"][0], "gpu": 1, "vram": {"1": 700 * 1024 * 1024}}
    spread = {**POOL["workers"][0], "id": "w2", "gpu": None, "vram": {"0": 1 << 30, "1": 1 << 30}}
    text = render_pool({"models": [], "workers": [worker, spread]}, now=NOW)
    header, first, second = text.splitlines()[2:5]
    assert header.split()[6:9] == ["PSS", "GPU", "VRAM"]
    at = header.index("GPU")
    assert first[at:].startswith(f"1    {format_bytes(700 * 1024 * 1024)}")
    assert f"-    0:{format_bytes(1 << 30)} 1:{format_bytes(1 << 30)}" in second


def test_the_cores_cell_shows_borrowed_and_lent_cores():
    borrowing = {"cores": [0], "elastic": {"state": "borrowing", "cores": [0, 1, 2]}}
    assert worker_cores(borrowing) == "0+1-2"
    assert worker_cores({"cores": [1], "elastic": {"state": "lent", "cores": [1]}}) == "1 (lent)"
    assert worker_cores({"cores": [1], "elastic": {"state": "own", "cores": [1]}}) == "1"
    assert worker_cores({"cores": [3], "elastic": None}) == "3"
    # Its widened decodes were slower than at home: it runs its own thread only.
    declined = {"state": "borrowing", "cores": [0, 1], "n_threads": 2, "decode_threads": 1}
    assert worker_cores({"cores": [0], "n_threads": 1, "elastic": declined}) == "0+1 (unused)"
    running = dict(declined, decode_threads=2)
    assert worker_cores({"cores": [0], "n_threads": 1, "elastic": running}) == "0+1"
