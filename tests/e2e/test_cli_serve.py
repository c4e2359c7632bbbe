"""`llamapool serve` flags and start-up: log files, log levels, the port, the admin token
file, unusable directories, the shutdown grace."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from serverutil import TAG_ENV, chat, chat_body, is_content_line, model_entry, tagged_processes


def test_log_dir_gets_router_and_worker_logs(serve, tiny_gguf, tmp_path):
    logs = tmp_path / "logs"
    server = serve(
        [model_entry("m", tiny_gguf)],
        args=["--log-dir", str(logs), "--log-level", "warning", "--file-log-level", "debug"],
    )
    assert chat(server.url).status_code == 200
    router_log = (logs / "llamapool.log").read_text()
    assert "IDLE: ready in" in router_log  # INFO reaches the file at debug level...
    assert "BUSY: serving" in router_log  # ...and DEBUG too
    assert "IDLE: ready in" not in server.log_text()  # but not the console at warning
    assert (logs / "workers.log").exists()


def test_access_log_only_when_asked(serve, tiny_gguf):
    quiet = serve([model_entry("m", tiny_gguf)])
    assert chat(quiet.url).status_code == 200
    assert '"POST /v1/chat/completions HTTP/1.1" 200' not in quiet.log_text()
    loud = serve([model_entry("m", tiny_gguf)], args=["--access-log"])
    assert chat(loud.url).status_code == 200
    loud.wait_for(
        lambda: '"POST /v1/chat/completions HTTP/1.1" 200' in loud.log_text(),
        what="the access log line",
    )


# -- a serve that should not get far -------------------------------------------


def _serve_once(tmp_path: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    """Run `llamapool serve` (no admin token in the environment) until it exits, and fail
    if any process it started outlives it."""
    config_path = tmp_path / f"once-{uuid.uuid4().hex[:8]}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    tag = f"lp-once-{uuid.uuid4().hex[:12]}"
    env = {**os.environ, TAG_ENV: tag, "LLAMAPOOL_ADMIN_TOKEN": ""}
    try:
        return subprocess.run(
            [sys.executable, "-m", "llamapool", "serve", "--config", str(config_path), *args],
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
    finally:
        left = tagged_processes(tag)
        for proc in left:
            proc.kill()
        assert not left, f"processes left behind: {[p.pid for p in left]}"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _pool_status(url: str, token: str) -> int:
    return httpx.get(f"{url}/admin/pool", headers=_bearer(token), timeout=10).status_code


# -- the admin token file -------------------------------------------------------


def test_a_second_server_on_a_taken_port_leaves_the_token_file_alone(serve, tiny_gguf, tmp_path):
    state = tmp_path / "state"
    models = [model_entry("m", tiny_gguf)]
    admin = {"admin": {"state_dir": str(state)}}
    server = serve(models, extra=admin, env={"LLAMAPOOL_ADMIN_TOKEN": ""})
    token = (state / "admin.token").read_text().strip()
    assert _pool_status(server.url, token) == 200

    second = _serve_once(tmp_path, {"models": models, **admin}, "--port", str(server.port))
    assert second.returncode == 3, second.stderr
    assert f"cannot listen on 127.0.0.1:{server.port}: Address already in use" in second.stderr
    assert "Traceback" not in second.stderr
    assert (state / "admin.token").read_text().strip() == token
    assert sorted(p.name for p in state.iterdir()) == ["admin.token"]
    assert _pool_status(server.url, token) == 200


def test_servers_sharing_a_state_dir_keep_their_own_tokens(serve, tiny_gguf, tmp_path):
    # The default state dir, as `llamapool ps` finds it.
    env = {"LLAMAPOOL_ADMIN_TOKEN": "", "XDG_STATE_HOME": str(tmp_path)}
    state = tmp_path / "llamapool"
    models = [model_entry("m", tiny_gguf)]
    first = serve(models, env=env)
    first_token = (state / "admin.token").read_text().strip()
    second = serve(models, env=env)
    own_file = state / f"admin-{second.port}.token"
    assert f"`llamapool ps --url {second.url} --token-file {own_file}`" in second.log_text()
    second_token = own_file.read_text().strip()
    assert (state / "admin.token").read_text().strip() == first_token
    assert _pool_status(first.url, first_token) == 200
    assert _pool_status(second.url, second_token) == 200
    assert _pool_status(first.url, second_token) == 401

    # `llamapool ps` with its default token file reaches the first server.
    ps = subprocess.run(
        [sys.executable, "-m", "llamapool", "ps", "--url", first.url],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )
    assert ps.returncode == 0, ps.stderr

    # A dead server's file is free again: the next server takes admin.token over.
    assert first.stop() == 0
    third = serve(models, env=env)
    third_token = (state / "admin.token").read_text().strip()
    assert third_token != first_token
    assert _pool_status(third.url, third_token) == 200
    assert own_file.read_text().strip() == second_token


# -- flags and directories ------------------------------------------------------


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "http"])
def test_a_port_outside_0_to_65535_is_a_usage_error(tmp_path, tiny_gguf, port):
    run = _serve_once(tmp_path, {"models": [model_entry("m", tiny_gguf)]}, "--port", port)
    assert run.returncode == 2
    assert "argument --port" in run.stderr
    assert "Traceback" not in run.stderr


def test_port_0_serves_on_a_free_port_and_says_which(serve, tiny_gguf):
    server = serve([model_entry("m", tiny_gguf)], args=["--port", "0"], wait_ready=False)
    found = server.wait_for(
        lambda: re.search(r"serving on http://127\.0\.0\.1:(\d+) ", server.log_text()),
        what="the serving line",
    )
    server.port = int(found.group(1))
    assert server.port != 0
    server.ready()
    assert chat(server.url).status_code == 200


@pytest.mark.parametrize(
    ("where", "path"),
    [
        ("state_dir", "a-file"),
        ("state_dir", "/proc/llamapool-nope"),
        ("log_dir", "a-file"),
        ("log_dir", "/proc/llamapool-nope"),
    ],
)
def test_an_unusable_directory_is_a_one_line_error(tmp_path, tiny_gguf, where, path):
    if path == "a-file":
        path = str(tmp_path / "a-file")
        Path(path).write_text("not a directory")
    config = {"models": [model_entry("m", tiny_gguf)]}
    args = ["--port", "0"]
    if where == "state_dir":
        config["admin"] = {"state_dir": path}
    else:
        args += ["--log-dir", path]
    run = _serve_once(tmp_path, config, *args)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("llamapool: ") and path in lines[0]


# -- SIGTERM's grace --------------------------------------------------------------


def _stream_until_cut(server) -> threading.Thread:
    """A streamed chat read in the background, returned once its first token has come."""
    streaming = threading.Event()

    def stream() -> None:
        body = chat_body("m", "x", 64, stream=True)
        try:
            with httpx.stream(
                "POST", f"{server.url}/v1/chat/completions", json=body, timeout=60
            ) as r:
                for line in r.iter_lines():
                    if is_content_line(line):
                        streaming.set()
        except httpx.HTTPError:
            pass  # the server cut it, as it should

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    assert streaming.wait(30), server.log_text()
    return client


@pytest.mark.parametrize("grace", [0, 0.5])
def test_a_grace_under_a_second_is_honoured(serve, tiny_gguf, tmp_path, grace):
    # The worker's engine stalls after the first chunk: the request runs until the stall
    # watchdog (120 s), so only the grace can end the router's wait for it.
    server = serve(
        [model_entry("m", tiny_gguf)],
        pool={"grace": grace},
        env={"LLAMAPOOL_TEST_FAULT": "stall:1", "LLAMAPOOL_TEST_FAULT_FILE": str(tmp_path / "f")},
    )
    client = _stream_until_cut(server)
    server.proc.send_signal(signal.SIGTERM)
    # Measured: 0.3 s with grace 0, 1.4 s with 0.5; waiting forever would take 120 s.
    assert server.proc.wait(15) == 0, server.log_text()
    client.join(10)


# -- SIGHUP ---------------------------------------------------------------------


def test_sighup_reloads_models_and_api_keys(serve, tiny_gguf):
    server = serve([model_entry("m", tiny_gguf)], extra={"api_keys": ["old-key"]})
    config_path = Path(server.proc.args[server.proc.args.index("--config") + 1])

    def models(key: str) -> httpx.Response:
        return httpx.get(f"{server.url}/v1/models", headers=_bearer(key), timeout=10)

    assert models("old-key").status_code == 200
    assert models("new-key").status_code == 401
    config = yaml.safe_load(config_path.read_text())
    config["api_keys"] = ["new-key"]
    config["models"].append(model_entry("added", tiny_gguf, min_instances=0))
    config_path.write_text(yaml.safe_dump(config))
    server.proc.send_signal(signal.SIGHUP)

    listed = server.wait_for(
        lambda: models("new-key").status_code == 200 and models("new-key").json(),
        what="the reload to take the new key",
    )
    assert sorted(m["id"] for m in listed["data"]) == ["added", "m"]
    assert models("old-key").status_code == 401
    assert chat(server.url, headers=_bearer("new-key")).status_code == 200

    # A broken file is logged and rejected whole; the server serves on unchanged.
    config_path.write_text("models: [")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for(lambda: "SIGHUP: reload rejected" in server.log_text(), what="the rejection")
    assert server.proc.poll() is None
    assert models("new-key").status_code == 200
    assert chat(server.url, model="added", headers=_bearer("new-key")).status_code == 200


def test_a_sighup_while_the_pool_drains_does_not_kill_the_server(serve, tiny_gguf, tmp_path):
    # The engine stalls after its first chunk, so the pool's drain lasts its whole grace:
    # a SIGHUP then (a reload racing a stop) must be ignored, not end the router at once.
    server = serve(
        [model_entry("m", tiny_gguf)],
        pool={"grace": 3},
        env={"LLAMAPOOL_TEST_FAULT": "stall:1", "LLAMAPOOL_TEST_FAULT_FILE": str(tmp_path / "f")},
    )
    client = _stream_until_cut(server)
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for(lambda: "pool shutting down" in server.log_text(), what="the pool's drain")
    server.proc.send_signal(signal.SIGHUP)
    assert server.proc.wait(30) == 0, server.log_text()
    assert "SIGHUP ignored: the server is shutting down" in server.log_text()
    client.join(10)
