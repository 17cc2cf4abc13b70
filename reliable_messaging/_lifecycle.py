"""What every consumer does the same way around its lifecycle: asyncio services and signals.

- **asyncio.** Called from a coroutine (a running event loop on the calling thread), ``start()``
  and ``stop()`` do not block the loop: the blocking part runs on the loop's default executor.
  ``start()`` still returns the consumer, which is awaitable (``await consumer.start()`` waits until
  it consumes, and raises what start() would have raised); ``stop()`` returns an awaitable of the
  bool it returns elsewhere. ``async with consumer:`` starts and stops it. Outside a running loop
  both behave as they always did.
- **Signals.** ``run()`` on the main thread turns SIGTERM (Kubernetes, systemd) and SIGINT (Ctrl-C)
  into a graceful stop: stop fetching, let the handlers in progress finish (up to the drain
  timeout), acknowledge or commit what finished, close. A second signal while draining raises
  KeyboardInterrupt as Python would. The previous handlers are put back when ``run()`` returns.

Written here rather than taken from a library: anyio and asyncio give "run this blocking call in a
thread", not one object that serves both sync and async callers, which is what the consumers are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Generator, Iterator
from types import FrameType
from typing import Any

__all__ = ["LoopFriendly", "graceful_signals", "running_loop"]

logger = logging.getLogger("reliable_messaging.consumer")


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running on this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class LoopFriendly:
    """Mixin: ``start()``/``stop()`` that hand their blocking part to an executor inside a running loop.

    A consumer defines ``_start_now()`` (blocking start, returns self) and ``_stop_now(timeout)``
    (blocking stop, returns bool) and calls :meth:`_start_or_schedule` / :meth:`_stop_or_schedule`.
    """

    _starting: asyncio.Future[Any] | None = None

    def _start_now(self) -> Any:
        raise NotImplementedError

    def _stop_now(self, timeout: float) -> bool:
        raise NotImplementedError

    def _start_or_schedule(self) -> Any:
        loop = running_loop()
        if loop is None:
            return self._start_now()
        self._starting = loop.run_in_executor(None, self._start_now)
        return self

    def _stop_or_schedule(self, timeout: float) -> Any:
        loop = running_loop()
        if loop is None:
            return self._stop_now(timeout)
        return loop.run_in_executor(None, self._stop_now, timeout)

    def __await__(self) -> Generator[Any, None, Any]:
        """Wait for a start() made inside the loop to finish (raises its error); returns the consumer."""
        starting = self._starting
        if starting is not None:
            yield from starting.__await__()
        return self

    async def __aenter__(self) -> Any:
        self.start()  # type: ignore[attr-defined]
        return await self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()  # type: ignore[attr-defined]


@contextlib.contextmanager
def graceful_signals(stop: Callable[[], None], what: str) -> Iterator[None]:
    """While in the block, SIGTERM and SIGINT call ``stop()`` once (a second one raises KeyboardInterrupt).

    Only on the main thread (Python delivers signals there); elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        logger.warning("%s received: stopping %s gracefully (finishing the handlers in progress; send it again "
                       "to interrupt them)", signal.Signals(signum).name, what)
        stop()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
