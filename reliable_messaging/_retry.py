"""Retry policy: bounded attempts with exponential, jittered backoff, owned by tenacity.

One policy object describes both kinds of retry the library does:

- *in-process* retries of a transient operation (reconnecting, republishing),
  through :meth:`RetryPolicy.retrying`, a configured :class:`tenacity.Retrying`;
- *message* retries, where a failed message is parked (retry topic, TTL retry
  queue, requeue) and delivered again later: :meth:`RetryPolicy.delay_for`
  gives the delay before attempt ``n + 1`` from the same tenacity wait strategy.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import tenacity

from ._errors import TRANSIENT_ERRORS, ConfigurationError
from ._log import limit_repeats

__all__ = ["DEFAULT_RETRY_POLICY", "RetryPolicy"]

logger = limit_repeats(logging.getLogger("reliable_messaging.retry"))

# tenacity 9.2 renamed wait_exponential_jitter's `initial` to `multiplier` (the old name warns).
_HAS_MULTIPLIER = "multiplier" in inspect.signature(tenacity.wait_exponential_jitter).parameters


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Bounded retry with exponential backoff and random jitter.

    The delay before attempt ``n + 1`` is ``min(initial_delay * multiplier ** (n - 1)
    + uniform(0, jitter), max_delay)`` (tenacity's ``wait_exponential_jitter``).

    ``max_attempts`` counts every attempt including the first: ``max_attempts=1``
    means no retry. ``sleep`` is injectable so tests never wait.
    """

    max_attempts: int = 5
    initial_delay: float = 0.2
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigurationError(
                f"RetryPolicy.max_attempts must be an int >= 1, got {self.max_attempts!r}", field="max_attempts"
            )
        for name in ("initial_delay", "max_delay", "jitter"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ConfigurationError(f"RetryPolicy.{name} must be a number >= 0, got {value!r}", field=name)
        if not isinstance(self.multiplier, int | float) or self.multiplier < 1:
            raise ConfigurationError(
                f"RetryPolicy.multiplier must be a number >= 1, got {self.multiplier!r}", field="multiplier"
            )
        if self.max_delay < self.initial_delay:
            raise ConfigurationError(
                f"RetryPolicy.max_delay ({self.max_delay}) must be >= initial_delay ({self.initial_delay})",
                field="max_delay",
            )

    def wait_strategy(self) -> tenacity.wait.wait_base:
        """The tenacity wait strategy of this policy."""
        base = {"multiplier" if _HAS_MULTIPLIER else "initial": self.initial_delay}
        return tenacity.wait_exponential_jitter(
            max=self.max_delay, exp_base=self.multiplier, jitter=self.jitter, **base
        )

    def delay_for(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based) before the next one."""
        state = tenacity.RetryCallState(retry_object=tenacity.Retrying(), fn=None, args=(), kwargs={})
        state.attempt_number = max(1, attempt)
        return float(self.wait_strategy()(state))

    def exhausted(self, attempt: int) -> bool:
        """True when attempt number ``attempt`` was the last one allowed."""
        return attempt >= self.max_attempts

    def retrying(
        self,
        *,
        retry_on: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
        deadline: float | None = None,
        what: str = "operation",
    ) -> tenacity.Retrying:
        """A :class:`tenacity.Retrying` that retries only ``retry_on`` errors.

        Stops after ``max_attempts`` or, when given, ``deadline`` seconds in total.
        Each retry is logged at WARNING in one line; the last error is re-raised as is.
        """
        stop: tenacity.stop.stop_base = tenacity.stop_after_attempt(self.max_attempts)
        if deadline is not None:
            stop = stop | tenacity.stop_after_delay(deadline)

        def _log(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            logger.warning(
                "%s failed (attempt %d/%d): %s; retrying in %.2fs",
                what,
                state.attempt_number,
                self.max_attempts,
                exc,
                state.upcoming_sleep,
            )
            logger.debug("%s failure detail", what, exc_info=exc)

        return tenacity.Retrying(
            stop=stop,
            wait=self.wait_strategy(),
            retry=tenacity.retry_if_exception_type(retry_on),
            sleep=self.sleep,
            before_sleep=_log,
            reraise=True,
        )


DEFAULT_RETRY_POLICY = RetryPolicy()
"""5 attempts, 0.2 s doubling to at most 30 s, up to 0.2 s of jitter.

Enough to ride out a broker restart or a leader election (a few seconds) without
holding a poison message for long.
"""
