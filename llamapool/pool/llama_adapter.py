"""Everything llamapool asks of llama-cpp-python, in one module.

The engines need a few things `llama_cpp.Llama` keeps private: its model pointer (to make
a second context and read the vocabulary), its chat handlers (to find the formatter
inside one), its evaluated tokens, its internal context and sampler wrappers. Each use is
a small named function or class here, so an upgrade of llama-cpp-python (pinned in
pyproject.toml) is checked against this file alone. No other llamapool module imports
llama_cpp (tests/test_llama_adapter.py holds them to it).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llamapool.config import LlamaSettings
    from llamapool.pool.prepare import Prepared

# llama_decode's status when the abort callback stopped it.
DECODE_ABORTED = 2
# The sampler chain's repetition window, as in llama-cpp-python's Llama.
_PENALTY_LAST_N = 64
# llama.cpp's llama_split_mode values, by the config's names.
_SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}


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
    """A model's vocabulary: a token's bytes, and whether it ends generation."""

    def __init__(self, llama: Any):
        import llama_cpp

        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._vocab = llama._model.vocab
        self._detokenize = llama.detokenize

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends generation (EOS, EOT, ...)."""
        return bool(self._is_eog(self._vocab, token))

    def detokenize(self, token: int) -> bytes:
        """The bytes of one token (maybe part of a character)."""
        return self._detokenize([token])


def evaluated_tokens(llama: Any) -> list[int]:
    """The tokens a `Llama`'s context holds now (what `generate` will reuse)."""
    return llama._input_ids[: llama.n_tokens].tolist()


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


# -- the batching engine's context ------------------------------------------------


class BatchContext:
    """A second context on a `Llama`'s model, for `n_seq_max` sequences, and its batch.

    It copies the Llama's context parameters (threads, RoPE, ...), then sizes it: `n_ctx`
    cells in all, `n_batch` tokens per decode, split KV streams, and sets flash attention.
    """

    def __init__(self, llama: Any, *, n_ctx: int, n_batch: int, n_seq_max: int, flash_attn: str):
        import llama_cpp
        from llama_cpp import _internals

        self._llama_cpp = llama_cpp
        base = llama.context_params
        params = type(base).from_buffer_copy(base)
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        # Split KV streams: attention then reads only a sequence's own cells, which is
        # what makes batching unrelated requests pay (8 sequences, 2 cores: 202 vs 167
        # and 162 vs 136 tok/s in paired runs).
        params.kv_unified = False
        # Llama's own default is off; with it, a request's greedy text could change with
        # the batch it was decoded in (see docs/configuration.md, flash_attn).
        params.flash_attn_type = flash_attn_type_of(flash_attn)
        self._context = _internals.LlamaContext(model=llama._model, params=params, verbose=False)
        self.abort = AbortFlag(self._context.ctx)
        self._memory = llama_cpp.llama_get_memory(self._context.ctx)
        self._tokens = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.n_tokens = 0  # tokens in the batch being built

    @property
    def flash_attn_type(self) -> int:
        """The flash attention type this context was made with."""
        return self._context.params.flash_attn_type

    def clear(self) -> None:
        """Start building the next batch."""
        self.n_tokens = 0

    def add(self, tokens: list[int], *, pos: int, seq: int, logits: bool) -> int:
        """Append `tokens` of sequence `seq` from position `pos`; the index of the last one.

        Only the last token's logits are computed, and only when `logits`.
        """
        batch, i = self._tokens, self.n_tokens
        for j, token in enumerate(tokens):
            batch.token[i + j] = token
            batch.pos[i + j] = pos + j
            batch.n_seq_id[i + j] = 1
            batch.seq_id[i + j][0] = seq
            batch.logits[i + j] = False
        last = i + len(tokens) - 1
        batch.logits[last] = logits
        self.n_tokens = last + 1
        return last

    def decode(self) -> int:
        """Decode the batch built since `clear`; llama_decode's status (0: done)."""
        self._tokens.n_tokens = self.n_tokens
        return self._llama_cpp.llama_decode(self._context.ctx, self._tokens)

    def keep(self, seq: int, n: int) -> bool:
        """Cut sequence `seq` to its first `n` tokens; False if the memory cannot (then
        nothing changed: recurrent and hybrid memories only drop whole sequences)."""
        return bool(self._llama_cpp.llama_memory_seq_rm(self._memory, seq, n, -1))

    def clear_seq(self, seq: int) -> None:
        """Drop everything sequence `seq` holds."""
        self._llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def save_seq(self, seq: int) -> SeqState | None:
        """A copy of everything sequence `seq` holds (its KV cells), or None if it is empty
        or llama.cpp cannot write it."""
        lib = self._llama_cpp
        size = lib.llama_state_seq_get_size(self._context.ctx, seq)
        if size == 0:
            return None
        buffer = (ctypes.c_uint8 * size)()
        if lib.llama_state_seq_get_data(self._context.ctx, buffer, size, seq) != size:
            return None
        return SeqState(buffer)

    def load_seq(self, seq: int, state: SeqState) -> bool:
        """Replace what sequence `seq` holds with `state`; False (and `seq` empty) if
        llama.cpp refused it (no room in the sequence's stream, another model's state)."""
        lib = self._llama_cpp
        loaded = lib.llama_state_seq_set_data(self._context.ctx, state.buffer, state.nbytes, seq)
        if loaded != state.nbytes:
            lib.llama_memory_seq_rm(self._memory, seq, -1, -1)
            return False
        return True

    def copy_seq(self, src: int, dst: int) -> None:
        """Make sequence `dst` hold what `src` holds (llama_memory_seq_cp). With split KV
        streams this copies `src`'s whole stream, all n_ctx cells, at the next decode."""
        self._llama_cpp.llama_memory_seq_rm(self._memory, dst, -1, -1)
        self._llama_cpp.llama_memory_seq_cp(self._memory, src, dst, -1, -1)

    def close(self) -> None:
        """Free the batch and the context (the process exit would too)."""
        self._llama_cpp.llama_batch_free(self._tokens)
        self._context.close()


class SeqState:
    """One sequence's saved KV cells (llama_state_seq_get_data), held in a C buffer so that
    restoring it copies nothing in Python."""

    __slots__ = ("buffer",)

    def __init__(self, buffer: Any):
        self.buffer = buffer

    @property
    def nbytes(self) -> int:
        """The state's size in bytes."""
        return len(self.buffer)


# -- grammars -------------------------------------------------------------------------


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """GBNF (root rule `root`) for the JSON values valid against `schema`.

    llama-cpp-python's converter, a port of llama.cpp's json_schema_to_grammar.py; it
    resolves local `$ref`s in place, so it gets a copy. Raises what the converter raises
    (ValueError, AssertionError, ...) for a schema it cannot turn into a grammar.
    """
    import copy

    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(copy.deepcopy(schema), ""), "")
    # The port's string character admits raw control characters, which JSON forbids in
    # strings (json.loads refuses them); llama.cpp's own converter excludes them since.
    return converter.format_grammar().replace(_PORT_CHAR, _JSON_CHAR)


_PORT_CHAR = r'char ::= [^"\\] | '
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | '


class Grammars:
    """A model's parsed grammars by GBNF text: each is parsed once, then cloned per request
    (a clone copies the parsed rules and the start state, no parsing)."""

    def __init__(self, llama: Any, size: int = 64):
        from collections import OrderedDict

        self._vocab = llama._model.vocab
        self._size = size
        self._parsed: OrderedDict[str, Any] = OrderedDict()

    def fresh(self, text: str) -> Any:
        """A grammar sampler (a one-sampler chain) at the start of `text`; ValueError if
        llama.cpp cannot parse it."""
        import llama_cpp
        from llama_cpp import _internals

        proto = self._parsed.get(text)
        if proto is None:
            grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, text.encode(), b"root")
            if not grammar:
                raise ValueError("llama.cpp could not parse the grammar (its log says where)")
            proto = _internals.LlamaSampler()
            llama_cpp.llama_sampler_chain_add(proto.sampler, grammar)
            self._parsed[text] = proto
            if len(self._parsed) > self._size:
                self._parsed.popitem(last=False)
        else:
            self._parsed.move_to_end(text)
        return proto.clone()


class Sampler:
    """One request's native sampler chain, in the order llama-cpp-python's Llama builds it:
    logit bias → penalties → top-k → top-p → min-p → temperature → seeded dist, or greedy
    at temperature 0; and, for a constrained request, its grammar (see `sample`)."""

    def __init__(self, prep: Prepared, n_vocab: int, grammars: Grammars | None = None):
        import numpy as np
        from llama_cpp import _internals

        chain = _internals.LlamaSampler()
        if prep.logit_bias:
            chain.add_logit_bias(n_vocab, prep.logit_bias)
        chain.add_penalties(
            n_vocab=n_vocab,
            penalty_last_n=_PENALTY_LAST_N,
            penalty_repeat=prep.repeat_penalty,
            penalty_freq=prep.frequency_penalty,
            penalty_present=prep.presence_penalty,
        )
        if prep.temperature == 0.0:
            chain.add_greedy()
        else:
            chain.add_top_k(prep.top_k)
            chain.add_top_p(prep.top_p, 1)
            chain.add_min_p(prep.min_p, 1)
            chain.add_temp(prep.temperature)
            chain.add_dist(prep.seed)
        self._chain = chain
        self._grammar: Any = None
        if prep.grammar is not None:
            assert grammars is not None, "a constrained request needs the model's Grammars"
            self._grammar = grammars.fresh(prep.grammar)
            self._cur = _internals.LlamaTokenDataArray(n_vocab=n_vocab)
            self._one = _OneToken()
            self._greedy = prep.temperature == 0.0
            self._raised = np.array([t for t, b in prep.logit_bias.items() if b > 0], np.intc)
            penalties = (prep.repeat_penalty, prep.frequency_penalty, prep.presence_penalty)
            lowered = len(prep.logit_bias) + (_PENALTY_LAST_N if penalties != (1, 0, 0) else 0)
            self._need = prep.top_k + lowered if 0 < prep.top_k <= _BEST // 2 else None
            # Penalties below 1 (or negative) lift tokens: then only the whole vocabulary.
            lifts = penalties[0] < 1 or min(penalties[1:]) < 0 or n_vocab <= 2 * _BEST
            self._subset = not lifts and (self._greedy or self._need is not None)

    def sample(self, context: BatchContext, index: int) -> int:
        """Sample (and accept) a token from the logits at `index` of the last batch."""
        if self._grammar is None:
            return self._chain.sample(context._context, index)
        return self._sample_constrained(context, index)

    def _sample_constrained(self, context: BatchContext, index: int) -> int:
        # llama-server's order (common_sampler_sample): sample as if free, keep the token
        # when the grammar allows it, and only otherwise pay for the grammar over the whole
        # vocabulary (~50k candidates) and sample again. A model that follows the format
        # (most tokens) costs one token's check.
        import llama_cpp
        import numpy as np

        chain, grammar, cur = self._chain.sampler, self._grammar.sampler, self._cur
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(context._context.ctx, index), shape=(cur.n_vocab,)
        )
        cur.copy_logits(logits)
        cur.candidates.selected = -1
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(cur.candidates))
        token = int(cur.candidates_data.id[cur.candidates.selected])
        if not self._one.allowed(grammar, token):
            token = self._among_best(logits)
            if token is None:
                cur.copy_logits(logits)
                cur.candidates.selected = -1
                llama_cpp.llama_sampler_apply(grammar, ctypes.byref(cur.candidates))
                llama_cpp.llama_sampler_apply(chain, ctypes.byref(cur.candidates))
                token = int(cur.candidates_data.id[cur.candidates.selected])
            if not self._one.allowed(grammar, token):  # no token of the vocabulary fits
                raise RuntimeError("the grammar allows no token of this model's vocabulary")
        # Both accept only a token the grammar allows: llama.cpp aborts the process on one
        # it does not (an end-of-generation token before the grammar is complete).
        llama_cpp.llama_sampler_accept(grammar, token)
        llama_cpp.llama_sampler_accept(chain, token)
        return token

    def _among_best(self, logits: Any) -> int | None:
        """The grammar-first chain's token, found among the `_BEST` highest logits only, or
        None when that is not certain (then the caller runs the whole vocabulary).

        The grammar costs ~10-25 ms over SmolLM2's 49k tokens, ~0.2 ms over 512. Tokens
        outside them have logits ≤ `floor`, and neither bias (raised tokens are added) nor
        penalties (`_subset`) lift one above it. So greedy is exact when its pick is ≥
        `floor`; sampling is when at least `_need` (top-k plus every token bias or penalties
        may lower) survive the grammar: top-k keeps the same tokens.
        """
        import llama_cpp
        import numpy as np

        if not self._subset:
            return None
        order = np.argpartition(logits, -(_BEST + 1))
        ids, floor = order[-_BEST:], logits[order[-(_BEST + 1)]]
        if self._raised.size:
            ids = np.union1d(ids, self._raised)
        cur, n = self._cur, len(ids)
        data = cur.candidates_data
        data.id[:n], data.logit[:n], data.p[:n] = ids, logits[ids], 0.0
        cur.candidates.size, cur.candidates.sorted, cur.candidates.selected = n, False, -1
        llama_cpp.llama_sampler_apply(self._grammar.sampler, ctypes.byref(cur.candidates))
        alive = int(np.count_nonzero(data.logit[:n] != -np.inf))
        if alive == 0 or (not self._greedy and alive < self._need):
            return None
        llama_cpp.llama_sampler_apply(self._chain.sampler, ctypes.byref(cur.candidates))
        if self._greedy and data.logit[cur.candidates.selected] < floor:
            return None  # greedy, penalties and bias keep no state: the rerun is the same
        return int(data.id[cur.candidates.selected])


# How many of the highest logits a grammar is tried on first (see Sampler._among_best).
_BEST = 512


class _OneToken:
    """A one-candidate token array, to ask a grammar whether it allows a single token."""

    def __init__(self) -> None:
        import llama_cpp

        self._data = (llama_cpp.llama_token_data * 1)()
        self._array = llama_cpp.llama_token_data_array(
            data=ctypes.cast(self._data, llama_cpp.llama_token_data_p),
            size=1,
            selected=-1,
            sorted=False,
        )

    def allowed(self, grammar: Any, token: int) -> bool:
        import llama_cpp

        self._data[0].id, self._data[0].logit, self._data[0].p = token, 1.0, 0.0
        self._array.size, self._array.selected = 1, -1
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(self._array))
        return self._data[0].logit != float("-inf")
