"""The model, its chat formatting and vocabulary, and the abort flag: llama-cpp-python's
`Llama` and the private parts of it the engines need."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llamapool.config import LlamaSettings

# llama_decode's status when the abort callback stopped it.
DECODE_ABORTED = 2
# The sampler chain's repetition window, as in llama-cpp-python's Llama.
PENALTY_LAST_N = 64
# llama.cpp's llama_split_mode values, by the config's names.
_SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}


def load_library() -> None:
    """Load llama.cpp's shared libraries now: call it from a thread that may run on every
    core the process may use, before any thread pins itself.

    The OpenMP runtime llama.cpp's CPU backend is built with (libgomp) counts the CPUs it
    may use once, when it is loaded, from the loading thread's affinity. Loaded from an
    engine thread already pinned to one core, it counts one; a decode later widened to two
    threads (elastic threads) has more threads than that count, so libgomp spins only
    briefly at each barrier and then sleeps: ~245 context switches per token instead of
    none, and 55-63 tok/s instead of 71-78 for SmolLM2 on two cores.
    """
    import llama_cpp  # noqa: F401


def set_threads(llama: Any, n_threads: int) -> None:
    """Run the `Llama`'s own context with `n_threads` threads (generation and prompt) from
    its next decode."""
    import llama_cpp

    llama_cpp.llama_set_n_threads(llama._ctx.ctx, n_threads, n_threads)
    llama.n_threads = llama.n_threads_batch = n_threads
    llama.context_params.n_threads = llama.context_params.n_threads_batch = n_threads


def open_llama(cfg: LlamaSettings, *, n_ctx: int | None = None, seed: int | None = None) -> Any:
    """The model's `llama_cpp.Llama` with a context of `n_ctx` (default: the model's).

    Raises ValueError for a chat_format llama-cpp-python does not know.
    """
    import llama_cpp
    from llama_cpp import llama_chat_format

    kwargs: dict[str, Any] = {
        "model_path": cfg.model_path,
        "n_ctx": n_ctx or cfg.n_ctx,
        "n_gpu_layers": cfg.n_gpu_layers,
        "split_mode": _SPLIT_MODES[cfg.split_mode],
        "main_gpu": cfg.main_gpu,
        "tensor_split": cfg.tensor_split,
        "n_batch": min(cfg.n_batch, n_ctx or cfg.n_batch),
        "use_mmap": cfg.use_mmap,
        "use_mlock": cfg.use_mlock,
        "embedding": cfg.embedding,
        "verbose": False,
    }
    if cfg.n_threads is not None:
        kwargs["n_threads"] = cfg.n_threads
        kwargs["n_threads_batch"] = cfg.n_threads
    if seed is not None:
        kwargs["seed"] = seed
    if cfg.chat_format is not None:
        if _registered_handler(cfg.chat_format) is None:
            raise ValueError(f"unknown chat_format {cfg.chat_format!r}")
        kwargs["chat_format"] = cfg.chat_format
    if cfg.mmproj_path is not None:
        kwargs["chat_handler"] = llama_chat_format.Llava15ChatHandler(
            clip_model_path=cfg.mmproj_path, verbose=False
        )
    # Llama takes flash attention only as on or off (its default: off).
    llama = llama_cpp.Llama(**kwargs, flash_attn=cfg.flash_attn == "on")
    if cfg.flash_attn == "auto":
        _replace_context(llama, flash_attn_type_of("auto"))
    return llama


def flash_attn_type_of(setting: str) -> int:
    """llama.cpp's `llama_flash_attn_type` for a model's `flash_attn` setting."""
    import llama_cpp

    return {
        "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
        "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }[setting]


def _replace_context(llama: Any, flash_attn_type: int) -> None:
    """Give `llama` a new context, with `flash_attn_type`, in place of the one it made."""
    from llama_cpp import _internals

    llama.context_params.flash_attn_type = flash_attn_type
    old = llama._ctx
    llama._ctx = _internals.LlamaContext(
        model=llama._model, params=llama.context_params, verbose=False
    )
    old.close()  # freed now, not with the Llama: two contexts' KV at once only briefly


def context_flash_attn_type(llama: Any) -> int:
    """The flash attention type the context a `Llama` decodes in was made with."""
    return llama._ctx.params.flash_attn_type


# -- chat formatting -----------------------------------------------------------


def _registered_handler(name: str) -> Any | None:
    from llama_cpp import llama_chat_format

    try:
        return llama_chat_format.get_chat_completion_handler(name)
    except Exception:
        return None


def _formatter_in(handler: Any) -> Any | None:
    # llama-cpp-python registers named chat formats only as completion handlers
    # wrapping a formatter; the formatter is what we need to run our own loop.
    code = getattr(handler, "__code__", None)
    if code is None or handler.__closure__ is None:
        return None
    for name, cell in zip(code.co_freevars, handler.__closure__, strict=True):
        if name == "chat_formatter":
            return cell.cell_contents
    return None


def handler_only(chat_format: str) -> bool:
    """Whether a registered chat format exists only as a handler (no formatter to drive).

    An unknown name is not: loading the model refuses it with a clear error.
    """
    handler = _registered_handler(chat_format)
    return handler is not None and _formatter_in(handler) is None


def chat_formatter(llama: Any, template: str | None = None) -> Any | None:
    """The formatter a `Llama` chats with: `template` (inline, or a file's path) if given,
    else its chat_format's (the GGUF's template by default); None if there is none."""
    from llama_cpp import llama_chat_format

    eos_id, bos_id = llama.token_eos(), llama.token_bos()
    eos = llama._model.token_get_text(eos_id) if eos_id != -1 else ""
    bos = llama._model.token_get_text(bos_id) if bos_id != -1 else ""
    if template is not None:
        if os.path.isfile(template):
            with open(template, encoding="utf-8") as fh:
                template = fh.read()
        return llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id]
        )
    name = llama.chat_format
    if name in llama._chat_handlers:
        # Built by Llama.__init__ from the GGUF's embedded template.
        embedded = llama.metadata.get("tokenizer.chat_template")
        if name == "chat_template.default" and embedded:
            return llama_chat_format.Jinja2ChatFormatter(
                template=embedded, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id]
            )
        return _formatter_in(llama._chat_handlers[name])
    return _formatter_in(llama_chat_format.get_chat_completion_handler(name))


# -- the vocabulary and a Llama's own state ---------------------------------------


class Vocab:
    """A model's vocabulary: a token's bytes, and whether it ends generation.

    Both are pure functions of the token, asked once per generated token per slot, so each
    token's answer is kept: a dict lookup instead of ~25 us of ctypes and Python layers.
    """

    def __init__(self, llama: Any):
        import llama_cpp

        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._vocab = llama._model.vocab
        self._detokenize = llama.detokenize
        self.bos = llama.token_bos()  # -1 if the model has none
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends generation (EOS, EOT, ...)."""
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(self._is_eog(self._vocab, token))
        return eog

    def detokenize(self, token: int) -> bytes:
        """The bytes of one token (maybe part of a character)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._detokenize([token])
        return piece

    def piece(self, token: int) -> bytes:
        """The bytes of one token as written, control tokens included (`<|im_end|>`)."""
        return self._detokenize([token], special=True)


def vocab_mismatch(llama: Any, draft: Any) -> str | None:
    """Why `draft` cannot draft for `llama` (llama.cpp's common_speculative_are_compatible:
    vocabulary type, BOS/EOS, every token's text), or None if it can."""
    import llama_cpp as lib

    a, b = llama._model.vocab, draft._model.vocab
    if lib.llama_vocab_type(a) != lib.llama_vocab_type(b):
        return "the tokenizer types differ"
    for name, get in (("BOS", lib.llama_vocab_bos), ("EOS", lib.llama_vocab_eos)):
        if get(a) != get(b):
            return f"the {name} tokens differ ({get(b)} vs {get(a)})"
    if lib.llama_vocab_get_add_bos(a) != lib.llama_vocab_get_add_bos(b):
        return "one adds BOS and the other does not"
    n = lib.llama_vocab_n_tokens(a)
    if lib.llama_vocab_n_tokens(b) != n:
        return f"the draft has {lib.llama_vocab_n_tokens(b)} tokens, the model {n}"
    for token in range(n):
        if lib.llama_vocab_get_text(a, token) != lib.llama_vocab_get_text(b, token):
            return f"token {token} differs"
    return None


def evaluated_tokens(llama: Any) -> list[int]:
    """The tokens a `Llama`'s context holds now (what `generate` will reuse)."""
    return llama._input_ids[: llama.n_tokens].tolist()


def embed_tokens(llama: Any, tokens: list[int]) -> list[float] | list[list[float]]:
    """`Llama.embed` of token ids (it takes only text): the pooled vector, or one per token
    for a model without pooling; cut to `n_batch` tokens as `embed` cuts text."""
    import llama_cpp

    tokens = tokens[: llama.n_batch]
    ctx, batch = llama._ctx, llama._batch
    batch.reset()
    ctx.kv_cache_clear()
    batch.add_sequence(tokens, 0, True)
    try:
        ctx.decode(batch)
        n_embd = llama.n_embd()
        if llama.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            ptr = llama_cpp.llama_get_embeddings(ctx.ctx)
            return [ptr[j * n_embd : (j + 1) * n_embd] for j in range(len(tokens))]
        return llama_cpp.llama_get_embeddings_seq(ctx.ctx, 0)[:n_embd]
    finally:
        batch.reset()
        ctx.kv_cache_clear()
        llama.reset()


def logit_bias_processor(bias: dict[int, float]) -> Any:
    """A `Llama.generate` logits processor that adds `bias` to the named tokens."""
    import numpy as np
    from llama_cpp import LogitsProcessorList

    ids = np.fromiter(bias.keys(), dtype=np.intc)
    values = np.fromiter(bias.values(), dtype=np.single)

    def apply(_input_ids: Any, scores: Any) -> Any:
        scores[ids] += values
        return scores

    return LogitsProcessorList([apply])


def stopping_criteria(stop: Callable[[], bool]) -> Any:
    """Stopping criteria for `create_chat_completion`: asked after every token."""
    from llama_cpp import StoppingCriteriaList

    return StoppingCriteriaList([lambda _ids, _logits: stop()])


class AbortFlag:
    """A flag that makes a context's decodes stop at the next graph node once raised.

    llama.cpp polls `bool cb(void *data)` between graph nodes. libc's strlen over a
    one-byte flag string is exactly that, in C: no Python callback (and no GIL) on
    the hot path, so it can stay installed.
    """

    def __init__(self, ctx: Any):
        import llama_cpp

        self._flag = ctypes.create_string_buffer(2)
        libc = ctypes.CDLL(None)
        # Kept referenced: llama.cpp holds only the raw pointers.
        self._cb = ctypes.cast(libc.strlen, llama_cpp.ggml_abort_callback)
        llama_cpp.llama_set_abort_callback(ctx, self._cb, ctypes.cast(self._flag, ctypes.c_void_p))

    def set(self, raised: bool = True) -> None:
        """Raise (or lower) the flag; any thread may call it."""
        self._flag[0] = b"\x01" if raised else b"\x00"
