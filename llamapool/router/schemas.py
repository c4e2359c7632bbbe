"""OpenAI request bodies as msgspec Structs: unknown fields and bad values are 400s."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec

from llamapool import errors
from llamapool.ipc.protocol import SamplingParams
from llamapool.pool.prepare import SEED_MODULUS

# Bounds keep every integer inside what the worker protocol and llama.cpp can carry: an
# unbounded one passed validation and then failed to encode for the worker.
INT32_MAX = 2**31 - 1
PositiveInt = Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]  # the engine reduces it
TokenId = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]  # the worker checks the vocabulary
# A prompt or an input: text, token ids, or a list of either (msgspec allows one array type
# in a union, so the list's items say which).
PromptList = Annotated[list[str | TokenId | list[TokenId]], msgspec.Meta(min_length=1)]

T = TypeVar("T")


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    include_usage: bool | None = False


# OpenAI's rule for function and schema names.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]


class ToolCallFunction(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A call an assistant message made, sent back in the history."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None  # a `tool` message answers this call
    tool_calls: list[ToolCall] | None = None  # an assistant message's calls
    # Clients echo an assistant message back whole; these two carry nothing for the prompt.
    refusal: str | None = None
    annotations: list[Any] | None = None


class FunctionDef(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    description: str | None = None
    parameters: Any = None  # a JSON Schema of type object (router/tools.py checks it)
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True):
    # Not forbid_unknown_fields: another tool type's own fields must not hide that the
    # type itself is what this server lacks (router/tools.py names `tools[i].type`).
    type: str
    function: FunctionDef | None = None


class NamedFunction(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`response_format.json_schema`: OpenAI's shape; the schema is always enforced."""

    name: Name
    description: str | None = None
    schema: dict[str, Any] | None = None  # none: any JSON object
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    # OpenAI's clients send null for "the default": every optional field takes it.
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=16)] | None = None
    seed: Seed | None = None
    logit_bias: dict[str, Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: PositiveInt | None = None  # server.max_choices bounds prompts × n
    user: str | None = None

    def check(self) -> None:
        """What a field's type cannot say; raises InvalidRequest."""
        if self.stream_options is not None and not self.stream:
            raise errors.InvalidRequest(
                "`stream_options` is only allowed when `stream` is true", param="stream_options"
            )

    def sampling(
        self, max_tokens: int | None = None, sample: int = 0, model_seed: int | None = None
    ) -> SamplingParams:
        """The request's sampling for its `sample`-th choice of a prompt: with a seed (the
        request's, else the model's `model_seed`), choice j gets seed + j, so that `n`
        samples differ and each is repeatable."""
        bias: dict[int, float] | None = None
        if self.logit_bias:
            bias = {}
            for key, value in self.logit_bias.items():
                try:
                    token = int(key)
                except ValueError:
                    token = -1
                if not 0 <= token <= INT32_MAX:
                    raise errors.InvalidRequest(
                        f"logit_bias key {key[:40]!r} is not a token id "
                        "(a non-negative integer as a string)",
                        param="logit_bias",
                    )
                bias[token] = value
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            stop=stop,
            seed=_sample_seed(self.seed, sample, model_seed),
            logit_bias=bias,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _sample_seed(seed: int | None, sample: int, model_seed: int | None) -> int | None:
    if sample == 0:
        return seed  # the worker falls back on the model's seed itself
    base = seed if seed is not None else model_seed
    if base in (None, -1):
        return seed
    # Reduced as llama_seed reduces it: seed + j is then never -1, which means random.
    return (base + sample) % SEED_MODULUS


def _unsupported(param: str, what: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"{what} is not supported by this server", param=param)


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], msgspec.Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise errors.InvalidRequest(
                "`top_logprobs` needs `logprobs: true`", param="top_logprobs"
            )
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            raise errors.InvalidRequest(
                "response_format of type `json_schema` needs `response_format.json_schema`",
                param="response_format.json_schema",
            )

    @property
    def scores(self) -> int | None:
        """Alternatives per token's logprob for the worker; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | PromptList
    # 0 with `echo`: score the prompt only (what loglikelihood evaluation asks).
    max_tokens: Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)] | None = None
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    echo: bool | None = None
    # Accepted where it asks for nothing this server lacks (clients send the default).
    suffix: str | None = None
    best_of: Annotated[int, msgspec.Meta(ge=1, le=1)] | None = None

    def check(self) -> None:
        super().check()
        if self.suffix:
            raise _unsupported("suffix", "`suffix` (insertion)")
        self.prompts  # noqa: B018  # refuses a mixed list now, as a 400

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        return _items(self.prompt, "prompt")


def _items(value: str | list[Any], param: str) -> list[str | list[int]]:
    """A prompt or input as OpenAI reads it: text, token ids, or a list of either."""
    if isinstance(value, str):
        return [value]
    if all(isinstance(v, int) for v in value):
        return [list(value)]
    if any(isinstance(v, int) for v in value):
        raise errors.InvalidRequest(
            f"`{param}` mixes token ids with texts or token lists; send token ids, a list of "
            "texts, or a list of token lists",
            param=param,
        )
    return list(value)


class EmbeddingRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: (
        str
        | Annotated[
            list[str | TokenId | list[TokenId]], msgspec.Meta(min_length=1, max_length=2048)
        ]
    )
    encoding_format: Literal["float", "base64"] | None = "float"
    user: str | None = None

    def check(self) -> None:
        """What a field's type cannot say; raises InvalidRequest."""
        self.inputs  # noqa: B018

    @property
    def inputs(self) -> list[str | list[int]]:
        """One entry per input: text or token ids."""
        return _items(self.input, "input")


def parse_body(body: bytes, schema: type[T]) -> T:
    """Decode a JSON body into `schema`, turning msgspec's complaint into a 400."""
    if not body.strip():
        raise errors.InvalidRequest("the request body is empty; send a JSON object")
    try:
        parsed = msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as exc:
        text = str(exc)
        param = None
        if " - at `$." in text:
            text, _, where = text.rpartition(" - at `$.")
            param = where.rstrip("`")
            text = f"invalid value for `{param}`: {text}"
        elif text.startswith("Object contains unknown field"):
            text = f"{text}; this server does not support that field"
        raise errors.InvalidRequest(text, param=param) from None
    except msgspec.DecodeError as exc:
        raise errors.InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise errors.InvalidRequest(f"the request body is not valid UTF-8: {exc}") from None
    except RecursionError:
        raise errors.InvalidRequest("the request body is nested too deeply") from None
    check = getattr(parsed, "check", None)
    if check is not None:
        check()
    return parsed


def message_dicts(messages: list[ChatMessage], *, images: bool) -> list[dict[str, Any]]:
    """Messages as the chat template expects them; image parts only for multimodal models."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            for part in m.content:
                kind = part.get("type")
                if kind == "text" and isinstance(part.get("text"), str):
                    continue
                if kind == "text":
                    raise errors.InvalidRequest(
                        f"messages[{i}].content has a text part without a string `text`",
                        param=f"messages[{i}].content",
                    )
                if kind == "image_url" and images:
                    continue
                raise errors.InvalidRequest(
                    f"messages[{i}].content has a part of type {kind!r} that this model "
                    "does not accept" + ("" if images else " (it has no mmproj_path)"),
                    param=f"messages[{i}].content",
                )
            content: Any = m.content
            if not images:
                content = "".join(part["text"] for part in m.content)
        else:
            content = m.content or ""
        d: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        elif m.role == "tool":
            raise errors.InvalidRequest(
                f"messages[{i}] has role `tool` but no `tool_call_id` (the call it answers)",
                param=f"messages[{i}].tool_call_id",
            )
        if m.tool_calls:
            d["tool_calls"] = [msgspec.to_builtins(call) for call in m.tool_calls]
        out.append(d)
    return out
