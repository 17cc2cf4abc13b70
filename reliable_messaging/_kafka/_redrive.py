"""Dead letters of a Kafka topic back to their origin (:func:`reliable_messaging.redrive` for ``kafka://``).

Reads ``<source>.DLT`` with its own consumer group, ``rm-redrive.<source>``, from that group's committed offsets (the
beginning the first time) to the end the topic had when the run started. Each dead letter that passes the filters
is republished with an ``acks=all`` idempotent producer, and only once that copy is acknowledged is the group's
offset committed past it (synchronously): a crash in between moves it again on the next run, with the same message
id. A dead letter that does not pass the filters is passed too (the topic is a log: the group's position is linear);
it stays in the topic, and a new group would read it again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from .._errors import ReliableMessagingError
from .._headers import ERROR_TYPE, REASON
from .._message import MESSAGE_ID_HEADER
from .._redrive import DeadLetter, RedriveReport, _text, copy_headers, matches, origin_of
from ._config import KafkaProducerConfig
from ._errors import operation_error
from ._producer import KafkaProducer
from ._topology import TopicNames

__all__ = ["redrive_topic"]

logger = logging.getLogger("reliable_messaging.kafka.redrive")


def redrive_topic(bootstrap_servers: str, source: str, *, limit: int | None, rate: float | None,
                  error_type: str | None, reason: str | None, dry_run: bool, timeout: float,
                  progress: Callable[[int], None] | None) -> RedriveReport:
    dlt = TopicNames().dead_letter(source)
    report = RedriveReport(source=source, dead_letters=dlt, dry_run=dry_run)
    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": f"rm-redrive.{source}",
                         "enable.auto.commit": False, "enable.auto.offset.store": False,
                         "auto.offset.reset": "earliest", "logger": logger})
    producer: KafkaProducer | None = None
    try:
        ends = _positions(consumer, dlt, timeout)
        if not ends:
            return report
        producer = KafkaProducer(KafkaProducerConfig(bootstrap_servers=bootstrap_servers,
                                                     client_id=f"rm-redrive.{source}"))
        pending = {p for p, (start, end) in ends.items() if start < end}
        consumer.assign([TopicPartition(dlt, p, ends[p][0]) for p in pending])
        interval = 1.0 / rate if rate else 0.0
        idle_since = time.monotonic()
        passed: dict[int, int] = {}  # partition -> the offset after the last dead letter moved or skipped
        while pending and (limit is None or report.moved + len(report.listed) < limit):
            record = consumer.poll(min(1.0, timeout))
            if record is None:
                if time.monotonic() - idle_since > timeout:
                    raise ReliableMessagingError(f"redrive: no record of {dlt} arrived within {timeout:g} s while "
                                                 f"partitions {sorted(pending)} had more")
                continue
            idle_since = time.monotonic()
            err = record.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise operation_error(f"reading {dlt}", KafkaException(err))
            partition, offset = record.partition() or 0, record.offset() or 0
            end = ends[partition][1]
            if offset >= end:  # written after the run started
                pending.discard(partition)
                continue
            headers: dict[str, Any] = dict(record.headers() or [])
            if not matches(headers, error_type, reason):
                report.skipped += 1
                passed[partition] = offset + 1
            elif dry_run:
                report.listed.append(DeadLetter(_text(headers.get(MESSAGE_ID_HEADER)), origin_of(headers, source),
                                                _text(headers.get(ERROR_TYPE)), _text(headers.get(REASON))))
            else:
                began = time.monotonic()
                copy = copy_headers(headers)
                message_id = _text(copy.pop(MESSAGE_ID_HEADER, None))
                future = producer.publish(origin_of(headers, source), record.value() or b"", key=record.key(),
                                          headers=copy, message_id=message_id)
                future.result(timeout=timeout)  # raises DeliveryError: the dead letter stays, uncommitted
                _commit(consumer, TopicPartition(dlt, partition, offset + 1))
                passed[partition] = offset + 1
                report.moved += 1
                if progress is not None:
                    progress(report.moved)
                if interval:
                    time.sleep(max(0.0, interval - (time.monotonic() - began)))
            if offset + 1 >= end:
                pending.discard(partition)
        if not dry_run:  # skipped ones after the last one moved are passed too
            for partition, offset in passed.items():
                _commit(consumer, TopicPartition(dlt, partition, offset))
        return report
    finally:
        if producer is not None:
            producer.close(timeout=timeout)
        consumer.close()


def _positions(consumer: Consumer, dlt: str, timeout: float) -> dict[int, tuple[int, int]]:
    """Per partition of ``dlt``: (where this run starts, the end offset now); empty if the topic does not exist."""
    try:
        metadata = consumer.list_topics(dlt, timeout=timeout)
        info = metadata.topics.get(dlt)
        if info is None or info.error is not None or not info.partitions:
            return {}
        tps = [TopicPartition(dlt, p) for p in sorted(info.partitions)]
        committed = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=timeout)}
        out: dict[int, tuple[int, int]] = {}
        for tp in tps:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            start = committed.get(tp.partition, -1)
            out[tp.partition] = (max(start, low) if start >= 0 else low, high)
        return out
    except KafkaException as exc:
        raise operation_error(f"reading the offsets of {dlt}", exc) from exc


def _commit(consumer: Consumer, position: TopicPartition) -> None:
    try:
        consumer.commit(offsets=[position], asynchronous=False)
    except KafkaException as exc:
        raise operation_error(f"committing the redrive of {position.topic}[{position.partition}]", exc) from exc
