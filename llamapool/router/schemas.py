"""OpenAI request bodies as msgspec Structs: unknown fields and bad values are 400s."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec

from llamapool import errors
from llamapool.ipc.protocol import SamplingParams

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]

T = TypeVar("T")


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    include_usage: bool = False


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _Sampling(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    stop: str | Annotated[list[str], msgspec.Meta(max_length=16)] | None = None
    seed: int | None = None
    logit_bias: dict[str, Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1
    user: str | None = None

    def sampling(self, max_tokens: int | None = None) -> SamplingParams:
        bias: dict[int, float] | None = None
        if self.logit_bias:
            try:
                bias = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise errors.InvalidRequest(
                    "logit_bias keys must be token ids (integers as strings)", param="logit_bias"
                ) from None
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=stop,
            seed=self.seed,
            logit_bias=bias,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def parse_body(body: bytes, schema: type[T]) -> T:
    """Decode a JSON body into `schema`, turning msgspec's complaint into a 400."""
    if not body.strip():
        raise errors.InvalidRequest("the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=schema)
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


def message_dicts(messages: list[ChatMessage], *, images: bool) -> list[dict[str, Any]]:
    """Messages as the chat template expects them; image parts only for multimodal models."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            for part in m.content:
                kind = part.get("type")
                if kind == "text" and isinstance(part.get("text"), str):
                    continue
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
        out.append(d)
    return out
