"""The contract suite's base: the hooks a subclass provides and the helpers the tests share (see :mod:`.contract`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import reliable_messaging as rm
from reliable_messaging import Broker, Message, RetryPolicy, connect

__all__ = ["FAST_RETRY", "ContractBase", "Recorder"]

FAST_RETRY = RetryPolicy(max_attempts=3, initial_delay=0.2, max_delay=1.0, jitter=0.0)


class Recorder:
    """A handler that records what it saw; ``script`` decides per attempt how it ends."""

    def __init__(self, script: Callable[[Message], None] | None = None) -> None:
        self.seen: list[Message] = []
        self.lock = threading.Lock()
        self.script = script

    def __call__(self, message: Message) -> None:
        with self.lock:
            self.seen.append(message)
        if self.script is not None:
            self.script(message)

    def bodies(self) -> list[bytes]:
        with self.lock:
            return [m.body for m in self.seen]


class ContractBase:
    """What a subclass of the suite provides (``url``; it may override the rest), and the helpers its tests share."""

    settings: dict[str, Any] = {}  # noqa: RUF012 - per-broker constants, overridden by subclasses
    consumer_settings: dict[str, Any] = {}  # noqa: RUF012 - e.g. {"concurrency": 16}

    # -- what a subclass provides --------------------------------------------------------------------

    @pytest.fixture
    def url(self) -> str:
        raise NotImplementedError

    def read_dead_letters(self, url: str, source: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        """The first ``count`` dead letters of ``source`` as ``{"body", "headers", "message_id"}`` (header
        values as text). Default: a consumer of ``dead_letter_source(source)`` through the facade."""
        letters: list[dict[str, Any]] = []
        lock = threading.Lock()

        def keep(message: Message) -> None:
            headers = {k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                       for k, v in message.headers.items()}
            with lock:
                letters.append({"body": message.body, "headers": headers, "message_id": message.message_id})

        with connect(url, name=f"{source}-dead-letters", **self.settings) as reader:
            dead = reader.dead_letter_source(source)
            consumer = reader.consumer(dead, keep, group=f"{source}.dead-letter-reader")
            consumer.start()
            deadline = time.monotonic() + timeout
            while len(letters) < count and time.monotonic() < deadline:
                time.sleep(0.05)
        assert len(letters) >= count, f"only {len(letters)} of {count} dead letters of {source}"
        return letters

    def settle(self, *consumers: rm.Consumer) -> None:
        """Wait until ``consumers`` receive (a Kafka group has its assignment); default: at once."""

    # -- helpers --------------------------------------------------------------------------------------

    @pytest.fixture
    def broker(self, url: str, unique_name: str) -> Iterator[Broker]:
        with connect(url, retry=FAST_RETRY, name=unique_name, **self.settings) as broker:
            yield broker

    def started(self, broker: Broker, source: str, handler: Callable[..., Any], **kwargs: Any) -> rm.Consumer:
        consumer = broker.consumer(source, handler, **{"group": source, **self.consumer_settings, **kwargs})
        consumer.start()
        return consumer
