"""``consumer.health()``: what a readiness or liveness probe needs to know, the same on every backend.

- **live**: the consumer is running, its loop turned within ``poll_within`` seconds, and no handler has run longer
  than ``handler_within`` (when given). Not live means restart the process: it stopped with an error, or it is stuck.
- **ready**: live and connected to the broker (Kafka: librdkafka reports a broker up, or the group assigned
  partitions; RabbitMQ: the queue is being consumed). Not ready means take it out of rotation and wait: a broker
  restart or a network cut makes a consumer not ready and, once it has reconnected by itself, ready again.

Nothing here touches the network: a probe can call it as often as it likes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["Health", "assess", "check_limits"]


@dataclass(frozen=True)
class Health:
    """A consumer's state for probes (see :meth:`Consumer.health`)."""

    live: bool
    ready: bool
    running: bool
    connected: bool
    since_turn: float | None
    """Seconds since the consumer's loop last turned (None: it never ran)."""
    in_flight: int
    """Handlers running now."""
    longest_handler: float
    """Seconds the longest-running handler has been running (0 with none)."""
    lag: int | None = None
    """Messages waiting in what the consumer reads, where the broker reports it (Kafka: the sum of its partitions'
    consumer lag, every statistics interval); None where unknown."""
    error: str | None = None
    """Why the consumer stopped, if it stopped by itself."""
    problems: tuple[str, ...] = ()
    """Why it is not live or not ready, in words."""


def assess(*, running: bool, error: BaseException | None, connected: bool, last_turn: float | None,
           in_flight: int, oldest_start: float | None, poll_within: float, handler_within: float | None,
           lag: int | None = None) -> Health:
    """The :class:`Health` of a consumer from what it knows (times from :func:`time.monotonic`)."""
    now = time.monotonic()
    since_turn = None if last_turn is None else max(0.0, now - last_turn)
    longest = 0.0 if oldest_start is None else max(0.0, now - oldest_start)
    problems: list[str] = []
    if not running:
        problems.append(f"stopped: {type(error).__name__}: {error}" if error is not None else "not running")
    elif since_turn is None or since_turn > poll_within:
        problems.append("its loop has not turned yet" if since_turn is None
                        else f"its loop has not turned for {since_turn:.1f}s (> {poll_within:g}s)")
    if handler_within is not None and longest > handler_within:
        problems.append(f"a handler has been running for {longest:.1f}s (> {handler_within:g}s)")
    live = not problems
    if running and not connected:
        problems.append("not connected to the broker")
    return Health(live=live, ready=live and connected, running=running, connected=connected, since_turn=since_turn,
                  in_flight=in_flight, longest_handler=longest, lag=lag,
                  error=None if error is None else f"{type(error).__name__}: {error}", problems=tuple(problems))


def check_limits(poll_within: object, handler_within: object) -> None:
    """ConfigurationError unless ``poll_within`` > 0 and ``handler_within`` is None or > 0."""
    from ._errors import ConfigurationError

    for name, value in (("poll_within", poll_within), ("handler_within", handler_within)):
        if value is None and name == "handler_within":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigurationError(f"{name} must be a number of seconds > 0, got {value!r}", field=name)
