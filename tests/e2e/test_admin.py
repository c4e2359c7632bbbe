"""The admin API, metrics and auth against a real pool."""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families
from serverutil import (
    ADMIN_TOKEN,
    SMOLLM2_EOG,
    chat,
    chat_body,
    model_entry,
    skip_to_first_token,
)


def _metric(server, name: str, **labels) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _served_config(tmp_path) -> tuple[Path, dict]:
    """The models.yaml the `serve` fixture wrote last, and what it holds (to edit, then reload)."""
    config_path = sorted(tmp_path.glob("models-*.yaml"))[-1]
    return config_path, yaml.safe_load(config_path.read_text())


def test_admin_needs_the_token(serve, tiny_gguf):
    server = serve([model_entry("m", tiny_gguf)])
    r = httpx.get(f"{server.url}/admin/pool")
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert "missing Authorization" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/admin/pool", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and ADMIN_TOKEN not in r.text
    assert server.admin("GET", "/admin/pool").status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # open


def test_pool_view_scale_and_restart(serve, tiny_gguf):
    server = serve([model_entry("m", tiny_gguf, min_instances=1, max_instances=3)])
    pool = server.pool()
    (model,) = pool["models"]
    assert model["id"] == "m" and model["state"] == "READY"
    assert model["instances"] == {"wanted": 1, "live": 1, "ready": 1, "min": 1, "max": 3}
    (worker,) = pool["workers"]
    assert worker["state"] == "IDLE" and worker["pid"] == server.workers()[0].pid
    assert worker["cores"] and worker["rss"] > 0 and worker["last_transition"]["reason"]
    assert pool["memory"]["budget"] > pool["memory"]["used"] > 0

    r = server.admin("POST", "/admin/models/m/scale", json={"instances": 3})
    assert r.status_code == 200, r.text
    server.wait_for(lambda: len(server.workers()) == 3, what="3 workers")
    server.wait_for(
        lambda: server.pool()["models"][0]["instances"]["ready"] == 3,
        what="3 ready",
    )
    for bad in (0, 4):
        r = server.admin("POST", "/admin/models/m/scale", json={"instances": bad})
        assert r.status_code == 400 and "1..3" in r.json()["error"]["message"]
    r = server.admin("POST", "/admin/models/m/scale", json={"instances": "two"})
    assert r.status_code == 400
    assert server.admin("POST", "/admin/models/zz/scale", json={"instances": 1}).status_code == 404

    r = server.admin("POST", "/admin/models/m/scale", json={"instances": 1})
    assert r.status_code == 200
    server.wait_for(lambda: len(server.pool()["workers"]) == 1, what="scale down to 1")
    assert len(server.workers()) == 1

    (w,) = server.pool()["workers"]
    r = server.admin("POST", f"/admin/workers/{w['id']}/restart")
    assert r.status_code == 200
    server.wait_for(
        lambda: [x for x in server.workers() if x.pid != w["pid"]], what="restarted worker"
    )
    server.ready()
    assert chat(server.url).status_code == 200
    assert _metric(server, "llamapool_worker_restarts_total", reason="admin") == 1
    assert server.admin("POST", "/admin/workers/nope/restart").status_code == 404


def test_scale_down_never_cuts_a_running_request(serve, smollm2_gguf):
    server = serve([model_entry("m", smollm2_gguf, min_instances=1, max_instances=2)])
    assert server.admin("POST", "/admin/models/m/scale", json={"instances": 2}).status_code == 200
    server.wait_for(
        lambda: server.pool()["models"][0]["instances"]["ready"] == 2,
        what="2 ready",
    )
    with cf.ThreadPoolExecutor(2) as pool:
        futs = [
            pool.submit(
                httpx.post,
                f"{server.url}/v1/chat/completions",
                json={
                    "model": "m",
                    "messages": [{"role": "user", "content": "story"}],
                    "max_tokens": 250,
                    "logit_bias": SMOLLM2_EOG,
                },
                timeout=60,
            )
            for _ in range(2)
        ]
        server.wait_for(
            lambda: all(w["state"] == "BUSY" for w in server.pool()["workers"]),
            what="both busy",
        )
        assert (
            server.admin("POST", "/admin/models/m/scale", json={"instances": 1}).status_code == 200
        )
        results = [f.result() for f in futs]
    assert [r.status_code for r in results] == [200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == 250 for r in results)
    server.wait_for(lambda: len(server.workers()) == 1, what="one instance left")


def test_unload_and_load(serve, tiny_gguf):
    server = serve([model_entry("m", tiny_gguf), model_entry("other", tiny_gguf)])
    r = server.admin("POST", "/admin/models/m/unload")
    assert r.status_code == 200 and r.json()["state"] == "UNLOADED"
    assert r.json()["instances"]["live"] == 0
    r = chat(server.url)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unloaded"
    assert chat(server.url, "other").status_code == 200
    r = server.admin("POST", "/admin/models/m/load")
    assert r.status_code == 200
    server.ready()
    assert chat(server.url).status_code == 200
    r = server.admin("POST", "/admin/models/m/unload?force=maybe")
    assert r.status_code == 400 and r.json()["error"]["param"] == "force"
    assert server.model_ready("m")["state"] == "READY"  # a bad flag changes nothing
    r = server.admin("POST", "/admin/models/m/unload?force=true")
    assert r.status_code == 200 and r.json()["instances"]["live"] == 0


def test_an_unload_holds_until_load(serve, tiny_gguf, tmp_path):
    server = serve([model_entry("m", tiny_gguf, max_instances=2), model_entry("other", tiny_gguf)])
    assert server.admin("POST", "/admin/models/m/unload").status_code == 200
    # Scaling an unloaded model would start workers that serve nothing: refused.
    r = server.admin("POST", "/admin/models/m/scale", json={"instances": 2})
    assert r.status_code == 400 and "load it first" in r.json()["error"]["message"]
    assert not [w for w in server.pool()["workers"] if w["model"] == "m"]
    # An operator's unload is not unreadiness, and the model says what it is.
    assert httpx.get(f"{server.url}/ready").status_code == 200
    assert httpx.get(f"{server.url}/v1/models/m").json()["status"] == "unloaded"

    # A reload that changes it keeps it unloaded, and starts nothing for it.
    config_path, data = _served_config(tmp_path)
    data["models"][0]["max_queue"] = 7
    config_path.write_text(yaml.safe_dump(data))
    r = server.admin("POST", "/admin/reload")
    assert r.status_code == 200 and r.json()["changed"] == ["m"], r.text
    assert server.model_ready("m")["state"] == "UNLOADED"
    assert not [w for w in server.pool()["workers"] if w["model"] == "m"]

    assert server.admin("POST", "/admin/models/m/load").status_code == 200
    server.ready()
    r = server.admin("POST", "/admin/models/m/scale", json={"instances": 2})
    assert r.status_code == 200
    server.wait_for(lambda: server.model_ready("m")["instances_ready"] == 2, what="2 ready")
    # Loading a loaded model changes nothing: its scale and state stay.
    r = server.admin("POST", "/admin/models/m/load")
    assert r.status_code == 200
    assert r.json()["state"] == "READY" and r.json()["instances"]["wanted"] == 2


def test_reload_retries_a_failed_model_whose_file_was_fixed(serve, tiny_gguf, tmp_path):
    broken = tmp_path / "fixme.gguf"
    broken.write_bytes(b"GGUF" + bytes(4096))
    server = serve([model_entry("fixme", broken)], wait_ready=False)
    server.wait_for(lambda: server.model_ready("fixme")["state"] == "FAILED", what="FAILED")
    broken.write_bytes(tiny_gguf.read_bytes())
    r = server.admin("POST", "/admin/reload")
    assert r.status_code == 200, r.text
    assert r.json()["unchanged"] == ["fixme"] and r.json()["retried"] == ["fixme"]
    server.ready()
    assert chat(server.url, "fixme").status_code == 200


def test_a_forced_unload_tells_the_running_request_so(serve, smollm2_gguf):
    server = serve([model_entry("m", smollm2_gguf, config={"n_ctx": 4096})])
    body = chat_body("m", "Write a long story.", 3000, logit_bias=SMOLLM2_EOG, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        skip_to_first_token(lines)
        assert server.admin("POST", "/admin/models/m/unload?force=true").status_code == 200
        errors = [line for line in lines if '"error"' in line]
    assert errors and '"model_unloaded"' in errors[0], errors


def test_an_unload_whose_model_a_reload_removed_says_so(serve, smollm2_gguf, tmp_path):
    server = serve([model_entry("m", smollm2_gguf, config={"n_ctx": 4096})])
    body = chat_body("m", "Write a long story.", 3000, logit_bias=SMOLLM2_EOG, stream=True)
    with cf.ThreadPoolExecutor(1) as pool:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()  # kept: dropping the iterator would close the stream
            skip_to_first_token(lines)
            # Without force the unload waits for the running request...
            unload = pool.submit(server.admin, "POST", "/admin/models/m/unload")
            server.wait_for(
                lambda: [w["state"] for w in server.pool()["workers"]] == ["DRAINING"],
                what="the worker draining",
            )
            # ...while a reload takes the model out of the config.
            config_path, data = _served_config(tmp_path)
            data["models"] = [model_entry("other", smollm2_gguf)]
            config_path.write_text(yaml.safe_dump(data))
            reloaded = server.admin("POST", "/admin/reload")
            assert reloaded.status_code == 200 and reloaded.json()["removed"] == ["m"]
        # The stream's hang-up ends the request, the worker exits, the unload returns.
        r = unload.result(timeout=60)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "model_not_found"
    assert "removed by a reload" in r.json()["error"]["message"]


def test_an_on_demand_model_is_on_standby_until_asked(serve, tiny_gguf):
    server = serve([model_entry("lazy", tiny_gguf, min_instances=0, max_instances=1)])

    def status() -> str:
        return httpx.get(f"{server.url}/v1/models/lazy").json()["status"]

    assert status() == "standby"
    assert chat(server.url, "lazy").status_code == 200
    assert status() == "ready"
    assert server.admin("POST", "/admin/models/lazy/scale", json={"instances": 0}).is_success
    server.wait_for(lambda: not server.workers(), what="scaled to none")
    assert status() == "standby"
    # load warms an on-demand model: one instance, without a request.
    r = server.admin("POST", "/admin/models/lazy/load")
    assert r.status_code == 200 and r.json()["instances"]["wanted"] == 1
    server.wait_for(lambda: server.model_ready("lazy")["instances_ready"] == 1, what="warm")
    assert status() == "ready"


def test_a_failed_model_unloaded_stays_out_of_the_way(serve, tiny_gguf, tmp_path):
    broken = tmp_path / "fixme.gguf"
    broken.write_bytes(b"GGUF" + bytes(4096))
    server = serve([model_entry("fixme", broken), model_entry("ok", tiny_gguf)], wait_ready=False)
    server.wait_for(lambda: server.model_ready("fixme")["state"] == "FAILED", what="FAILED")
    assert httpx.get(f"{server.url}/ready").status_code == 503
    assert server.admin("POST", "/admin/models/fixme/unload").status_code == 200
    server.ready()  # unloaded, the failed model no longer holds /ready at 503
    broken.write_bytes(tiny_gguf.read_bytes())
    r = server.admin("POST", "/admin/reload")
    assert r.status_code == 200 and r.json()["retried"] == [], r.text
    assert server.model_ready("fixme")["state"] == "UNLOADED"
    assert server.admin("POST", "/admin/models/fixme/load").status_code == 200
    server.wait_for(lambda: server.model_ready("fixme")["instances_ready"] == 1, what="loaded")
    assert chat(server.url, "fixme").status_code == 200


def test_reload_keeps_unchanged_replaces_changed_drains_removed(serve, tiny_gguf, tmp_path):
    server = serve(
        [
            model_entry("keep", tiny_gguf),
            model_entry("change", tiny_gguf),
            model_entry("drop", tiny_gguf),
        ]
    )
    before = {w["model"]: w["pid"] for w in server.pool()["workers"]}
    config_path, data = _served_config(tmp_path)

    config_path.write_text("models: [")  # broken: rejected, nothing changes
    r = server.admin("POST", "/admin/reload")
    assert r.status_code == 400 and "nothing changed" in r.json()["error"]["message"]

    models = {m["id"]: m for m in data["models"]}
    models["change"]["config"]["n_ctx"] = 1024
    del models["drop"]
    models["new"] = model_entry("new", tiny_gguf)
    data["models"] = list(models.values())
    config_path.write_text(yaml.safe_dump(data))
    r = server.admin("POST", "/admin/reload")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["unchanged"] == ["keep"] and body["changed"] == ["change"]
    assert body["added"] == ["new"] and body["removed"] == ["drop"]

    server.ready()
    server.wait_for(
        lambda: {w["model"] for w in server.pool()["workers"]} == {"keep", "change", "new"},
        what="the reloaded pool",
    )
    after = {w["model"]: w["pid"] for w in server.pool()["workers"]}
    assert after["keep"] == before["keep"]
    assert after["change"] != before["change"]
    assert chat(server.url, "drop").status_code == 404
    for m in ("keep", "change", "new"):
        assert chat(server.url, m).status_code == 200


def test_a_reload_of_queue_limits_alone_keeps_the_instances(serve, tiny_gguf, tmp_path):
    server = serve([model_entry("m", tiny_gguf, config={"n_ctx": 4096})])
    (before,) = [w["pid"] for w in server.pool()["workers"]]
    config_path, data = _served_config(tmp_path)
    data["models"][0]["max_request_time"] = 0.3
    config_path.write_text(yaml.safe_dump(data))
    r = server.admin("POST", "/admin/reload")
    assert r.status_code == 200 and r.json()["changed"] == ["m"], r.text
    # The new limit applies at once, on the worker that was already running.
    timed_out = chat(server.url, "m", 4000, "tell a long story")
    assert timed_out.status_code == 504, timed_out.text
    assert [w["pid"] for w in server.pool()["workers"]] == [before]


def test_metrics_move_as_requests_are_served(serve, tiny_gguf):
    server = serve([model_entry("m", tiny_gguf, max_queue=1)])
    assert _metric(server, "llamapool_requests_total", model="m") == 0
    for _ in range(3):
        assert chat(server.url, max_tokens=5).status_code == 200
    assert _metric(server, "llamapool_requests_total", model="m", status="200") == 3
    assert _metric(server, "llamapool_generated_tokens_total", model="m") == 15
    assert _metric(server, "llamapool_time_to_first_token_seconds_count", model="m") == 3
    assert _metric(server, "llamapool_queue_wait_seconds_count", model="m") == 3
    assert _metric(server, "llamapool_worker_state", model="m", state="IDLE") == 1
    assert _metric(server, "llamapool_worker_memory_bytes", model="m", kind="rss") > 0
    assert _metric(server, "llamapool_queue_depth", model="m") == 0
    assert chat(server.url, "nope").status_code == 404
    assert _metric(server, "llamapool_requests_total", model="unknown", status="404") == 1


def test_api_keys_protect_v1(serve, tiny_gguf):
    server = serve([model_entry("m", tiny_gguf)], extra={"api_keys": ["k-123"]})
    assert chat(server.url).status_code == 401
    assert chat(server.url, headers={"Authorization": "Bearer k-123"}).status_code == 200
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_cli_wrappers_talk_to_a_running_server(serve, tiny_gguf, tmp_path):
    server = serve([model_entry("m", tiny_gguf, max_instances=2)])
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN)
    base = [sys.executable, "-m", "llamapool"]
    common = ["--url", server.url, "--token-file", str(token_file)]
    r = subprocess.run([*base, "ps", *common], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "m" in r.stdout and "IDLE" in r.stdout
    r = subprocess.run(
        [*base, "scale", "m", "2", *common], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    server.wait_for(lambda: len(server.workers()) == 2, what="2 workers")
    r = subprocess.run(
        [*base, "scale", "m", "9", *common], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1 and "1..2" in (r.stdout + r.stderr)
    r = subprocess.run([*base, "reload", *common], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_reload_removing_a_busy_model_lets_its_request_finish(serve, smollm2_gguf, tmp_path):
    server = serve([model_entry("keep", smollm2_gguf), model_entry("drop", smollm2_gguf)])
    config_path, data = _served_config(tmp_path)
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(chat, server.url, "drop", 300, "story", logit_bias=SMOLLM2_EOG)
        server.wait_for(
            lambda: any(w["state"] == "BUSY" for w in server.pool()["workers"]), what="busy"
        )
        data["models"] = [m for m in data["models"] if m["id"] == "keep"]
        config_path.write_text(yaml.safe_dump(data))
        r = server.admin("POST", "/admin/reload")
        assert r.status_code == 200 and r.json()["removed"] == ["drop"]
        done = fut.result(timeout=60)
    assert done.status_code == 200, done.text
    assert done.json()["usage"]["completion_tokens"] == 300
    server.wait_for(lambda: len(server.pool()["workers"]) == 1, what="drop's worker to stop")
    assert chat(server.url, "drop").status_code == 404
