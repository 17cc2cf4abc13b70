"""Concurrent handlers under real faults: SIGKILL with 64 handlers in flight, SIGTERM mid-stream, a rebalance.

Same method as ``test_kill_at_random.py`` (a consumer process whose handler logs each message id with
an fsync; kills at random handled counts; restarts on the same store), with ``concurrency`` set:

- **SIGKILL, 64 in flight** (``async def`` handlers waiting 10 ms, messages over 1,000 keys so that 64
  lanes are busy): lost 0; with effectively-once, repeats at most the handlers in flight per kill
  (``concurrency``: a handler that logged but whose done record was not yet journaled); at-least-once
  adds the preset's window (Kafka: the records finished since the last commit; RabbitMQ: ``prefetch``).
- **SIGTERM mid-stream** (``consumer.run()`` handles it): the process finishes its handlers, commits or
  acks, and exits 0; after a restart nothing is repeated, with plain at-least-once (no dedup store).
- **A rebalance** (a second consumer joins the group while the first runs 16 handlers): lost 0,
  repeats 0, and every key's messages handled in publish order across both consumers.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from reliable_messaging import Message, connect
from reliable_messaging._kafka._config import DEFAULT_COMMIT_EVERY
from reliable_messaging.testing import KafkaEndpoint, RabbitMQEndpoint, wait_for

from .test_kill_at_random import KAFKA_SETTINGS, KILLS, Run, kill_at_random

pytestmark = [pytest.mark.fault, pytest.mark.slow]

IN_FLIGHT = 64
"""Handlers running at once in the SIGKILL tests."""

KEYS = 1000


def concurrent(n: int, *, use_async: bool = True, delay: float = 0.01, run: bool = False) -> list[str]:
    """``_consumer.py`` arguments for ``n`` concurrent handlers waiting ``delay`` each."""
    return ["--consumer", f'{{"concurrency": {n}}}', "--delay", str(delay),
            *(["--async"] if use_async else []), *(["--run"] if run else [])]


def store_arg(kind: str, tmp_path: Path) -> str:
    return f"sqlite:{tmp_path / 'dedup.sqlite3'}" if kind == "sqlite" else "none"


def check_order(log_lines: list[str]) -> None:
    """Each key's messages were logged in publish order, once each ("<id> <key> body <n>" lines)."""
    last: dict[str, int] = {}
    for line in log_lines:
        _mid, key, _body, number = line.split(" ")
        n = int(number)
        assert n > last.get(key, -1), f"key {key}: message {n} after {last[key]}"
        last[key] = n


@pytest.mark.kafka
@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["sqlite", "none"])
def test_kafka_consumer_killed_with_64_handlers_in_flight(
        kafka_endpoint: KafkaEndpoint, topic: str, kind: str, tmp_path: Path) -> None:
    url = f"kafka://{kafka_endpoint.bootstrap_servers}"
    run = kill_at_random(url, topic, f"{topic}-g", store_arg(kind, tmp_path), tmp_path, settings=KAFKA_SETTINGS,
                         extra=concurrent(IN_FLIGHT), keys=KEYS)
    assert run.lost == 0, run.describe()
    window = IN_FLIGHT if kind == "sqlite" else DEFAULT_COMMIT_EVERY + 4 * IN_FLIGHT
    assert run.repeats <= KILLS * window, run.describe()
    assert run.drain <= KAFKA_SETTINGS["session_timeout"] + 10, run.describe()


@pytest.mark.rabbitmq
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("kind", "use_async"), [("sqlite", True), ("none", False)], ids=["sqlite-async",
                                                                                        "none-threads"])
def test_rabbitmq_consumer_killed_with_64_handlers_in_flight(
        rabbitmq_endpoint: RabbitMQEndpoint, queue_name: str, kind: str, use_async: bool, tmp_path: Path) -> None:
    run = kill_at_random(rabbitmq_endpoint.url, queue_name, "unused", store_arg(kind, tmp_path), tmp_path,
                         settings={}, extra=concurrent(IN_FLIGHT, use_async=use_async), keys=KEYS)
    assert run.lost == 0, run.describe()
    prefetch = 2 * IN_FLIGHT  # the facade raises prefetch to 2 N
    assert run.repeats <= KILLS * (IN_FLIGHT if kind == "sqlite" else prefetch), run.describe()
    assert run.drain <= 10, run.describe()


SIGNAL_SLACK = 5
"""Messages a consumer may finish between the test's last look at the log and the signal's arrival."""


def _sigterm(url: str, source: str, group: str, tmp_path: Path, n: int, settings: dict[str, Any]) -> Run:
    return kill_at_random(url, source, group, "none", tmp_path, settings=settings, sig=signal.SIGTERM,
                          extra=concurrent(n, delay=0.002, run=True), keys=24, messages=2000)


@pytest.mark.kafka
@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [1, 16])
def test_kafka_consumer_stopped_with_sigterm_repeats_nothing(
        kafka_endpoint: KafkaEndpoint, topic: str, n: int, tmp_path: Path) -> None:
    run = _sigterm(f"kafka://{kafka_endpoint.bootstrap_servers}", topic, f"{topic}-g", tmp_path, n, KAFKA_SETTINGS)
    assert (run.lost, run.repeats) == (0, 0), run.describe()
    # After SIGTERM no new record starts, except those a partition's commit needs (behind a finished one):
    # at most the 4 N outstanding (1 with one handler), and a few handled while the signal was on its way.
    assert max(run.after_signal) <= (1 if n == 1 else 4 * n) + SIGNAL_SLACK, run.describe()


@pytest.mark.rabbitmq
@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [1, 16])
def test_rabbitmq_consumer_stopped_with_sigterm_repeats_nothing(
        rabbitmq_endpoint: RabbitMQEndpoint, queue_name: str, n: int, tmp_path: Path) -> None:
    run = _sigterm(rabbitmq_endpoint.url, queue_name, "unused", tmp_path, n, {})
    assert (run.lost, run.repeats) == (0, 0), run.describe()
    # After SIGTERM no new delivery starts: the handlers running finish, the prefetched rest goes back. Those N,
    # plus the ones that started while the signal was on its way (with 2 ms handlers, up to N more).
    assert max(run.after_signal) <= 2 * n + SIGNAL_SLACK, run.describe()


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_a_rebalance_during_concurrent_processing_loses_nothing_repeats_nothing_keeps_key_order(
        kafka_endpoint: KafkaEndpoint, topic: str) -> None:
    """The first consumer runs 16 handlers on 4 partitions; a second joins after 1,000 of 6,000 messages.

    On revoke the first drops what it had not started, lets its running handlers finish, commits, and only
    then the partitions move: the second starts right after the last finished record of each."""
    servers = kafka_endpoint.bootstrap_servers
    admin = AdminClient({"bootstrap.servers": servers})  # referenced until the result: its handle must live
    admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])[topic].result(30)
    total, keys = 6000, 200
    lock = threading.Lock()
    log: list[str] = []
    by: dict[str, int] = {"first": 0, "second": 0}
    where: list[str] = []  # who handled each logged message: consumer, partition@offset, when

    def handler_of(name: str) -> Any:
        def handler(message: Message) -> None:
            time.sleep(0.02)  # 16 at once: ~800/s, so the rebalance comes with handlers in flight
            with lock:
                log.append(f"{message.message_id} {message.key.decode()} {message.body.decode()}")  # type: ignore[union-attr]
                where.append(f"{name} {message.partition}@{message.offset} {time.monotonic():.3f}")  # type: ignore[attr-defined]
                by[name] += 1
        return handler

    url = f"kafka://{servers}"
    with connect(url, name=f"{topic}-producer") as producer:
        for i in range(total):
            producer.publish(topic, f"body {i}", key=f"key-{i % keys}", message_id=f"{topic}-{i}")
        assert producer.flush(60)
    with connect(url, name=f"{topic}-first", **KAFKA_SETTINGS) as first, \
            connect(url, name=f"{topic}-second", **KAFKA_SETTINGS) as second:
        a = first.consumer(topic, handler_of("first"), group=f"{topic}-g", concurrency=16)
        a.start()
        wait_for(lambda: len(log) >= 1000, 60, "the first consumer to handle 1,000 messages")
        b = second.consumer(topic, handler_of("second"), group=f"{topic}-g", concurrency=16)
        b.start()
        wait_for(lambda: len(log) >= total, 120, "every message")
        time.sleep(2)  # anything handled twice would show up now
        assert a.stop(30) and b.stop(30)
    ids = [line.split(" ", 1)[0] for line in log]
    assert len(set(ids)) == total, f"lost {total - len(set(ids))}"
    counts = Counter(ids)
    repeated = [f"{ids[i]}: {where[i]}" for i in range(len(ids)) if counts[ids[i]] > 1]
    assert len(ids) == total, f"repeated {len(ids) - total}: {repeated[:20]}"
    check_order(log)
    assert by["second"] > 0, f"the second consumer got no partition: {by}"
    print(f"handled by each consumer: {by}")
