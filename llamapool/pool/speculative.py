"""Speculative decoding for the batching engine: drafts that the next decode verifies.

Each generating slot may put, after its sampled token, up to `draft_max` drafted tokens
into the same `llama_decode` as every other slot's work, with logits at each of those
rows. The slot then samples at each row with its own sampler chain and keeps going while
the sampled token equals the draft (llama.cpp's `common_sampler_sample_and_accept_n`):
`accept_run`. The rejected drafts' cells are cut off the sequence again.

Why this is exact: every emitted token is sampled from the target's own distribution at
its position (the row's logits are those the next plain step would compute) with the
slot's full chain (bias, penalties, top-k/p, min-p, temperature, grammar), one chain
sample (one random draw) per emitted token in the same order as without drafts. A seeded
request's text is therefore the one it gets without speculation, at any temperature. For
a deterministic draft (n-gram lookup, a greedy draft model) this is the standard
rejection scheme: the draft is a point mass (q = 1), accepted with probability
min(1, p/q) = p, and on rejection the residual max(0, p - q) renormalised is p without
the draft token, which is what sampling p and comparing yields.

Drafts come from a `Drafter`: `NgramDrafter` (prompt lookup: what followed the latest
earlier occurrence of the text's last n tokens) or `ModelDrafter` (greedy tokens of a
smaller model with the same vocabulary, one sequence per slot in a context of its own).
`Speculator` keeps each slot's adaptive draft length and counts, and shares the decode's
room for drafts fairly among the slots.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import numpy as np

from llamapool.config import LlamaSettings, SpeculativeSettings
from llamapool.pool import llama_adapter
from llamapool.pool.prompt_cache import shared_prefix

log = logging.getLogger(__name__)

# A slot's acceptance before its first verdict: 3 of 4 drafted tokens (a Beta prior), and
# how much each verdict's weight decays by the next, so it follows the text's mood (a
# passage being copied, then free text).
_PRIOR_HITS, _PRIOR_MISSES = 3.0, 1.0
_DECAY = 0.8
# A slot whose drafts do not pay drafts one token after this many steps without, to learn
# whether its text has started repeating.
_PROBE_EVERY = 16


def accept_run(
    sample: Callable[[int], int], push: Callable[[int, int], bool], first: int, run: list[int]
) -> tuple[int, int | None]:
    """Sample at the rows `first`, `first + 1`, ... holding `run` (the slot's sampled token,
    then its drafts), while each sampled token equals the next draft.

    `push` takes each row and its sampled token and says whether the request is finished.
    Returns how many of `run`'s tokens are now the sequence's (the sampled token and the
    accepted drafts) and the token to decode next, or None when the request finished.
    """
    for i in range(len(run)):
        token = sample(first + i)
        if push(first + i, token):
            return i + 1, None
        if i + 1 == len(run) or token != run[i + 1]:
            return i + 1, token
    raise AssertionError("unreachable: the last row always returns")


@dataclass(frozen=True)
class Ask:
    """A generating slot that may draft: what its sequence holds, the token it decodes
    next, and how many drafts fit (its context and its max_tokens)."""

    seq: int
    cached: list[int]
    next_token: int
    limit: int


class Drafter(Protocol):
    """Proposes each asking slot's next tokens."""

    # Whether a slot whose drafts do not pay should still draft a token now and then: cheap
    # for a lookup; a draft model would have to evaluate everything since its last draft.
    probes: bool

    def begin(self, seq: int) -> None:
        """A new request starts on `seq`."""

    def draft(self, asks: list[tuple[Ask, int]]) -> dict[int, list[int]]:
        """At most `n` tokens for each (ask, n); slots with nothing to propose are left out."""

    def close(self) -> None:
        """Free what the drafter holds."""


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the text's
    last n tokens (prompt and output), n from `ngram_max` down to `ngram_min`.

    Each slot's text lives in a NumPy buffer, appended as its sequence grows; a lookup
    compares the whole text at once, n positions a pass (~µs per thousand tokens).
    """

    probes = True

    def __init__(self, settings: SpeculativeSettings, n_slots: int, n_ctx: int):
        self.ngram_min, self.ngram_max = settings.ngram_min, settings.ngram_max
        self._text = [np.zeros(n_ctx + 1, dtype=np.int32) for _ in range(n_slots)]
        self._synced = [0] * n_slots  # leading tokens of the slot's sequence in its buffer

    def begin(self, seq: int) -> None:
        self._synced[seq] = 0  # the new request's prefix may have come from elsewhere

    def draft(self, asks: list[tuple[Ask, int]]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for ask, n in asks:
            tokens = self._lookup(ask, n)
            if tokens:
                out[ask.seq] = tokens
        return out

    def _lookup(self, ask: Ask, n: int) -> list[int]:
        text, done, held = self._text[ask.seq], self._synced[ask.seq], len(ask.cached)
        # What a sequence holds only grows between lookups (a step keeps the sampled token
        # and accepted drafts), so the buffer catches up from where it was.
        if held > done:
            text[done:held] = ask.cached[done:]
            self._synced[ask.seq] = held
        text[held] = ask.next_token
        size = held + 1
        if size <= self.ngram_min:
            return []
        # ends[e]: text[e - k] == text[size - 1 - k] for k < the n-gram length so far; e is
        # where an earlier occurrence ends (the token after it exists: e < size - 1).
        ends = text[: size - 1] == text[size - 1]
        found = -1
        for length in range(1, self.ngram_max + 1):
            if length > 1:
                if length > size - 1:
                    break
                ends[length - 1 :] &= text[: size - length] == text[size - length]
                ends[: length - 1] = False
            hits = np.flatnonzero(ends)
            if hits.size == 0:
                break
            if length >= self.ngram_min:
                found = int(hits[-1])
        if found < 0:
            return []
        return text[found + 1 : min(found + 1 + n, size)].tolist()

    def close(self) -> None:
        pass


class ModelDrafter:
    """Greedy drafts of a second model: one sequence per slot in its own context, brought
    level with the slot's sequence before each draft (the first one evaluates the prompt).

    It stops a slot's draft at a token whose probability is below `draft_p_min`.
    """

    probes = False

    def __init__(self, cfg: LlamaSettings, n_slots: int, n_ctx: int, target: Any):
        settings = cfg.speculative
        assert settings is not None and settings.draft_model_path is not None
        draft_cfg = msgspec.structs.replace(
            cfg,
            model_path=settings.draft_model_path,
            chat_format=None,
            chat_format_template=None,
            speculative=None,
        )
        self.llama = llama_adapter.open_llama(draft_cfg, n_ctx=64)
        why = llama_adapter.vocab_mismatch(target, self.llama)
        if why is not None:
            raise ValueError(
                f"draft model {settings.draft_model_path} cannot draft for {cfg.model_path}: {why}"
            )
        self.p_min = settings.draft_p_min
        self.n_batch = cfg.n_batch
        self.context = llama_adapter.BatchContext(
            self.llama,
            n_ctx=n_ctx * n_slots,
            n_batch=cfg.n_batch,
            n_seq_max=n_slots,
            flash_attn=cfg.flash_attn,
        )
        self._held: list[list[int]] = [[] for _ in range(n_slots)]  # what each sequence holds

    def begin(self, seq: int) -> None:
        pass  # the next draft compares what the sequence holds with the slot's

    def draft(self, asks: list[tuple[Ask, int]]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        rows = self._catch_up([ask for ask, _ in asks])
        if rows is None:
            return out
        want = {ask.seq: n for ask, n in asks}
        while rows:
            nxt: dict[int, int] = {}
            for seq, row in rows.items():
                logits = self.context.logits(row)
                token = int(logits.argmax())
                p = 1.0 / float(np.exp(logits - logits[token]).sum())
                if p < self.p_min:
                    continue
                drafted = out.setdefault(seq, [])
                drafted.append(token)
                if len(drafted) < want[seq]:
                    nxt[seq] = token
            if not nxt:
                break
            self.context.clear()
            rows = {}
            for seq, token in nxt.items():
                held = self._held[seq]
                rows[seq] = self.context.add([token], pos=len(held), seq=seq, logits=True)
                held.append(token)
            if self.context.decode() != 0:
                self._drop(list(nxt))
                break
        return out

    def _catch_up(self, asks: list[Ask]) -> dict[int, int] | None:
        """Make each sequence hold its slot's tokens and sampled token; the batch row of
        each one's last logits (None when a decode failed)."""
        feed: dict[int, list[int]] = {}
        for ask in asks:
            text, held = ask.cached + [ask.next_token], self._held[ask.seq]
            keep = min(shared_prefix(held, text), len(text) - 1)
            if keep < len(held) and not self.context.keep(ask.seq, keep):
                self.context.clear_seq(ask.seq)
                keep = 0
            del held[keep:]
            feed[ask.seq] = text[keep:]
        rows: dict[int, int] = {}
        while feed:
            self.context.clear()
            room = self.n_batch
            for seq in list(feed):
                if room <= 0:
                    break
                chunk, rest = feed[seq][:room], feed[seq][room:]
                held = self._held[seq]
                at = self.context.add(chunk, pos=len(held), seq=seq, logits=not rest)
                held.extend(chunk)
                room -= len(chunk)
                if rest:
                    feed[seq] = rest
                else:
                    rows[seq] = at
                    del feed[seq]
            if self.context.decode() != 0:
                self._drop([ask.seq for ask in asks])
                return None
            if feed:  # another round overwrites the logits: keep only this round's slots
                rows = {}
        return rows

    def _drop(self, seqs: list[int]) -> None:
        for seq in seqs:
            self.context.clear_seq(seq)
            self._held[seq] = []

    def close(self) -> None:
        self.context.close()


def ubatches(groups: list[tuple[int, int]], n_ubatch: int) -> int:
    """How many ubatches llama.cpp splits a batch into with split KV streams, given each
    sequence's rows in batch order, as (seq, rows) (llama_batch_allocr::split_equal: a
    ubatch takes the same number of rows from a run of consecutive sequence ids)."""
    left = dict(groups)
    count = 0
    while any(left.values()):
        run: list[int] = []
        for seq, _ in groups:
            if left[seq] and (not run or seq == run[-1] + 1):
                run.append(seq)
        rows = max(1, min(min(left[seq] for seq in run), n_ubatch // len(run)))
        for seq in run:
            left[seq] = max(0, left[seq] - rows)
        count += 1
    return count


class StepCost:
    """What a decode costs: `per_ubatch × ubatches + per_row × rows` (llama.cpp computes
    each ubatch's graph in turn, reading every weight again), fitted by least squares to
    recent steps of generation only (older steps weigh less and less)."""

    def __init__(self, decay: float = 0.95):
        self.decay = decay
        self._w = self._uu = self._ur = self._rr = self._uy = self._ry = 0.0
        self._last: tuple[float, float] | None = None

    def observe(self, ubatches: int, rows: int, seconds: float) -> None:
        """A decode of `rows` rows in `ubatches` ubatches took `seconds`."""
        d, u, r = self.decay, ubatches, rows
        self._w = self._w * d + 1
        self._uu = self._uu * d + u * u
        self._ur = self._ur * d + u * r
        self._rr = self._rr * d + r * r
        self._uy = self._uy * d + u * seconds
        self._ry = self._ry * d + r * seconds

    def fit(self) -> tuple[float, float] | None:
        """(per_ubatch, per_row) in seconds, or None until the steps seen have differed
        enough in rows per ubatch to tell the two apart."""
        det = self._uu * self._rr - self._ur * self._ur
        if self._w < 4 or det < 0.05 * self._uu * self._rr:
            # Steps all alike again (no drafts for a while): the last fit still holds.
            return self._last
        per_ubatch = (self._rr * self._uy - self._ur * self._ry) / det
        per_row = (self._uu * self._ry - self._ur * self._uy) / det
        self._last = max(0.0, per_ubatch), max(0.0, per_row)
        return self._last


@dataclass
class _SlotDrafts:
    """One slot's drafting: its draft tokens' acceptance (decayed counts, from a prior),
    and its request's counts."""

    hits: float = _PRIOR_HITS  # drafted tokens accepted
    misses: float = _PRIOR_MISSES  # drafts cut by a wrong token
    wait: int = 0  # steps without drafting since the last draft
    drafted: int = 0
    accepted: int = 0

    @property
    def p(self) -> float:
        """The chance that its next drafted token is accepted, given the ones before were."""
        return self.hits / (self.hits + self.misses)


class Speculator:
    """Per slot, draft as many tokens as pay for what they cost. A drafted token is
    accepted with chance p given the ones before it, so the i-th yields p^i tokens; it
    costs a row, and a slot's drafts beyond the other slots' rows take a ubatch of their
    own (`ubatches`); a plain step yields a token per slot for what `StepCost` says it
    costs. Each slot takes the draft length with the best expected tokens over cost (plus,
    for a draft model, its own time per drafted token). On a GPU rows are nearly free and
    drafts run long; where a row costs almost a step (a small model on a CPU core) drafts
    stay short or stop, probing one token now and then. Drafts share the decode's room
    fairly."""

    def __init__(self, settings: SpeculativeSettings, drafter: Drafter, n_slots: int):
        self.settings = settings
        self.drafter = drafter
        self.cost = StepCost()
        self._draft_s = 0.0  # the drafter's own time per drafted token (EMA)
        self._slots = [_SlotDrafts() for _ in range(n_slots)]

    def begin(self, seq: int) -> None:
        """A new request starts on `seq`: acceptance from the prior, counts from 0."""
        self._slots[seq] = _SlotDrafts()
        self.drafter.begin(seq)

    def observe(self, ubatches: int, rows: int, seconds: float) -> None:
        """A decode of generating slots only, `rows` rows in `ubatches`, took `seconds`."""
        self.cost.observe(ubatches, rows, seconds)

    def plan(self, asks: list[Ask], room: int, n_ubatch: int) -> dict[int, list[int]]:
        """Each asking slot's drafts for this step, `room` tokens at most in all."""
        price = self._price(asks, n_ubatch)
        wants: dict[int, int] = {}
        for ask in asks:
            s = self._slots[ask.seq]
            n = min(self._length(s.p, price), ask.limit)
            if n == 0 and s.wait >= _PROBE_EVERY and self.drafter.probes:
                n = min(1, ask.limit)  # a probe keeps the estimate of p alive
            if n >= max(1, self.settings.draft_min):
                wants[ask.seq] = n
                s.wait = 0
            else:
                s.wait += 1
        shares = fair_shares(wants, room)
        chosen = [(a, shares[a.seq]) for a in asks if shares.get(a.seq, 0) > 0]
        if not chosen:
            return {}
        started = time.perf_counter()
        drafts = self.drafter.draft(chosen)
        n_drafted = sum(len(d) for d in drafts.values())
        if n_drafted:
            per_token = (time.perf_counter() - started) / n_drafted
            self._draft_s = 0.8 * self._draft_s + 0.2 * per_token if self._draft_s else per_token
        low = self.settings.draft_min
        return {seq: d for seq, d in drafts.items() if d and len(d) >= low}

    def _price(self, asks: list[Ask], n_ubatch: int) -> tuple[float, float] | None:
        """What drafting costs this step, in a plain step's tokens: (per drafted row, once
        for a slot that drafts at all); None while the cost is unknown."""
        fit = self.cost.fit()
        if fit is None or not self.settings.adaptive:
            return None
        per_ubatch, per_row = fit
        plain = ubatches([(a.seq, 1) for a in asks], n_ubatch)
        token = (per_ubatch * plain + per_row * len(asks)) / max(1, len(asks))
        if token <= 0:
            return None
        # Another slot's rows ride in the same ubatch; a slot's drafts beyond them take
        # ubatches of their own (split_equal), one at least.
        once = per_ubatch if len(asks) > 1 else 0.0
        return (per_row + self._draft_s) / token, once / token

    def _length(self, p: float, price: tuple[float, float] | None) -> int:
        """The draft length with the most expected tokens over cost: the i-th drafted token
        is accepted with chance p^i and costs a row (and the first one `once`)."""
        top = self.settings.draft_max
        if price is None:
            return top  # cost unknown (it is learnt from drafts), or not adaptive
        row, once = price
        best, gain, expected = 0, 0.0, 0.0
        for k in range(1, top + 1):
            expected += p**k
            net = expected - row * k - once
            if net > gain:
                best, gain = k, net
        return best

    def verified(self, seq: int, drafted: int, accepted: int) -> None:
        """`accepted` of the `drafted` tokens of slot `seq` were the sampled ones."""
        s = self._slots[seq]
        s.drafted += drafted
        s.accepted += accepted
        s.hits = s.hits * _DECAY + accepted
        s.misses = s.misses * _DECAY + (1 if accepted < drafted else 0)

    def counts(self, seq: int) -> tuple[int, int]:
        """The drafted and accepted tokens of the request on `seq`."""
        s = self._slots[seq]
        return s.drafted, s.accepted

    def close(self) -> None:
        """Free the drafter's context, if any."""
        self.drafter.close()


def fair_shares(wants: dict[int, int], room: int) -> dict[int, int]:
    """Split `room` among the wants, one token at a time round the slots (water-filling):
    a slot gets all it wants when there is room, and no slot gets more than another
    unless that one wants less."""
    if sum(wants.values()) <= room:
        return dict(wants)
    shares = dict.fromkeys(wants, 0)
    left = room
    open_ = sorted(wants, key=wants.__getitem__)
    while left > 0 and open_:
        each = max(1, left // len(open_))
        for seq in list(open_):
            give = min(each, wants[seq] - shares[seq], left)
            shares[seq] += give
            left -= give
            if shares[seq] == wants[seq]:
                open_.remove(seq)
            if left == 0:
                break
    return shares


def open_speculator(cfg: LlamaSettings, llama: Any) -> Speculator | None:
    """The model's speculator (None when `speculative` is off); raises ValueError for a
    draft model that cannot draft for it."""
    settings = cfg.speculative
    if settings is None:
        return None
    n_slots = cfg.n_parallel
    drafter: Drafter
    if settings.mode == "ngram":
        drafter = NgramDrafter(settings, n_slots, cfg.n_ctx)
    else:
        drafter = ModelDrafter(cfg, n_slots, cfg.n_ctx, llama)
    log.info("speculative decoding: %s, up to %d tokens a step", settings.mode, settings.draft_max)
    return Speculator(settings, drafter, n_slots)
