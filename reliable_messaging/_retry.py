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
from collections.abc import Callable, Mapping
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

    For message handlers, the policy can tell errors apart (Spring Kafka's
    ``addNotRetryableException`` and per-exception back-off):

    - ``not_retryable``: exception types (subclasses included) that dead-letter the
      message at once, its dead letter's reason saying so: a bug or bad data gives
      the same result on every attempt.
    - ``by_error``: exception type -> the :class:`RetryPolicy` for it (its attempts,
      at most this policy's, and its delays); the first type the error is an
      instance of wins, other errors use this policy. An explicit
      :class:`~reliable_messaging.Retry` always uses this policy.
    """

    max_attempts: int = 5
    initial_delay: float = 0.2
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2
    sleep: Callable[[float], None] = time.sleep
    not_retryable: tuple[type[BaseException], ...] = ()
    by_error: Mapping[type[BaseException], RetryPolicy] | tuple[tuple[type[BaseException], RetryPolicy], ...] = ()

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
        self._check_error_rules()

    def _check_error_rules(self) -> None:
        not_retryable = self.not_retryable
        if isinstance(not_retryable, type):
            not_retryable = (not_retryable,)
        if not isinstance(not_retryable, tuple | list) or not all(_is_exception_type(t) for t in not_retryable):
            raise ConfigurationError(f"RetryPolicy.not_retryable must be a tuple of exception types, got "
                                     f"{self.not_retryable!r}", field="not_retryable")
        rules = self.by_error.items() if isinstance(self.by_error, Mapping) else self.by_error
        try:
            pairs = tuple((kind, policy) for kind, policy in rules)
        except (TypeError, ValueError):
            raise ConfigurationError("RetryPolicy.by_error must map exception types to RetryPolicy objects, got "
                                     f"{self.by_error!r}", field="by_error") from None
        for kind, policy in pairs:
            if not _is_exception_type(kind) or not isinstance(policy, RetryPolicy):
                raise ConfigurationError("RetryPolicy.by_error must map exception types to RetryPolicy objects, got "
                                         f"{kind!r}: {policy!r}", field="by_error")
            if policy.max_attempts > self.max_attempts:
                # The retry topics/queues are made for this policy's attempts: a longer rule has nowhere to go.
                raise ConfigurationError(f"RetryPolicy.by_error[{kind.__name__}].max_attempts ({policy.max_attempts})"
                                         f" must be <= max_attempts ({self.max_attempts})", field="by_error")
            if policy.not_retryable or policy.by_error:
                raise ConfigurationError(f"RetryPolicy.by_error[{kind.__name__}] must not have rules of its own",
                                         field="by_error")
        object.__setattr__(self, "not_retryable", tuple(not_retryable))
        object.__setattr__(self, "by_error", pairs)

    def will_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether a handler's ``error`` on attempt number ``attempt`` gets another attempt (else: dead letter),
        as the consumers decide it."""
        from ._errors import Reject, Retry

        if isinstance(error, Reject):
            return False
        if isinstance(error, Retry):
            return not self.exhausted(attempt)
        return self.retryable(error) and not self.for_error(error).exhausted(attempt)

    def retryable(self, error: BaseException) -> bool:
        """False if ``error`` is one of :attr:`not_retryable`."""
        return not isinstance(error, self.not_retryable)

    def for_error(self, error: BaseException) -> RetryPolicy:
        """The policy for a handler's ``error``: its :attr:`by_error` rule, or this policy."""
        rules = self.by_error
        assert isinstance(rules, tuple)  # pairs since __post_init__
        for kind, policy in rules:
            if isinstance(error, kind):
                return policy
        return self

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


def _is_exception_type(kind: object) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseException)


DEFAULT_RETRY_POLICY = RetryPolicy()
"""5 attempts, 0.2 s doubling to at most 30 s, up to 0.2 s of jitter.

Enough to ride out a broker restart or a leader election (a few seconds) without
holding a poison message for long.
"""
