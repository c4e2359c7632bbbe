"""Sampling: each slot's native sampler chain, and grammars (JSON Schema → GBNF)."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

from llamapool.pool.llama_adapter.model import PENALTY_LAST_N

if TYPE_CHECKING:
    from llamapool.pool.llama_adapter.context import BatchContext
    from llamapool.pool.prepare import Prepared

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
            penalty_last_n=PENALTY_LAST_N,
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
            lowered = len(prep.logit_bias) + (PENALTY_LAST_N if penalties != (1, 0, 0) else 0)
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
