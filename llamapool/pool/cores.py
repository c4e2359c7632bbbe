"""Elastic threads: a busy instance borrows the cores of idle neighbours and gives them
back before a neighbour's next decode.

`CoreLedger` is pure bookkeeping, fed the pool's events (a worker joined, became busy,
became idle, confirmed a resize, left, a tick) and answering with `Moves`: the resizes to
send and the workers whose held requests may now go. The supervisor applies them; it
stays the one owner of core assignment.

A seat's cores go through one `CoreState` (see `CORE_TRANSITIONS`). Cores are lent by
*group*: the seats whose home cores overlap (more instances than cores), all idle, lent
together, so a core is never lent while another seat homed on it could start work.

Why the held request: a borrower runs its extra threads on the lender's core until its
current decode ends, so a lender that gets work waits (RECLAIMING) for the borrower's
confirmation, sent at its next step boundary, before its request is sent. A borrower
that goes idle is decoding nothing and its shrink travels ahead of any new request on its
data socket, so its lenders are free at once.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

from llamapool.config import ModelSpec, PoolSettings
from llamapool.pool.transitions import check

log = logging.getLogger("llamapool.cores")

# A neighbour idle this long lends its cores to a worker already busy (checked on the
# tick); at dispatch any idle neighbour lends. The wait keeps cores from bouncing between
# two clients' back-to-back requests at concurrency 2.
LEND_AFTER = 0.25
# A lender whose borrower has not confirmed its shrink after this long gets its request
# anyway (a borrower's decode step longer than this: a big prompt on a large model).
RECLAIM_TIMEOUT = 2.0


class CoreState(str, enum.Enum):
    """Where a worker runs relative to its home cores (the ones placement gave it)."""

    OWN = "own"  # on its home cores, nothing lent or borrowed
    BORROWING = "borrowing"  # busy, also on idle neighbours' cores
    LENT = "lent"  # idle; a busy neighbour runs on its home cores
    RECLAIMING = "reclaiming"  # got work while lent: its requests wait for the borrower's shrink


_C = CoreState
CORE_TRANSITIONS: dict[CoreState, frozenset[CoreState]] = {
    _C.OWN: frozenset({_C.BORROWING, _C.LENT}),
    # BORROWING → BORROWING: widened further, or one lender reclaimed and others remain.
    _C.BORROWING: frozenset({_C.OWN, _C.BORROWING}),
    _C.LENT: frozenset({_C.OWN, _C.RECLAIMING}),
    _C.RECLAIMING: frozenset({_C.OWN}),
}


def may_lend(spec: ModelSpec, pool: PoolSettings, *, resizable: bool, gpu: int | None) -> bool:
    """Whether a worker lends and borrows cores: an engine that resizes between steps
    (READY's `resizable`: the batching one, pinned), no GPU, and `elastic_threads` on for
    its model (null: the pool's)."""
    if not resizable or gpu is not None or spec.config.n_gpu_layers != 0:
        return False
    return pool.elastic_threads if spec.elastic_threads is None else spec.elastic_threads


@dataclass(frozen=True)
class Resize:
    """Tell a worker to run `n_threads` threads on `cores` from its next step boundary."""

    worker_id: str
    seq: int
    cores: list[int]
    n_threads: int
    reason: str


@dataclass
class Moves:
    """What the supervisor does after an event: send these resizes, release these holds."""

    resizes: list[Resize] = field(default_factory=list)
    freed: list[str] = field(default_factory=list)  # RECLAIMING → OWN: their data may go

    def __bool__(self) -> bool:
        return bool(self.resizes or self.freed)


@dataclass(eq=False)
class Seat:
    """One worker in the ledger."""

    worker_id: str
    home: frozenset[int]
    threads: int  # its thread count on its home cores
    elastic: bool  # may lend and borrow (else its cores only count as taken)
    node: str = ""  # the host its cores are on: cores are lent within a node only
    state: CoreState = CoreState.OWN
    busy: bool = False
    idle_since: float = 0.0
    borrowed: set[int] = field(default_factory=set)  # BORROWING: cores beyond home
    lent_to: str | None = None  # LENT, RECLAIMING: the borrower
    give_back_seq: int = 0  # LENT, RECLAIMING: the borrower's resize that returns the cores
    reclaim_since: float = 0.0
    seq: int = 0  # its last resize sent
    acked: int = 0  # its last resize confirmed
    running: tuple[list[int], int] | None = None  # cores and threads it last confirmed
    reason: str = "joined"  # why it is in its state

    @property
    def cores(self) -> list[int]:
        """The cores it is told to run on."""
        return sorted(self.home | self.borrowed)

    @property
    def n_threads(self) -> int:
        return self.threads + len(self.borrowed)


class CoreLedger:
    """Which worker runs on which cores, who lent what to whom (pure, clock passed in)."""

    def __init__(self, lend_after: float = LEND_AFTER, reclaim_timeout: float = RECLAIM_TIMEOUT):
        self.lend_after = lend_after
        self.reclaim_timeout = reclaim_timeout
        self.seats: dict[str, Seat] = {}

    # -- views --------------------------------------------------------------------

    def holds(self, worker_id: str) -> bool:
        """Whether data to this worker must wait (it is reclaiming its cores)."""
        seat = self.seats.get(worker_id)
        return seat is not None and seat.state is CoreState.RECLAIMING

    def view(self, worker_id: str) -> dict | None:
        """A worker's elastic state for /admin/pool (None: not in the ledger)."""
        seat = self.seats.get(worker_id)
        if seat is None:
            return None
        cores, threads = seat.running or (sorted(seat.home), seat.threads)
        return {
            "state": seat.state.value,
            "elastic": seat.elastic,
            "cores": cores,  # as the worker last confirmed
            "n_threads": threads,
            "lent_to": seat.lent_to,
            "reason": seat.reason,
        }

    def violations(self) -> list[str]:
        """Cores that two running workers would share beyond what placement itself shared
        (busy borrowers vs each other and vs busy owners); empty when all is well."""
        running = [s for s in self.seats.values() if s.busy and s.state is not CoreState.RECLAIMING]
        found = []
        for seat in running:
            for other in running:
                if other is not seat and other.node == seat.node:
                    shared = seat.borrowed & (other.home | other.borrowed)
                    if shared:
                        found.append(
                            f"{seat.worker_id} borrows {sorted(shared)} of {other.worker_id}"
                        )
        return found

    # -- events -------------------------------------------------------------------

    def join(
        self,
        worker_id: str,
        home: list[int],
        threads: int,
        *,
        elastic: bool,
        now: float,
        node: str = "",
    ) -> Moves:
        """A worker is READY on `home` (of host `node`). One placed on cores a borrower
        holds starts LENT."""
        seat = Seat(worker_id, frozenset(home), threads, elastic, node, idle_since=now)
        self.seats[worker_id] = seat
        moves = Moves()
        for b in self._borrowers():
            if b.node == seat.node and b.borrowed & seat.home:
                self._lend(
                    seat,
                    b,
                    f"placed on core(s) {sorted(b.borrowed & seat.home)} "
                    f"that {b.worker_id} borrows",
                )
        return moves

    def retire(self, worker_id: str) -> None:
        """The worker is draining: it neither lends nor borrows from now (a loan it holds
        ends when it goes idle, as any other)."""
        seat = self.seats.get(worker_id)
        if seat is not None:
            seat.elastic = False

    def leave(self, worker_id: str) -> Moves:
        """The worker's process is gone: what it borrowed is free, what it lent stays with
        the borrower until that one goes idle."""
        seat = self.seats.pop(worker_id, None)
        moves = Moves()
        if seat is not None:  # a lender may still wait for its shrink's confirmation
            self._free_lenders(seat, f"borrower {worker_id} exited", moves)
        return moves

    def busy(self, worker_id: str, now: float) -> Moves:
        """The worker got work. A lender reclaims its cores; an owner widens onto idle ones."""
        seat = self.seats.get(worker_id)
        moves = Moves()
        if seat is None:
            return moves
        seat.busy = True
        if seat.state is CoreState.LENT:
            self._reclaim(seat, now, moves)
        elif seat.state is CoreState.OWN and seat.elastic:
            self._widen(seat, now, 0.0, moves)
        return moves

    def idle(self, worker_id: str, now: float) -> Moves:
        """The worker has nothing in flight: a borrower shrinks, its lenders own again."""
        seat = self.seats.get(worker_id)
        moves = Moves()
        if seat is None:
            return moves
        seat.busy, seat.idle_since = False, now
        if seat.state is CoreState.BORROWING:
            seat.borrowed.clear()
            self._resize(seat, "idle: gave back its borrowed cores", moves)
            self._move(seat, CoreState.OWN, "idle: gave back its borrowed cores")
        # It decodes nothing now, and a shrink goes ahead of any new request: whoever
        # lent to it (or waits for its last shrink's confirmation) owns its cores again.
        self._free_lenders(seat, f"borrower {worker_id} went idle", moves)
        return moves

    def resized(
        self, worker_id: str, seq: int, cores: list[int], n_threads: int, now: float
    ) -> Moves:
        """The worker confirms it runs as its resize `seq` said (at a step boundary)."""
        seat = self.seats.get(worker_id)
        moves = Moves()
        if seat is None:
            return moves
        seat.acked = max(seat.acked, seq)
        seat.running = (list(cores), n_threads)
        for lender in self._lenders_of(seat):
            if lender.give_back_seq and lender.give_back_seq <= seat.acked:
                self._own(lender, f"{worker_id} gave its cores back (resize {seq})", moves, now)
        return moves

    def tick(self, now: float) -> Moves:
        """Lend long-idle cores to busy workers; end reclaims a borrower has not answered."""
        moves = Moves()
        for seat in list(self.seats.values()):
            if (
                seat.state is CoreState.RECLAIMING
                and now - seat.reclaim_since > self.reclaim_timeout
            ):
                log.warning(
                    "worker %s: %s did not give its cores back within %g s; its requests go now",
                    seat.worker_id,
                    seat.lent_to,
                    self.reclaim_timeout,
                )
                self._own(
                    seat, f"{seat.lent_to} did not answer within {self.reclaim_timeout:g} s", moves
                )
        for seat in self.seats.values():
            if seat.busy and seat.elastic and seat.state in (CoreState.OWN, CoreState.BORROWING):
                self._widen(seat, now, self.lend_after, moves)
        return moves

    # -- the rules ------------------------------------------------------------------

    def _groups(self) -> list[list[Seat]]:
        """Seats whose home cores overlap, transitively (one group each on one core)."""
        groups: list[list[Seat]] = []
        for seat in self.seats.values():
            joined = [
                g for g in groups if any(s.node == seat.node and s.home & seat.home for s in g)
            ]
            merged = [seat] + [s for g in joined for s in g]
            groups = [g for g in groups if g not in joined] + [merged]
        return groups

    def _widen(self, seat: Seat, now: float, idle_for: float, moves: Moves) -> None:
        """Lend `seat` every group whose seats are all elastic, idle (for `idle_for`), OWN."""
        taken = {c for s in self.seats.values() if s.node == seat.node for c in s.borrowed}
        lenders: list[Seat] = []
        for group in self._groups():
            cores = {c for s in group for c in s.home}
            if seat in group or group[0].node != seat.node or cores & taken:
                continue
            if all(
                s.elastic
                and not s.busy
                and s.state is CoreState.OWN
                and now - s.idle_since >= idle_for
                for s in group
            ):
                lenders += group
        if not lenders:
            return
        new = {c for s in lenders for c in s.home}
        seat.borrowed |= new
        reason = f"busy, borrowed core(s) {sorted(new)} of idle " + ", ".join(
            s.worker_id for s in lenders
        )
        self._move(seat, CoreState.BORROWING, reason)
        self._resize(seat, reason, moves)
        for lender in lenders:
            self._lend(
                lender, seat, f"idle, core(s) {sorted(lender.home)} lent to {seat.worker_id}"
            )

    def _reclaim(self, seat: Seat, now: float, moves: Moves) -> None:
        """A lender got work: its group's cores go back; it waits for the borrower's shrink."""
        borrower = self.seats[seat.lent_to] if seat.lent_to in self.seats else None
        if borrower is None:  # the borrower is gone
            self._own(seat, "its borrower is gone", moves)
            return
        group = next(g for g in self._groups() if seat in g)
        back = {c for s in group for c in s.home} & borrower.borrowed
        borrower.borrowed -= back
        reason = f"{seat.worker_id} got work: gave back core(s) {sorted(back)}"
        self._move(borrower, CoreState.BORROWING if borrower.borrowed else CoreState.OWN, reason)
        self._resize(borrower, reason, moves)
        for s in group:
            if s.lent_to == borrower.worker_id:
                s.give_back_seq = borrower.seq
        seat.reclaim_since = now
        self._move(
            seat,
            CoreState.RECLAIMING,
            f"got work; waits for {borrower.worker_id} to give back core(s) {sorted(back)}",
            level=logging.INFO,
        )

    def _free_lenders(self, borrower: Seat, reason: str, moves: Moves) -> None:
        for lender in self._lenders_of(borrower):
            self._own(lender, reason, moves)

    def _lenders_of(self, borrower: Seat) -> list[Seat]:
        return [s for s in self.seats.values() if s.lent_to == borrower.worker_id]

    def _borrowers(self) -> list[Seat]:
        return [s for s in self.seats.values() if s.state is CoreState.BORROWING]

    def _lend(self, lender: Seat, borrower: Seat, reason: str) -> None:
        lender.lent_to, lender.give_back_seq = borrower.worker_id, 0
        self._move(lender, CoreState.LENT, reason)

    def _own(self, seat: Seat, reason: str, moves: Moves, now: float | None = None) -> None:
        level = logging.DEBUG
        if seat.state is CoreState.RECLAIMING:
            moves.freed.append(seat.worker_id)
            level = logging.INFO
            if now is not None:  # what the wait cost its first request
                reason += f" after {1000 * (now - seat.reclaim_since):.1f} ms"
        seat.lent_to, seat.give_back_seq = None, 0
        self._move(seat, CoreState.OWN, reason, level)

    def _resize(self, seat: Seat, reason: str, moves: Moves) -> None:
        seat.seq += 1
        moves.resizes.append(Resize(seat.worker_id, seat.seq, seat.cores, seat.n_threads, reason))

    def _move(self, seat: Seat, state: CoreState, reason: str, level: int = logging.DEBUG) -> None:
        check(CORE_TRANSITIONS, "cores of worker", seat.worker_id, seat.state, state, reason)
        # Per request, like IDLE ⇄ BUSY: at DEBUG; a wait for a borrower at INFO.
        log.log(
            level,
            "worker %s cores %s → %s: %s (cores %s, %d threads)",
            seat.worker_id,
            seat.state.value,
            state.value,
            reason,
            seat.cores,
            seat.n_threads,
        )
        seat.state, seat.reason = state, reason
