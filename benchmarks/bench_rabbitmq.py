"""RabbitMQ throughput: reliable_messaging's publisher and consumer against hand-written pika, same broker, same run.

    python benchmarks/bench_rabbitmq.py [--messages N] [--repeat R] [--url URL]

Publishing (confirms on, persistent, mandatory, a message id on every message, one durable
classic queue per run):

- ``pika select``: a hand-written ``SelectConnection`` publisher that pipelines publishes
  with the same in-flight window and counts ``basic.ack`` frames (incl. ``multiple``);
  the baseline the library's publisher is held to (target >= 0.9x);
- ``pika blocking``: ``BlockingConnection`` confirming one message at a time (what naive
  code does), on at most 2,000 messages, for context;
- ``RabbitMQPublisher``: futures for every message, resolved by the broker's confirms.

Consuming (manual acks, the same prefetch, a queue pre-filled with N messages):

- ``pika select``: a ``SelectConnection`` consumer acking each delivery in its callback;
- ``RabbitMQConsumer``: a no-op handler through the library (worker thread, coalesced acks);
  target >= 0.8x.

Each pair runs alternately ``--repeat`` times; the medians and their ratio are printed. The
numbers depend on the machine and on whatever else it runs: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pika
import pika.channel
import pika.frame
import pika.spec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reliable_messaging import (  # after the path tweak, so the checkout is importable
    RabbitMQConsumer,
    RabbitMQConsumerConfig,
    RabbitMQPublisher,
    RabbitMQPublisherConfig,
)

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
WINDOW = 1000
PREFETCH = 100


def _blocking(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


def _declare(url: str, name: str) -> None:
    conn = _blocking(url)
    conn.channel().queue_declare(name, durable=True)
    conn.close()


def _delete(url: str, name: str) -> None:
    conn = _blocking(url)
    conn.channel().queue_delete(name)
    conn.close()


def _count(url: str, name: str) -> int:
    conn = _blocking(url)
    n = int(conn.channel().queue_declare(name, passive=True).method.message_count)
    conn.close()
    return n


def _props() -> pika.BasicProperties:
    return pika.BasicProperties(delivery_mode=2, message_id=uuid.uuid4().hex)


# -- publishing -----------------------------------------------------------------------------------


def pika_select_publish(url: str, queue: str, n: int, body: bytes) -> float:
    """Hand-written pipelined confirms on a SelectConnection; returns seconds for n confirmed messages."""
    state = {"sent": 0, "confirmed": 0, "start": 0.0, "end": 0.0}
    outstanding: collections.deque[int] = collections.deque()
    channel_box: list[pika.channel.Channel] = []

    def pump() -> None:
        channel = channel_box[0]
        while state["sent"] < n and len(outstanding) < WINDOW:
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2, message_id=uuid.uuid4().hex),
                                  mandatory=True)
            state["sent"] += 1
            outstanding.append(int(state["sent"]))

    def on_confirm(frame: pika.frame.Method) -> None:
        tag = frame.method.delivery_tag
        if frame.method.multiple:
            while outstanding and outstanding[0] <= tag:
                outstanding.popleft()
                state["confirmed"] += 1
        else:
            outstanding.remove(tag)
            state["confirmed"] += 1
        if state["confirmed"] == n:
            state["end"] = time.perf_counter()
            conn.close()
            return
        pump()

    def on_confirm_ok(_frame: pika.frame.Method) -> None:
        state["start"] = time.perf_counter()
        pump()

    def on_channel(channel: pika.channel.Channel) -> None:
        channel_box.append(channel)
        channel.confirm_delivery(ack_nack_callback=on_confirm, callback=on_confirm_ok)

    conn = pika.SelectConnection(pika.URLParameters(url), on_open_callback=lambda c: c.channel(
        on_open_callback=on_channel), on_close_callback=lambda c, r: c.ioloop.stop())
    conn.ioloop.start()
    return state["end"] - state["start"]


def pika_blocking_publish(url: str, queue: str, n: int, body: bytes) -> float:
    """BlockingConnection with confirms: each basic_publish waits for its basic.ack."""
    conn = _blocking(url)
    channel = conn.channel()
    channel.confirm_delivery()
    start = time.perf_counter()
    for _ in range(n):
        channel.basic_publish("", queue, body, _props(), mandatory=True)
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def library_publish(url: str, queue: str, n: int, body: bytes) -> float:
    with RabbitMQPublisher(RabbitMQPublisherConfig(url=url, max_in_flight=WINDOW)) as publisher:
        start = time.perf_counter()
        futures = [publisher.publish("", queue, body) for _ in range(n)]
        for future in futures:
            future.result(timeout=120)
        return time.perf_counter() - start


# -- consuming ------------------------------------------------------------------------------------


def _fill(url: str, queue: str, n: int, body: bytes) -> None:
    with RabbitMQPublisher(RabbitMQPublisherConfig(url=url, max_in_flight=WINDOW)) as publisher:
        futures = [publisher.publish("", queue, body) for _ in range(n)]
        for future in futures:
            future.result(timeout=120)


def pika_select_consume(url: str, queue: str, n: int) -> float:
    state = {"got": 0, "start": 0.0, "end": 0.0}

    def on_message(channel: pika.channel.Channel, method: pika.spec.Basic.Deliver, _props: pika.BasicProperties,
                   _body: bytes) -> None:
        channel.basic_ack(method.delivery_tag)
        state["got"] += 1
        if state["got"] == n:
            state["end"] = time.perf_counter()
            conn.close()

    def on_channel(channel: pika.channel.Channel) -> None:
        def consume(_frame: pika.frame.Method) -> None:
            state["start"] = time.perf_counter()
            channel.basic_consume(queue, on_message)

        channel.basic_qos(prefetch_count=PREFETCH, callback=consume)

    conn = pika.SelectConnection(pika.URLParameters(url), on_open_callback=lambda c: c.channel(
        on_open_callback=on_channel), on_close_callback=lambda c, r: c.ioloop.stop())
    conn.ioloop.start()
    return state["end"] - state["start"]


def library_consume(url: str, queue: str, n: int) -> float:
    consumer = RabbitMQConsumer(RabbitMQConsumerConfig(url=url, prefetch=PREFETCH), queue, lambda _m: None)
    consumer.start()  # returns on basic.consume-ok, where the baseline's clock starts too
    start = time.perf_counter()
    deadline = time.monotonic() + 300
    while consumer.stats.processed < n and time.monotonic() < deadline:
        time.sleep(0.0005)
    elapsed = time.perf_counter() - start
    consumer.stop()
    if consumer.stats.processed < n:
        raise RuntimeError(f"RabbitMQConsumer processed {consumer.stats.processed}/{n} within 300s")
    return elapsed


# -- driver ---------------------------------------------------------------------------------------


def _run(url: str, n: int, body: bytes, fn: Callable[[str, str, int, bytes], float], fill: bool = False,
         expect: int | None = None) -> float:
    queue = f"bench.{uuid.uuid4().hex[:8]}"
    _declare(url, queue)
    try:
        if fill:
            _fill(url, queue, n, body)
            seconds = fn(url, queue, n, body)
            left = _count(url, queue)
            if left:
                raise RuntimeError(f"{left} messages left in {queue} after consuming")
        else:
            seconds = fn(url, queue, n, body)
            count = _count(url, queue)
            if count != (n if expect is None else expect):
                raise RuntimeError(f"{queue} holds {count} messages, expected {n if expect is None else expect}")
        return n / seconds
    finally:
        for name in (queue, *(f"{queue}.retry.{i}" for i in range(1, 5))):  # the consumer's retry queues
            _delete(url, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run (default 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each variant; medians are reported")
    parser.add_argument("--size", type=int, default=200, help="body size in bytes (default 200)")
    parser.add_argument("--url", default=DEFAULT_URL)
    args = parser.parse_args(argv)
    n, body = args.messages, b"x" * args.size
    blocking_n = min(n, 2000)

    rates: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(args.repeat):
        rates["publish pika select"].append(_run(args.url, n, body, pika_select_publish))
        rates["publish RabbitMQPublisher"].append(_run(args.url, n, body, library_publish))
        rates["publish pika blocking"].append(_run(args.url, blocking_n, body, pika_blocking_publish))
        rates["consume pika select"].append(_run(args.url, n, body, lambda u, q, k, _b: pika_select_consume(u, q, k),
                                                 fill=True))
        rates["consume RabbitMQConsumer"].append(_run(args.url, n, body, lambda u, q, k, _b: library_consume(u, q, k),
                                                      fill=True))

    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"RabbitMQ at {args.url}: {n} messages of {args.size} bytes, {args.repeat} run(s) each, "
          f"window {WINDOW}, prefetch {PREFETCH}")
    for name, values in rates.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"  {name:<28} {median[name]:>10,.0f} msg/s   (runs: {runs})")
    publish_ratio = median["publish RabbitMQPublisher"] / median["publish pika select"]
    blocking_ratio = median["publish pika select"] / median["publish pika blocking"]
    consume_ratio = median["consume RabbitMQConsumer"] / median["consume pika select"]
    print(f"ratio publish  RabbitMQPublisher / pika select   = {publish_ratio:.2f}x (target >= 0.90)")
    print(f"ratio publish  pika select / pika blocking       = {blocking_ratio:.1f}x (context)")
    print(f"ratio consume  RabbitMQConsumer / pika select    = {consume_ratio:.2f}x (target >= 0.80)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
