"""The in-process broker's consumer: the same lifecycle and outcomes as the Kafka and RabbitMQ ones.

One worker thread takes the source's messages in order and runs the handler through the shared
:class:`~reliable_messaging._handling.HandlerRunner` (decoding, deduplication, the retry decision).
Outcomes, as on the real brokers: return -> acknowledged (gone); a retry -> a copy comes back after
the delay with ``x-rm-attempt`` + 1 (a hand-back without ``x-rm-deferrals`` + 1); dead letter -> a
copy with the library's headers on ``<source>.dlq``. ``stop()`` never gives a message away while its
handler runs; a handler's ``BaseException`` stops the consumer with
:class:`~reliable_messaging.HandlerAborted` and puts the message back for the next consumer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from .._dedup import DedupStore
from .._errors import ClosedError, ConfigurationError, HandlerAborted
from .._handling import ConsumerStats, Disposition, HandlerRunner, Outcome
from .._headers import ATTEMPT, DEFERRALS, failure_headers
from .._message import Message, header_count
from .._retry import RetryPolicy
from ._server import MemoryServer, Stored

__all__ = ["MemoryConsumer", "dead_letter_queue"]

logger = logging.getLogger("reliable_messaging.memory")

_POLL = 0.05
"""Seconds the worker waits for a message before it looks at whether it was stopped."""


def dead_letter_queue(source: str) -> str:
    return f"{source}.dlq"


class MemoryConsumer:
    """Consumes ``source`` of a :class:`MemoryServer`; ``auto_ack``: at-most-once (the outcome is ignored)."""

    def __init__(self, server: MemoryServer, source: str, handler: Callable[[Any], Any], *, retry: RetryPolicy,
                 decoder: Callable[[bytes], Any] | None, dedup: DedupStore | None,
                 dedup_key: Callable[[Any], str] | None, loop: asyncio.AbstractEventLoop | None,
                 auto_ack: bool) -> None:
        self.server = server
        self.source = source
        self.runner: HandlerRunner[Message] = HandlerRunner(handler, retry=retry, decoder=decoder, dedup=dedup,
                                                            dedup_key=dedup_key, loop=loop)
        self.auto_ack = auto_ack
        self.error: Exception | None = None
        """Why the consumer stopped on its own, if it did."""
        self._aborted: BaseException | None = None
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def stats(self) -> ConsumerStats:
        return self.runner.stats

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._finished.is_set()

    def start(self) -> MemoryConsumer:
        if self._closed:
            raise ClosedError("the consumer was stopped; create a new one")
        if self._thread is not None:
            raise ConfigurationError("the consumer is already running")
        self.server.declare_source(self.source)
        self._thread = threading.Thread(target=self._work, name=f"rm-memory-consumer-{self.source}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> bool:
        """Let the handler in progress finish, then stop; False (it stops when the handler returns) if it does
        not within ``timeout``."""
        self._stop.set()
        self.server.wake()
        thread = self._thread
        if thread is None:
            self._closed = True
            return True
        if thread is threading.current_thread():
            return False
        if not self._finished.wait(max(0.0, timeout)):
            logger.warning("the handler of %r is still running %.1fs after stop(): the consumer stops when it "
                           "returns", self.source, timeout)
            return False
        return True

    def run(self) -> None:
        """Start (if needed) and block until stopped; raises why it stopped on its own, a handler's
        ``BaseException`` as it was."""
        if self._thread is None:
            self.start()
        try:
            while not self._finished.wait(0.2):
                pass
        except KeyboardInterrupt:
            self.stop()
            return
        if self._aborted is not None:
            raise self._aborted
        if self.error is not None:
            raise self.error

    def __enter__(self) -> MemoryConsumer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<MemoryConsumer source={self.source!r} running={self.running}>"

    # -- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
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

    def _handle(self, stored: Stored) -> None:
        runner = self.runner
        value, outcome = runner.decode(stored.body)
        message = Message(body=stored.body, value=value, message_id=stored.message_id, key=stored.key,
                          headers=dict(stored.headers), redelivered=stored.redelivered,
                          attempt=max(1, header_count(stored.headers.get(ATTEMPT))), source=self.source)
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
