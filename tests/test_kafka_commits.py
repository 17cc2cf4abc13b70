"""The consumer's commit decisions, driven record by record without a broker.

A recording stand-in replaces the librdkafka consumer (commit, store_offsets,
seek, pause); records are real ``confluent_kafka.Message`` objects. The
integration tests show the same promises against a broker with SIGKILL; these
pin the exact commit sequence, including the cases a crash test rarely hits
(an asynchronous commit still unanswered when the bound is reached, a failed
republish in the middle of a batch).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from confluent_kafka import KafkaError, TopicPartition
from confluent_kafka import Message as RawMessage

from reliable_messaging import (
    CommitMode,
    DeliveryFailed,
    KafkaConsumer,
    KafkaConsumerConfig,
    KafkaMessage,
    RetryPolicy,
)

TOPIC = "orders"


class RecordingClient:
    """Stands in for confluent_kafka.Consumer: records what the consumer asks of the broker."""

    def __init__(self) -> None:
        self.commits: list[tuple[str, dict[tuple[str, int], int]]] = []
        self.stored: list[tuple[tuple[str, int], int]] = []
        self.seeks: list[tuple[str, int, int]] = []
        self.paused: list[tuple[str, int]] = []

    def commit(self, *, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> Any:
        positions = {(tp.topic, tp.partition): tp.offset for tp in offsets or []}
        self.commits.append(("async" if asynchronous else "sync", positions))
        return None if asynchronous else [TopicPartition(t, p, o) for (t, p), o in positions.items()]

    def store_offsets(self, *, offsets: list[TopicPartition]) -> None:
        self.stored.extend(((tp.topic, tp.partition), tp.offset) for tp in offsets)

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused.extend((tp.topic, tp.partition) for tp in tps)

    def close(self) -> None:
        pass


class FailingProducer:
    """A republisher whose broker refuses everything."""

    class config:  # mimics KafkaProducer.config: the one attribute the consumer reads
        delivery_timeout = 1.0

    def publish(self, topic: str, body: bytes, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_exception(DeliveryFailed("refused", code="TOPIC_AUTHORIZATION_FAILED"))
        return future

    def close(self, timeout: float = 0) -> None:
        pass


def record(offset: int, partition: int = 0) -> RawMessage:
    return RawMessage(topic=TOPIC, partition=partition, offset=offset, value=f"r{offset}".encode(),
                      headers=[("message-id", f"id-{partition}-{offset}".encode())], timestamp=(1, 1_700_000_000_000))


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.getLogger("reliable_messaging").setLevel(logging.CRITICAL)
    yield
    logging.getLogger("reliable_messaging").setLevel(logging.NOTSET)


def make(mode: CommitMode, handler: Any = None, **kwargs: Any) -> tuple[KafkaConsumer, RecordingClient]:
    config = KafkaConsumerConfig(bootstrap_servers="127.0.0.1:1", group_id="g", commit_mode=mode,
                                 commit_every=kwargs.pop("commit_every", 10), commit_interval=3600)
    consumer = KafkaConsumer(config, TOPIC, handler or (lambda m: None), create_topics=False, **kwargs)
    consumer._consumer.close()
    client = RecordingClient()
    consumer._consumer = client  # type: ignore[assignment]
    consumer._commits.client = client
    consumer._partitions.client = client
    consumer._on_assign(client, [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)])  # type: ignore[arg-type]
    return consumer, client


def test_manual_batch_commits_asynchronously_every_quarter_batch_one_at_a_time() -> None:
    consumer, client = make(CommitMode.MANUAL_BATCH, commit_every=12)
    consumer._handle_batch([record(o) for o in range(3)])
    assert client.commits == [("async", {(TOPIC, 0): 3})]
    consumer._handle_batch([record(o) for o in range(3, 7)])
    assert client.commits == [("async", {(TOPIC, 0): 3})], "one commit in flight at a time"
    consumer._on_commit(None, [TopicPartition(TOPIC, 0, 3)])  # the broker answers
    consumer._handle_batch([record(7)])  # 4 processed since the last commit went out: the next one goes
    assert client.commits[-1] == ("async", {(TOPIC, 0): 8})
    consumer._on_commit(None, [TopicPartition(TOPIC, 0, 8)])
    consumer._handle_batch([record(o) for o in range(8, 11)])
    assert client.commits[-1] == ("async", {(TOPIC, 0): 11})
    assert all(kind == "async" for kind, _ in client.commits)


def test_manual_batch_commits_synchronously_rather_than_exceed_the_bound() -> None:
    consumer, client = make(CommitMode.MANUAL_BATCH, commit_every=12)
    # No answer to the asynchronous commit at 3: record 13 would make 13 unacknowledged records.
    consumer._handle_batch([record(o) for o in range(13)])
    assert client.commits == [("async", {(TOPIC, 0): 3}), ("sync", {(TOPIC, 0): 12})]


def test_manual_batch_late_answer_after_a_sync_commit_changes_nothing() -> None:
    consumer, client = make(CommitMode.MANUAL_BATCH, commit_every=12)
    consumer._handle_batch([record(o) for o in range(13)])  # async at 3, sync at 12, then record 12
    consumer._on_commit(None, [TopicPartition(TOPIC, 0, 3)])  # the async commit's answer, late
    consumer._handle_batch([record(13)])
    assert client.commits[-1] == ("sync", {(TOPIC, 0): 12}), "2 records since the sync commit: no commit yet"
    consumer._handle_batch([record(14)])  # 3 = commit_every / 4 since the sync commit (which settled all)
    assert client.commits[-1] == ("async", {(TOPIC, 0): 15})


def test_manual_batch_failed_async_commit_counts_toward_the_bound() -> None:
    consumer, client = make(CommitMode.MANUAL_BATCH, commit_every=10)
    consumer._handle_batch([record(o) for o in range(5)])
    consumer._on_commit(KafkaError(KafkaError.REQUEST_TIMED_OUT), [])
    consumer._handle_batch([record(o) for o in range(5, 11)])
    kinds = [kind for kind, _ in client.commits]
    assert "sync" in kinds, "the failed commit's records were still uncommitted: the bound forced a sync commit"
    assert client.commits[kinds.index("sync")][1][(TOPIC, 0)] <= 10


def test_manual_commits_every_record_synchronously() -> None:
    consumer, client = make(CommitMode.MANUAL)
    consumer._handle_batch([record(0), record(1), record(0, partition=1)])
    assert client.commits == [("sync", {(TOPIC, 0): 1}), ("sync", {(TOPIC, 0): 2}), ("sync", {(TOPIC, 1): 1})]


def test_store_offsets_stores_after_each_record_and_commits_on_revoke() -> None:
    consumer, client = make(CommitMode.STORE_OFFSETS)
    consumer._handle_batch([record(0), record(1)])
    assert client.stored == [((TOPIC, 0), 1), ((TOPIC, 0), 2)]
    assert client.commits == []
    consumer._on_revoke(client, [TopicPartition(TOPIC, 0)])  # type: ignore[arg-type]
    assert client.commits == [("sync", {(TOPIC, 0): 2})]
    assert consumer.assignment() == {(TOPIC, 1)}


def test_revoke_commits_processed_offsets_synchronously() -> None:
    consumer, client = make(CommitMode.MANUAL_BATCH, commit_every=1000)
    consumer._handle_batch([record(0), record(1), record(7, partition=1)])
    assert client.commits == []
    consumer._on_revoke(client, [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)])  # type: ignore[arg-type]
    assert client.commits == [("sync", {(TOPIC, 0): 2, (TOPIC, 1): 8})]


def test_failed_republish_rewinds_the_partition_and_commits_stop_before_it() -> None:
    seen: list[int] = []

    def handler(message: KafkaMessage) -> None:
        seen.append(message.offset)
        if message.offset == 2:
            raise ValueError("boom")

    consumer, client = make(CommitMode.MANUAL, handler, producer=FailingProducer(),
                            retry=RetryPolicy(max_attempts=3))
    consumer._handle_batch([record(o) for o in range(5)] + [record(0, partition=1)])
    assert seen == [0, 1, 2, 0], "records after the failed one in partition 0 wait; partition 1 goes on"
    assert client.seeks == [(TOPIC, 0, 2)] and client.paused == [(TOPIC, 0)]
    committed_p0 = [positions[(TOPIC, 0)] for _, positions in client.commits if (TOPIC, 0) in positions]
    assert max(committed_p0) == 2, "never past the record whose outcome is unsettled"
    assert consumer.stats.extra["republish_failures"] == 1


def test_records_of_a_revoked_partition_are_not_processed() -> None:
    seen: list[tuple[int, int]] = []
    consumer, client = make(CommitMode.MANUAL_BATCH, lambda m: seen.append((m.partition, m.offset)))
    consumer._on_revoke(client, [TopicPartition(TOPIC, 1)])  # type: ignore[arg-type]
    # What the loop does with the records of a consume() during which a rebalance was served:
    kept = consumer._partitions.owned([record(0), record(0, partition=1)])
    consumer._handle_batch(kept)
    assert seen == [(0, 0)]


def test_records_carry_attempt_and_origin_from_retry_topics() -> None:
    seen: list[KafkaMessage] = []
    consumer, client = make(CommitMode.MANUAL_BATCH, seen.append)
    retry = RawMessage(topic=f"{TOPIC}.retry.2", partition=0, offset=9, value=b"again",
                       headers=[("message-id", b"m-1"), ("x-rm-attempt", b"3"), ("x-rm-due", b"0")],
                       timestamp=(1, 1_700_000_000_000))
    consumer._on_assign(client, [TopicPartition(f"{TOPIC}.retry.2", 0)])  # type: ignore[arg-type]
    consumer._handle_batch([retry])
    [message] = seen
    assert (message.attempt, message.redelivered, message.source, message.topic) == (3, True, TOPIC,
                                                                                     f"{TOPIC}.retry.2")
    assert message.message_id == "m-1" and message.timestamp == 1_700_000_000.0


def test_retry_record_not_yet_due_pauses_its_partition() -> None:
    import time

    seen: list[KafkaMessage] = []
    consumer, client = make(CommitMode.MANUAL_BATCH, seen.append)
    due = str(int(time.time() * 1000) + 60_000).encode()
    waiting = RawMessage(topic=f"{TOPIC}.retry.1", partition=0, offset=4, value=b"later",
                         headers=[("message-id", b"m-2"), ("x-rm-attempt", b"2"), ("x-rm-due", due)],
                         timestamp=(1, 1_700_000_000_000))
    consumer._on_assign(client, [TopicPartition(f"{TOPIC}.retry.1", 0)])  # type: ignore[arg-type]
    consumer._handle_batch([waiting, record(0)])
    assert [m.topic for m in seen] == [TOPIC], "the main topic goes on"
    assert client.seeks == [(f"{TOPIC}.retry.1", 0, 4)]
    assert 55 < consumer._partitions.paused[(f"{TOPIC}.retry.1", 0)] - time.monotonic() <= 60
