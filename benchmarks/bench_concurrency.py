"""Concurrent handlers: how close ``concurrency=N`` gets to the ideal rate, on real Kafka and RabbitMQ.

    python benchmarks/bench_concurrency.py [--messages 20000] [--runs 3] [--broker kafka|rabbitmq|both]

Each handler waits 5 ms (``await asyncio.sleep(0.005)``, or ``time.sleep(0.005)`` for plain functions), as
a handler waiting on a database or an HTTP call does. The messages are spread over 1,000 keys on one
Kafka partition / one RabbitMQ queue; the consumers keep per-key order (``ordering="key"``, the default),
and the benchmark checks it: every key's messages must be handled in publish order (violations are
printed, and must be 0). Variants, per broker, interleaved per run, each on a fresh group / queue:

- ``no-op N=1``: a handler doing nothing, one at a time (what every consumer did before ``concurrency``);
- ``no-op async N=256``: the same consumer as below with a no-op handler: the rate the library's own
  work allows, which caps the ideal;
- ``async N=1`` (on ``--messages / 20`` messages: 5 ms each takes a while) and ``async N=256``;
- ``sync N=32``.

Ideal = min(N / 5 ms, the no-op cap). Printed: messages/s (median of the runs, and their spread), the
ratio to the ideal (targets: async N=256 >= 0.7, sync N=32 >= 0.8) and async N=256 over async N=1
(target >= 50). The rate is measured from the first message handled to the last (not the group join or
the connection). Numbers depend on the machine and what else runs on it: compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reliable_messaging as rm  # after the path tweak, so the checkout is importable

KEYS = 1000
WAIT = 0.005


def kafka_url() -> str:
    return f"kafka://{os.environ.get('KAFKA_BOOTSTRAP_SERVERS', '127.0.0.1:9092')}"


def rabbitmq_url() -> str:
    return os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


class Tally:
    """Handled count, first/last times, and per-key order violations (thread-safe)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.lock = threading.Lock()
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.violations = 0
        self.seen: dict[bytes, int] = {}
        self.done = threading.Event()

    def record(self, message: rm.Message) -> None:
        number = int(message.body)
        key = message.key or b""
        now = time.perf_counter()
        with self.lock:
            if number <= self.seen.get(key, -1):
                self.violations += 1
            self.seen[key] = number
            if not self.count:
                self.first = now
            self.count += 1
            self.last = now
            if self.count >= self.expected:
                self.done.set()

    def rate(self) -> float:
        return (self.count - 1) / (self.last - self.first) if self.count > 1 and self.last > self.first else 0.0


def handlers(tally: Tally) -> dict[str, Callable[..., Any]]:
    async def async_wait(message: rm.Message) -> None:
        await asyncio.sleep(WAIT)
        tally.record(message)

    async def async_noop(message: rm.Message) -> None:
        tally.record(message)

    def sync_wait(message: rm.Message) -> None:
        time.sleep(WAIT)
        tally.record(message)

    return {"async": async_wait, "async-noop": async_noop, "sync": sync_wait, "sync-noop": tally.record}


VARIANTS: list[tuple[str, str, int]] = [  # (label, handler, N)
    ("no-op N=1", "sync-noop", 1),
    ("no-op async N=256", "async-noop", 256),
    ("async N=1", "async", 1),
    ("async N=256", "async", 256),
    ("sync N=32", "sync", 32),
]


def publish(url: str, source: str, count: int) -> None:
    with rm.connect(url, name=f"{source}-producer") as broker:
        broker.declare(source, source=source)
        for i in range(count):
            broker.publish(source, str(i), key=f"key-{i % KEYS}")
        if not broker.flush(120):
            raise SystemExit("the broker did not confirm the benchmark's messages")


def consume(url: str, source: str, group: str, handler: str, n: int, count: int) -> Tally:
    tally = Tally(count)
    with rm.connect(url, name=f"{group}-consumer") as broker:
        consumer = broker.consumer(source, handlers(tally)[handler], group=group, concurrency=n)
        consumer.start()
        if not tally.done.wait(600):
            raise SystemExit(f"{handler} N={n}: only {tally.count} of {count} within 600 s")
        consumer.stop(60)
        broker.delete(source=source) if url.startswith("amqp") else None
    return tally


def bench(broker: str, messages: int, runs: int) -> None:
    url = kafka_url() if broker == "kafka" else rabbitmq_url()
    rates: dict[str, list[float]] = {label: [] for label, _h, _n in VARIANTS}
    violations: dict[str, int] = {label: 0 for label, _h, _n in VARIANTS}
    topic = f"bench-concurrency-{uuid.uuid4().hex[:8]}"
    if broker == "kafka":
        publish(url, topic, messages)  # once: each variant reads it from the start in a group of its own
    for run in range(runs):
        for label, handler, n in VARIANTS:
            count = messages // 20 if label == "async N=1" else messages
            if broker == "kafka":
                source, group = topic, f"{topic}-{run}-{label.replace(' ', '-')}"
            else:
                source = group = f"bench-concurrency-{uuid.uuid4().hex[:8]}"
                publish(url, source, count)
            tally = consume(url, source, group, handler, n, count)
            rates[label].append(tally.rate())
            violations[label] += tally.violations
            print(f"  {broker} run {run + 1} {label:18s} {tally.rate():>9,.0f} msg/s", flush=True)
    median = {label: statistics.median(values) for label, values in rates.items()}
    cap = median["no-op async N=256"]
    print(f"\n{broker}: {messages:,} messages over {KEYS:,} keys, handlers waiting {WAIT * 1000:.0f} ms; "
          f"no-op cap (async N=256) {cap:,.0f} msg/s")
    for label, handler, n in VARIANTS:
        values = rates[label]
        line = (f"  {label:18s} {median[label]:>9,.0f} msg/s  (runs {min(values):,.0f}..{max(values):,.0f})  "
                f"order violations {violations[label]}")
        if handler in ("async", "sync"):
            ideal = min(n / WAIT, cap)
            target = {"async N=256": " (target >= 0.7)", "sync N=32": " (target >= 0.8)"}.get(label, "")
            line += f"  ideal {ideal:,.0f}: {median[label] / ideal:.2f}x{target}"
        print(line)
    print(f"  async N=256 / async N=1: {median['async N=256'] / median['async N=1']:.0f}x (target >= 50)")
    if broker == "kafka":
        with rm.connect(url) as admin:
            admin.delete(source=topic)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--broker", choices=["kafka", "rabbitmq", "both"], default="both")
    args = parser.parse_args()
    for broker in ("kafka", "rabbitmq") if args.broker == "both" else (args.broker,):
        bench(broker, args.messages, args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
