"""``redrive`` moving 1,000 dead letters back to their origin on the real brokers: listed by a dry run, filtered,
and moved by a process SIGKILLed midway and then run again — every message ends up at its origin and an
effectively-once consumer there handles each id exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pika
import pytest
from confluent_kafka import Consumer, TopicPartition

import reliable_messaging as rm
from reliable_messaging._redrive import REDRIVEN
from reliable_messaging.testing import wait_for

pytestmark = [pytest.mark.fault, pytest.mark.slow]

TOTAL = 1000

BROKERS = [pytest.param("kafka", marks=pytest.mark.kafka), pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]


def command(*args: str) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run([sys.executable, "-m", "reliable_messaging", "redrive", "--json", *args],
                          capture_output=True, text=True, timeout=180)
    report = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, report, done.stderr


def copies_at_origin(url: str, source: str) -> int:
    """Messages at the origin beyond the TOTAL originals (Kafka: its end offsets; RabbitMQ: its queue depth, which
    holds only copies, the originals having been consumed)."""
    if url.startswith("kafka"):
        consumer = Consumer({"bootstrap.servers": url.split("://", 1)[1], "group.id": "rm-test-watermarks"})
        try:
            partitions = consumer.list_topics(source, timeout=10).topics[source].partitions
            ends = sum(consumer.get_watermark_offsets(TopicPartition(source, p), timeout=10)[1] for p in partitions)
        finally:
            consumer.close()
        return ends - TOTAL
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(connection.channel().queue_declare(source, passive=True).method.message_count)
    finally:
        connection.close()


@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.timeout(300)
def test_redrive_killed_midway_and_rerun_moves_every_dead_letter_once(broker: str, url: str, unique_name: str,
                                                                      tmp_path: Path) -> None:
    source, group = unique_name, f"{unique_name}-g"
    ids = [f"{source}-{i:05d}" for i in range(TOTAL)]
    with rm.connect(url, name=f"{source}-first") as first:
        first.declare(source, source=source)
        for future in [first.publish(source, f"order {i}", key=f"k{i % 8}", message_id=mid)
                       for i, mid in enumerate(ids)]:
            future.result(timeout=60)

        def refuse(message: rm.Message) -> None:
            if message.body.startswith(b"order 1"):  # orders 1, 10-19, 100-199: another reason
                raise rm.Reject("downstream said no")
            raise rm.Reject("invalid order")

        consumer = first.consumer(source, refuse, group=group)
        consumer.start()
        wait_for(lambda: consumer.stats.dead_lettered == TOTAL, 90, f"{TOTAL} dead letters")
        consumer.stop()

    code, listed, err = command(url, "--from", f"{source}.{'DLT' if broker == 'kafka' else 'dlq'}", "--dry-run",
                                "--reason", "downstream")
    assert code == 0, err
    assert len(listed["listed"]) == 111 and listed["moved"] == 0, {k: v for k, v in listed.items() if k != "listed"}
    assert all(d["origin"] == source and d["error_type"].endswith("Reject") for d in listed["listed"]), listed
    code, listed, err = command(url, "--from", source, "--dry-run", "--max", "7")
    assert code == 0 and len(listed["listed"]) == 7, (listed, err)

    # Killed midway: some copies at the origin, the rest still dead letters.
    proc = subprocess.Popen([sys.executable, "-m", "reliable_messaging", "redrive", url, "--from", source,
                             "--rate", "400"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: copies_at_origin(url, source) >= 150, 60, "150 copies at the origin")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()
    moved_before = copies_at_origin(url, source)
    assert 150 <= moved_before < TOTAL, moved_before
    code, remaining, err = command(url, "--from", source, "--dry-run")
    assert code == 0 and 0 < len(remaining["listed"]) <= TOTAL - moved_before + 1, (len(remaining["listed"]), err)

    code, report, err = command(url, "--from", source)
    assert code == 0, err
    assert report["moved"] + moved_before in (TOTAL, TOTAL + 1), (report["moved"], moved_before)  # +1: in flight
    code, left, err = command(url, "--from", source, "--dry-run")
    assert code == 0 and left["listed"] == [], left

    handled: list[str] = []
    copies: list[int] = []

    def handle(message: rm.Message) -> None:
        handled.append(message.message_id)
        copies.append(int(message.headers[REDRIVEN]))

    with rm.connect(url, guarantee="effectively-once", dedup_path=tmp_path / "dedup.sqlite3",
                    name=f"{source}-second") as second:
        consumer = second.consumer(source, handle, group=group)
        consumer.start()
        wait_for(lambda: len(set(handled)) == TOTAL, 90, f"{TOTAL} redriven ids handled")
        time.sleep(1.0)  # a copy repeated by the kill would arrive here
        consumer.stop()
    counts = Counter(handled)
    assert sorted(counts) == ids and max(counts.values()) == 1, [m for m, n in counts.items() if n > 1]
    assert set(copies) == {1}, Counter(copies)


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", ["rabbitmq"])
def test_a_dead_letter_whose_copy_the_broker_refuses_stays_in_the_dead_letter_queue(
        broker: str, url: str, unique_name: str) -> None:
    """The origin queue is gone, so the copy is unroutable (mandatory): redrive fails and every dead letter stays.
    A redrive that acked before the broker confirmed the copy would lose the first one here."""
    def reject(message: rm.Message) -> None:
        raise rm.Reject("bad")

    with rm.connect(url, name=unique_name) as b:
        consumer = b.consumer(unique_name, reject)
        consumer.start()
        for i in range(5):
            b.publish(unique_name, f"order {i}").result(timeout=30)
        wait_for(lambda: consumer.stats.dead_lettered == 5, 60, "5 dead letters")
        assert consumer.stop(30) is True
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.queue_delete(unique_name)
        code, report, err = command(url, "--from", unique_name)
        assert code != 0 and "does not exist" in err, (code, report, err)
        assert channel.queue_declare(f"{unique_name}.dlq", passive=True).method.message_count == 5
    finally:
        connection.close()
