"""`llamapool serve` flags: log files, log levels."""

from __future__ import annotations

from serverutil import chat, model_entry


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
