"""Log-probabilities from the logits of a batch: the model's own distribution.

They are the log-softmax of the raw logits, before logit bias, penalties, temperature,
truncation or a grammar touch them, as OpenAI and llama-server report them: what the
model thinks of a token, not how likely this request's sampler was to pick it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamapool.pool.llama_adapter.context import BatchContext


class LogprobReader:
    """Reads a token's log-probability, and the most likely tokens, at a row of the last
    decoded batch of a `BatchContext` (a row whose logits the batch asked for)."""

    def __init__(self, context: BatchContext, n_vocab: int):
        import llama_cpp

        self._logits_ith = llama_cpp.llama_get_logits_ith
        self._context = context
        self.n_vocab = n_vocab

    def at(self, row: int, token: int, n_top: int) -> tuple[float, list[tuple[int, float]]]:
        """`token`'s log-probability at `row`, and the `n_top` most likely tokens there
        with theirs, most likely first."""
        import numpy as np

        ctx = self._context._context.ctx
        logits = np.ctypeslib.as_array(self._logits_ith(ctx, row), shape=(self.n_vocab,))
        peak = float(logits.max())
        norm = peak + math.log(float(np.exp(logits - peak).sum(dtype=np.float64)))
        top: list[tuple[int, float]] = []
        if n_top > 0:
            k = min(n_top, self.n_vocab)
            ids = np.argpartition(logits, -k)[-k:]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            top = [(int(i), float(logits[i]) - norm) for i in ids]
        return float(logits[token]) - norm, top
