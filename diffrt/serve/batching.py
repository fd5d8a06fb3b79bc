"""Dynamic batching: N worker threads (default 1), each with its own runner (a pipeline
view with its own contexts, see Pipeline.worker), take batches from one queue; each
runs one batch at a time.

Queue order. Waiting requests are grouped by the pipeline's `batch_key` (calls with
equal keys can share denoiser calls). The groups form a rotation, ordered first by
their oldest request (a new key joins at the end). The worker looks at the groups in
rotation order and takes the first *ready* one: a group is ready when its requests
add up to `max_batch` images, or its oldest request has waited `batch_wait_ms`, or the
server is draining. From that group it takes requests oldest first while they fit in
`max_batch` images (a request of more images than `max_batch` runs alone), runs them as
one `generate`, and moves the group to the end of the rotation if requests are
left in it. So within a key the order is first come first served, and across keys it is
round-robin: a busy key cannot starve another, which waits at most one batch per
other group ahead of it. While no group is ready the worker sleeps until the earliest
one will be, or a request arrives. With several workers, each free one takes the next
batch by these rules (the queue's order is the same; batches start side by side).

The queue holds at most `max_queue` waiting requests (running ones do not count); a
submit beyond that raises `QueueFull`.

Cancellation. `cancel(job)` abandons a request (its client is gone, or it timed out):
a queued one leaves the queue at once; a running one is marked, and the worker stops
its batch between two denoiser steps once every request in it is abandoned (the
pipeline's progress callback raises `Cancelled`), so abandoned work does not hold the
worker for the rest of its steps.

Isolation. A request's failure must not fail the requests batched with it: when a
batch of several requests raises, each of them is run again alone (by the same worker),
so only the one(s) that fail alone get the error.

Tests: `pause()` holds the workers before they take their next batch, `wait_for(predicate)`
waits (bounded) for the queue to reach a state, and `clock` is injectable, so tests can
build a queue and release it without depending on timing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry after {retry_after_s}s")
        self.retry_after_s = retry_after_s


class Cancelled(Exception):
    """Raised between denoiser steps of a batch whose every request was abandoned."""


@dataclass(eq=False)
class Job:
    call: dict[str, Any]
    key: Hashable
    images: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    id: int = 0
    enqueued: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued, running, done, failed, cancelled
    step: int = 0
    total: int = 0
    batch_size: int = 0    # images in the batch it ran in
    abandoned: bool = False  # nobody waits for the answer any more (set by cancel)

    def _settle(self, setter: Callable, *value: Any) -> None:
        def settle() -> None:
            if not self.future.done():
                setter(*value)
        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def resolve(self, value: Any) -> None:
        self._settle(self.future.set_result, value)

    def fail(self, exc: BaseException) -> None:
        if self.abandoned:  # nobody would retrieve the exception (asyncio would log it)
            self._settle(self.future.cancel)
        else:
            self._settle(self.future.set_exception, exc)


class BatchScheduler:
    """`runner(requests, progress)` -> one result per request (the pipeline's
    `generate`); a sequence of runners starts one worker thread per runner, each
    running its own. `on_batch(jobs, seconds, results_or_exception)` observes each
    pipeline run. `warmup(runner)` (optional) runs on each worker thread, with its
    runner, before its first batch."""

    def __init__(self, runner: Callable | Sequence[Callable], max_batch: int = 4, batch_wait_ms: float = 10.0,
                 max_queue: int = 64, warmup: Callable[[Callable], None] | None = None,
                 on_batch: Callable | None = None, clock: Callable[[], float] = time.monotonic):
        self.runners = [runner] if callable(runner) else list(runner)
        if not self.runners:
            raise ValueError("BatchScheduler needs at least one runner")
        self.max_batch, self.max_queue = max(1, max_batch), max(1, max_queue)
        self.batch_wait = max(0.0, batch_wait_ms) / 1000.0
        self.clock = clock
        self._warmup, self._on_batch = warmup, on_batch
        self._groups: OrderedDict[Hashable, deque[Job]] = OrderedDict()
        self._waiting = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._paused = False
        self._ids = itertools.count(1)
        self.ready = threading.Event()  # every worker warmed up
        self._warmed = 0
        self.warmup_error: BaseException | None = None
        self._running: dict[int, list[Job]] = {}  # worker index -> the jobs of its batch
        self.batch_seconds = 0.0  # moving average, for Retry-After
        self._threads = [threading.Thread(target=self._work, args=(i,), name=f"diffrt-batch-worker-{i}", daemon=True)
                         for i in range(len(self.runners))]

    @property
    def workers(self) -> int:
        return len(self.runners)

    @property
    def running(self) -> list[Job]:
        """The jobs of every batch running now."""
        return [job for jobs in list(self._running.values()) for job in jobs]

    # -- the event loop's side ------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        return self._waiting

    def submit(self, call: dict[str, Any], key: Hashable, images: int) -> Job:
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._stopping:
                raise QueueFull(5)
            if self._waiting >= self.max_queue:
                raise QueueFull(self.retry_after())
            job = Job(call, key, images, loop.create_future(), loop, id=next(self._ids), enqueued=self.clock())
            self._groups.setdefault(key, deque()).append(job)
            self._waiting += 1
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """Abandon a job: out of the queue if its batch has not started (True), else
        marked, so its batch stops between steps once none of its requests is wanted."""
        with self._cond:
            job.abandoned = True
            self._cond.notify_all()
            if job.state != "queued":
                return False
            group = self._groups.get(job.key)
            if group is not None and job in group:
                group.remove(job)
                if not group:
                    del self._groups[job.key]
                self._waiting -= 1
            job.state = "cancelled"
        job.future.cancel()
        return True

    def retry_after(self) -> int:
        batches_ahead = (self._waiting / self.max_batch + 1) / self.workers
        return max(1, min(60, int(batches_ahead * max(self.batch_seconds, 0.1) + 0.999)))

    def pause(self) -> None:
        """Hold the workers before their next batch (running ones finish)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` (checked whenever the queue changes) or the timeout."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Drain: run what is queued, then end the workers."""
        with self._cond:
            self._stopping = True
            self._paused = False
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # -- the worker's side ----------------------------------------------------------

    def _ready_group(self, now: float) -> tuple[Hashable | None, float | None]:
        """The first ready group in rotation order, else when the next will be ready."""
        wake = None
        for key, group in self._groups.items():
            due = group[0].enqueued + self.batch_wait
            if self._stopping or now >= due or sum(j.images for j in group) >= self.max_batch:
                return key, None
            wake = due if wake is None else min(wake, due)
        return None, wake

    def _take(self, worker: int) -> list[Job] | None:
        with self._cond:
            while True:
                if self._stopping and not self._groups:
                    return None
                key, wake = (None, None) if self._paused else self._ready_group(self.clock())
                if key is not None:
                    break
                self._cond.wait(None if wake is None else max(0.0, wake - self.clock()))
            group = self._groups.pop(key)
            jobs, images = [], 0
            while group and (not jobs or images + group[0].images <= self.max_batch):
                job = group.popleft()
                jobs.append(job)
                images += job.images
            if group:
                self._groups[key] = group  # to the end of the rotation
            self._waiting -= len(jobs)
            for job in jobs:
                job.state, job.batch_size = "running", images
            self._running[worker] = jobs
            self._cond.notify_all()
            return jobs

    def _work(self, worker: int) -> None:
        runner = self.runners[worker]
        if self._warmup is not None:
            try:
                self._warmup(runner)
            except BaseException as exc:  # noqa: BLE001 - reported by /readyz, requests still run
                logger.exception("warm-up generation failed (worker %d)", worker)
                self.warmup_error = exc
        with self._cond:
            self._warmed += 1
            if self._warmed == self.workers:
                self.ready.set()
        while True:
            jobs = self._take(worker)
            if jobs is None:
                return
            try:
                self._run(worker, jobs)
            finally:
                with self._cond:
                    self._running.pop(worker, None)
                    self._cond.notify_all()

    def _run(self, worker: int, jobs: list[Job]) -> None:
        outcome = self._attempt(self.runners[worker], jobs)
        if not isinstance(outcome, BaseException):
            for job, result in zip(jobs, outcome):
                job.state = "done"
                job.resolve(result)
            return
        if len(jobs) > 1 and not isinstance(outcome, Cancelled):
            # one request's fault (a prompt the tokenizer rejects, a non-finite output)
            # must not fail the others: run each alone, so only the culprit fails
            logger.warning("a batch of %d requests failed (%s: %s); running them one at a time", len(jobs),
                           type(outcome).__name__, outcome)
            for job in jobs:
                job.batch_size = job.images
                with self._cond:
                    self._running[worker] = [job]
                self._run(worker, [job])
            return
        if isinstance(outcome, Cancelled):
            logger.info("stopped a batch of %d abandoned request(s) between denoiser steps", len(jobs))
        else:
            logger.error("a request failed: %s: %s", type(outcome).__name__, outcome)
        for job in jobs:
            job.state = "cancelled" if job.abandoned else "failed"
            job.fail(outcome)

    def _attempt(self, runner: Callable, jobs: list[Job]) -> list[Any] | BaseException:
        """One pipeline run of `jobs`: their results, or the exception it raised."""
        def progress(step: int, total: int) -> None:
            for job in jobs:
                job.step, job.total = step, total
            if all(job.abandoned for job in jobs):
                raise Cancelled(f"all {len(jobs)} request(s) of the batch were abandoned")

        t0 = time.perf_counter()
        try:
            if all(job.abandoned for job in jobs):
                raise Cancelled("abandoned before it started")
            outcome = runner([job.call for job in jobs], progress)
            if len(outcome) != len(jobs):
                raise RuntimeError(f"the pipeline returned {len(outcome)} results for {len(jobs)} calls")
        except BaseException as exc:  # noqa: BLE001 - fails these requests only
            outcome = exc
        seconds = time.perf_counter() - t0
        self.batch_seconds = seconds if not self.batch_seconds else 0.8 * self.batch_seconds + 0.2 * seconds
        self._observe(jobs, seconds, outcome)
        return outcome

    def _observe(self, jobs: list[Job], seconds: float, outcome: Any) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(jobs, seconds, outcome)
        except Exception:  # noqa: BLE001 - metrics must never break serving
            logger.exception("batch observer failed")
