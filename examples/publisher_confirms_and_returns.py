"""Publishing with broker acknowledgements: RabbitMQ confirms and returns, Kafka acks=all.

RabbitMQ: with publisher confirms the broker answers every publish with ``basic.ack`` once it has
taken responsibility (a persistent message on a durable queue: written to disk) or ``basic.nack``.
A ``mandatory`` message that no queue is bound for comes back as ``basic.return`` (312 NO_ROUTE),
followed by an ack: the publisher fails exactly that message's future with ``Unroutable``. Without
``mandatory`` the broker would drop it and ack it, and nobody would know. Publishes are pipelined:
``publish()`` returns a future at once; ``concurrent.futures.wait`` collects them all.

Kafka: with ``acks="all"`` (and idempotence, the default) the partition leader answers once every
in-sync replica has the message; the future resolves with its partition and offset.

    RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2F KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 \\
        python examples/publisher_confirms_and_returns.py [--name invoices-1]

Exits 1 unless the routed messages were confirmed and the unroutable one was returned.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import uuid

# confluent_kafka.admin re-exports NewTopic (its documented home) without declaring it to type checkers.
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from reliable_messaging import (
    DeliveryError,
    KafkaProducer,
    KafkaProducerConfig,
    RabbitMQPublisher,
    RabbitMQPublisherConfig,
    RabbitMQTopology,
    Unroutable,
)

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
KAFKA_BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")


def rabbitmq(name: str) -> bool:
    # Exchange `name` routes key "invoice.created" to queue `name`; nothing is bound for "invoice.voided".
    topology = RabbitMQTopology.work_queue(name, routing_key="invoice.created", dead_letter=False)
    # The defaults, spelled out because they are the point.
    config = RabbitMQPublisherConfig(url=RABBITMQ_URL, confirms=True, mandatory=True, persistent=True)
    with RabbitMQPublisher(config, topology=topology) as publisher:
        futures = [publisher.publish(name, "invoice.created", f"invoice {n}") for n in range(5)]
        futures.append(publisher.publish(name, "invoice.voided", "invoice 3 voided"))
        done, pending = concurrent.futures.wait(futures, timeout=30)
    confirmed = returned = 0
    for future in futures:
        if future in pending:
            print(f"rabbitmq: {future.message_id} still unconfirmed after 30 s")
        elif isinstance(error := future.exception(), Unroutable):
            returned += 1
            print(f"rabbitmq: returned {future.message_id}: Unroutable {error.reply_code} {error.reply_text} "
                  f"(exchange {error.exchange!r}, routing key {error.routing_key!r})")
        elif isinstance(error, DeliveryError):  # Nacked, DeliveryTimeout, DeliveryFailed: resend or alert
            print(f"rabbitmq: failed {future.message_id}: {type(error).__name__}: {error}")
        else:
            confirmed += 1
            print(f"rabbitmq: confirmed {future.message_id} on exchange {future.result().destination!r}")
    return (confirmed, returned, len(done)) == (5, 1, len(futures))


def kafka(name: str) -> bool:
    admin = AdminClient({"bootstrap.servers": KAFKA_BOOTSTRAP})  # the demo's topic; a service's exists already
    admin.create_topics([NewTopic(name, num_partitions=1)])[name].result(timeout=30)
    # The default, spelled out because it is the point.
    with KafkaProducer(KafkaProducerConfig(bootstrap_servers=KAFKA_BOOTSTRAP, acks="all")) as producer:
        delivery = producer.publish(name, "invoice 1", key="customer-7").result(timeout=30)
    print(f"kafka: acknowledged {delivery.message_id} at {delivery.destination}[{delivery.partition}]"
          f"@{delivery.offset}")
    return delivery.offset is not None


def main() -> int:
    parser = argparse.ArgumentParser(description="RabbitMQ confirms and returns; Kafka acks=all")
    parser.add_argument("--name", default=f"invoices-{uuid.uuid4().hex[:8]}", help="exchange/queue/topic name")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ok = rabbitmq(args.name)
    ok = kafka(args.name) and ok
    print("all publishes ended as expected" if ok else "some publishes did not end as expected")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
