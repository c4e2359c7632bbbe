"""Request preparation's pure parts: stop sequences, UTF-8 output, seeds, temperatures."""

from __future__ import annotations

from llamapool.ipc.protocol import TokenLogprob
from llamapool.pool.prepare import (
    Prepared,
    TextOut,
    _find_stop,
    _held_back,
    llama_seed,
    temperature,
)


def test_stop_helpers():
    assert _find_stop("hello world", ["wor", "lo"]) == 3
    assert _find_stop("hello", ["xyz"]) is None
    assert _held_back("hello wo", ["world"]) == 2
    assert _held_back("hello", ["world"]) == 0
    assert _held_back("abc", ["c", "bcd"]) == 2


class _Pieces:
    """Token ids standing for byte strings: what TextOut needs of a model, for text cases
    no vocabulary here can produce (a stop sequence and a split character in one token)."""

    def __init__(self, pieces: dict[int, bytes]):
        self._pieces = pieces

    def detokenize(self, token: int) -> bytes:
        return self._pieces[token]

    def is_eog(self, token: int) -> bool:
        return token == 0


def _text_out(pieces: dict[int, bytes], stops: list[str]):
    emitted: list[str] = []
    prep = Prepared(
        tokens=[], max_tokens=10, stops=stops, seed=0, top_k=40, top_p=1.0, min_p=0.0,
        temperature=0.0, repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
        logit_bias={},
    )  # fmt: skip
    return TextOut(_Pieces(pieces), prep, lambda text, n: emitted.append(text)), emitted


def test_bytes_after_a_stop_sequence_are_dropped():
    out, emitted = _text_out({1: b"abX", 2: b"Y\xf0\x9f"}, ["XZ", "Y"])
    assert not out.push(1)
    assert out.push(2)
    out.result(1, 0, 0.0, None)
    assert "".join(emitted) == "abX"  # no U+FFFD from the emoji's first half after "Y"
    assert out.finish == "stop"


def test_a_split_character_at_the_end_is_replaced_not_lost():
    out, emitted = _text_out({1: b"ok\xf0\x9f", 0: b""}, [])
    assert not out.push(1)
    assert out.push(0)  # end of generation with half a character held
    out.result(1, 0, 0.0, None)
    assert "".join(emitted) == "ok\ufffd"


def test_logprob_entries_go_with_their_text_and_with_a_cut():
    pieces = {1: b"ab", 2: b"X", 3: b"Y", 4: b"cd"}
    sent: list[tuple[str, list[bytes]]] = []
    prep = Prepared(
        tokens=[], max_tokens=10, stops=["XY"], seed=0, top_k=40, top_p=1.0, min_p=0.0,
        temperature=0.0, repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
        logit_bias={},
    )  # fmt: skip
    out = TextOut(
        _Pieces(pieces),
        prep,
        lambda text, n, lp=None: sent.append((text, [e.token for e in lp or []])),
    )
    for token in (1, 2, 4, 2, 3):  # "ab", "X" held (it may start "XY"), "cd", then "XY"
        finished = out.push(token, TokenLogprob(pieces[token], -1.0, [], 0))
    assert finished and out.finish == "stop"
    out.result(0, 0, 0.0, None)
    assert sent == [("ab", [b"ab"]), ("Xcd", [b"X", b"cd"]), ("", [])]


def test_seeds_and_temperatures_as_llama_cpp_takes_them():
    # 32-bit seeds; 0xFFFFFFFF would mean "random": every other seed maps below it.
    assert llama_seed(None) is None
    assert llama_seed(5) == 5
    assert llama_seed(0xFFFFFFFF) == 0 and llama_seed(0xFFFFFFFF + 7) == 7
    assert llama_seed(-1) is None  # random, as in llama-cpp-python
    assert 0 <= llama_seed(-2) < 0xFFFFFFFF
    assert temperature(1e-40) == 0.0 and temperature(0.0) == 0.0
    assert temperature(0.7) == 0.7
