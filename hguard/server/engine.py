"""Engine: a bounded queue of generation jobs, batched dynamically onto one model.

The engine knows nothing about HTTP. A job is one request's prompt rows (a prompt repeated n times)
with its sampling and guard settings. One worker thread takes the oldest job and every waiting job
that can share its `generate` call (same sampling settings, stop strings and guard policy; different
length limits are fine, each row has its own), up to `max_batch_size` rows, and runs the batch as one
generation episode (hguard/episode.py) in that same thread: the episode's events go straight to each
job's asyncio queue on the event loop (`call_soon_threadsafe`), with no second thread between. A job
whose client left is cancelled row by row, so its slot stops costing anything at the next step, and a
batch whose jobs are all cancelled ends at the next step. A full queue refuses new jobs (429).

The interface the server talks to (a vLLM-backed engine and the proxy's scorer are to implement the
same): `start()` / `stop()`; `submit(job)` queues a `Job` (prompt rows, a length limit, `Settings`:
sampling and guard settings) or raises `QueueFull`; the job's `events` queue then receives a
`TokenEvent` per scored token (step s's events carry the scores of the tokens sampled at step s - 1),
one `GuardResult` per row, and `DONE` (or an exception, then `DONE`); setting `job.cancelled` stops
its rows; `queue_depth`, `running` and `alive` report the state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..guard import Guard
from ..metrics import Metrics
from ..results import GuardResult, TokenEvent


class QueueFull(RuntimeError):
    """The engine's queue is at its bound; retry later."""


@dataclass(frozen=True)
class Settings:
    """What must be equal for two jobs to share one `generate` call."""

    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    action: str | None
    threshold: float | None
    alpha: float | None
    logprobs: int | None = None  # alternatives per token when the request asks for logprobs
    top_k: int | None = None  # vLLM's sampling fields (None: off)
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        """These settings as `generate` keyword arguments (greedy at temperature 0, as the OpenAI API)."""
        kwargs: dict[str, Any] = {"do_sample": False}
        if self.temperature > 0:  # top_k=0: transformers' default of 50 would cut what the request allows
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p,
                          top_k=self.top_k if self.top_k and self.top_k > 0 else 0)
            if self.min_p:
                kwargs["min_p"] = self.min_p
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.min_tokens:
            kwargs["min_new_tokens"] = self.min_tokens
        return kwargs


@dataclass(eq=False)
class Job:
    rows: list[list[int]]
    max_new_tokens: int
    settings: Settings
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None

    def send(self, item: Any) -> None:
        """Hand `item` to the job's event loop; nothing when that loop has closed (whoever waited for the
        job is gone), so that an engine's thread never dies of a client's ending."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # "Event loop is closed"
            pass


DONE = object()


class QueuedEngine:
    """What every engine shares: the bounded queue of waiting jobs, its lock, the serving thread's
    liveness and the queue gauges. A subclass runs the jobs (`start`, `stop`, `running`)."""

    def __init__(self, max_batch_size: int, max_queue: int, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> None:
        with self._condition:
            if len(self._waiting) >= self.max_queue:  # jobs whose clients left hold no place
                self._waiting = deque(waiting for waiting in self._waiting if not waiting.cancelled.is_set())
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} requests; retry later")
            self._waiting.append(job)
            self._gauges()
            self._condition.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        """The serving thread is running (/health reports it)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.labels(self.metrics.queue_depth).set(len(self._waiting))
            self.metrics.labels(self.metrics.running).set(self.running)


class Engine(QueuedEngine):
    def __init__(self, guard: Guard, max_batch_size: int = 32, max_queue: int = 256,
                 metrics: Metrics | None = None) -> None:
        super().__init__(max_batch_size, max_queue, metrics)
        self.guard = guard
        self._running: list[Job] = []

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="hguard-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            for job in [*self._waiting, *self._running]:
                job.cancelled.set()
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def running(self) -> int:
        return len(self._running)

    # ---- the worker ---------------------------------------------------------------------------
    def _next_batch(self) -> list[Job]:
        with self._condition:
            while not self._waiting and not self._stopping:
                self._condition.wait()
            if self._stopping:
                return []
            first = self._waiting.popleft()
            batch, rows = [first], len(first.rows)
            if first.settings.seed is None:  # a seeded job runs alone, so its samples are reproducible
                for job in list(self._waiting):
                    if job.settings == first.settings and rows + len(job.rows) <= self.max_batch_size:
                        self._waiting.remove(job)
                        batch.append(job)
                        rows += len(job.rows)
            batch = [job for job in batch if not job.cancelled.is_set()]
            self._running = batch
            self._gauges()
            return batch

    def _work(self) -> None:
        while not self._stopping:
            batch = self._next_batch()
            if batch:
                try:
                    self._run(batch)
                except BaseException as error:  # reported to every job of the batch
                    for job in batch:
                        job.send(error)
                finally:
                    for job in batch:
                        job.send(DONE)
                    self._running = []
                    self._gauges()

    def _run(self, batch: list[Job]) -> None:
        owners: list[tuple[Job, int]] = [(job, i) for job in batch for i in range(len(job.rows))]
        rows = [row for job in batch for row in job.rows]
        limits = [job.max_new_tokens for job in batch for _ in job.rows]
        settings = batch[0].settings
        start = time.perf_counter()
        for job in batch:
            job.started = start
        timing = Timing(self.metrics, batch)
        kwargs: dict[str, Any] = {"max_new_tokens": limits, **settings.generate_kwargs()}
        if settings.seed is not None:
            torch.manual_seed(settings.seed)

        def cancelled_rows() -> set[int]:
            return {i for i, (job, _) in enumerate(owners) if job.cancelled.is_set()}

        def dispatch(item: TokenEvent | GuardResult) -> None:
            """One event of the episode to its job's queue on the event loop (in this worker thread)."""
            job, index = owners[item.row]
            if job.cancelled.is_set():
                if all(j.cancelled.is_set() for j in batch):
                    cancel.set()  # every client left: the batch ends at the next step
                return
            if isinstance(item, GuardResult):
                item.row = index
                timing.result(job, item, self.guard.threshold if settings.threshold is None else settings.threshold)
            else:
                item = dataclasses.replace(item, row=index)
                if item.token_id >= 0:  # not the text held back until the row ended
                    timing.token(job, index)
            job.send(item)

        cancel = threading.Event()
        episode = self.guard.episode(
            rows, action=settings.action, threshold=settings.threshold, alpha=settings.alpha,
            stop=list(settings.stop), logprobs=settings.logprobs, on_event=dispatch, cancel=cancel,
            cancelled_rows=cancelled_rows, **kwargs,
        )
        for result in episode.run():
            dispatch(result)


class Timing:
    """Latency and guard outcomes of one batch, recorded into Metrics (a no-op without them)."""

    def __init__(self, metrics: Metrics | None, batch: list[Job]) -> None:
        self.metrics = metrics
        self.last: dict[tuple[int, int], float] = {}  # (job, choice) -> when its last token went out
        self.first: set[int] = set()  # jobs whose first token went out
        if metrics is not None:
            self.ttft = metrics.labels(metrics.time_to_first_token)
            self.itl = metrics.labels(metrics.inter_token_latency)
            for job in batch:
                metrics.labels(metrics.queue_time).observe(job.started - job.enqueued)

    def token(self, job: Job, choice: int) -> None:
        """A token of one choice went out: time to the job's first token, and between each choice's
        tokens (the n choices of a request step together, and are not each other's gaps)."""
        if self.metrics is None:
            return
        now = time.perf_counter()
        if id(job) not in self.first:
            self.first.add(id(job))
            self.ttft.observe(now - job.enqueued)
        previous = self.last.get((id(job), choice))
        if previous is not None:
            self.itl.observe(now - previous)
        self.last[(id(job), choice)] = now

    def result(self, job: Job, result: GuardResult, threshold: float) -> None:
        m = self.metrics
        if m is None:
            return
        m.labels(m.generation_tokens).inc(len(result.token_ids))
        m.answer(result.token_probs, result.probability, result.verdict, threshold)
