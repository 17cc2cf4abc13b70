"""Concurrent handlers with per-key order: up to N at once, one at a time per lane, in arrival order per lane.

A consumer with ``concurrency=N`` hands each message to a :class:`Dispatcher` with a *lane*: messages of one
lane run one after another, in the order they were submitted; different lanes run side by side, at most
``N`` at a time. The lane is the message's key (``ordering="key"``), its partition
(``ordering="partition"``), or none (``ordering="none"``: any order). A message without a key runs in its
partition's lane on Kafka and without order on RabbitMQ.

Two engines, one behaviour:

- :class:`ThreadDispatcher` for plain functions: ``N`` worker threads;
- :class:`LoopDispatcher` for ``async def`` handlers: tasks on one event loop (the service's, or a private
  one), so thousands can wait on I/O without a thread each.

A job is submitted from the consumer's polling thread and reports back through ``on_done(job, error)`` on
the thread that ran it; the consumer settles it (ack, commit) on its own thread. Jobs not started yet can
be dropped (a revoked partition, a lost channel, stopping): their messages were never handled, and the
broker delivers them again.

Why by hand: :mod:`concurrent.futures` and :mod:`asyncio` give the pools, not "one at a time per key, in
order, with a bound across keys"; the lane bookkeeping is this module.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigurationError

__all__ = ["ORDERINGS", "Concurrency", "Dispatcher", "Job", "LoopDispatcher", "ThreadDispatcher", "dispatcher_for",
           "is_async"]

logger = logging.getLogger("reliable_messaging.consumer")

ORDERINGS = ("key", "partition", "none")


def is_async(handler: Callable[..., Any]) -> bool:
    """Whether calling ``handler`` returns a coroutine (an ``async def`` function or ``__call__``)."""
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - an object with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


@dataclass(frozen=True)
class Concurrency:
    """How a consumer runs its handlers: how many at once, in what order, for how long."""

    handlers: int = 1
    ordering: str = "key"
    handler_timeout: float | None = None
    drain_timeout: float = 30.0

    @classmethod
    def check(cls, concurrency: object, ordering: object, handler_timeout: object,
              drain_timeout: object) -> Concurrency:
        """Validated settings (ConfigurationError naming the field otherwise)."""
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 10_000:
            raise ConfigurationError(f"concurrency must be an int in 1..10000, got {concurrency!r}",
                                     field="concurrency")
        if ordering is None:
            ordering = "key"
        if ordering not in ORDERINGS:
            raise ConfigurationError(f"ordering must be one of {', '.join(ORDERINGS)}, got {ordering!r}",
                                     field="ordering")
        seconds: dict[str, float | None] = {"handler_timeout": None}
        for name, value in (("handler_timeout", handler_timeout), ("drain_timeout", drain_timeout)):
            if value is None and name == "handler_timeout":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigurationError(f"{name} must be a number of seconds > 0, got {value!r}", field=name)
            seconds[name] = float(value)
        return cls(concurrency, str(ordering), seconds["handler_timeout"], seconds["drain_timeout"] or 30.0)

    def lane(self, key: bytes | None, partition: Hashable | None) -> Hashable | None:
        """The lane of a message with ``key`` read from ``partition`` (None: no order to keep)."""
        if self.ordering == "none":
            return None
        if self.ordering == "key" and key:
            return ("k", key)
        return None if partition is None else ("p", partition)


class Job:
    """One message's handling: what the dispatcher runs (``message``, through the consumer's runner) and what
    the consumer needs to settle it afterwards (``ref``); ``outcome`` once it ran (None: skipped)."""

    __slots__ = ("lane", "message", "outcome", "ref", "started")

    def __init__(self, lane: Hashable | None, message: Any, ref: Any = None) -> None:
        self.lane = lane
        self.message = message
        self.ref = ref
        self.outcome: Any = None
        self.started = False

    def __repr__(self) -> str:
        return f"<Job lane={self.lane!r} ref={self.ref!r} started={self.started}>"


OnDone = Callable[[Job, "BaseException | None"], None]


def dispatcher_for(runner: Any, handler: Callable[..., Any], mode: Concurrency, on_done: OnDone, name: str,
                   wanted: Callable[[Job], bool] | None = None) -> Dispatcher:
    """The dispatcher for ``handler``: tasks on the runner's event loop for an ``async def`` handler, threads
    otherwise. Each job runs ``runner.invoke`` (``ainvoke``) on its message, unless ``wanted(job)`` says it
    is no longer (its channel or partition went away meanwhile): then its outcome stays None."""
    if is_async(handler):
        async def ainvoke(job: Job) -> None:
            if wanted is None or wanted(job):
                job.outcome = await runner.ainvoke(job.message)

        return LoopDispatcher(mode.handlers, on_done, runner.event_loop(), ainvoke)

    def invoke(job: Job) -> None:
        if wanted is None or wanted(job):
            job.outcome = runner.invoke(job.message)

    return ThreadDispatcher(mode.handlers, on_done, name, invoke)


class Dispatcher:
    """The lane bookkeeping shared by both engines (under ``_lock``)."""

    def __init__(self, concurrency: int, on_done: OnDone) -> None:
        self.concurrency = concurrency
        self.on_done = on_done
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._lanes: dict[Hashable, collections.deque[Job]] = {}  # busy lanes -> their waiting jobs
        self._ready: collections.deque[Job] = collections.deque()  # may start now (their lane is theirs)
        self._running: set[Job] = set()
        self._waiting = 0  # jobs in lanes, not yet ready
        self._closed = False

    def outstanding(self) -> int:
        """Jobs submitted and not finished (running, ready or waiting for their lane)."""
        with self._lock:
            return len(self._running) + len(self._ready) + self._waiting

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the dispatcher is closed")
            lane = job.lane
            if lane is None:
                self._ready.append(job)
            else:
                waiting = self._lanes.get(lane)
                if waiting is None:
                    self._lanes[lane] = collections.deque()
                    self._ready.append(job)
                else:
                    waiting.append(job)
                    self._waiting += 1
        self._kick()

    def drop(self, matches: Callable[[Job], bool]) -> list[Job]:
        """Remove the jobs not started yet whose ref ``matches``; returns them."""
        dropped: list[Job] = []
        with self._lock:
            for job in list(self._ready):
                if matches(job):
                    self._ready.remove(job)
                    dropped.append(job)
            for lane, waiting in list(self._lanes.items()):
                kept = collections.deque(job for job in waiting if not matches(job))
                removed = len(waiting) - len(kept)
                if removed:
                    dropped.extend(job for job in waiting if matches(job))
                    self._waiting -= removed
                    self._lanes[lane] = kept
            self._release_idle_lanes()  # a dropped lane head frees its lane for the next waiting job
            self._idle.notify_all()
        self._kick()
        return dropped

    def running(self, matches: Callable[[Job], bool]) -> list[Job]:
        """The started, unfinished jobs whose ref ``matches``."""
        with self._lock:
            return [job for job in self._running if matches(job)]

    def wait_below(self, limit: int, timeout: float) -> bool:
        """Wait until fewer than ``limit`` jobs are outstanding; False at the timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._running) + len(self._ready) + self._waiting >= limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
            return True

    def wait(self, matches: Callable[[Job], bool], timeout: float) -> bool:
        """Wait until no job whose ref ``matches`` is running or pending; False at the timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while any(matches(job) for job in self._all()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
            return True

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def on_handler_thread(self) -> bool:
        """Whether the calling thread is one of this dispatcher's (a handler calling stop())."""
        return False

    # -- internals (_lock held unless said otherwise) -------------------------------------------

    def _report(self, job: Job, error: BaseException | None) -> None:
        """(not under _lock) Hand the finished job to the consumer *before* it stops counting as running, so
        that whoever waits for a partition's jobs (a revoke, a stop) finds its outcome already posted."""
        try:
            self.on_done(job, error)
        except Exception:  # a consumer bug must not kill the worker: the job still finishes
            logger.exception("settling a finished handler failed")

    def _all(self) -> list[Job]:
        jobs = list(self._running) + list(self._ready)
        for waiting in self._lanes.values():
            jobs.extend(waiting)
        return jobs

    def _release_idle_lanes(self) -> None:
        """A busy lane whose head left (dropped) and that has no job running: start its next job, or free it."""
        running_lanes = {job.lane for job in self._running} | {job.lane for job in self._ready}
        for lane, waiting in list(self._lanes.items()):
            if lane in running_lanes:
                continue
            if waiting:
                self._ready.append(waiting.popleft())
                self._waiting -= 1
            else:
                del self._lanes[lane]

    def _take(self) -> Job | None:
        """The next ready job, if one may start (fewer than ``concurrency`` running)."""
        if not self._ready or len(self._running) >= self.concurrency:
            return None
        job = self._ready.popleft()
        job.started = True
        self._running.add(job)
        return job

    def _finished(self, job: Job) -> None:
        self._running.discard(job)
        lane = job.lane
        if lane is not None:
            waiting = self._lanes.get(lane)
            if waiting:
                self._ready.append(waiting.popleft())
                self._waiting -= 1
            else:
                self._lanes.pop(lane, None)
        self._idle.notify_all()

    def _kick(self) -> None:
        """(not under _lock) Start what may start."""
        raise NotImplementedError


class ThreadDispatcher(Dispatcher):
    """Runs ``job.run()`` on ``concurrency`` worker threads."""

    def __init__(self, concurrency: int, on_done: OnDone, name: str, invoke: Callable[[Job], None]) -> None:
        super().__init__(concurrency, on_done)
        self.invoke = invoke
        self._work = threading.Condition(self._lock)
        self._threads = [threading.Thread(target=self._worker, name=f"{name}-{n}", daemon=True)
                         for n in range(concurrency)]
        for thread in self._threads:
            thread.start()

    def _kick(self) -> None:
        with self._lock:
            self._work.notify(len(self._ready))

    def _worker(self) -> None:
        while True:
            with self._lock:
                job = self._take()
                while job is None:
                    if self._closed and not self._running and not self._ready:
                        return
                    self._work.wait(0.5)
                    job = self._take()
            error: BaseException | None = None
            try:
                self.invoke(job)
            except BaseException as exc:  # noqa: BLE001 - reported to the consumer, which decides
                error = exc
            self._report(job, error)
            with self._lock:
                self._finished(job)
                self._work.notify(len(self._ready))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._work.notify_all()

    def on_handler_thread(self) -> bool:
        return threading.current_thread() in self._threads


class LoopDispatcher(Dispatcher):
    """Runs ``await job.arun()`` as tasks on ``loop``, at most ``concurrency`` at a time."""

    def __init__(self, concurrency: int, on_done: OnDone, loop: asyncio.AbstractEventLoop,
                 ainvoke: Callable[[Job], Coroutine[Any, Any, None]]) -> None:
        super().__init__(concurrency, on_done)
        self.loop = loop
        self.ainvoke = ainvoke
        self._tasks: set[asyncio.Task[None]] = set()
        self._kick_pending = False

    def _kick(self) -> None:
        with self._lock:
            if self._kick_pending:
                return
            self._kick_pending = True
        try:
            self.loop.call_soon_threadsafe(self._start_ready)
        except RuntimeError:  # the loop is closed: nothing can run any more
            with self._lock:
                self._kick_pending = False

    def _start_ready(self) -> None:
        """(on the loop) Start tasks for the ready jobs, up to the bound."""
        with self._lock:
            self._kick_pending = False
            jobs = []
            while (job := self._take()) is not None:
                jobs.append(job)
        for job in jobs:
            task = self.loop.create_task(self._run(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, job: Job) -> None:
        error: BaseException | None = None
        try:
            await self.ainvoke(job)
        except BaseException as exc:  # noqa: BLE001 - reported to the consumer, which decides
            error = exc
        self._report(job, error)
        with self._lock:
            self._finished(job)
        self._start_ready()
