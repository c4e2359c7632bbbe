"""The reload plan: what a new config changes, computed without a process."""

from __future__ import annotations

import pytest
import yaml

from llamapool import errors
from llamapool.config import Config, parse_config
from llamapool.pool.reload import plan_reload, read_config


def _config(*models: dict, **top) -> Config:
    return parse_config({"models": list(models), **top}, check_files=False)


def _model(model_id: str, **keys) -> dict:
    config = {"model_path": f"/models/{model_id}.gguf", **keys.pop("config", {})}
    return {"id": model_id, "config": config, **keys}


def test_each_model_lands_in_one_list():
    old = _config(_model("keep"), _model("change"), _model("drop"), _model("broken"))
    new = _config(
        _model("keep"), _model("change", config={"n_ctx": 512}), _model("new"), _model("broken")
    )
    plan = plan_reload(old.models, new, failed={"broken", "drop"}, current=old)
    assert plan.summary() == {
        "added": ["new"],
        "removed": ["drop"],
        "changed": ["change"],
        "unchanged": ["keep", "broken"],
        "retried": ["broken"],  # unchanged and FAILED: its file may be fixed now
        "warnings": [],
    }
    assert plan.changed[0].config.n_ctx == 512
    assert plan.added[0] is new.models["new"]


def test_a_changed_failed_model_is_replaced_not_retried():
    old = _config(_model("m"))
    plan = plan_reload(old.models, _config(_model("m", max_queue=3)), failed={"m"})
    assert [s.id for s in plan.changed] == ["m"] and plan.retried == []


def test_the_same_file_changes_nothing():
    old = _config(_model("a"), _model("b"), api_keys=["k"])
    plan = plan_reload(old.models, _config(_model("a"), _model("b")), current=old)
    assert plan.summary()["unchanged"] == ["a", "b"]
    assert not (plan.added or plan.removed or plan.changed or plan.retried or plan.warnings)


def test_restart_only_blocks_are_warned_about():
    old = _config(_model("a"))
    new = _config(_model("a"), pool={"grace": 1}, server={"max_body_bytes": 10})
    assert plan_reload(old.models, new, current=old).warnings == [
        "the pool: block changed; it takes effect at the next restart",
        "the server: block changed; it takes effect at the next restart",
    ]


def test_a_file_with_any_error_is_rejected_whole(tmp_path, tiny_gguf):
    path = tmp_path / "models.yaml"
    good = _model("a", config={"model_path": str(tiny_gguf)})
    path.write_text(yaml.safe_dump({"models": [good]}))
    assert list(read_config(path).models) == ["a"]
    path.write_text(yaml.safe_dump({"models": [good, _model("b", config={"n_ctx": 0})]}))
    with pytest.raises(errors.InvalidRequest, match="reload rejected, nothing changed: model 'b'"):
        read_config(path)
    path.write_text("models: [")
    with pytest.raises(errors.InvalidRequest, match="invalid YAML"):
        read_config(path)
    with pytest.raises(errors.InvalidRequest, match="not started from a config file"):
        read_config(None)


def test_queue_limits_alone_retune_the_model_without_a_restart():
    old = _config(_model("a"), _model("b"), _model("c"))
    new = _config(
        _model("a", max_queue=3, queue_timeout=5, max_request_time=30),
        _model("b", max_queue=3, config={"n_ctx": 512}),
        _model("c", max_queue=3),
    )
    plan = plan_reload(old.models, new, failed={"c"})
    assert [s.id for s in plan.retuned] == ["a"]  # its instances stay
    assert [s.id for s in plan.changed] == ["b", "c"]  # b's llama settings; c is FAILED
    assert plan.summary()["changed"] == ["b", "c", "a"]
