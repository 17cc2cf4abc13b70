"""A RabbitMQ consumer with manual acks, TTL retry queues and a dead-letter exchange.

- ``RabbitMQTopology.work_queue(name)`` declares the durable exchange and queue ``<name>``, which
  dead-letters to the exchange ``<name>.dlx`` and from there to the queue ``<name>.dlq``.
- ``RabbitMQAckMode.MANUAL``: a message is acked only after its handler returned, so a crash
  redelivers it (``redelivered=True``) instead of losing it. ``prefetch`` bounds how many
  unacknowledged messages the broker hands this consumer at once.
- ``RabbitMQRetryMode.DELAYED``: a failed message is republished (with confirms) to
  ``<name>.retry.<n>`` with the retry delay as its TTL, then the original is acked; when the TTL
  expires the broker dead-letters it back to ``<name>``. The consumer keeps working meanwhile.
  When attempts run out it publishes the message, with confirms, to ``<name>.dlx`` and from there
  ``<name>.dlq``, with headers saying where it came from and why it failed (``x-rm-reason``,
  ``x-rm-error-type``, ... the same as on Kafka's dead-letter topic), then acks the original.

The demo publishes four orders (``order-2`` asks for one retry, ``poison`` always fails), handles
them, reads the dead letter back, prints a summary and exits 1 if anything went otherwise. Run it:
``RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2F python examples/rabbitmq_manual_ack_consumer.py``
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import uuid
from collections.abc import Callable

from reliable_messaging import (
    RabbitMQAckMode,
    RabbitMQConsumer,
    RabbitMQConsumerConfig,
    RabbitMQMessage,
    RabbitMQPublisher,
    RabbitMQPublisherConfig,
    RabbitMQRetryMode,
    RabbitMQTopology,
    Retry,
    RetryPolicy,
)

URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
ORDERS = ["order-1", "order-2", "poison", "order-3"]
# Three attempts, 0.5 s then 1 s apart: a demo's delays. A service waits longer (the default policy).
RETRY = RetryPolicy(max_attempts=3, initial_delay=0.5, max_delay=5.0, jitter=0.1)


def handle(message: RabbitMQMessage) -> None:
    order = message.body.decode()
    if order == "order-2" and message.attempt == 1:
        # Parked in <queue>.retry.1 for 1 s. RabbitMQ expires messages only at the head of a queue,
        # so a message with a shorter delay queued behind this one there waits for it.
        raise Retry("stock service not ready yet", delay=1.0)
    if order == "poison":
        raise ValueError(f"cannot parse {order!r}")  # retried per RETRY, then dead-lettered
    print(f"handled {order} (attempt {message.attempt}, redelivered={message.redelivered})")


def wait_until(done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.1)


def read_dead_letters(queue: str, count: int) -> list[RabbitMQMessage]:
    """Whoever watches the DLQ (alerting, a replay tool) is just another consumer; its failures requeue."""
    dead: list[RabbitMQMessage] = []
    config = RabbitMQConsumerConfig(url=URL)
    with RabbitMQConsumer(config, f"{queue}.dlq", dead.append, retry_mode=RabbitMQRetryMode.REQUEUE):
        wait_until(lambda: len(dead) >= count, 30)
    return dead


def main() -> int:
    parser = argparse.ArgumentParser(description="RabbitMQ manual-ack consumer with TTL retry queues and a DLQ")
    parser.add_argument("--name", default=f"orders-{uuid.uuid4().hex[:8]}", help="exchange and queue name")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the outcome")
    args = parser.parse_args()
    queue = args.name
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("reliable_messaging").setLevel(logging.INFO)

    topology = RabbitMQTopology.work_queue(queue)  # declared (idempotently) by the publisher and the consumer
    with RabbitMQPublisher(RabbitMQPublisherConfig(url=URL), topology=topology) as publisher:
        for future in [publisher.publish(queue, queue, order) for order in ORDERS]:
            future.result(timeout=30)  # confirmed: the broker has it, on disk, in the queue

    config = RabbitMQConsumerConfig(url=URL, ack_mode=RabbitMQAckMode.MANUAL, prefetch=20)
    consumer = RabbitMQConsumer(config, queue, handle, retry=RETRY, retry_mode=RabbitMQRetryMode.DELAYED,
                                topology=topology)
    stats = consumer.stats
    consumer.start()
    try:
        wait_until(lambda: stats.processed + stats.dead_lettered >= len(ORDERS) or consumer.error is not None,
                   args.timeout)
    except KeyboardInterrupt:
        print("interrupted")
    finally:
        consumer.stop()  # finishes and acks the message in progress; prefetched ones go back to the queue

    dead = read_dead_letters(queue, stats.dead_lettered)
    for letter in dead:
        reason = letter.header("x-rm-reason")  # why it was dead-lettered (x-rm-error-type, ... too)
        print(f"dead letter {letter.body.decode()} in {letter.queue}: {reason}")
    print(f"summary: handled={stats.processed} retried={stats.retried} dead-lettered={stats.dead_lettered} "
          f"acks={stats.extra['acks']} rejects={stats.extra['rejects']}"
          + (f" error={consumer.error}" if consumer.error else ""))
    ok = (stats.processed, stats.retried, stats.dead_lettered) == (3, 3, 1) and consumer.error is None
    return 0 if ok and [m.body for m in dead] == [b"poison"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
