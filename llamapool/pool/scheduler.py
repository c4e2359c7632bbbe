"""Per-model bounded FIFO queues with deadlines; dispatch to instances with a free slot.

The queue lives in the router, where deadlines, cancellation and metrics can see
it. A worker announces its capacity in READY; the scheduler counts in-flight
requests against it, so batching workers need no change here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llamapool import errors
from llamapool.config import ModelSpec
from llamapool.ipc import protocol as P
from llamapool.pool.affinity import (
    AFFINITY_MIN_GAIN,
    AFFINITY_SLACK,
    cached_prefix,
    prefix_key,
    remember_prefix,
)
from llamapool.pool.events import PoolObserver
from llamapool.pool.handle import WorkerHandle
from llamapool.pool.job import Event, Job, JobState
from llamapool.pool.lifecycle import ExitCause, ModelState
from llamapool.pool.supervisor import Supervisor

log = logging.getLogger("llamapool.scheduler")

__all__ = ["Event", "Job", "JobState", "ModelQueue", "Scheduler"]


@dataclass
class ModelQueue:
    """A model's waiting jobs and the limits its spec sets on them."""

    max_queue: int
    queue_timeout: float
    max_request_time: float | None = None  # seconds a dispatched job may run
    jobs: deque[Job] = field(default_factory=deque)
    service_time: float = 1.0  # moving average of a request's time on a worker, for Retry-After


class Scheduler:
    """Admission, queueing, dispatch and the bookkeeping of running requests."""

    def __init__(
        self,
        supervisor: Supervisor,
        send: Callable[[WorkerHandle, Any], bool],
        *,
        max_requeues: int = 2,
        observer: PoolObserver | None = None,
    ):
        self.supervisor = supervisor
        self.send = send
        self.observer = observer or PoolObserver()
        self.max_requeues = max_requeues
        self.queues: dict[str, ModelQueue] = {}
        self.running: dict[str, Job] = {}
        self.dropped_replies = 0
        self._ids = itertools.count(1)
        self.accepting = True

    def add_model(self, spec: ModelSpec) -> None:
        """Give a model its queue, or (on reload) its queue the spec's new limits."""
        mq = self.queues.setdefault(spec.id, ModelQueue(spec.max_queue, spec.queue_timeout))
        # Waiting jobs stay; the limits apply to what comes next (and to dispatches from now).
        mq.max_queue, mq.queue_timeout = spec.max_queue, spec.queue_timeout
        mq.max_request_time = spec.max_request_time

    # -- admission --------------------------------------------------------------

    def submit(
        self, model_id: str, request: P.Request, *, stream: bool = True, expires: bool = True
    ) -> Job:
        """Queue a request or raise the error the client should see at once.

        `stream`: the client gets output as it comes. A non-streamed job's output is held
        until its DONE, so a worker's death mid-way is retried like one before output.
        `expires`: False for a request's further choices (prompts × n), which may wait in
        the queue for its own earlier ones; its first choice's queue_timeout answers for it.
        """
        try:
            return self._admit(model_id, request, stream, expires)
        except errors.LlamapoolError as exc:
            self.observer.rejected(model_id, exc.code)
            raise

    def _admit(self, model_id: str, request: P.Request, stream: bool, expires: bool) -> Job:
        if not self.accepting:
            raise errors.ShuttingDown("the server is shutting down; retry on another instance")
        refusal = self.supervisor.refusal(model_id)
        if refusal is not None:
            raise refusal
        mq = self.queues[model_id]
        if len(mq.jobs) >= mq.max_queue:
            raise errors.QueueFull(
                f"queue for {model_id} is full ({len(mq.jobs)} waiting); "
                f"retry after {self.retry_after(model_id):.0f} s or raise max_queue",
                retry_after=self.retry_after(model_id),
            )
        self.supervisor.ensure_capacity(model_id)
        loop = asyncio.get_running_loop()
        job = Job(id=f"r-{next(self._ids)}", model_id=model_id, request=request, stream=stream)
        request.request_id = job.id
        job.prefix_key = prefix_key(request)
        mq.jobs.append(job)
        if expires:
            job.timer = loop.call_later(mq.queue_timeout, self._expire, job)
        self.dispatch(model_id)
        return job

    def retry_after(self, model_id: str) -> float:
        mq = self.queues[model_id]
        instances = max(1, len([w for w in self.supervisor.workers_of(model_id) if w.ready]))
        return min(60.0, max(1.0, len(mq.jobs) * mq.service_time / instances))

    def _expire(self, job: Job) -> None:
        if job.state is not JobState.QUEUED:
            return
        mq = self.queues[job.model_id]
        try:
            mq.jobs.remove(job)
        except ValueError:
            return
        waited = time.monotonic() - job.enqueued_at
        self.observer.rejected(job.model_id, "queue_timeout")
        self._finish(
            job,
            errors.QueueTimeout(
                f"request waited {waited:.1f} s in the queue for {job.model_id} "
                f"(queue_timeout {mq.queue_timeout:g} s); retry later or add instances",
                retry_after=self.retry_after(job.model_id),
            ),
        )

    # -- dispatch ---------------------------------------------------------------

    def dispatch(self, model_id: str) -> None:
        mq = self.queues.get(model_id)
        if mq is None:
            return
        while mq.jobs:
            worker = self._pick_worker(model_id, mq.jobs[0].prefix_key)
            if worker is None:
                return
            job = mq.jobs.popleft()
            if job.timer is not None:
                job.timer.cancel()
            job.move(JobState.RUNNING)
            job.worker = worker
            job.served_by = f"{worker.id} pid={worker.pid}"
            job.dispatched_at = time.monotonic()
            if mq.max_request_time is not None:
                job.timer = asyncio.get_running_loop().call_later(
                    mq.max_request_time, self._time_out, job
                )
            self.observer.queue_wait(model_id, job.dispatched_at - job.enqueued_at)
            worker.in_flight[job.id] = job
            worker.last_used = job.dispatched_at
            remember_prefix(worker, job.prefix_key)
            self.running[job.id] = job
            self.supervisor.note_dispatched(worker)
            try:
                sent = self.send(worker, job.request)
            except Exception as exc:
                # The request itself cannot be encoded (the schemas bound what they can,
                # so this is a bug): it fails alone, and the worker never saw it.
                log.exception("request %s could not be sent to %s", job.id, worker.id)
                self._release_slot(worker, job)
                self._finish(job, errors.LlamapoolError(f"the request could not be sent: {exc}"))
                continue
            if not sent:
                # The send failed: the worker is gone. Its reaping requeues the job.
                self.supervisor.kill(worker, ExitCause.UNREACHABLE, "unreachable on its socket")
                return

    def _pick_worker(self, model_id: str, key: str) -> WorkerHandle | None:
        candidates = [w for w in self.supervisor.workers_of(model_id) if w.free_slots > 0]
        if not candidates:
            return None
        # Least loaded first: a batching instance with a free slot still shares its cores
        # among its requests, so an idle instance serves sooner. Among equally loaded
        # ones, prompt-cache affinity: the instance that served the longest prefix of this
        # one lately holds it in a slot or its RAM prompt cache (a chat's next turn).
        # Ties, and requests that share nothing, go to the least recently used instance.
        cached = {w.id: cached_prefix(w, key) for w in candidates}
        least = min(candidates, key=lambda w: (len(w.in_flight), -cached[w.id], w.last_used))
        # One request more in flight is worth it for a prefix that spares a real prompt
        # evaluation: the wider batch costs a row per step, the miss costs every token of
        # the prefix now (on a 2-core box a prompt row costs about what a step's row does).
        held = cached[least.id] + AFFINITY_MIN_GAIN
        nearly = len(least.in_flight) + AFFINITY_SLACK
        better = [w for w in candidates if len(w.in_flight) <= nearly and cached[w.id] >= held]
        if not better:
            return least
        return min(better, key=lambda w: (-cached[w.id], len(w.in_flight), w.last_used))

    # -- events from workers ----------------------------------------------------

    def on_chunk(self, worker: WorkerHandle, msg: P.Chunk) -> None:
        job = self._job_for(worker, msg.request_id)
        if job is None or not job.state.delivers():
            return
        if job.first_output_at is None:
            job.first_output_at = time.monotonic()
            if job.stream:
                self._observe_first_output(job)
        if not job.stream:
            job.held.append(msg)  # still RUNNING: the client has seen nothing
            return
        if job.state is JobState.RUNNING:
            job.move(JobState.STREAMING)
        job.events.put_nowait(msg)

    def _observe_reuse(self, model_id: str, t: P.Timings | None) -> None:
        if t is None:
            return
        split = {"slot": t.cache_slot_n, "ram": t.cache_ram_n, "shared": t.cache_shared_n}
        source = max(split, key=split.__getitem__)
        if split[source] > 0:
            self.observer.prompt_reused(model_id, source, split[source])
        else:
            self.observer.prompt_reused(model_id, "none", 0)

    def _observe_first_output(self, job: Job) -> None:
        assert job.first_output_at is not None
        self.observer.time_to_first_token(job.model_id, job.first_output_at - job.enqueued_at)

    def on_done(self, worker: WorkerHandle, msg: P.Done) -> None:
        job = self._job_for(worker, msg.request_id)
        if job is None:
            return
        worker.served += 1
        self._release_slot(worker, job)
        tokens = msg.usage.completion_tokens
        self.observer.tokens_generated(job.model_id, tokens)
        self._observe_reuse(job.model_id, msg.timings)
        if msg.usage.drafted_tokens:
            self.observer.speculated(
                job.model_id, msg.usage.drafted_tokens, msg.usage.accepted_tokens
            )
        if job.first_output_at is not None and tokens > 1:
            self.observer.generation_finished(
                job.model_id, tokens, time.monotonic() - job.first_output_at
            )
        mq = self.queues.get(job.model_id)
        if job.dispatched_at is not None and mq is not None:
            mq.service_time = 0.8 * mq.service_time + 0.2 * (time.monotonic() - job.dispatched_at)
        if not job.stream and job.first_output_at is not None and job.state.delivers():
            # Its first token reached the client now, but this is when the attempt that
            # served it produced one, as for a streamed job.
            self._observe_first_output(job)
        self._finish(job, msg)
        self.dispatch(worker.model_id)

    def on_error(self, worker: WorkerHandle, msg: P.Error) -> None:
        job = self._job_for(worker, msg.request_id)
        if job is None:
            return
        self._release_slot(worker, job)
        if msg.retryable and job.state.can_requeue() and job.attempts < self.max_requeues:
            job.attempts += 1
            self._requeue(job)
        elif msg.retryable:
            # A refusal (the worker is draining): the pool's churn, not the request's fault.
            self._finish(job, self._refused_error(job, msg.message))
        else:
            self._finish(job, errors.error_from_code(msg.code, msg.message, param=msg.param))
        self.dispatch(worker.model_id)

    def _refused_error(self, job: Job, why: str) -> errors.LlamapoolError:
        """What a request refused by its worker, with no requeue left, is told."""
        wait = self.retry_after(job.model_id)
        return errors.WorkerBusy(
            f"no instance of {job.model_id} could take the request ({why}; "
            f"{job.attempts} requeue(s), max_requeues {self.max_requeues}); "
            f"retry after {wait:.0f} s",
            retry_after=wait,
        )

    def _job_for(self, worker: WorkerHandle, request_id: str) -> Job | None:
        job = worker.in_flight.get(request_id)
        if job is None:
            self.dropped_replies += 1
            log.debug("dropped a reply for unknown request %s from %s", request_id, worker.id)
        return job

    def _release_slot(self, worker: WorkerHandle, job: Job) -> None:
        worker.in_flight.pop(job.id, None)
        self.running.pop(job.id, None)
        job.worker = None
        if job.timer is not None:  # its max_request_time timer
            job.timer.cancel()
            job.timer = None
        self.supervisor.note_released(worker)

    def _requeue(self, job: Job) -> None:
        # At the head: it was admitted first. A fresh queue_timeout, since the wait is ours.
        refusal = self._cannot_serve(job.model_id)
        if refusal is not None:
            self._finish(job, refusal)
            return
        mq = self.queues[job.model_id]
        job.move(JobState.QUEUED)
        job.dispatched_at = None
        # The failed attempt's output was never seen; the retry starts from scratch, with
        # the same request (so the same seed, where the client fixed one).
        job.first_output_at = None
        job.held.clear()
        mq.jobs.appendleft(job)
        job.timer = asyncio.get_running_loop().call_later(mq.queue_timeout, self._expire, job)

    def _cannot_serve(self, model_id: str) -> errors.LlamapoolError | None:
        """Why a requeued job could never run now (model removed, unloaded, failed), if so."""
        refusal = self.supervisor.refusal(model_id)
        if refusal is not None:
            return refusal
        if model_id not in self.queues:
            return errors.ModelNotFound(f"model {model_id!r} was removed by a reload")
        # An instance is wanted (it may have been scaled to 0 meanwhile). No memory verdict
        # here: the dead worker's replacement is on its way, and queue_timeout bounds the wait.
        self.supervisor.want_instance(model_id)
        return None

    def _finish(self, job: Job, event: Event) -> None:
        """End a job: its final event to the client, or, when it was told to stop, nothing."""
        if job.timer is not None:
            job.timer.cancel()
        held, job.held = job.held, []
        if job.state is JobState.CANCELLING:
            job.move(JobState.CANCELLED)
            return
        if isinstance(event, P.Done):
            job.move(JobState.DONE)
            for chunk in held:  # a non-streamed job's output, whole at last
                job.events.put_nowait(chunk)
        else:
            job.move(JobState.FAILED)
        job.events.put_nowait(event)

    # -- failures ---------------------------------------------------------------

    def on_worker_lost(self, worker: WorkerHandle, reason: str) -> None:
        """Requeue what the client has seen nothing of (no streamed output); fail the rest."""
        for job in list(worker.in_flight.values()):
            self._release_slot(worker, job)
            if job.state is JobState.CANCELLING:
                job.move(JobState.CANCELLED)
            elif job.state.can_requeue() and job.attempts < self.max_requeues:
                job.attempts += 1
                log.warning(
                    "requeued %s at the head of %s (attempt %d): %s",
                    job.id,
                    job.model_id,
                    job.attempts + 1,
                    reason,
                )
                self._requeue(job)
            else:
                self._finish(job, self._lost_error(job.model_id, reason))
        self.dispatch(worker.model_id)

    def _lost_error(self, model_id: str, reason: str) -> errors.LlamapoolError:
        """What a request whose worker went mid-way is told."""
        runtime = self.supervisor.models.get(model_id)
        if runtime is not None and runtime.state is ModelState.UNLOADED:  # forced, not a crash
            return errors.ModelUnloaded(
                f"model {model_id!r} was unloaded by an operator while this request ran"
            )
        return errors.WorkerCrashed(
            f"the worker serving this request died ({reason}); "
            "the pool restarted it — retry the request"
        )

    def on_model_failed(self, model_id: str, reason: str) -> None:
        self.fail_queued(model_id, errors.ModelFailed(f"model {model_id!r} is failed: {reason}"))

    def fail_queued(self, model_id: str, error: errors.LlamapoolError) -> None:
        """Finish every queued request of a model with `error` (the model cannot serve them)."""
        mq = self.queues.get(model_id)
        if mq is None:
            return
        while mq.jobs:
            self._finish(mq.jobs.popleft(), error)

    # -- client side ------------------------------------------------------------

    def release(self, job: Job) -> None:
        """The client is gone or done: drop a queued job, cancel a running one."""
        if job.state is JobState.QUEUED:
            try:
                self.queues[job.model_id].jobs.remove(job)
            except ValueError:
                pass
            if job.timer is not None:
                job.timer.cancel()
            job.move(JobState.CANCELLED)
        elif job.state.can_cancel():
            self._cancel(job)

    def _time_out(self, job: Job) -> None:
        """The job ran past max_request_time: the client is told, its worker stops it."""
        if not job.state.can_cancel():
            return
        limit = self.queues[job.model_id].max_request_time or 0.0
        assert job.worker is not None and job.dispatched_at is not None
        ran = time.monotonic() - job.dispatched_at
        log.warning(
            "request %s ran past max_request_time (%g s) of %s; cancelling it on %s",
            job.id,
            limit,
            job.model_id,
            job.worker.id,
        )
        # Before any output this is the response's status (504); after, an in-band error.
        job.events.put_nowait(
            errors.RequestTimeout(
                f"request stopped after {ran:.1f} s: model {job.model_id} allows "
                f"{limit:g} s per request (max_request_time); ask for fewer tokens "
                "(max_tokens) or raise max_request_time"
            )
        )
        self._cancel(job)

    def _cancel(self, job: Job) -> None:
        """Tell a job's worker to stop it; its slot frees when the worker confirms."""
        job.move(JobState.CANCELLING)
        assert job.worker is not None
        self.send(job.worker, P.Cancel(request_id=job.id))

    def queue_depth(self, model_id: str) -> int:
        return len(self.queues[model_id].jobs)
