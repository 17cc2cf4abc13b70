"""consumer.health() on the in-process backend, and the assessment rules behind it on every backend."""

from __future__ import annotations

import threading
import time

import pytest

import reliable_messaging as rm
from reliable_messaging._health import assess
from reliable_messaging.testing import wait_for


def test_the_rules() -> None:
    now = time.monotonic()
    fine = assess(running=True, error=None, connected=True, last_turn=now, in_flight=0, oldest_start=None,
                  poll_within=5, handler_within=None)
    assert (fine.live, fine.ready, fine.problems) == (True, True, ())
    away = assess(running=True, error=None, connected=False, last_turn=now, in_flight=0, oldest_start=None,
                  poll_within=5, handler_within=None)
    assert (away.live, away.ready, away.problems) == (True, False, ("not connected to the broker",))
    stale = assess(running=True, error=None, connected=True, last_turn=now - 9, in_flight=0, oldest_start=None,
                   poll_within=5, handler_within=None)
    assert not stale.live and not stale.ready and "has not turned for 9" in stale.problems[0]
    stuck = assess(running=True, error=None, connected=True, last_turn=now, in_flight=2, oldest_start=now - 7,
                   poll_within=5, handler_within=3)
    assert not stuck.live and stuck.longest_handler >= 7 and "running for 7" in stuck.problems[0]
    slow_but_allowed = assess(running=True, error=None, connected=True, last_turn=now, in_flight=1,
                              oldest_start=now - 7, poll_within=5, handler_within=None)
    assert slow_but_allowed.live
    dead = assess(running=False, error=rm.ConsumerCancelled("queue deleted"), connected=False, last_turn=now,
                  in_flight=0, oldest_start=None, poll_within=5, handler_within=None)
    assert (dead.live, dead.ready, dead.error) == (False, False, "ConsumerCancelled: queue deleted")
    assert dead.problems == ("stopped: ConsumerCancelled: queue deleted",), "not also 'not connected'"


@pytest.mark.parametrize(("poll_within", "handler_within"), [(0, None), (-1, None), (True, None), (5, 0), (5, "1")])
def test_limits_are_checked(poll_within: object, handler_within: object) -> None:
    with rm.connect("memory://health-limits") as broker:
        consumer = broker.consumer("q", lambda m: None)
        with pytest.raises(rm.ConfigurationError):
            consumer.health(poll_within=poll_within, handler_within=handler_within)  # type: ignore[arg-type]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_slow_handler_is_in_flight_and_stuck_past_its_limit(concurrency: int) -> None:
    release = threading.Event()

    def handle(message: rm.Message) -> None:
        if message.body == b"slow":
            release.wait(10)

    with rm.connect("memory://health-slow") as broker:
        consumer = broker.consumer("q", handle, concurrency=concurrency)
        assert consumer.health().problems == ("not running",)
        consumer.start()
        wait_for(lambda: consumer.health().ready, 5, "ready")
        broker.publish("q", b"slow").result(timeout=5)
        wait_for(lambda: consumer.health().in_flight == 1, 5, "the handler running")
        time.sleep(0.3)
        health = consumer.health(handler_within=0.2)
        assert not health.live and not health.ready and health.longest_handler >= 0.3
        assert consumer.health().live, "no handler limit: a slow handler is not stuck"
        release.set()
        wait_for(lambda: consumer.health(handler_within=0.2).live, 5, "live again")
        assert consumer.health().in_flight == 0
        assert consumer.stop(5) is True
        assert not consumer.health().running
