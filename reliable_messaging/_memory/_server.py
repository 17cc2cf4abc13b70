"""The in-process broker's state: queues, the bindings that route destinations to them, delayed messages.

One :class:`MemoryServer` per ``memory://<name>`` in a process: every broker connected to the same
name shares it, as services sharing a real broker do. Routing is RabbitMQ's topic exchange: a
destination routes a message to each source bound to it whose pattern matches the message's key
(``#`` matches everything, ``*`` one dot-separated word). Publishing to a destination nothing is
bound to binds a source of the same name with ``#`` first, so messages published before their
consumer starts wait for it (as on Kafka, and on RabbitMQ once the queue exists).
"""

from __future__ import annotations

import heapq
import itertools
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MemoryServer", "Stored", "server"]


@dataclass
class Stored:
    """A message as the in-process broker keeps it."""

    body: bytes
    key: bytes | None
    message_id: str
    headers: dict[str, Any] = field(default_factory=dict)
    redelivered: bool = False


class MemoryServer:
    """Queues and bindings of one ``memory://<name>``. Thread-safe (one lock, one condition)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._queues: dict[str, deque[Stored]] = {}
        self._bindings: dict[str, list[tuple[str, str, re.Pattern[str]]]] = {}  # destination -> (source, pattern)
        self._delayed: list[tuple[float, int, str, Stored]] = []  # (due, n, source, message), a heap
        self._order = itertools.count()
        self._timer: threading.Thread | None = None

    # -- topology -------------------------------------------------------------------------------

    def declare_source(self, source: str, destination: str | None = None, pattern: str = "#") -> None:
        with self._lock:
            self._queues.setdefault(source, deque())
            if destination is not None:
                bound = self._bindings.setdefault(destination, [])
                if not any(s == source and p == pattern for s, p, _ in bound):
                    bound.append((source, pattern, _compile(pattern)))

    def declare_destination(self, destination: str) -> None:
        with self._lock:
            self._bindings.setdefault(destination, [])

    def delete_source(self, source: str) -> None:
        with self._lock:
            self._queues.pop(source, None)
            for bound in self._bindings.values():
                bound[:] = [entry for entry in bound if entry[0] != source]
            self._delayed = [entry for entry in self._delayed if entry[2] != source]
            heapq.heapify(self._delayed)

    def delete_destination(self, destination: str) -> None:
        with self._lock:
            self._bindings.pop(destination, None)

    # -- messages -------------------------------------------------------------------------------

    def route(self, destination: str, message: Stored) -> int:
        """Put ``message`` on every source bound to ``destination`` whose pattern matches its key; returns how
        many. A destination nothing was ever bound to gets a source of its own name first."""
        key = message.key.decode("utf-8", "replace") if message.key is not None else ""
        with self._lock:
            bound = self._bindings.get(destination)
            if not bound and destination not in self._bindings:
                self._queues.setdefault(destination, deque())
                bound = self._bindings[destination] = [(destination, "#", _compile("#"))]
            targets = [source for source, _pattern, compiled in bound or () if compiled.fullmatch(key)]
            for source in targets:
                self._queues.setdefault(source, deque()).append(_copy(message))
            if targets:
                self._arrived.notify_all()
            return len(targets)

    def put(self, source: str, message: Stored, *, front: bool = False) -> None:
        with self._lock:
            queue = self._queues.setdefault(source, deque())
            if front:
                queue.appendleft(message)
            else:
                queue.append(message)
            self._arrived.notify_all()

    def put_later(self, source: str, message: Stored, delay: float) -> None:
        """Put ``message`` on ``source`` after ``delay`` seconds (a retry's backoff)."""
        with self._lock:
            heapq.heappush(self._delayed, (time.monotonic() + max(0.0, delay), next(self._order), source, message))
            if self._timer is None:
                self._timer = threading.Thread(target=self._release_due, name=f"rm-memory-{self.name}-timer",
                                               daemon=True)
                self._timer.start()
            self._arrived.notify_all()

    def get(self, source: str, timeout: float) -> Stored | None:
        """The next message of ``source``, waiting up to ``timeout`` seconds for one."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                queue = self._queues.get(source)
                if queue:
                    return queue.popleft()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._arrived.wait(remaining)

    def count(self, source: str) -> int:
        """Messages waiting on ``source`` (not counting those in a retry's backoff)."""
        with self._lock:
            return len(self._queues.get(source, ()))

    def wake(self) -> None:
        with self._lock:
            self._arrived.notify_all()

    def _release_due(self) -> None:
        """The timer thread: moves delayed messages to their source when due."""
        with self._lock:
            while True:
                if not self._delayed:
                    self._arrived.wait(1.0)
                    continue
                due = self._delayed[0][0] - time.monotonic()
                if due > 0:
                    self._arrived.wait(due)
                    continue
                _due, _n, source, message = heapq.heappop(self._delayed)
                self._queues.setdefault(source, deque()).append(message)
                self._arrived.notify_all()


_servers: dict[str, MemoryServer] = {}
_servers_lock = threading.Lock()


def server(name: str) -> MemoryServer:
    """The server of ``memory://<name>`` in this process (made on first use)."""
    with _servers_lock:
        found = _servers.get(name)
        if found is None:
            found = _servers[name] = MemoryServer(name)
        return found


def _compile(pattern: str) -> re.Pattern[str]:
    """A topic-exchange pattern as a regular expression: ``#`` any words (or none), ``*`` exactly one."""
    if pattern == "#":
        return re.compile(r".*", re.DOTALL)
    parts = []
    for word in pattern.split("."):
        parts.append(r"[^.]+" if word == "*" else r".*" if word == "#" else re.escape(word))
    return re.compile(r"\.".join(parts), re.DOTALL)


def _copy(message: Stored) -> Stored:
    return Stored(body=message.body, key=message.key, message_id=message.message_id, headers=dict(message.headers),
                  redelivered=message.redelivered)
