"""The batching engine's context on a `Llama`'s model: its batch, its memory, its sequences'
saved states."""

from __future__ import annotations

import ctypes
from typing import Any

from llamapool.pool.llama_adapter.model import AbortFlag, flash_attn_type_of

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
        model = llama._model.model
        self._n_vocab = llama.n_vocab()
        self._can_cut = not (
            llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        )

    @property
    def flash_attn_type(self) -> int:
        """The flash attention type this context was made with."""
        return self._context.params.flash_attn_type

    @property
    def n_threads(self) -> int:
        """The threads its next decode runs (llama_n_threads)."""
        return self._llama_cpp.llama_n_threads(self._context.ctx)

    def set_threads(self, n_threads: int) -> None:
        """Decode with `n_threads` threads, one token or a prompt batch, from the next
        decode on (llama_set_n_threads: llama.cpp reads it per decode)."""
        self._llama_cpp.llama_set_n_threads(self._context.ctx, n_threads, n_threads)

    def clear(self) -> None:
        """Start building the next batch."""
        self.n_tokens = 0

    def add(
        self, tokens: list[int], *, pos: int, seq: int, logits: bool, every: bool = False
    ) -> int:
        """Append `tokens` of sequence `seq` from position `pos`; the index of the last one.

        Only the last token's logits are computed, and only when `logits`; with `every`,
        each token's (a prompt whose own log-probabilities are asked for, a slot's sampled
        token and the drafts it verifies).
        """
        batch, i = self._tokens, self.n_tokens
        for j, token in enumerate(tokens):
            batch.token[i + j] = token
            batch.pos[i + j] = pos + j
            batch.n_seq_id[i + j] = 1
            batch.seq_id[i + j][0] = seq
            batch.logits[i + j] = every
        last = i + len(tokens) - 1
        batch.logits[last] = logits or every
        self.n_tokens = last + 1
        return last

    def logits(self, index: int) -> Any:
        """The logits at `index` of the last decode, as a NumPy view (valid until the next)."""
        import numpy as np

        row = self._llama_cpp.llama_get_logits_ith(self._context.ctx, index)
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,))

    @property
    def n_vocab(self) -> int:
        """The model's vocabulary size."""
        return self._n_vocab

    @property
    def can_cut(self) -> bool:
        """Whether `keep` can cut a sequence in the middle (not a recurrent or hybrid
        memory): speculative steps need it to drop rejected drafts."""
        return self._can_cut

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
