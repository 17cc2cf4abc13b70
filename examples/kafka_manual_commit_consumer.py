"""A Kafka consumer with manual commits, retry topics and a dead-letter topic.

- ``CommitMode.MANUAL``: a record's offset is committed, synchronously, once its handler finished
  and its outcome (ack, retry, dead letter) is settled at the broker: a crash repeats at most the
  record in progress and never skips one. Chosen over ``MANUAL_BATCH`` (async commits every
  ``commit_every`` records: far higher throughput, but a crash repeats up to that many) because
  this handler is slow anyway (a call to another service per record) and its repeats are costly.
- A failed record is not retried in place (that would stall its partition): it waits in
  ``<topic>.retry.<n>`` for its delay while later records go on; after ``max_attempts`` it lands in
  ``<topic>.DLT`` with headers saying where it came from and why it failed.

The demo publishes four orders (``order-2`` asks for one retry, ``poison`` always fails), handles
them, reads the dead letter back, prints a summary and exits 1 if anything went otherwise. Run it:
``KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python examples/kafka_manual_commit_consumer.py [--name orders-1]``
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import uuid
from collections.abc import Callable

# confluent_kafka.admin re-exports NewTopic (its documented home) without declaring it to type checkers.
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from reliable_messaging import (
    CommitMode,
    KafkaConsumer,
    KafkaConsumerConfig,
    KafkaMessage,
    KafkaProducer,
    KafkaProducerConfig,
    Retry,
    RetryPolicy,
)

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
ORDERS = ["order-1", "order-2", "poison", "order-3"]
# Three attempts, 0.5 s then 1 s apart: a demo's delays. A service waits longer (the default policy).
RETRY = RetryPolicy(max_attempts=3, initial_delay=0.5, max_delay=5.0, jitter=0.1)


def handle(message: KafkaMessage) -> None:
    order = message.body.decode()
    if order == "order-2" and message.attempt == 1:
        raise Retry("stock service not ready yet", delay=1.0)  # comes back from <topic>.retry.1 in 1 s
    if order == "poison":
        raise ValueError(f"cannot parse {order!r}")  # retried per RETRY, then dead-lettered
    print(f"handled {order} (attempt {message.attempt}, from {message.topic}@{message.offset})")


def wait_until(done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.1)


def read_dead_letters(topic: str, count: int) -> list[KafkaMessage]:
    """Whoever watches the DLT (alerting, a replay tool) is just another consumer, without retries."""
    dead: list[KafkaMessage] = []
    config = KafkaConsumerConfig(bootstrap_servers=BOOTSTRAP, group_id=f"{topic}.dlt-reader")
    with KafkaConsumer(config, f"{topic}.DLT", dead.append, retry_topics=False, create_topics=False):
        wait_until(lambda: len(dead) >= count, 30)
    return dead


def main() -> int:
    parser = argparse.ArgumentParser(description="Kafka manual-commit consumer with retry and dead-letter topics")
    parser.add_argument("--name", default=f"orders-{uuid.uuid4().hex[:8]}", help="topic (and group) name")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the outcome")
    args = parser.parse_args()
    topic = args.name
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("reliable_messaging").setLevel(logging.INFO)

    # The demo creates its topic (a service's exists); the consumer creates the retry topics and the DLT.
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    admin.create_topics([NewTopic(topic, num_partitions=1)])[topic].result(timeout=30)
    with KafkaProducer(KafkaProducerConfig(bootstrap_servers=BOOTSTRAP)) as producer:
        for future in [producer.publish(topic, order, key=order) for order in ORDERS]:
            future.result(timeout=30)

    config = KafkaConsumerConfig(bootstrap_servers=BOOTSTRAP, group_id=f"{topic}.billing",
                                 commit_mode=CommitMode.MANUAL)
    consumer = KafkaConsumer(config, topic, handle, retry=RETRY)
    stats = consumer.stats
    consumer.start()
    try:
        wait_until(lambda: stats.processed + stats.dead_lettered >= len(ORDERS) or consumer.error is not None,
                   args.timeout)
    except KeyboardInterrupt:
        print("interrupted")
    finally:
        consumer.stop()  # finishes the record in progress, commits, leaves the group

    dead = read_dead_letters(topic, stats.dead_lettered)
    for letter in dead:
        print(f"dead letter {letter.body.decode()} in {letter.topic}: {letter.header('x-rm-reason')}")
    print(f"summary: handled={stats.processed} retried={stats.retried} dead-lettered={stats.dead_lettered} "
          f"commits={stats.extra['commits']}" + (f" error={consumer.error}" if consumer.error else ""))
    ok = (stats.processed, stats.retried, stats.dead_lettered) == (3, 3, 1) and consumer.error is None
    return 0 if ok and [m.body for m in dead] == [b"poison"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
