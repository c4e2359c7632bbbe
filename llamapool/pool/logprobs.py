"""One request's log-probabilities and echo in the batching engine.

Entries are the model's own distribution at each position (`llama_adapter.LogprobReader`:
log-softmax of the raw logits, before bias, penalties, temperature or grammar). A sampled
token's entry comes from the row it was sampled from; with `echo` and `logprobs`, prompt
token i's comes from row i - 1 of the prompt's evaluation, whose every row then asks for
logits, and the first echoed token has none (nothing predicts it), as in OpenAI's and
llama-cpp-python's completions. The echo is the prompt as the client sent it: a text
prompt without the BOS (or the prefix space) the tokenizer added, token ids as given, a
BOS among them too (so the entries line up with the client's own tokens, as
lm-evaluation-harness counts them).
"""

from __future__ import annotations

import codecs

from llamapool.ipc.protocol import TokenLogprob, TopLogprob
from llamapool.pool.llama_adapter import LogprobReader, Vocab
from llamapool.pool.prepare import Prepared


class Scoring:
    """What one request asked for beyond text: logprobs with `n_top` alternatives per
    token (None: none) and the echo of its prompt; builds the entries in text order."""

    def __init__(self, prep: Prepared, reader: LogprobReader, vocab: Vocab, *, completion: bool):
        self.n_top = prep.logprobs
        self.echo = prep.echo
        self._reader, self._vocab = reader, vocab
        self._prompt = prep.tokens
        added_bos = prep.prompt_text is not None and prep.tokens[0] == vocab.bos
        self._first = 1 if added_bos else 0
        self._text_decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._entries: list[TokenLogprob] = []  # the echoed prompt's, until it is emitted
        self._echo_text = prep.prompt_text
        if self.echo and self._echo_text is None:
            pieces = b"".join(vocab.piece(t) for t in self._prompt[self._first :])
            self._echo_text = pieces.decode("utf-8", "replace")
        # `text_offset` counts from the start of the prompt, as OpenAI's completions do.
        self.offset = 0
        if completion and not self.echo and self.n_top is not None:
            if prep.prompt_text is not None:
                self.offset = len(prep.prompt_text)
            else:
                self.offset = sum(len(self._advance(t)) for t in self._prompt[self._first :])
                self._text_decoder.reset()
        if self.wants_prompt_rows and self._first < len(self._prompt):
            piece = vocab.piece(self._prompt[self._first])
            if prep.prompt_text is not None and self._added_space(prep.prompt_text):
                piece = piece[1:]
            self._entries.append(TokenLogprob(piece, None, [], self.offset))
            self.offset += len(self._text_decoder.decode(piece))

    def _added_space(self, text: str) -> bool:
        """Whether the tokenizer put a space before the prompt `text` (SentencePiece's
        prefix space): not the client's, so its first token is echoed without it, as
        llama.cpp's detokenizer drops it."""
        pieces = b"".join(self._vocab.piece(t) for t in self._prompt[self._first :])
        spelled = pieces.decode("utf-8", "replace")
        return len(spelled) - len(spelled.lstrip(" ")) > len(text) - len(text.lstrip(" "))

    @property
    def wants_prompt_rows(self) -> bool:
        """Whether every prompt row's logits are needed (echo with logprobs): then the
        prompt is evaluated whole, no cached prefix reused."""
        return self.echo and self.n_top is not None

    def prompt_rows(self, first_row: int, pos: int, n: int) -> None:
        """Read the entries the `n` prompt rows from `first_row` (positions from `pos`)
        predict: each row's logits score the next prompt token."""
        end = len(self._prompt)
        for j in range(n):
            q = pos + j + 1
            if self._first < q < end:
                self._entries.append(self._entry(first_row + j, self._prompt[q]))

    def opening(self) -> tuple[str, list[TokenLogprob] | None]:
        """The echoed prompt's text and entries, once its evaluation is done."""
        entries, self._entries = self._entries, []
        return self._echo_text or "", entries if self.n_top is not None else None

    def sampled(self, row: int, token: int) -> TokenLogprob | None:
        """The entry of a token sampled from `row`, if logprobs were asked for."""
        return None if self.n_top is None else self._entry(row, token)

    def _entry(self, row: int, token: int) -> TokenLogprob:
        logprob, top = self._reader.at(row, token, self.n_top or 0)
        piece = self._vocab.piece
        alternatives = [TopLogprob(piece(t), lp) for t, lp in top]
        entry = TokenLogprob(piece(token), logprob, alternatives, self.offset)
        self.offset += len(self._advance(token))
        return entry

    def _advance(self, token: int) -> str:
        return self._text_decoder.decode(self._vocab.piece(token))
