"""The engine: one worker thread runs the requests, fed by a bounded queue. It knows nothing of
HTTP: app.py submits Jobs and reads their Events.

With max_batch 1 the worker runs one request at a time through SpeculativeDecoder.stream. With
max_batch > 1 it batches continuously (batch.py): between two steps waiting jobs join the running
batch while it has free rows, and finished ones leave it; every step advances all rows in one
target forward. Model work in a thread of its own leaves the event loop free for /health, /metrics
and streaming (torch releases the GIL inside its kernels). Between two steps the worker checks each
job's cancellation, its deadline and a shutdown, so a stop is never more than one step away.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator

from outrider.batch import BatchDecoder, Row
from outrider.decoder import GenerationRequest, SpeculativeDecoder
from outrider.serve.metrics import ServeMetrics
from outrider.stats import SpecStats


class QueueFull(Exception):
    """The waiting queue holds max_queue requests already; retry after `retry_after` seconds."""

    def __init__(self, max_queue: int, retry_after: int) -> None:
        super().__init__(f"the server's queue is full ({max_queue} requests waiting): retry after "
                         f"{retry_after} s, or start the server with a larger --max-queue")
        self.retry_after = retry_after


class Draining(Exception):
    """The server is shutting down and admits no new requests."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down and admits no new requests: retry on another replica")


@dataclass
class Event:
    """What one step committed (text: the pieces the decoder released), or the end of the job:
    finish_reason is the decoder's ("length" | "eos" | "stop") or "abort"; error ends it too."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    error: Exception | None = None

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Job:
    """One admitted request. Created by Engine.submit on the event loop; the worker emits Events
    to it thread-safely and the event loop reads them with `events()`."""

    def __init__(self, request: GenerationRequest, n_prompt: int, deadline_s: float | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.n_prompt = n_prompt
        self.arrival = time.monotonic()
        self.deadline = None if deadline_s is None else self.arrival + deadline_s
        self.stats = SpecStats()
        self.first_token_at: float | None = None  # monotonic time of the first committed token
        self.started_at: float | None = None  # when a batch admitted it (max_batch > 1)
        self.finished_at: float | None = None
        self.abort_reason: str | None = None  # "cancelled" | "deadline" | "shutdown"
        self._cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        """Hand an event to the event loop (from any thread)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server stopped, nobody reads this job any more
            pass

    async def events(self) -> AsyncIterator[Event]:
        """The job's events, up to and including the last one."""
        while True:
            event = await self._events.get()
            yield event
            if event.last:
                return


class Engine:
    """Runs admitted jobs one at a time in a worker thread. max_queue bounds the jobs waiting
    behind the running one; a full queue raises QueueFull (the HTTP layer's 429)."""

    def __init__(self, decoder: SpeculativeDecoder, max_queue: int = 16, metrics: ServeMetrics | None = None,
                 max_batch: int = 1) -> None:
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue={max_queue!r} is invalid: use an integer >= 0 (0: no waiting requests)")
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} is invalid: use an integer >= 1 (requests run at once)")
        self.decoder = decoder
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.metrics = metrics
        # max_batch > 1: the batch owns the target's cache from now on (it gets max_batch slots).
        self._batch = BatchDecoder(decoder, max_batch) if max_batch > 1 else None
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._n_batched = 0  # jobs in the batch (max_batch > 1)
        self._accepting = True
        self._aborting = False  # after the drain timeout: every job ends with "abort"
        self._stopping = False
        self._mean_service_s = 1.0  # running mean of one job's run time, for Retry-After
        self._thread: threading.Thread | None = None
        self._drain_timer: threading.Timer | None = None

    # ---- admission (event loop) ----------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            work = self._work if self._batch is None else self._work_batched
            self._thread = threading.Thread(target=work, name="outrider-engine", daemon=True)
            self._thread.start()

    def submit(self, request: GenerationRequest, n_prompt: int, deadline_s: float | None = None) -> Job:
        """Queue a validated request; called on the event loop that will read the job's events."""
        job = Job(request, n_prompt, deadline_s, asyncio.get_running_loop())
        with self._cond:
            if not self._accepting:
                raise Draining()
            busy = self.running >= self.max_batch or self._waiting
            if busy and len(self._waiting) >= self.max_queue:
                raise QueueFull(self.max_queue, self._retry_after())
            self._waiting.append(job)
            self._publish()
            self._cond.notify()
        return job

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Stop a job: a waiting one leaves the queue now, a running one after its current step."""
        with self._cond:
            if job.abort_reason is None and job.finished_at is None:
                job.abort_reason = reason
            job._cancelled.set()
            if job in self._waiting:
                self._waiting.remove(job)
                self._publish()
                self._finish(job, Event([], "", "abort"))

    @property
    def running(self) -> int:
        """Jobs being generated: the running batch's size."""
        return self._n_batched if self._batch is not None else int(self._running is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def accepting(self) -> bool:
        return self._accepting

    # ---- shutdown ------------------------------------------------------------------------

    def drain(self, timeout_s: float) -> None:
        """Stop admitting; let admitted jobs finish for timeout_s seconds, then abort the rest."""
        with self._cond:
            if not self._accepting:
                return
            self._accepting = False
        self._drain_timer = threading.Timer(max(0.0, timeout_s), self.abort_all)
        self._drain_timer.daemon = True
        self._drain_timer.start()

    def abort_all(self) -> None:
        """End every job with "abort": the waiting ones now, the running one after its step."""
        with self._cond:
            self._accepting = False
            self._aborting = True
            while self._waiting:
                job = self._waiting.popleft()
                job.abort_reason = job.abort_reason or "shutdown"
                self._finish(job, Event([], "", "abort"))
            self._publish()
            self._cond.notify_all()

    def close(self, timeout_s: float = 10.0) -> None:
        """Abort whatever is left and stop the worker thread."""
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self.abort_all()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ---- the worker thread ---------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                self._running = job
                self._publish()
            started = time.monotonic()
            last = Event([], "", "abort")
            try:
                last = self._run(job)
            finally:
                with self._cond:
                    self._running = None
                    self._mean_service_s = 0.8 * self._mean_service_s + 0.2 * (time.monotonic() - started)
                    self._publish()
                # Only now: a client that sends its next request on this answer must find the
                # engine free, not get a 429 from a job that has ended but still counts as running.
                self._finish(job, last)

    def _run(self, job: Job) -> Event:
        """Generate, emitting each step's event; return the last event (not yet emitted)."""
        if self._stop_reason(job) is not None:  # cancelled, expired or shut down while it waited
            return Event([], "", "abort")
        stream = self.decoder.stream(job.request, stats=job.stats)
        last: Event | None = None
        try:
            for chunk in stream:
                if chunk.token_ids and job.first_token_at is None:
                    job.first_token_at = time.monotonic()
                event = Event(chunk.token_ids, chunk.text, chunk.finish_reason)
                if event.last:
                    last = event
                    break
                job.emit(event)
                if self._stop_reason(job) is not None:
                    break
        except Exception as e:  # a failed generation ends its own request, never the server
            last = Event([], "", None, e)
        finally:
            stream.close()  # an abandoned generator leaves nothing half-done: the next request resets
        return last or Event([], "", "abort")

    def _work_batched(self) -> None:
        """Continuous batching: admit waiting jobs into free rows, run one step for every row,
        emit each row's chunk, and retire finished, cancelled and expired jobs; until stopped."""
        batch = self._batch
        active: dict[int, tuple[Row, Job]] = {}  # slot -> its row and job
        while True:
            admit: list[Job] = []
            with self._cond:
                while not self._waiting and not active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._waiting and not active:
                    return
                while self._waiting and len(active) + len(admit) < self.max_batch:
                    admit.append(self._waiting.popleft())
                self._n_batched = len(active) + len(admit)
                self._publish()
            for job in admit:  # prefill outside the lock: submit and /metrics stay answered
                if self._stop_reason(job) is not None:
                    self._retire(job, Event([], "", "abort"))
                    continue
                try:
                    row = batch.add(job.request, stats=job.stats)
                except Exception as e:  # a request that fails to start ends alone
                    self._retire(job, Event([], "", None, e))
                    continue
                job.started_at = time.monotonic()
                active[row.slot] = (row, job)
            if not active:
                continue
            try:
                out = batch.step()
            except Exception as e:  # a failed step leaves every row's caches unknown: end them all
                for row, job in active.values():
                    batch.remove(row)
                    self._retire(job, Event([], "", None, e))
                active.clear()
                continue
            for row, chunk in out:
                job = active[row.slot][1]
                if chunk.token_ids and job.first_token_at is None:
                    job.first_token_at = time.monotonic()
                event = Event(chunk.token_ids, chunk.text, chunk.finish_reason)
                if event.last:
                    del active[row.slot]
                    self._retire(job, event)
                else:
                    job.emit(event)
            for slot, (row, job) in list(active.items()):
                if self._stop_reason(job) is not None:
                    batch.remove(row)
                    del active[slot]
                    self._retire(job, Event([], "", "abort"))

    def _retire(self, job: Job, event: Event) -> None:
        """A batched job leaves: the gauges first, then its last event (see _work)."""
        with self._cond:
            self._n_batched -= 1
            if job.started_at is not None:
                self._mean_service_s = 0.8 * self._mean_service_s + 0.2 * (time.monotonic() - job.started_at)
            self._publish()
        self._finish(job, event)

    def _stop_reason(self, job: Job) -> str | None:
        """Why the job must stop now (recorded on the job), or None."""
        if job.cancelled:
            reason = job.abort_reason or "cancelled"
        elif self._aborting:
            reason = "shutdown"
        elif job.deadline is not None and time.monotonic() > job.deadline:
            reason = "deadline"
        else:
            return None
        job.abort_reason = job.abort_reason or reason
        return reason

    def _finish(self, job: Job, event: Event) -> None:
        job.finished_at = time.monotonic()
        if self.metrics is not None:
            reason = event.finish_reason or "error"
            ttft = None if job.first_token_at is None else job.first_token_at - job.arrival
            self.metrics.request_finished(job.stats, reason, ttft, job.finished_at - job.arrival)
        job.emit(event)

    def _publish(self) -> None:
        """Update the gauges (called with the lock held)."""
        if self.metrics is not None:
            self.metrics.set_queue(self.running, len(self._waiting))

    def _retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the mean run time of one job."""
        return max(1, math.ceil(self._mean_service_s))
