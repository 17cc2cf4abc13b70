"""An asyncio service that publishes and consumes on Kafka or RabbitMQ, and shuts down gracefully.

- ``await broker.publish(...)``: the publish future is awaitable; awaiting it suspends this
  coroutine, not the event loop, until the broker acknowledged the message.
- ``broker.consumer(source, handler, group=..., loop=asyncio.get_running_loop())`` with an ``async def``
  handler: each message's coroutine runs on the service's own loop, next to the rest of the service
  (its HTTP sessions, database pools). The consumer thread waits for it before taking the next
  message, so order is kept and the ack/commit follows the handler.
- SIGINT/SIGTERM set an event; leaving ``async with connect(...)`` then stops the consumer (it
  finishes and acknowledges the message in hand) and flushes the publisher, in a worker thread,
  so the loop keeps running the handler that is finishing.

The demo publishes five events and exits once they are handled (1 if they were not, or not on the
service's loop); with ``--serve`` it keeps serving until SIGINT/SIGTERM (at most ``--timeout`` s).

    python examples/asyncio_service.py kafka|rabbitmq [--name events-1] [--serve]

The brokers are read from KAFKA_BOOTSTRAP_SERVERS (127.0.0.1:9092) and RABBITMQ_URL
(amqp://guest:guest@127.0.0.1:5672/%2F).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import uuid

from reliable_messaging import Message, connect

KAFKA_BOOTSTRAP_SERVERS = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
EVENTS = 5


def create_kafka_topic(bootstrap_servers: str, topic: str) -> None:
    """The demo's topic must exist before its consumer subscribes (a service's topic does): librdkafka
    looks for a missing subscribed topic again only every ``topic.metadata.refresh.interval.ms`` (5 min)."""
    # confluent_kafka.admin re-exports NewTopic (its documented home) without declaring it to type checkers.
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    admin.create_topics([NewTopic(topic, num_partitions=1)])[topic].result(timeout=30)


async def service(url: str, name: str, *, serve: bool, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    handled: list[str] = []

    async def handle(message: Message) -> None:
        await asyncio.sleep(0.01)  # stands for an awaited database write or HTTP call
        if asyncio.get_running_loop() is loop:
            handled.append(message.body.decode())
        print(f"handled {message.body.decode()} (on the service loop: {asyncio.get_running_loop() is loop})")
        if len(handled) == EVENTS:
            print("all events handled")
            if not serve:
                stop.set()

    async with connect(url, name=name) as broker:
        consumer = broker.consumer(name, handle, group=name, loop=loop)
        await asyncio.to_thread(consumer.start)  # RabbitMQ connects and declares its queue here: off the loop
        deliveries = await asyncio.gather(*(broker.publish(name, f"event {n}") for n in range(EVENTS)))
        print(f"published {len(deliveries)} events, each acknowledged by the broker")
        if serve:
            print("serving until Ctrl-C or SIGTERM")
        try:
            await asyncio.wait_for(stop.wait(), timeout)
        except asyncio.TimeoutError:
            print(f"gave up after {timeout} s")
        print("shutting down: finishing the message in hand and acknowledging it")
    print(f"stopped gracefully: handled {len(handled)} of {EVENTS} events")
    return stop.is_set() and len(handled) == EVENTS


def main() -> int:
    parser = argparse.ArgumentParser(description="asyncio service on reliable_messaging")
    parser.add_argument("broker", choices=["kafka", "rabbitmq"])
    parser.add_argument("--name", default=f"events-{uuid.uuid4().hex[:8]}", help="topic/queue and group name")
    parser.add_argument("--serve", action="store_true", help="keep serving until SIGINT/SIGTERM")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before giving up")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = f"kafka://{KAFKA_BOOTSTRAP_SERVERS}" if args.broker == "kafka" else RABBITMQ_URL
    if args.broker == "kafka":
        create_kafka_topic(KAFKA_BOOTSTRAP_SERVERS, args.name)
    return 0 if asyncio.run(service(url, args.name, serve=args.serve, timeout=args.timeout)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
