"""Everything llamapool asks of llama-cpp-python, in one package.

The engines need a few things `llama_cpp.Llama` keeps private: its model pointer (to make
a second context and read the vocabulary), its chat handlers (to find the formatter
inside one), its evaluated tokens, its internal context and sampler wrappers. Each use is
a small named function or class here, so an upgrade of llama-cpp-python (pinned in
pyproject.toml) is checked against this package alone. No other llamapool module imports
llama_cpp (tests/test_llama_adapter.py holds them to it).
"""

from __future__ import annotations

from llamapool.pool.llama_adapter.context import (  # noqa: F401
    BatchContext,
    SeqState,
)
from llamapool.pool.llama_adapter.logprobs import LogprobReader  # noqa: F401
from llamapool.pool.llama_adapter.model import (  # noqa: F401
    DECODE_ABORTED,
    PENALTY_LAST_N,
    AbortFlag,
    Vocab,
    chat_formatter,
    context_flash_attn_type,
    embed_tokens,
    evaluated_tokens,
    flash_attn_type_of,
    handler_only,
    load_library,
    logit_bias_processor,
    open_llama,
    set_threads,
    stopping_criteria,
    vocab_mismatch,
)
from llamapool.pool.llama_adapter.sampling import (  # noqa: F401
    Grammars,
    Sampler,
    json_schema_grammar,
)
