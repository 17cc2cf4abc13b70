"""What deduplication costs a consumer: the same consumer without dedup, with memory, with SQLite.

    python benchmarks/bench_dedup.py [--messages N] [--repeat R] [--broker kafka|rabbitmq|both]

For each broker, N messages are published once to a fresh topic/queue; then each variant consumes
them from the start (Kafka: a new group on the same topic; RabbitMQ: its own queue, every queue
filled before any is consumed, so no run competes with the broker still writing the next one's
messages) through ``reliable_messaging.connect`` (at-least-once, the default manual commits/acks)
with a trivial handler, so the cost measured is the library's and the store's, not the handler's.
Prints msgs/s, the throughput cost of each store relative to no dedup (targets: memory <= 10%,
SQLite <= 20%), and the consumer process's CPU time per message (all its threads: the store's
writer thread included). Median of R runs per variant, variants interleaved so drift hits all alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pika

from reliable_messaging import Broker, DedupStore, MemoryDedupStore, Message, SQLiteDedupStore, connect

TARGETS = {"memory": 0.10, "sqlite": 0.20}


def _kafka_url() -> str:
    return f"kafka://{os.environ.get('KAFKA_BOOTSTRAP_SERVERS', '127.0.0.1:9092')}"


def _rabbitmq_url() -> str:
    return os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def _store(kind: str, directory: Path) -> DedupStore | None:
    if kind == "memory":
        return MemoryDedupStore(max_entries=1_000_000)
    if kind == "sqlite":
        return SQLiteDedupStore(directory / f"{uuid.uuid4().hex}.sqlite3")
    return None


def _consume(broker: Broker, source: str, group: str, expected: int, store: DedupStore | None) -> tuple[float, float]:
    """Seconds from the first handled message to the last (excludes group join / queue setup), and
    the process's CPU seconds meanwhile."""
    count = 0
    first = 0.0
    cpu_first = 0.0

    def handler(message: Message) -> None:
        nonlocal count, first, cpu_first
        if count == 0:
            first = time.perf_counter()
            cpu_first = time.process_time()
        count += 1

    consumer = broker.consumer(source, handler, group=group, dedup=store)
    consumer.start()
    deadline = time.monotonic() + 300
    while count < expected:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {count}/{expected} handled")
        time.sleep(0.001)
    elapsed = time.perf_counter() - first
    cpu = time.process_time() - cpu_first
    consumer.stop()
    return elapsed, cpu


Results = dict[str, list[tuple[float, float]]]
"""Per variant: (msgs/s, CPU microseconds per message) of each run."""


def bench_kafka(messages: int, repeat: int, directory: Path) -> Results:
    topic = f"bench-dedup-{uuid.uuid4().hex[:8]}"
    results: Results = {"none": [], "memory": [], "sqlite": []}
    with connect(_kafka_url(), name=topic) as broker:
        for i in range(messages):
            broker.publish(topic, b"x" * 100, key=str(i % 16))
        assert broker.flush(120), "publishing the benchmark's messages did not finish"
        for r in range(repeat):
            for kind in results:
                store = _store(kind, directory)
                seconds, cpu = _consume(broker, topic, f"{topic}-{kind}-{r}", messages, store)
                results[kind].append((messages / seconds, cpu / messages * 1e6))
                if store is not None:
                    store.close()
    return results


def bench_rabbitmq(messages: int, repeat: int, directory: Path) -> Results:
    results: Results = {"none": [], "memory": [], "sqlite": []}
    with connect(_rabbitmq_url(), name="bench-dedup") as broker:
        runs = [(r, kind, f"bench-dedup-{kind}-{r}-{uuid.uuid4().hex[:6]}") for r in range(repeat) for kind in results]
        for _, _, queue in runs:
            broker.consumer(queue, lambda m: None).start().stop()  # declare the queue, then fill it
            for _ in range(messages):
                broker.publish(queue, b"x" * 100)
            assert broker.flush(120), "publishing the benchmark's messages did not finish"
        time.sleep(2)  # let the broker finish writing the persistent messages
        try:
            for _, kind, queue in runs:
                store = _store(kind, directory)
                seconds, cpu = _consume(broker, queue, queue, messages, store)
                results[kind].append((messages / seconds, cpu / messages * 1e6))
                if store is not None:
                    store.close()
        finally:
            _delete(broker, [queue for _, _, queue in runs])
    return results


def _delete(broker: Broker, sources: list[str]) -> None:
    """Delete the benchmark's queues and exchanges: durable leftovers slow every later broker restart."""
    params = pika.URLParameters(_rabbitmq_url())
    params.socket_timeout = 5
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        for source in sources:
            topology = broker.topology(source)  # type: ignore[attr-defined]
            for queue in topology.queues:
                channel.queue_delete(queue.name)
            for exchange in topology.exchanges:
                channel.exchange_delete(exchange.name)
    finally:
        connection.close()


def report(label: str, results: Results) -> list[str]:
    base = statistics.median(rate for rate, _ in results["none"])
    print(f"\n{label}: consumer throughput, median of {len(results['none'])} runs")
    print(f"  {'dedup store':12} {'msg/s':>10} {'cost':>8} {'target':>8} {'CPU us/msg':>11}  (runs, msg/s)")
    misses = []
    for kind, values in results.items():
        rate = statistics.median(rate for rate, _ in values)
        cpu = statistics.median(cpu for _, cpu in values)
        runs = ", ".join(f"{rate / 1000:.0f}k" for rate, _ in values)
        if kind == "none":
            print(f"  {kind:12} {rate:>10,.0f} {'-':>8} {'-':>8} {cpu:>11.2f}  ({runs})")
            continue
        cost = 1 - rate / base
        target = TARGETS[kind]
        flag = "" if cost <= target else "  MISSED"
        print(f"  {kind:12} {rate:>10,.0f} {cost:>8.1%} {target:>8.0%} {cpu:>11.2f}  ({runs}){flag}")
        if cost > target:
            misses.append(f"{label} {kind}")
    return misses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=None,
                        help="messages per run (default: Kafka 200000, RabbitMQ 20000: runs of a second or more)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--broker", choices=["kafka", "rabbitmq", "both"], default="both")
    args = parser.parse_args()
    runs: list[tuple[str, Callable[[int, int, Path], Results], int]] = []
    if args.broker in ("kafka", "both"):
        runs.append(("Kafka", bench_kafka, args.messages or 200_000))
    if args.broker in ("rabbitmq", "both"):
        runs.append(("RabbitMQ", bench_rabbitmq, args.messages or 20_000))
    misses: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, bench, messages in runs:
            misses += report(label, bench(messages, args.repeat, Path(tmp)))
    if misses:
        print(f"\ntargets missed: {', '.join(misses)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
