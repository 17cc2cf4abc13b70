"""One I/O thread per publisher/consumer, owning a pika ``SelectConnection`` at a time.

pika is not thread-safe: every pika object is touched only by this thread. Other
threads hand work over through plain deques and wake the I/O thread with
:meth:`IOThread.wake`, which calls ``ioloop.add_callback_threadsafe`` at most
once per batch (that call writes a byte to a wake-up pipe; doing it per message
would cost more than the publish itself).

Reconnecting: the thread runs one connection until it closes, inside a tenacity
:class:`~tenacity.Retrying` built from the reconnect :class:`RetryPolicy` (only
:class:`BrokerUnavailable` is retried; configuration errors such as refused
credentials or a topology mismatch are fatal). Tenacity's sleep is injected: it
waits on the close event, so ``close()`` interrupts a backoff at once, and it
keeps running the owner's periodic work (delivery deadlines) meanwhile; a sleep
the caller injected into the policy (tests) is used instead. A
connection that was fully set up and is then lost starts a fresh backoff: the
first reconnect attempt is immediate, the following ones back off.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop

from .._errors import BrokerUnavailable, ClosedError, ReliableMessagingError
from .._log import limit_repeats
from .._retry import RetryPolicy
from ._errors import map_pika_error

__all__ = ["Connection", "IOThread"]

logger = limit_repeats(logging.getLogger("reliable_messaging.rabbitmq"))

# pika logs every failed connection attempt at ERROR, some with a traceback, five or six lines an
# attempt: while a broker is down and the I/O thread reconnects, each kind of line is let through once
# per interval (repeats are counted, not lost). Only these loggers of pika's are touched.
for _name in ("pika.adapters.utils.io_services_utils", "pika.adapters.utils.connection_workflow",
              "pika.adapters.blocking_connection", "pika.adapters.base_connection",
              "pika.adapters.select_connection", "pika.connection", "pika.channel"):
    limit_repeats(logging.getLogger(_name))

TICK_INTERVAL = 0.1
"""Seconds between periodic checks (deadlines, shutdown progress) on the I/O thread."""


_CAN_CORK = hasattr(pika.SelectConnection, "_output_marshaled_frames") and hasattr(
    pika.SelectConnection, "_adapter_emit_data")


class Connection(pika.SelectConnection):  # type: ignore[misc]  # pika ships no type information
    """A ``SelectConnection`` that can gather the frames of many publishes into one socket write.

    pika writes every frame (method, header, body: three per message) as its own buffer and
    sends each with its own ``send()`` syscall. Between :meth:`cork` and :meth:`uncork` this
    subclass joins them into one buffer instead: a batch of a thousand publishes becomes one
    write, which matters when the I/O thread shares the GIL with publishing threads (each
    syscall releases the GIL and has to win it back). It overrides pika's private
    ``_output_marshaled_frames`` (stable since pika 1.0; a unit test pins its presence); without
    it, :meth:`cork` is a no-op and frames go out one by one as usual.
    """

    _corked: list[bytes] | None = None

    def cork(self) -> None:
        if _CAN_CORK and self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        frames, self._corked = self._corked, None
        if frames:
            self._adapter_emit_data(b"".join(frames))

    def _output_marshaled_frames(self, marshaled_frames: Any) -> None:
        corked = self._corked
        if corked is None:
            super()._output_marshaled_frames(marshaled_frames)
            return
        for marshaled in marshaled_frames:
            self.bytes_sent += len(marshaled)
            self.frames_sent += 1
            corked.append(marshaled)


class IOThread:
    """Base of the publisher and consumer engines: the I/O thread, its connection and reconnects.

    Subclasses implement the hooks, all called on the I/O thread:

    - :meth:`on_connection_open`: open channels, declare, then call :meth:`mark_ready`;
    - :meth:`on_connection_lost`: forget channel state (tags are per channel);
    - :meth:`on_wake`: take the work other threads queued;
    - :meth:`on_tick`: periodic work, also called during reconnect backoff (no connection then);
    - :meth:`on_finished`: last call, after the final connection closed (fail what is left).
    """

    role = "client"

    def __init__(self, *, params: pika.URLParameters, reconnect: RetryPolicy, name: str) -> None:
        self._params = params
        self._reconnect = reconnect
        self._ioloop = IOLoop()
        self._closing = threading.Event()
        self.last_tick: float | None = None
        """time.monotonic() of the thread's last periodic round (also during reconnect backoff): it is alive."""
        self._started = threading.Event()  # set when first ready, or when the thread ends
        self._wake_pending = False
        self._connection: Connection | None = None
        self._open_error: ReliableMessagingError | None = None
        self._setup_error: ReliableMessagingError | None = None
        self._ready = False
        self._ever_ready = False
        self.fatal: ReliableMessagingError | None = None
        """Why the I/O thread stopped on its own (reconnects exhausted, topology mismatch, ...)."""
        self.connections = 0
        """Connections that were fully set up (1 + reconnects)."""
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    # -- lifecycle, any thread ------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self._params.host}:{self._params.port}"

    @property
    def last_open_error(self) -> ReliableMessagingError | None:
        """Why the last connection attempt failed, if it did."""
        return self._open_error

    def start_thread(self, timeout: float, *, wait: bool = True) -> None:
        """Start the I/O thread; wait up to ``timeout`` s for the first ready connection (unless not ``wait``).

        Raises the fatal error if the thread gave up, :class:`BrokerUnavailable` on timeout
        (the thread is then stopped).
        """
        self._thread.start()
        if not wait:
            return
        if not self._started.wait(timeout):
            self.request_close()
            self.join(10.0)
            raise BrokerUnavailable(
                f"no ready connection to {self._params.host}:{self._params.port} within {timeout:.1f}s"
                + (f": {self._open_error}" if self._open_error else "")
            )
        if self.fatal is not None:
            self.join(10.0)
            raise self.fatal

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        """Ask the I/O thread to run :meth:`on_wake` soon. Cheap when a wake is already pending."""
        if not self._wake_pending:
            self._wake_pending = True
            self._ioloop.add_callback_threadsafe(self._on_wake)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the I/O thread (thread-safe; not for per-message use)."""
        self._ioloop.add_callback_threadsafe(callback)

    def request_close(self) -> None:
        """Stop reconnecting; close the connection (via :meth:`begin_close` on the I/O thread)."""
        self._closing.set()
        self._ioloop.add_callback_threadsafe(self.begin_close)

    def join(self, timeout: float) -> bool:
        """Wait for the I/O thread to end. True if it did."""
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        ended = not self._thread.is_alive()
        if ended:
            try:
                self._ioloop.close()
            except OSError as exc:  # the wake-up pipe is already closed
                logger.debug("closing the I/O loop: %s", exc)
        return ended

    # -- I/O thread -------------------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    @property
    def connection(self) -> Connection | None:
        return self._connection

    def begin_close(self) -> None:
        """Close the connection now. Subclasses may first finish work, then call this."""
        connection = self._connection
        if connection is not None and not (connection.is_closing or connection.is_closed):
            connection.close()
        elif connection is None:
            self._ioloop.stop()

    def mark_ready(self) -> None:
        """The connection and its channels are set up: the first one releases ``start_thread``."""
        self._ready = True
        self._ever_ready = True
        self.connections += 1
        if self.connections > 1:
            logger.warning("%s reconnected to %s:%s (connection %d)", self.role, self._params.host,
                           self._params.port, self.connections)
        self._started.set()

    def fail_setup(self, error: ReliableMessagingError, *, fatal: bool) -> None:
        """Channel setup failed: close the connection; ``fatal`` stops reconnecting."""
        if fatal:
            self._setup_error = error
        else:
            self._open_error = error
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close()
        elif connection is None or connection.is_closed:
            self._ioloop.stop()

    def close_connection(self, reason: str) -> None:
        """Drop the current connection (e.g. after an unexpected channel close); reconnect follows."""
        connection = self._connection
        if connection is not None and connection.is_open:
            logger.warning("%s: closing the connection to recover: %s", self.role, reason)
            connection.close(320, reason[:200])

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        return self._ioloop.call_later(delay, callback)

    def remove_timeout(self, handle: object) -> None:
        self._ioloop.remove_timeout(handle)

    # hooks
    def on_connection_open(self, connection: pika.SelectConnection) -> None:
        raise NotImplementedError

    def on_connection_lost(self, error: ReliableMessagingError) -> None:
        """The connection closed (lost, or closed by us)."""

    def on_wake(self) -> None:
        """Work queued by other threads."""

    def on_tick(self) -> None:
        """Periodic work (every TICK_INTERVAL s, and during reconnect backoff)."""

    def on_finished(self, error: ReliableMessagingError | None) -> None:
        """The I/O thread is about to end; ``error`` is why, if it was not a requested close."""

    # -- internals ----------------------------------------------------------------------------------------

    def _on_wake(self) -> None:
        self._wake_pending = False
        self.on_wake()

    def _tick(self) -> None:
        self.last_tick = time.monotonic()
        self.on_tick()
        if not self._ioloop_closed():
            self._ioloop.call_later(TICK_INTERVAL, self._tick)

    def _ioloop_closed(self) -> bool:
        return False

    def _sleep(self, seconds: float) -> None:
        """tenacity's sleep: interruptible by close(), and keeps the periodic work going."""
        deadline = time.monotonic() + seconds
        while not self._closing.is_set():
            self.last_tick = time.monotonic()
            self.on_tick()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._closing.wait(min(remaining, TICK_INTERVAL))

    def _main(self) -> None:
        error: ReliableMessagingError | None = None
        policy = self._reconnect
        if policy.sleep is time.sleep:  # a sleep injected into the policy (tests) is used as is
            policy = dataclasses.replace(policy, sleep=self._sleep)
        self._ioloop.call_later(TICK_INTERVAL, self._tick)
        try:
            while not self._closing.is_set():
                retrying = policy.retrying(retry_on=(BrokerUnavailable,),
                                           what=f"{self.role} connecting to {self._params.host}:{self._params.port}")
                retrying(self._run_connection)
        except ClosedError:
            pass
        except ReliableMessagingError as exc:
            error = exc
            logger.warning("%s stopped: %s", self.role, exc)
            logger.debug("%s stop reason", self.role, exc_info=exc)
        except Exception as exc:  # the thread's last resort: report, never die silently
            error = BrokerUnavailable(f"{self.role} I/O thread failed: {type(exc).__name__}: {exc}")
            logger.warning("%s I/O thread failed: %s: %s", self.role, type(exc).__name__, exc)
            logger.debug("%s I/O thread failure", self.role, exc_info=exc)
        finally:
            self.fatal = error
            try:
                self.on_finished(error)
            finally:
                self._started.set()

    def _run_connection(self) -> None:
        if self._closing.is_set():
            raise ClosedError(f"{self.role} is closing")
        self._open_error = None
        self._setup_error = None
        self._ready = False
        self._connection = Connection(
            self._params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self._ioloop,
        )
        try:
            self._ioloop.start()
        except pika.exceptions.AMQPError as exc:
            raise map_pika_error(exc, what=f"{self.role} connection") from exc
        except ValueError as exc:
            # pika's connect callback raises this when the peer resets the socket as soon as it is
            # accepted (a refusing proxy, a broker at its socket limit): a failed attempt like any other.
            if "getpeername() failed" not in str(exc):
                raise
            raise BrokerUnavailable(f"{self.role} connecting to {self._params.host}:{self._params.port}: "
                                    f"the connection was reset as it was accepted") from exc
        finally:
            was_ready, self._ready = self._ready, False
            self._connection = None
        if self._setup_error is not None:
            raise self._setup_error
        if self._closing.is_set():
            raise ClosedError(f"{self.role} is closing")
        if not was_ready:
            raise self._open_error or BrokerUnavailable(f"{self.role}: connection closed before it was set up")
        # A set-up connection was lost: return, and the caller starts a fresh backoff.

    # An attempt that failed inside pika (see _run_connection) may leave timers on the shared I/O loop
    # that call back later: callbacks from any connection but the current one are ignored.

    def _on_open(self, connection: pika.SelectConnection) -> None:
        if connection is not self._connection:
            return
        self.on_connection_open(connection)

    def _on_open_error(self, connection: pika.SelectConnection, exc: BaseException) -> None:
        if connection is not self._connection:
            return
        mapped = _map(exc, f"{self.role} connecting to {self._params.host}:{self._params.port}")
        if isinstance(mapped, BrokerUnavailable):
            self._open_error = mapped
        else:
            self._setup_error = mapped
        self._ioloop.stop()

    def _on_closed(self, connection: pika.SelectConnection, reason: BaseException) -> None:
        if connection is not self._connection:
            return
        error = _map(reason, f"{self.role} connection")
        if self._ready and not self._closing.is_set():
            logger.warning("%s lost its connection: %s", self.role, error)
            logger.debug("%s connection loss detail", self.role, exc_info=reason)
        if self._open_error is None:
            self._open_error = error if isinstance(error, BrokerUnavailable) else None
        try:
            self.on_connection_lost(error)
        finally:
            self._ioloop.stop()


def _map(exc: BaseException, what: str) -> ReliableMessagingError:
    if isinstance(exc, pika.exceptions.AMQPError | OSError | ReliableMessagingError):
        return map_pika_error(exc, what=what)
    return BrokerUnavailable(f"{what}: {exc!r}")
