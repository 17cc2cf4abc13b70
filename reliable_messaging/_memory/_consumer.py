"""The in-process broker's consumer: the same lifecycle and outcomes as the Kafka and RabbitMQ ones.

One worker thread takes the source's messages in order and runs the handler through the shared
:class:`~reliable_messaging._handling.HandlerRunner` (decoding, deduplication, the retry decision).
Outcomes, as on the real brokers: return -> acknowledged (gone); a retry -> a copy comes back after
the delay with ``x-rm-attempt`` + 1 (a hand-back without ``x-rm-deferrals`` + 1); dead letter -> a
copy with the library's headers on ``<source>.dlq``. ``stop()`` never gives a message away while its
handler runs; a handler's ``BaseException`` stops the consumer with
:class:`~reliable_messaging.HandlerAborted` and puts the message back for the next consumer.

With ``concurrency=N`` (> 1) the worker hands messages to a :mod:`.._dispatch` dispatcher (per-key
lanes; a message's partition is its source), at most ``2 N`` outstanding; ``stop()`` puts the messages
not started back at the front of the source, in order, and waits for those running.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .._dedup import DedupStore
from .._dispatch import Concurrency, Dispatcher, Job, dispatcher_for
from .._errors import ClosedError, ConfigurationError, HandlerAborted
from .._handling import ConsumerStats, Disposition, HandlerRunner, Outcome
from .._headers import ATTEMPT, DEFERRALS, failure_headers
from .._health import Health, assess, check_limits
from .._lifecycle import LoopFriendly, graceful_signals
from .._message import Message, header_count
from .._retry import RetryPolicy
from ._server import MemoryServer, Stored

__all__ = ["MemoryConsumer", "dead_letter_queue"]

logger = logging.getLogger("reliable_messaging.memory")

_POLL = 0.05
"""Seconds the worker waits for a message before it looks at whether it was stopped."""


def dead_letter_queue(source: str) -> str:
    return f"{source}.dlq"


class MemoryConsumer(LoopFriendly):
    """Consumes ``source`` of a :class:`MemoryServer`; ``auto_ack``: at-most-once (the outcome is ignored)."""

    def __init__(self, server: MemoryServer, source: str, handler: Callable[[Any], Any], *, retry: RetryPolicy,
                 decoder: Callable[[bytes], Any] | None, dedup: DedupStore | None,
                 dedup_key: Callable[[Any], str] | None, loop: asyncio.AbstractEventLoop | None,
                 auto_ack: bool, concurrency: Concurrency | None = None) -> None:
        self.server = server
        self.source = source
        self.mode = concurrency or Concurrency()
        concurrent = self.mode.handlers > 1
        self.runner: HandlerRunner[Message] = HandlerRunner(
            handler, retry=retry, decoder=decoder, dedup=dedup, dedup_key=dedup_key, loop=loop,
            concurrent=concurrent, handler_timeout=self.mode.handler_timeout)
        self._dispatcher: Dispatcher | None = None
        if concurrent:
            self._dispatcher = dispatcher_for(self.runner, handler, self.mode, self._job_done,
                                              f"rm-memory-handler-{source}")
        self.auto_ack = auto_ack
        self.error: Exception | None = None
        """Why the consumer stopped on its own, if it did."""
        self._aborted: BaseException | None = None
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._last_turn: float | None = None

    @property
    def stats(self) -> ConsumerStats:
        return self.runner.stats

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._finished.is_set()

    def health(self, *, poll_within: float = 60.0, handler_within: float | None = None) -> Health:
        """Live and ready as on the real brokers (see :mod:`.._health`); always connected while running."""
        check_limits(poll_within, handler_within)
        in_flight, oldest = self.runner.in_flight()
        turn = self._last_turn if self._dispatcher is not None else max(
            (t for t in (self._last_turn, self.runner.last_progress()) if t is not None), default=None)
        return assess(running=self.running, error=self.error, connected=self.running, last_turn=turn,
                      in_flight=in_flight, oldest_start=oldest, poll_within=poll_within,
                      handler_within=handler_within)

    def start(self) -> MemoryConsumer:
        """Start consuming on a background thread; returns self (awaitable inside a running event loop)."""
        return self._start_or_schedule()  # type: ignore[no-any-return]

    def stop(self, timeout: float = 30.0) -> Any:
        """Let the handlers in progress finish, then stop; False (it stops when they return) if they do not
        within ``timeout``. Inside a running event loop: an awaitable of that bool."""
        return self._stop_or_schedule(timeout)

    def _start_now(self) -> MemoryConsumer:
        if self._closed:
            raise ClosedError("the consumer was stopped; create a new one")
        if self._thread is not None:
            raise ConfigurationError("the consumer is already running")
        self.server.declare_source(self.source)
        self._thread = threading.Thread(target=self._work, name=f"rm-memory-consumer-{self.source}", daemon=True)
        self._thread.start()
        return self

    def _stop_now(self, timeout: float) -> bool:
        self._stop.set()
        self.server.wake()
        thread = self._thread
        if thread is None:
            self._closed = True
            return True
        if thread is threading.current_thread() or (self._dispatcher and self._dispatcher.on_handler_thread()):
            return False  # called from a handler: the consumer stops after it
        if not self._finished.wait(max(0.0, timeout)):
            logger.warning("the handler of %r is still running %.1fs after stop(): the consumer stops when it "
                           "returns", self.source, timeout)
            return False
        return True

    def run(self) -> None:
        """Start (if needed) and block until stopped; raises why it stopped on its own, a handler's
        ``BaseException`` as it was."""
        if self._thread is None:
            self._start_now()

        def stop() -> None:
            self._stop.set()
            self.server.wake()

        try:
            with graceful_signals(stop, f"the consumer of {self.source!r}"):
                while not self._finished.wait(0.2):
                    pass
        except KeyboardInterrupt:
            self._stop_now(30.0)
            return
        if self._aborted is not None:
            raise self._aborted
        if self.error is not None:
            raise self.error

    def __enter__(self) -> MemoryConsumer:
        return self._start_now()

    def __exit__(self, *exc_info: object) -> None:
        self._stop_now(30.0)

    def __repr__(self) -> str:
        return f"<MemoryConsumer source={self.source!r} running={self.running}>"

    # -- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        if self._dispatcher is not None:
            self._work_concurrent(self._dispatcher)
            return
        try:
            while not self._stop.is_set():
                self._last_turn = time.monotonic()
                stored = self.server.get(self.source, _POLL)
                if stored is None:
                    continue
                if self._stop.is_set():
                    self.server.put(self.source, stored, front=True)  # not started: the next consumer's
                    break
                self._handle(stored)
        except BaseException as exc:  # noqa: BLE001 - the handler raised SystemExit, KeyboardInterrupt...
            self._aborted = exc
            self.error = HandlerAborted(f"the handler raised {type(exc).__name__}({exc}): the consumer of "
                                        f"{self.source!r} stopped; the message is not acknowledged and comes again")
            self.error.__cause__ = exc
            logger.error("%s", self.error)
        finally:
            self._closed = True
            self.runner.close()
            self._finished.set()

    def _work_concurrent(self, dispatcher: Dispatcher) -> None:
        """Hand messages to the dispatcher, at most ``2 N`` outstanding, until stopped or aborted."""
        bound = 2 * self.mode.handlers
        stop = self._stop
        try:
            while not stop.is_set():
                self._last_turn = time.monotonic()
                if not dispatcher.wait_below(bound, _POLL):
                    continue
                stored = self.server.get(self.source, _POLL)
                if stored is None:
                    continue
                if stop.is_set():
                    self.server.put(self.source, stored, front=True)
                    break
                message, outcome = self._message(stored)
                if outcome is not None:
                    if not self.auto_ack:
                        self._settle(message, stored, outcome)
                    continue
                dispatcher.submit(Job(self.mode.lane(stored.key, self.source), message, stored))
        finally:
            # Not started: back to the front of the source, in their order; then wait for those running.
            for job in reversed(dispatcher.drop(lambda job: True)):
                self.server.put(self.source, job.ref, front=True)
            if not dispatcher.wait(lambda job: True, self.mode.drain_timeout):
                logger.warning("%d handlers of %r still running %.1fs after stopping: their messages are "
                               "acknowledged (or retried) when they return", dispatcher.outstanding(), self.source,
                               self.mode.drain_timeout)
            dispatcher.close()
            self._closed = True
            self.runner.close()
            self._finished.set()

    def _job_done(self, job: Job, error: BaseException | None) -> None:
        """A handler finished (on its thread or task): settle its message; a BaseException stops the consumer."""
        stored: Stored = job.ref
        if error is not None:
            stored.redelivered = True
            self.server.put(self.source, stored, front=True)
            if self._aborted is None:
                self._aborted = error
                self.error = HandlerAborted(f"the handler raised {type(error).__name__}({error}): the consumer of "
                                            f"{self.source!r} stopped; the message is not acknowledged and comes "
                                            "again")
                self.error.__cause__ = error
                logger.error("%s", self.error)
            self._stop.set()
            return
        if job.outcome is not None and not self.auto_ack:
            self._settle(job.message, stored, job.outcome)

    def _message(self, stored: Stored) -> tuple[Message, Outcome | None]:
        value, outcome = self.runner.decode(stored.body)
        message = Message(body=stored.body, value=value, message_id=stored.message_id, key=stored.key,
                          headers=dict(stored.headers), redelivered=stored.redelivered,
                          attempt=max(1, header_count(stored.headers.get(ATTEMPT))), source=self.source)
        return message, outcome

    def _handle(self, stored: Stored) -> None:
        runner = self.runner
        message, outcome = self._message(stored)
        if outcome is None:
            try:
                outcome = runner.invoke(message)
            except BaseException:
                stored.redelivered = True
                self.server.put(self.source, stored, front=True)
                raise
        if self.auto_ack:
            return  # at-most-once: the message was gone before the handler ran
        self._settle(message, stored, outcome)

    def _settle(self, message: Message, stored: Stored, outcome: Outcome) -> None:
        if outcome.disposition is Disposition.ACK:
            return
        if outcome.disposition is Disposition.RETRY:
            attempt = message.attempt + 1 if outcome.counts_attempt else message.attempt
            deferrals = None if outcome.counts_attempt else header_count(message.headers.get(DEFERRALS)) + 1
            headers = failure_headers(message.headers, origin=self.source, reason=outcome.reason,
                                      error=outcome.error, attempt=attempt, deferrals=deferrals)
            self.server.put_later(self.source, Stored(stored.body, stored.key, stored.message_id, headers, True),
                                  outcome.delay)
            return
        headers = failure_headers(message.headers, origin=self.source, reason=outcome.reason, error=outcome.error,
                                  attempt=message.attempt)
        self.server.put(dead_letter_queue(self.source), Stored(stored.body, stored.key, stored.message_id, headers))
