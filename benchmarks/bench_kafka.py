"""Kafka adapter vs raw confluent-kafka, same broker, same run.

    python benchmarks/bench_kafka.py [--messages N] [--size BYTES] [--runs R] [--bootstrap HOST:PORT]

Producer: ``acks=all`` + idempotence on both sides, 5 ms linger.

- raw: ``produce(topic, value, on_delivery=callback)`` + ``poll(0)`` per message,
  as confluent-kafka's documentation writes it; the callback counts errors.
- raw + id header: the same, also stamping a ``message-id`` header (what every
  library message carries), to show what the id costs by itself.
- library: ``KafkaProducer.publish`` returning a delivery future per message; all
  futures kept and checked at the end.

Consumer: a topic pre-filled with N messages; each side reads all N with a fresh
group. Timing runs from the first record to the N-th (group join excluded).

- raw: ``poll()`` loop with ``enable.auto.commit``, librdkafka's defaults.
- raw, tuned: the same with ``fetch.queue.backoff.ms=20``, which the library sets
  by default (librdkafka's 1000 ms lets a fast consumer run its prefetch queue
  dry and wait; see ``CONSUMER_DEFAULTS``). The fair CPU-bound comparison.
- library MANUAL_BATCH: ``KafkaConsumer`` with a no-op handler, default batch commits.
- library STORE_OFFSETS, and MANUAL (a synchronous commit per message, on a
  smaller sample since it is bounded by the commit round trip).

Each run measures every variant once, interleaved; the table shows the median
over runs, and the ratios are medians of per-run ratios (the machine's noise
moves both sides of a run together).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka import Message as RawMessage

from reliable_messaging import (
    CommitMode,
    DeliveryFuture,
    KafkaConsumer,
    KafkaConsumerConfig,
    KafkaMessage,
    KafkaProducer,
    KafkaProducerConfig,
)
from reliable_messaging._kafka._config import CONSUMER_DEFAULTS
from reliable_messaging._kafka._topology import create_topics
from reliable_messaging._message import new_message_id

LINGER_MS = 5


@dataclass
class Results:
    rates: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, rate: float) -> None:
        self.rates.setdefault(name, []).append(rate)

    def median(self, name: str) -> float:
        return statistics.median(self.rates[name])

    def ratio(self, name: str, baseline: str) -> float:
        return statistics.median(a / b for a, b in zip(self.rates[name], self.rates[baseline], strict=True))


# -- producer ---------------------------------------------------------------------------------


def raw_producer(bootstrap: str, topic: str, n: int, payload: bytes, *, with_id: bool) -> float:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                         "linger.ms": LINGER_MS})
    producer.produce(topic, b"warm-up")
    producer.flush(30)
    errors = [0]
    delivered = [0]

    def on_delivery(err: KafkaError | None, _msg: RawMessage) -> None:
        delivered[0] += 1
        if err is not None:
            errors[0] += 1

    began = time.perf_counter()
    for _ in range(n):
        headers = [("message-id", new_message_id())] if with_id else None
        while True:
            try:
                producer.produce(topic, payload, on_delivery=on_delivery, headers=headers)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    remaining = producer.flush(120)
    elapsed = time.perf_counter() - began
    if remaining or errors[0] or delivered[0] != n:
        raise RuntimeError(f"raw producer: {remaining} undelivered, {errors[0]} errors")
    return n / elapsed


def library_producer(bootstrap: str, topic: str, n: int, payload: bytes) -> float:
    producer = KafkaProducer(KafkaProducerConfig(bootstrap_servers=bootstrap, linger=LINGER_MS / 1000))
    producer.publish(topic, b"warm-up").result(timeout=30)
    publish = producer.publish
    began = time.perf_counter()
    futures: list[DeliveryFuture] = [publish(topic, payload) for _ in range(n)]
    flushed = producer.flush(120)
    elapsed = time.perf_counter() - began
    remaining = len(producer)
    failed = sum(1 for f in futures if f.exception(timeout=0) is not None)
    producer.close()
    if not flushed or failed:
        raise RuntimeError(f"library producer: {remaining} undelivered, {failed} failed futures")
    return n / elapsed


# -- consumer ---------------------------------------------------------------------------------


def fill(bootstrap: str, topic: str, n: int, payload: bytes) -> None:
    with KafkaProducer(KafkaProducerConfig(bootstrap_servers=bootstrap, linger=0.02)) as producer:
        futures = [producer.publish(topic, payload) for _ in range(n)]
        if not producer.flush(120) or any(f.exception(timeout=0) for f in futures):
            raise RuntimeError("could not fill the consumer benchmark topic")


def raw_consumer(bootstrap: str, topic: str, n: int, *, tuned: bool = False) -> float:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", **(CONSUMER_DEFAULTS if tuned else {})})
    consumer.subscribe([topic])
    seen = 0
    began = 0.0
    deadline = time.monotonic() + 120
    try:
        while seen < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"raw consumer read {seen}/{n} in 120s")
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            if seen == 0:
                began = time.perf_counter()
            msg.value()
            seen += 1
        elapsed = time.perf_counter() - began
    finally:
        consumer.close()
    return (n - 1) / elapsed


def library_consumer(bootstrap: str, topic: str, n: int, mode: CommitMode) -> float:
    done = threading.Event()
    state = {"seen": 0, "began": 0.0, "ended": 0.0}

    def handler(message: KafkaMessage) -> None:
        seen = state["seen"]
        if seen == 0:
            state["began"] = time.perf_counter()
        seen += 1
        state["seen"] = seen
        if seen == n:
            state["ended"] = time.perf_counter()
            done.set()

    config = KafkaConsumerConfig(bootstrap_servers=bootstrap, group_id=f"bench-lib-{uuid.uuid4().hex[:8]}",
                                 commit_mode=mode)
    consumer = KafkaConsumer(config, topic, handler, retry_topics=False, create_topics=False)
    with consumer:
        if not done.wait(300):
            raise RuntimeError(f"library consumer ({mode.value}) read {state['seen']}/{n} in 300s")
    return (n - 1) / (state["ended"] - state["began"])


# -- main -------------------------------------------------------------------------------------


def default_bootstrap() -> str:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    from reliable_messaging.testing._endpoints import resolve_kafka

    return resolve_kafka().bootstrap_servers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=100, help="message size in bytes")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--manual-sample", type=int, default=2_000,
                        help="messages for the per-message-commit consumer (bounded by the commit round trip)")
    parser.add_argument("--bootstrap", default=None)
    args = parser.parse_args(argv)
    bootstrap = args.bootstrap or default_bootstrap()
    n, payload = args.messages, b"x" * args.size
    suffix = uuid.uuid4().hex[:8]
    produce_topic, consume_topic = f"bench-produce-{suffix}", f"bench-consume-{suffix}"
    create_topics(bootstrap, {produce_topic: 1, consume_topic: 1}, replication_factor=-1)
    print(f"Kafka at {bootstrap}: {n} messages of {args.size} bytes, {args.runs} runs, python {sys.version.split()[0]}")

    results = Results()
    fill(bootstrap, consume_topic, n, payload)
    manual = min(n, args.manual_sample)
    producers: list[tuple[str, Callable[[], float]]] = [
        ("producer raw (delivery callbacks)", lambda: raw_producer(bootstrap, produce_topic, n, payload,
                                                                  with_id=False)),
        ("producer raw + message-id header", lambda: raw_producer(bootstrap, produce_topic, n, payload,
                                                                 with_id=True)),
        ("producer library (acks=all, futures)", lambda: library_producer(bootstrap, produce_topic, n, payload)),
    ]
    consumers: list[tuple[str, Callable[[], float]]] = [
        ("consumer raw (auto-commit, poll)", lambda: raw_consumer(bootstrap, consume_topic, n)),
        ("consumer raw, tuned fetch backoff", lambda: raw_consumer(bootstrap, consume_topic, n, tuned=True)),
        ("consumer library MANUAL_BATCH", lambda: library_consumer(bootstrap, consume_topic, n,
                                                                   CommitMode.MANUAL_BATCH)),
        ("consumer library STORE_OFFSETS", lambda: library_consumer(bootstrap, consume_topic, n,
                                                                    CommitMode.STORE_OFFSETS)),
        (f"consumer library MANUAL ({manual} msgs)", lambda: library_consumer(bootstrap, consume_topic, manual,
                                                                              CommitMode.MANUAL)),
    ]
    for run in range(1, args.runs + 1):
        for name, measure in producers + consumers:
            rate = measure()
            results.add(name, rate)
            print(f"  run {run}: {name:<42} {rate:>12,.0f} msgs/s", flush=True)

    baseline_p, baseline_c, tuned_c = producers[0][0], consumers[0][0], consumers[1][0]
    print()
    print(f"{'variant':<44} {'msgs/s (median)':>16} {'vs raw':>8} {'vs tuned':>9}")
    print("-" * 80)
    for name, _ in producers:
        print(f"{name:<44} {results.median(name):>16,.0f} {results.ratio(name, baseline_p):>7.2f}x")
    for name, _ in consumers:
        print(f"{name:<44} {results.median(name):>16,.0f} {results.ratio(name, baseline_c):>7.2f}x "
              f"{results.ratio(name, tuned_c):>8.2f}x")
    print()
    print(f"ratio producer library/raw: {results.ratio(producers[2][0], baseline_p):.2f} (target >= 0.85)")
    print(f"ratio consumer MANUAL_BATCH/raw: {results.ratio(consumers[2][0], baseline_c):.2f} "
          f"(vs tuned raw: {results.ratio(consumers[2][0], tuned_c):.2f}; target >= 0.85)")
    print(f"per-message commit (MANUAL): {results.median(consumers[4][0]):,.0f} msgs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
