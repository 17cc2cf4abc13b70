"""An idempotent consumer: effectively-once processing with a SQLite dedup store, on Kafka or RabbitMQ.

``connect(url, guarantee="effectively-once", dedup_path=...)`` is at-least-once delivery (Kafka:
acks=all with idempotence, commit after processing; RabbitMQ: confirms, mandatory, persistent, ack
after processing) plus a dedup store keyed on the producer-stamped message id: the consumer claims
the id, runs the handler, marks the id done, then acks/commits. A message whose id is already done
is acknowledged without calling the handler and counted in ``stats.deduplicated``. The SQLite file
outlives the process, so a duplicate is recognised after a restart too (Kafka re-reads from the
last committed offset; RabbitMQ redelivers what a dead consumer had not acknowledged).

The demo publishes payment ``payment-42`` twice with the same message id, as a producer does when
it resends after a lost acknowledgement, then restarts the consumer and receives it a third time.
The handler must run once; the exit code is 1 otherwise.

    python examples/idempotent_consumer_sqlite.py kafka|rabbitmq [--name payments-1] [--dedup-path FILE]

The brokers are read from KAFKA_BOOTSTRAP_SERVERS (127.0.0.1:9092) and RABBITMQ_URL
(amqp://guest:guest@127.0.0.1:5672/%2F).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path

from reliable_messaging import ConsumerStats, Message, connect

KAFKA_BOOTSTRAP_SERVERS = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def charge(message: Message) -> None:
    """The side effect that must not happen twice."""
    print(f"charged {message.body.decode()} (message id {message.message_id}, attempt {message.attempt})")


def create_kafka_topic(bootstrap_servers: str, topic: str) -> None:
    """The demo's topic must exist before its consumer subscribes (a service's topic does): librdkafka
    looks for a missing subscribed topic again only every ``topic.metadata.refresh.interval.ms`` (5 min)."""
    # confluent_kafka.admin re-exports NewTopic (its documented home) without declaring it to type checkers.
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    admin.create_topics([NewTopic(topic, num_partitions=1)])[topic].result(timeout=30)


def run_consumer(url: str, name: str, dedup_path: Path, copies: int, timeout: float) -> ConsumerStats:
    """Start a consumer, publish ``copies`` copies of payment-42, wait until each is settled, stop."""
    with connect(url, guarantee="effectively-once", dedup_path=dedup_path, name=name) as broker:
        print(broker)  # the preset and every knob it set
        consumer = broker.consumer(name, charge, group=name)
        consumer.start()  # RabbitMQ: declares the queue (bound to the exchange `name`) before we publish
        for _ in range(copies):
            broker.publish(name, "10.00 EUR to ACME", message_id="payment-42").result(timeout=30)
        stats = consumer.stats
        deadline = time.monotonic() + timeout
        while stats.processed + stats.deduplicated < copies and time.monotonic() < deadline:
            time.sleep(0.1)
    return stats  # leaving `with` stopped the consumer: the last ack/commit is done


def main() -> int:
    parser = argparse.ArgumentParser(description="Idempotent consumer with a SQLite dedup store")
    parser.add_argument("broker", choices=["kafka", "rabbitmq"])
    parser.add_argument("--name", default=f"payments-{uuid.uuid4().hex[:8]}", help="topic/queue and group name")
    parser.add_argument("--dedup-path", type=Path, help="the SQLite file (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait per consumer run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = f"kafka://{KAFKA_BOOTSTRAP_SERVERS}" if args.broker == "kafka" else RABBITMQ_URL
    if args.broker == "kafka":
        create_kafka_topic(KAFKA_BOOTSTRAP_SERVERS, args.name)

    with tempfile.TemporaryDirectory() as tmp:
        dedup_path = args.dedup_path or Path(tmp) / "dedup.sqlite3"
        first = run_consumer(url, args.name, dedup_path, copies=2, timeout=args.timeout)  # original + resend
        print(f"first run: handler ran {first.processed} time(s), duplicates skipped: {first.deduplicated}")
        after_restart = run_consumer(url, args.name, dedup_path, copies=1, timeout=args.timeout)
        print(f"after restart: handler ran {after_restart.processed} time(s), "
              f"duplicates skipped: {after_restart.deduplicated}")

    ran = first.processed + after_restart.processed
    skipped = first.deduplicated + after_restart.deduplicated
    print(f"summary: payment-42 delivered 3 times, charged {ran} time(s), {skipped} duplicate(s) skipped")
    return 0 if (ran, skipped) == (1, 2) else 1


if __name__ == "__main__":
    raise SystemExit(main())
