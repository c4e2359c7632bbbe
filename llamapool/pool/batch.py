"""Continuous batching: one llama.cpp context decodes every running request together.

Each of `n_parallel` slots owns a KV-cache sequence. A step puts one token per
generating slot and as much pending prompt as `n_batch` leaves room for into one
`llama_decode`; each slot then samples from its own logits with its own sampler
chain. Requests join and leave between steps, so a new request never waits for
the others to finish, and a slot keeps its tokens when idle, so the next request
with the same prefix (a chat's next turn) skips evaluating it again. A request that
shares a longer prefix with another slot, or with a state saved in the RAM prompt cache
(`pool/prompt_cache.py`) when its slot was overwritten, gets those cells copied in.

A slot's lifecycle is one `SlotState` (see `_ALLOWED`): IDLE → PROMPT (admitted, prompt
tokens pending) → GENERATING (a sampled token waits for the next step) → IDLE; a request
that ends at its first token, fails or is cancelled goes from PROMPT straight to IDLE.

The KV cache stays consistent by construction: a slot's `cached` list is exactly
what its sequence holds; after a failed or aborted decode the batch's new cells
are removed again.
"""

from __future__ import annotations

import enum
import functools
import logging
import queue
import time
from dataclasses import dataclass, field
from typing import Any

from llamapool.config import ModelSpec
from llamapool.errors import ErrorCode
from llamapool.ipc.protocol import Request
from llamapool.pool.llama_adapter import (
    DECODE_ABORTED,
    BatchContext,
    Grammars,
    LogprobReader,
    Sampler,
    set_threads,
)
from llamapool.pool.logprobs import Scoring
from llamapool.pool.prepare import (
    Prepared,
    Preparer,
    RequestFailed,
    Sink,
    TextOut,
    is_broken_pipe,
    load_llama,
)
from llamapool.pool.prompt_cache import (
    CacheSource,
    Entry,
    PromptCache,
    shared_prefix,
    worth_copying,
)
from llamapool.pool.speculative import Ask, accept_run, open_speculator, ubatches
from llamapool.pool.widening import WidenGuard

log = logging.getLogger(__name__)

# The Llama object only tokenizes and formats here; its own context stays this small.
_TOKENIZER_CTX = 64
_NO_REQUEST = object()


# Rows of a scored prompt (echo with logprobs: every row's logits) per decode. llama.cpp's
# output buffer keeps the logits of the most rows one decode asked for, for good: a full
# n_batch of 512 rows is 96 MiB more on SmolLM2's vocabulary; 64 rows are 12 MiB.
SCORED_ROWS = 64


class SlotState(enum.Enum):
    """Where a slot is in serving a request (llama.cpp's server slots have the same)."""

    IDLE = "idle"  # no request; the sequence keeps its tokens for the next one's prefix
    PROMPT = "prompt"  # evaluating the prompt, `n_batch` tokens at most per step
    GENERATING = "generating"  # one sampled token decoded per step


# Every transition a slot may make; anything else is a bug in the engine.
_ALLOWED: dict[SlotState, frozenset[SlotState]] = {
    SlotState.IDLE: frozenset({SlotState.PROMPT}),
    SlotState.PROMPT: frozenset({SlotState.GENERATING, SlotState.IDLE}),
    SlotState.GENERATING: frozenset({SlotState.IDLE}),
}


class SlotStateError(RuntimeError):
    """A slot was asked to make a transition `_ALLOWED` does not list."""


@dataclass(eq=False)
class _Slot:
    seq: int
    state: SlotState = SlotState.IDLE
    cached: list[int] = field(default_factory=list)  # exactly what this sequence's KV holds
    rid: str | None = None  # the request, unless IDLE
    pending: list[int] = field(default_factory=list)  # PROMPT: prompt tokens not decoded yet
    next_token: int | None = None  # GENERATING: sampled, not yet decoded
    sampler: Sampler | None = None
    out: TextOut | None = None
    n_prompt: int = 0
    n_reused: int = 0
    reused_from: CacheSource = CacheSource.SLOT
    used_at: float = 0.0  # when it last took a request: the least recently used goes first
    started: float = 0.0
    first_token_at: float | None = None
    logits_at: int = -1  # index in the current batch whose logits this slot samples
    scoring: Scoring | None = None  # logprobs and echo, when the request asks for them
    last_row: int = -1  # index in the current batch of the last token it added


@dataclass(frozen=True)
class _Reuse:
    """How a slot gets its cached prefix of a prompt: `n` tokens, from `source`."""

    n: int
    source: CacheSource
    donor: _Slot | None = None  # SHARED: the slot whose cells are copied
    entry: Entry | None = None  # RAM: the saved state restored


@dataclass(eq=False)
class _Waiting:
    """A prepared request held back until another slot has evaluated the prefix it shares."""

    rid: str
    prep: Prepared
    sampler: Sampler
    started: float
    scoring: Scoring | None = None


class BatchEngine:
    """Serves up to `n_parallel` chat and completion requests at once from one context."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.cfg = cfg = spec.config
        self.capacity = cfg.n_parallel
        self.n_ctx = cfg.n_ctx  # per request: each sequence has its own n_ctx cells
        self.n_batch = cfg.n_batch
        self.llama = load_llama(spec, n_ctx=_TOKENIZER_CTX)
        self.preparer = Preparer(self.llama, spec, n_ctx=cfg.n_ctx)
        self.context = BatchContext(
            self.llama,
            n_ctx=cfg.n_ctx * cfg.n_parallel,
            n_batch=cfg.n_batch,
            n_seq_max=cfg.n_parallel,
            flash_attn=cfg.flash_attn,
        )
        self.slots = [_Slot(seq=i) for i in range(cfg.n_parallel)]
        self.prompt_cache = PromptCache(cfg.prompt_cache_limit())
        self.n_vocab = self.llama.n_vocab()
        self.grammars = Grammars(self.llama)  # constrained requests' grammars, parsed once
        self.logprob_reader = LogprobReader(self.context, self.n_vocab)
        # Drafts verified in the shared decode (pool/speculative.py); None when off.
        self.speculator = open_speculator(cfg, self.llama) if self.context.can_cut else None
        if cfg.speculative is not None and self.speculator is None:
            log.warning(
                "model %s: no speculative decoding (its memory cannot drop drafts)", spec.id
            )
        self._cancelled_ids: set[str] = set()
        self._waiting: list[_Waiting] = []
        # Elastic threads: widened decodes run their extra threads only while it pays.
        self.widening = WidenGuard(self.context.n_threads, f"model {spec.id}")
        # time.monotonic() of the engine's last decode step; the I/O thread's stall watchdog
        # reads it (a float assignment is atomic under the GIL).
        self.progress_at = time.monotonic()

    def close(self) -> None:
        """Free the batch and the contexts (the process exit would too)."""
        if self.speculator is not None:
            self.speculator.close()
        self.context.close()

    @property
    def n_threads(self) -> int:
        """The threads the supervisor granted (elastic threads), or its own."""
        return self.widening.granted

    @property
    def decode_threads(self) -> int:
        """The threads each decode runs: the grant, unless widened decodes were slower."""
        return self.context.n_threads

    def set_threads(self, n_threads: int) -> None:
        """Up to `n_threads` threads from the next step (elastic threads: the worker calls
        it between steps, with its new CPU affinity); WidenGuard decides how many run."""
        self._run_threads(self.widening.grant(n_threads))

    def _run_threads(self, n_threads: int) -> None:
        if n_threads != self.context.n_threads:
            self.context.set_threads(n_threads)
            set_threads(self.llama, n_threads)

    # -- the worker's entry points --------------------------------------------

    def serve(self, jobs: queue.Queue[Request | None], sink: Sink) -> None:
        """Admit requests from `jobs` between decode steps; after a None, finish and return."""
        stopping = False
        while True:
            busy = self._busy()
            if stopping and not busy:
                return
            try:
                req: Any = jobs.get(block=not busy)
            except queue.Empty:
                req = _NO_REQUEST
            while req is not _NO_REQUEST:
                if req is None:
                    stopping = True
                else:
                    self._admit(req, sink)
                try:
                    req = jobs.get_nowait()
                except queue.Empty:
                    req = _NO_REQUEST
            self.progress_at = time.monotonic()
            self._drop_cancelled(sink)
            for held in [w for w in self._waiting if not self._should_wait(w.prep.tokens)]:
                self._waiting.remove(held)
                self._place(held, sink)
            if self._busy():
                self._step(sink)

    def _busy(self) -> bool:
        return bool(self._waiting) or any(s.state is not SlotState.IDLE for s in self.slots)

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step; abort the decode if it is all that runs.

        Called from the worker's I/O thread as well as the engine's.
        """
        self._cancelled_ids.add(request_id)
        running = {s.rid for s in self.slots if s.state is not SlotState.IDLE}
        running |= {w.rid for w in self._waiting}
        if request_id in running and running <= self._cancelled_ids:
            self.context.abort.set()

    def forget(self, request_id: str) -> None:
        """The request has ended: drop a cancel that arrived after its last step."""
        self._cancelled_ids.discard(request_id)

    def _failure(self, exc: Exception) -> str:
        return f"generation failed in model {self.spec.id!r}: {exc}"

    # -- admission ------------------------------------------------------------

    def _admit(self, req: Request, sink: Sink) -> None:
        rid = req.request_id
        started = time.perf_counter()  # the prompt's clock includes templating and tokenizing
        sink.start(rid)
        if rid in self._cancelled_ids:
            self._cancelled_ids.discard(rid)
            sink.error(rid, ErrorCode.CANCELLED, "request cancelled")
            return
        try:
            prep = self.preparer.prepare(req)
            sampler = Sampler(prep, self.n_vocab, self.grammars)
            scoring = None
            if prep.logprobs is not None or prep.echo:
                scoring = Scoring(
                    prep,
                    self.logprob_reader,
                    self.preparer.vocab,
                    completion=req.kind == "completion",
                )
        except RequestFailed as exc:
            sink.error(rid, exc.code, exc.message, exc.param)
            return
        except Exception as exc:
            if is_broken_pipe(exc):
                raise
            log.exception("request %s failed at admission", rid)
            sink.error(rid, ErrorCode.GENERATION_FAILED, self._failure(exc))
            return
        held = _Waiting(rid, prep, sampler, started, scoring)
        if self._should_wait(prep.tokens) and not _scores_prompt(held):
            self._waiting.append(held)
        else:
            self._place(held, sink)

    def _should_wait(self, tokens: list[int]) -> bool:
        """Whether a slot evaluating its prompt will soon hold a prefix of `tokens` worth
        copying: requests that arrive together evaluate a shared system prompt once."""
        if self.cfg.reset_each_request or not self.cfg.share_prefixes:
            return False
        limit = len(tokens) - 1
        now = max(min(shared_prefix(s.cached, tokens), limit) for s in self.slots)
        for slot in self.slots:
            if slot.state is SlotState.PROMPT and slot.pending:
                soon = min(shared_prefix(slot.cached + slot.pending, tokens), limit)
                if soon > len(slot.cached) and worth_copying(
                    soon - now, slot.cached + slot.pending
                ):
                    return True
        return False

    def _place(self, held: _Waiting, sink: Sink) -> None:
        """Give a prepared request a slot and its cached prefix; it is evaluated from now."""
        rid, prep, sampler, started = held.rid, held.prep, held.sampler, held.started
        slot, plan = self._pick_slot(prep.tokens)
        if _scores_prompt(held):  # every prompt row's logits are needed: evaluate it all
            plan = _Reuse(0, CacheSource.SLOT)
        keep, source = self._reuse(slot, prep.tokens, plan)
        slot.scoring = held.scoring
        slot.rid = rid
        slot.pending = prep.tokens[keep:]
        slot.sampler = sampler
        slot.out = TextOut(self.preparer.vocab, prep, functools.partial(sink.chunk, rid))
        slot.n_prompt, slot.n_reused, slot.reused_from = len(prep.tokens), keep, source
        slot.used_at = started
        slot.started, slot.first_token_at = started, None
        if self.speculator is not None:
            self.speculator.begin(slot.seq)
        self._set_state(slot, SlotState.PROMPT, f"admitted, {keep} of {len(prep.tokens)} cached")

    def _pick_slot(self, tokens: list[int]) -> tuple[_Slot, _Reuse]:
        """The free slot that evaluates the least of `tokens`, and how it gets the rest.

        A slot has its own prefix of `tokens`, or can copy a longer one from another slot
        or the RAM prompt cache (when that pays: `worth_copying`). Among slots that
        evaluate as little, the one that loses the least of what it holds, then the least
        recently used: a free slot takes a copy of a shared system prompt rather than a
        slot holding another conversation giving that up.
        """
        limit = len(tokens) - 1  # the last prompt token is evaluated: it gives the logits
        free = [s for s in self.slots if s.state is SlotState.IDLE]
        if self.cfg.reset_each_request:
            return min(free, key=lambda s: s.used_at), _Reuse(0, CacheSource.SLOT)
        held = {s.seq: min(shared_prefix(s.cached, tokens), limit) for s in self.slots}
        found = self.prompt_cache.best(tokens)
        in_ram = min(found[1], limit) if found is not None else 0

        def reuse(slot: _Slot) -> _Reuse:
            own = held[slot.seq]
            best = _Reuse(own, CacheSource.SLOT)
            for other in self.slots if self.cfg.share_prefixes else ():
                n = held[other.seq]
                if other is not slot and n > best.n and worth_copying(n - own, other.cached):
                    best = _Reuse(n, CacheSource.SHARED, donor=other)
            if (
                found is not None
                and in_ram > best.n
                and worth_copying(in_ram - own, found[0].tokens)
            ):
                best = _Reuse(in_ram, CacheSource.RAM, entry=found[0])
            return best

        plans = {s.seq: reuse(s) for s in free}
        slot = max(
            free,
            key=lambda s: (plans[s.seq].n, held[s.seq] - len(s.cached), -s.used_at),
        )
        return slot, plans[slot.seq]

    def _reuse(self, slot: _Slot, tokens: list[int], plan: _Reuse) -> tuple[int, CacheSource]:
        """Give `slot` the prefix of `tokens` that `plan` says, saving what it held first if
        that is about to be lost; how many tokens it keeps and where they came from."""
        cache = self.prompt_cache
        own = min(shared_prefix(slot.cached, tokens), len(tokens) - 1)  # what it keeps of its own
        if len(slot.cached) - own >= cache.min_tokens and cache.wants(slot.cached):
            state = self.context.save_seq(slot.seq)
            if state is not None and cache.put(list(slot.cached), state):
                log.debug("saved %d tokens of slot %d in RAM", len(slot.cached), slot.seq)
        keep, source = plan.n, plan.source
        if source is not CacheSource.SLOT:
            if plan.entry is not None:
                held, state = plan.entry.tokens, plan.entry.state
            else:
                assert plan.donor is not None
                held, state = plan.donor.cached, self.context.save_seq(plan.donor.seq)
            if state is not None and self.context.load_seq(slot.seq, state):
                slot.cached = list(held)
            else:  # llama.cpp refused it: start from an empty sequence
                self.context.clear_seq(slot.seq)
                slot.cached, keep, source = [], 0, CacheSource.SLOT
        self._trim(slot, keep)
        return len(slot.cached), source

    # -- one decode step --------------------------------------------------------

    def _step(self, sink: Sink) -> None:
        """One step: each prompt chunk the generating slots' tokens (and drafts) leave
        room for in `n_batch`, in a decode of its own, then those tokens in one decode.

        A prompt's rows never share a decode with other sequences' rows: llama.cpp splits
        such a batch into ubatches of equal tokens per sequence, so the prompt's first row
        would be computed beside other sequences' single rows, in another attention
        grouping than the same prompt alone, and a greedy near-tie could flip (seen with a
        copied prefix on SmolLM2). Separate decodes cost no extra pass over the weights:
        llama.cpp made those ubatches anyway.
        """
        budget = self.n_batch
        generating = [s for s in self.slots if s.state is SlotState.GENERATING]
        drafts = self._drafts(generating, budget) if self.speculator is not None else {}
        runs = []
        for slot in generating:
            assert slot.next_token is not None
            runs.append((slot, [slot.next_token, *drafts.get(slot.seq, ())]))
            budget -= len(runs[-1][1])
        chunks = []
        for slot in self.slots:
            if slot.state is not SlotState.PROMPT or budget <= 0:
                continue
            take = min(budget, SCORED_ROWS) if _scores_prompt(slot) else budget
            chunks.append((slot, slot.pending[:take]))
            budget -= len(chunks[-1][1])
        # Prompts first, the shortest first, each one's first token sent as soon as it is
        # sampled: a new request's TTFT does not wait for the generating slots' decode or
        # for longer prompts. The step takes as long in any order, so the generating
        # slots' tokens come as often as before.
        chunks.sort(key=lambda chunk: len(chunk[1]))
        if chunks:
            self._run_threads(self.widening.prompt_threads)
        for chunk in chunks:
            if not self._decode([chunk], sink):
                return
            sink.flush()
        if runs:
            self._run_threads(self.widening.running)
            self._decode(runs, sink)

    def _decode(self, in_batch: list[tuple[_Slot, list[int]]], sink: Sink) -> bool:
        """Decode these slots' tokens and sample where they have logits; False if the
        decode was aborted (every request in it cancelled) and the step should end."""
        self.context.clear()
        for slot, tokens in in_batch:
            if slot.state is SlotState.GENERATING:  # logits at each row
                slot.logits_at = self._add(slot, tokens, logits=True, every=True) - len(tokens) + 1
            else:
                last = len(tokens) == len(slot.pending)
                at = self._add(slot, tokens, logits=last, every=_scores_prompt(slot))
                slot.logits_at = at if last else -1
        generating_only = in_batch[0][0].state is SlotState.GENERATING  # cost by rows
        # A cancel of everything in the batch may have come before the flag was lowered.
        self.context.abort.set({s.rid for s, _ in in_batch} <= self._cancelled_ids)
        started = time.perf_counter()
        status = self.context.decode()
        if status == 0 and generating_only:
            seconds = time.perf_counter() - started
            rows, threads = self.context.n_tokens, self.context.n_threads
            self._run_threads(self.widening.observe(threads, rows, seconds))
            if self.speculator is not None:
                groups = [(slot.seq, len(run)) for slot, run in in_batch]
                self.speculator.observe(ubatches(groups, self.n_batch), rows, seconds)
        if status != 0:
            for slot, _ in in_batch:  # drop whatever part of the batch reached the cache
                self._trim(slot, len(slot.cached))
            if status == DECODE_ABORTED:
                return False  # every slot in it was cancelled; _drop_cancelled ends them
            for slot, _ in in_batch:
                self._finish_error(
                    slot,
                    sink,
                    ErrorCode.GENERATION_FAILED,
                    f"llama_decode failed with status {status} in model {self.spec.id!r}",
                )
            return True

        for slot, tokens in in_batch:
            if slot.state is SlotState.PROMPT and _scores_prompt(slot):
                self._score_prompt(slot, tokens)
            held = len(slot.cached)
            slot.cached.extend(tokens)
            if slot.state is SlotState.GENERATING:  # its token (and drafts) are decoded now
                slot.next_token = None
            else:
                del slot.pending[: len(tokens)]
                tokens = tokens[-1:]  # the only row with logits
            if slot.logits_at < 0:
                continue
            try:
                self._sample(slot, sink, tokens)
            except Exception as exc:
                if is_broken_pipe(exc):
                    raise
                log.exception("request %s failed", slot.rid)
                self._trim(slot, held)  # whatever it sampled, drafts may still be there
                self._finish_error(slot, sink, ErrorCode.GENERATION_FAILED, self._failure(exc))
        return True

    def _drafts(self, generating: list[_Slot], budget: int) -> dict[int, list[int]]:
        """Each generating slot's drafts for this step. Drafts share what the batch has
        left after every slot's sampled token, but a pending prompt keeps at least half."""
        assert self.speculator is not None
        room = budget - len(generating)
        prompts = sum(len(s.pending) for s in self.slots if s.state is SlotState.PROMPT)
        room -= min(prompts, room // 2)
        asks = []
        for slot in generating:
            assert slot.out is not None and slot.next_token is not None
            limit = min(self.n_ctx - len(slot.cached) - 1, slot.out.remaining - 1)
            asks.append(Ask(slot.seq, slot.cached, slot.next_token, limit))
        return self.speculator.plan(asks, room, self.n_batch) if room > 0 else {}

    def _sample(self, slot: _Slot, sink: Sink, run: list[int]) -> None:
        """Sample the slot's next token at its logits, or, for a run with drafts, every
        token the drafts let through (`accept_run`), and cut the rejected ones off."""
        assert slot.sampler is not None and slot.out is not None
        if slot.state is SlotState.PROMPT and not self._open(slot):
            self._finish(slot, sink)  # `max_tokens: 0`: the prompt (echoed) is all
            return
        sampler, context, scoring, out = slot.sampler, self.context, slot.scoring, slot.out
        if slot.first_token_at is None:
            slot.first_token_at = time.perf_counter()

        def push(row: int, token: int) -> bool:
            return out.push(token, scoring.sampled(row, token) if scoring else None)

        used, token = accept_run(
            lambda row: sampler.sample(context, row), push, slot.logits_at, run
        )
        if len(run) > 1:
            assert self.speculator is not None
            self.speculator.verified(slot.seq, len(run) - 1, used - 1)
            self._trim(slot, len(slot.cached) - len(run) + used)
        if token is None:
            self._finish(slot, sink)
            return
        slot.next_token = token
        if slot.state is SlotState.PROMPT:
            self._set_state(slot, SlotState.GENERATING, "prompt evaluated")

    def _add(self, slot: _Slot, tokens: list[int], *, logits: bool, every: bool = False) -> int:
        """Append `tokens` of `slot` to the batch; the index of the last one."""
        slot.last_row = self.context.add(
            tokens, pos=len(slot.cached), seq=slot.seq, logits=logits, every=every
        )
        return slot.last_row

    def _score_prompt(self, slot: _Slot, tokens: list[int]) -> None:
        """Read the logprobs of the prompt tokens this step's rows of `slot` predict."""
        assert slot.scoring is not None
        first = slot.last_row - len(tokens) + 1
        slot.scoring.prompt_rows(first, len(slot.cached), len(tokens))

    def _open(self, slot: _Slot) -> bool:
        """The prompt is evaluated: echo it if asked; False if no token is to follow."""
        assert slot.out is not None
        if slot.scoring is not None and slot.scoring.echo:
            slot.out.echo(*slot.scoring.opening())
        return slot.out.wants_tokens

    def _trim(self, slot: _Slot, keep: int) -> None:
        """Cut the slot's sequence to its first `keep` tokens; `slot.cached` follows.

        A memory that cannot cut a sequence in the middle (recurrent, hybrid) is cleared.
        """
        if not self.context.keep(slot.seq, keep):
            self.context.clear_seq(slot.seq)
            keep = 0
        slot.cached = slot.cached[:keep]

    # -- ends of a request --------------------------------------------------------

    def _finish(self, slot: _Slot, sink: Sink) -> None:
        assert slot.out is not None and slot.rid is not None
        result = slot.out.result(slot.n_prompt, slot.n_reused, slot.started, slot.first_token_at)
        if self.speculator is not None:
            drafted, accepted = self.speculator.counts(slot.seq)
            result.usage.drafted_tokens, result.usage.accepted_tokens = drafted, accepted
        if result.timings is not None:  # where the reused prompt tokens came from
            t, n, source = result.timings, slot.n_reused, slot.reused_from
            t.cache_slot_n = n if source is CacheSource.SLOT else 0
            t.cache_ram_n = n if source is CacheSource.RAM else 0
            t.cache_shared_n = n if source is CacheSource.SHARED else 0
        rid = self._release(slot, f"finished ({result.finish_reason})")
        sink.done(rid, result)

    def _finish_error(self, slot: _Slot, sink: Sink, code: ErrorCode, message: str) -> None:
        rid = self._release(slot, code)
        sink.error(rid, code, message)

    def _release(self, slot: _Slot, reason: str) -> str:
        rid = slot.rid
        assert rid is not None
        self._cancelled_ids.discard(rid)
        self._set_state(slot, SlotState.IDLE, reason)
        slot.rid, slot.sampler, slot.out, slot.scoring = None, None, None, None
        slot.pending, slot.next_token = [], None
        return rid

    def _set_state(self, slot: _Slot, state: SlotState, reason: str) -> None:
        """Move `slot` to `state` if `_ALLOWED` lets it (else SlotStateError), and log why."""
        if state not in _ALLOWED[slot.state]:
            raise SlotStateError(
                f"slot {slot.seq} cannot go from {slot.state.name} to {state.name} ({reason})"
            )
        log.debug(
            "slot %d %s -> %s: %s (request %s)",
            slot.seq,
            slot.state.name,
            state.name,
            reason,
            slot.rid,
        )
        slot.state = state

    def _drop_cancelled(self, sink: Sink) -> None:
        for held in [w for w in self._waiting if w.rid in self._cancelled_ids]:
            self._waiting.remove(held)
            self._cancelled_ids.discard(held.rid)
            sink.error(held.rid, ErrorCode.CANCELLED, "request cancelled")
        for slot in self.slots:
            if slot.state is not SlotState.IDLE and slot.rid in self._cancelled_ids:
                self._finish_error(slot, sink, ErrorCode.CANCELLED, "request cancelled")


def _scores_prompt(holder: _Slot | _Waiting) -> bool:
    """Whether a request needs its prompt's own logprobs (echo with logprobs)."""
    return holder.scoring is not None and holder.scoring.wants_prompt_rows
