"""What the pool reports as work moves through it; the router's Metrics implements it."""

from __future__ import annotations

from llamapool.pool.lifecycle import ExitCause


class PoolObserver:
    """No-op hooks; a subclass or any object with the same methods can listen."""

    def rejected(self, model: str, reason: str) -> None:
        """A request was refused before reaching a worker (queue_full, queue_timeout, ...)."""

    def queue_wait(self, model: str, seconds: float) -> None:
        """A request left the queue for a worker after waiting `seconds`."""

    def time_to_first_token(self, model: str, seconds: float) -> None:
        """The first output of a request arrived `seconds` after it was admitted."""

    def tokens_generated(self, model: str, n: int) -> None:
        """A request finished with `n` completion tokens."""

    def generation_finished(self, model: str, tokens: int, seconds: float) -> None:
        """A request decoded `tokens` in `seconds` after its first token."""

    def prompt_reused(self, model: str, source: str, tokens: int) -> None:
        """A request finished having reused `tokens` prompt tokens from `source` (slot, ram,
        shared; "none" with 0 tokens when nothing was cached)."""

    def speculated(self, model: str, drafted: int, accepted: int) -> None:
        """A request finished having drafted `drafted` tokens, `accepted` of them right."""

    def worker_restarted(self, model: str, cause: ExitCause) -> None:
        """A worker died or was restarted, and why."""

    def evicted(self, model: str) -> None:
        """An idle instance of `model` was stopped to make room for another model."""
