"""The models.yaml schema: typed, validated, with errors that name the model and the key.

A broken top level (bad YAML, a bad `pool:` block) rejects the whole file; a broken
model entry is reported against that model alone so that the others still serve.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import yaml

from llamapool.model_path import PackageNotInstalled, resolve_model_path
from llamapool.yaml_loader import read_yaml

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
# Finite: YAML's .inf would pass a lower bound alone, and a timer or sleep of inf breaks.
PositiveFloat = Annotated[float, msgspec.Meta(gt=0, le=1e9)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0, le=1e9)]
Probability = Annotated[float, msgspec.Meta(ge=0, le=1)]

T = TypeVar("T")
FLASH_ATTN_VALUES = ("auto", "on", "off")
# One share per GPU, at most llama.cpp's LLAMA_MAX_DEVICES of them.
Shares = Annotated[list[NonNegativeFloat], msgspec.Meta(min_length=1, max_length=16)]


class ConfigError(Exception):
    """The configuration cannot be used; the message lists every problem found."""


class SpeculativeSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A model's `config.speculative:`: how each slot drafts tokens the next decode verifies
    (pool/speculative.py)."""

    # ngram: copy what followed the latest earlier occurrence of the text's last n tokens
    # (prompt lookup); draft: greedy tokens of a second, smaller model (same vocabulary).
    mode: Literal["ngram", "draft"]
    # Tokens drafted per slot and step at most, and fewer than draft_min are not verified.
    draft_max: Annotated[int, msgspec.Meta(ge=1, le=64)] = 16
    draft_min: Annotated[int, msgspec.Meta(ge=0, le=64)] = 1
    # true: each slot drafts only as long as its recent acceptance pays for the rows at what
    # decodes have cost (pool/speculative.py, Speculator); false: draft_max every step
    # (llama-server's way).
    adaptive: bool = True
    # ngram: the lengths of the text's tail looked up, longest first.
    ngram_min: Annotated[int, msgspec.Meta(ge=1, le=16)] = 2
    ngram_max: Annotated[int, msgspec.Meta(ge=1, le=16)] = 4
    # draft: the draft model's GGUF (a path or pkg://), and the confidence (its top
    # token's probability) below which it stops drafting for the step.
    draft_model_path: str | None = None
    draft_p_min: Probability = 0.5


class LlamaSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Keys under a model's `config:`; they reach `Llama(...)` or the sampler."""

    model_path: str
    n_ctx: PositiveInt = 4096
    # Offloaded from the end: the output layer, then the last repeating layers; -1: all.
    n_gpu_layers: Annotated[int, msgspec.Meta(ge=-1)] = 0
    # Over the GPUs an instance sees: by layer, by row, or all on main_gpu (none); the
    # visible GPUs' shares, e.g. [3, 1] (null: in proportion to free VRAM).
    split_mode: Literal["layer", "row", "none"] = "layer"
    main_gpu: NonNegativeInt = 0
    tensor_split: Shares | None = None
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
    # Flash attention in every context: auto (llama-server's default: on where the device
    # supports it), on, or off. YAML 1.1 reads a bare on/off as a boolean: both are taken.
    flash_attn: str | bool = "auto"
    # RAM for saved KV states of prompts that slots gave up (llama-server's --cache-ram);
    # 0 turns it off. The default holds ~11k tokens of SmolLM2-135M's f16 KV cache (23 KiB
    # a token): some 20 chats of a few hundred tokens, 2.7 full 4096-token contexts.
    prompt_cache_bytes: str | int = "256MiB"
    # Copy a prefix another slot holds (a shared system prompt) instead of evaluating it
    # again, and hold a request back while another slot evaluates the prefix it shares.
    share_prefixes: bool = True
    # Speculative decoding in the batching engine (null: off).
    speculative: SpeculativeSettings | None = None

    def prompt_cache_limit(self) -> int:
        """Bytes the batching engine's RAM prompt cache may hold; 0 where none is kept
        (embedding and multimodal models, reset_each_request)."""
        if self.embedding or self.mmproj_path is not None or self.reset_each_request:
            return 0
        return parse_bytes(self.prompt_cache_bytes)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ModelPlacement(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A model's `placement:`: what a Ray node must offer to host one of its instances."""

    # Custom resources each instance reserves ({"big_ram": 1}); CPU and GPU are not
    # among them: the CPUs are config.n_threads, the GPUs num_gpus.
    resources: dict[str, PositiveFloat] = msgspec.field(default_factory=dict)
    # Node labels an instance's node must carry (`ray start --labels zone=a`).
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    num_gpus: NonNegativeFloat = 0.0


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
    # Seconds a dispatched request may run before it is cancelled (504 request_timeout).
    max_request_time: PositiveFloat | None = None
    # GPUs its instances take turns on, one each (null: every instance sees every GPU).
    gpus: Annotated[list[NonNegativeInt], msgspec.Meta(min_length=1)] | None = None
    # Where its instances may run on a Ray cluster (placement.backend: ray only).
    placement: ModelPlacement | None = None
    # Its busy instances borrow idle instances' cores, and lend theirs (null: the pool's).
    elastic_threads: bool | None = None

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
    # Of each GPU's VRAM, same forms; applies where NVML reports GPUs.
    gpu_memory_budget: str | int = "90%"
    max_worker_memory: str | int | None = None
    memory_check_interval: PositiveFloat = 2.0
    # A busy instance runs on the cores of idle ones (more threads) until they get work.
    elastic_threads: bool = True


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
    # The most choices (prompts × n) one completion or chat request may ask for: each is a
    # request of its own in the model's queue.
    max_choices: PositiveInt = 64


Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class PlacementSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The top-level `placement:` block: where workers run, how they reach the router."""

    # local: subprocesses of the router; ray: one per Ray actor on the cluster's nodes.
    backend: Literal["local", "ray"] = "local"
    # ipc: socket pairs and ipc:// (local only); tcp: workers dial back (ipc.remote).
    # Unset: ipc locally, tcp with ray (which needs it).
    transport: Literal["ipc", "tcp"] | None = None
    # The address workers dial; the router binds it. Unset: 127.0.0.1 locally, with ray
    # this machine's address as Ray sees it.
    advertise_host: str | None = None
    # ray: the cluster to join: auto (the one `ray start` runs on this machine),
    # host:port of its head (GCS), or ray://host:port (Ray Client).
    address: str = "auto"
    port: Port = 0  # control (ZeroMQ + CURVE); 0: any free port
    data_port: Port = 0  # data (TLS); 0: any free port


class _TopLevel(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    models: list[Any]
    pool: PoolSettings = msgspec.field(default_factory=PoolSettings)
    admin: AdminSettings = msgspec.field(default_factory=AdminSettings)
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    placement: PlacementSettings = msgspec.field(default_factory=PlacementSettings)
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
    placement: PlacementSettings = field(default_factory=PlacementSettings)


def _humanize(err: msgspec.ValidationError, label: str) -> str:
    # msgspec says "... - at `$.config.n_ctx`" (nothing for the top level); turn the JSON
    # path into the YAML key.
    text = str(err)
    m = re.search(r" - at `\$\.?(.*)`$", text)
    if m and m.group(1):
        return f"{label}: {m.group(1)}: {text[: m.start()]}"
    return f"{label}: {text[: m.start()] if m else text}"


def _convert(data: Any, schema: type[T], label: str) -> T:
    """msgspec's strict conversion, its complaint turned into a ConfigError under `label`."""
    try:
        return msgspec.convert(data, schema, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(_humanize(exc, label)) from None


def _model_file(label: str, key: str, value: str, base_dir: Path | None, check: bool) -> str:
    """A model's file setting, resolved; with `check`, the package and file must exist."""
    try:
        path = resolve_model_path(value, base_dir)
    except PackageNotInstalled as exc:
        if check:
            raise ConfigError(f"{label}: config.{key}: {exc}") from None
        return value
    except ValueError as exc:
        raise ConfigError(f"{label}: config.{key}: {exc}") from None
    if check and not path.is_file():
        raise ConfigError(f"{label}: config.{key}: file not found: {path}")
    if check:
        try:
            with path.open("rb") as fh:
                magic = fh.read(4)
        except OSError as exc:
            raise ConfigError(
                f"{label}: config.{key}: cannot read {path}: {exc.strerror}"
            ) from None
        if magic != b"GGUF":
            raise ConfigError(f"{label}: config.{key}: {path} is not a GGUF file")
    return str(path)


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
    if isinstance(cfg.flash_attn, bool):
        cfg.flash_attn = "on" if cfg.flash_attn else "off"
    if cfg.flash_attn not in FLASH_ATTN_VALUES:
        raise ConfigError(
            f"{label}: config.flash_attn: {cfg.flash_attn!r} is not one of "
            f"{', '.join(FLASH_ATTN_VALUES)}"
        )
    _check_gpu_placement(label, spec)
    try:
        if str(cfg.prompt_cache_bytes).strip().endswith("%"):
            raise ValueError(f"{cfg.prompt_cache_bytes!r}: give a size like 512MiB, not a share")
        if parse_bytes(cfg.prompt_cache_bytes) < 0:
            raise ValueError(f"{cfg.prompt_cache_bytes!r} is below 0 (0 turns the cache off)")
    except ValueError as exc:
        raise ConfigError(f"{label}: config.prompt_cache_bytes: {exc}") from None
    # A disabled model is not served, so its files need not exist (yet).
    check = check_files and spec.enabled
    cfg.model_path = _model_file(label, "model_path", cfg.model_path, base_dir, check)
    if cfg.mmproj_path is not None:
        cfg.mmproj_path = _model_file(label, "mmproj_path", cfg.mmproj_path, base_dir, check)
    if cfg.speculative is not None:
        _check_speculative(label, cfg, base_dir, check)
    return spec


def _check_speculative(label: str, cfg: LlamaSettings, base_dir: Path | None, check: bool) -> None:
    """Refuse speculative settings that cannot work; resolve the draft model's path and, when
    files are checked, compare its vocabulary with the model's (from both GGUF headers)."""
    spec, key = cfg.speculative, "config.speculative"
    assert spec is not None
    if cfg.embedding or cfg.mmproj_path is not None:
        what = "embedding: true" if cfg.embedding else "mmproj_path"
        raise ConfigError(
            f"{label}: {key}: a model with {what} serves one request at a time, without "
            "speculative decoding; remove speculative"
        )
    if spec.draft_min > spec.draft_max:
        raise ConfigError(
            f"{label}: {key}.draft_min ({spec.draft_min}) is above draft_max ({spec.draft_max})"
        )
    if spec.ngram_min > spec.ngram_max:
        raise ConfigError(
            f"{label}: {key}.ngram_min ({spec.ngram_min}) is above ngram_max ({spec.ngram_max})"
        )
    if spec.mode == "ngram":
        if spec.draft_model_path is not None:
            raise ConfigError(
                f"{label}: {key}.draft_model_path: mode ngram drafts without a model; "
                "set mode: draft or remove draft_model_path"
            )
        return
    if spec.draft_model_path is None:
        raise ConfigError(f"{label}: {key}.draft_model_path: mode draft needs the draft's GGUF")
    key_path = "speculative.draft_model_path"
    path = spec.draft_model_path = _model_file(
        label, key_path, spec.draft_model_path, base_dir, check
    )
    if check:
        from llamapool.pool.gguf_header import GGUFError, vocab_mismatch

        try:
            why = vocab_mismatch(cfg.model_path, path)
        except (OSError, GGUFError) as exc:
            raise ConfigError(f"{label}: {key}.draft_model_path: {exc}") from None
        if why is not None:
            raise ConfigError(
                f"{label}: {key}.draft_model_path: {path} cannot draft for this model: {why}; "
                "a draft model needs the same vocabulary (tokens, types, BOS/EOS)"
            )


def _check_gpu_placement(label: str, spec: ModelSpec) -> None:
    """Refuse GPU settings llama.cpp would reject or silently ignore."""
    cfg = spec.config
    if cfg.tensor_split is not None and not any(cfg.tensor_split):
        raise ConfigError(f"{label}: config.tensor_split: at least one share must be above 0")
    if spec.gpus is None:
        return
    if len(set(spec.gpus)) != len(spec.gpus):
        raise ConfigError(f"{label}: gpus: {spec.gpus} lists a GPU twice")
    # Each instance then sees one GPU only (its CUDA_VISIBLE_DEVICES), as device 0.
    if cfg.tensor_split is not None or cfg.main_gpu != 0:
        key = "tensor_split" if cfg.tensor_split is not None else "main_gpu"
        raise ConfigError(
            f"{label}: config.{key}: with gpus each instance sees only its own GPU, as device "
            f"0; set gpus or {key}, not both"
        )


def parse_config(data: Any, *, path: Path | None = None, check_files: bool = True) -> Config:
    """Validate a parsed YAML document; per-model problems land in `Config.broken`."""
    where = str(path) if path else "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with a `models:` list")
    top = _convert(data, _TopLevel, where)
    for key in ("memory_budget", "max_worker_memory", "gpu_memory_budget"):
        value = getattr(top.pool, key)
        try:
            if value is not None and parse_bytes(value, total=1 << 40) <= 0:
                raise ValueError(f"{value!r} must be more than 0 bytes")
        except ValueError as exc:
            raise ConfigError(f"{where}: pool.{key}: {exc}") from None
    _check_placement(top.placement, where)
    if top.api_keys is not None:
        _check_api_keys(top.api_keys, where)
    base_dir = path.parent if path else None
    models: dict[str, ModelSpec] = {}
    broken: dict[str, str] = {}
    seen: set[str] = set()
    for index, raw in enumerate(top.models):
        rid = raw.get("id") if isinstance(raw, dict) else None
        key = rid if isinstance(rid, str) else f"models[{index}]"
        # Disabled entries count too: otherwise enabling one later would clash.
        if key in seen:
            raise ConfigError(f"{where}: model id {key!r} appears more than once")
        seen.add(key)
        try:
            spec = parse_model(raw, index, base_dir, check_files)
        except ConfigError as exc:
            broken[key] = str(exc)
            continue
        problem = spec.enabled and _placement_problem(spec, top.placement)
        if problem:
            broken[key] = f"model {spec.id!r}: {problem}"
        elif spec.enabled:
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
        placement=top.placement,
    )


def _check_placement(p: PlacementSettings, where: str) -> None:
    """Settle the transport (ray implies tcp) and refuse a block that cannot work."""
    if p.backend == "ray" and p.transport == "ipc":
        raise ConfigError(
            f"{where}: placement.transport: ipc reaches only this machine; workers on a Ray "
            "cluster dial back over tcp (leave transport unset)"
        )
    p.transport = p.transport or ("tcp" if p.backend == "ray" else "ipc")
    if p.backend == "local" and p.address != "auto":
        raise ConfigError(f"{where}: placement.address: only used with backend: ray")
    if p.address != "auto" and not re.fullmatch(r"(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d+", p.address):
        raise ConfigError(
            f"{where}: placement.address: {p.address!r} is not auto, host:port or ray://host:port"
        )


def _placement_problem(spec: ModelSpec, p: PlacementSettings) -> str | None:
    """Why a model cannot be placed by the configured backend, or None."""
    if p.backend == "local":
        if spec.placement is not None:
            return "placement: needs placement.backend: ray at the top level"
        return None
    if spec.config.n_threads is None:
        return (
            "config.n_threads: set it with placement.backend: ray; each instance reserves "
            "that many CPUs of its Ray node"
        )
    if spec.gpus is not None:
        return "gpus: picks GPUs of this machine; on Ray use placement.num_gpus"
    if spec.placement is not None and {"CPU", "GPU"} & set(spec.placement.resources):
        return "placement.resources: CPU and GPU come from config.n_threads and num_gpus"
    return None


def header_safe(token: str) -> bool:
    """Whether an HTTP Authorization header can carry `token`: printable ASCII."""
    return token.isascii() and token.isprintable()


def _check_api_keys(keys: list[str], where: str) -> None:
    """Refuse api_keys that would turn auth off or could never match a bearer token."""
    if not keys:
        raise ConfigError(
            f"{where}: api_keys: the list is empty, which would leave /v1 open; "
            "list at least one key, or remove api_keys (or set it to null) for no API keys"
        )
    for i, key in enumerate(keys):
        if not key.strip():
            raise ConfigError(f"{where}: api_keys[{i}]: the key is empty or blank")
        # Clients' bearer tokens are stripped and HTTP headers carry ASCII, so such a
        # key could never match.
        if key != key.strip() or not header_safe(key):
            raise ConfigError(
                f"{where}: api_keys[{i}]: a key must be printable ASCII with no "
                "leading or trailing spaces"
            )


def load_config(path: str | Path, *, check_files: bool = True) -> Config:
    """Read and validate a models.yaml file."""
    path = Path(path).resolve()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = read_yaml(text)
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
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text)
        if not m:
            raise ValueError(f"{value!r} is not a percentage like 80%")
        percent = float(m.group(1))
        if percent > 100:
            raise ValueError(f"{value!r} is over 100% (a percentage of the machine's memory)")
        return int(total * percent / 100)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{value!r} is not a size like 12GiB, 512MB, 80% or a byte count")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper()
    powers = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    base = 1024 if "I" in unit or len(unit) == 1 and unit != "B" else 1000
    size = number * base ** powers[unit[0]]
    if not math.isfinite(size):
        raise ValueError(f"{value!r} is too large")
    return int(size)
