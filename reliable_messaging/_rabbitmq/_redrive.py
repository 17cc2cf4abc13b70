"""Dead letters of a RabbitMQ queue back to their origin (:func:`reliable_messaging.redrive` for ``amqp://``).

Takes the messages ``<source>.dlq`` held when the run started, one ``basic.get`` at a time (manual ack). Each one that
passes the filters is published to its origin queue through the default exchange — to that queue only, not to other
queues bound to the exchange it first came through, so its routing key becomes the queue's name — persistent,
``mandatory``, on a channel in confirm mode; only once the broker confirmed the copy is the dead letter acked. One
that does not pass the filters, and every one of a dry run, stays unacked until the end and then goes back to the
queue (closing the channel returns it, in order, flagged redelivered).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions

from .._errors import Nacked, ReliableMessagingError, Unroutable
from .._headers import ERROR_TYPE, REASON
from .._log import redact
from .._redrive import DeadLetter, RedriveReport, _text, copy_headers, matches, origin_of
from ._topology import _blocking_channel, dead_letter_queue_name

__all__ = ["redrive_queue"]

_BROKER_HEADERS = ("x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
                   "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason")
"""Written by the broker when it dead-letters; a copy sent back starts without them."""


def _origin(headers: dict[str, Any], source: str) -> str:
    deaths = headers.get("x-death")
    if headers.get("x-rm-origin") is None and isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        queue = deaths[0].get("queue")
        if queue:
            return _text(queue) or source
    return origin_of(headers, source)


def redrive_queue(url: str, source: str, *, limit: int | None, rate: float | None, error_type: str | None,
                  reason: str | None, dry_run: bool, timeout: float,
                  progress: Callable[[int], None] | None) -> RedriveReport:
    dlq = dead_letter_queue_name(source)
    report = RedriveReport(source=source, dead_letters=dlq, dry_run=dry_run)
    interval = 1.0 / rate if rate else 0.0
    # Leaving the block closes the connection, which returns the unacked (skipped, listed) dead letters.
    with _blocking_channel(url, timeout, f"rm-redrive.{source}", redact(url)) as reader:
        try:
            try:
                waiting = reader.queue_declare(dlq, passive=True).method.message_count
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == 404:
                    return report  # no dead-letter queue: nothing to move
                raise
            writer = reader.connection.channel()
            writer.confirm_delivery()
            for _ in range(waiting):
                if limit is not None and report.moved + len(report.listed) >= limit:
                    break
                method, properties, body = reader.basic_get(dlq, auto_ack=False)
                if method is None:
                    break
                headers: dict[str, Any] = dict(properties.headers or {})
                if not matches(headers, error_type, reason):
                    report.skipped += 1
                    continue
                origin = _origin(headers, source)
                if dry_run:
                    report.listed.append(DeadLetter(properties.message_id, origin, _text(headers.get(ERROR_TYPE)),
                                                    _text(headers.get(REASON))))
                    continue
                began = time.monotonic()
                _send_back(writer, origin, body, properties, headers, dlq)
                reader.basic_ack(method.delivery_tag)  # only now: the copy is confirmed
                report.moved += 1
                if progress is not None:
                    progress(report.moved)
                if interval:
                    time.sleep(max(0.0, interval - (time.monotonic() - began)))
        except pika.exceptions.AMQPError as exc:
            raise ReliableMessagingError(f"redrive of {dlq}: {type(exc).__name__}: {exc}") from exc
    return report


def _send_back(writer: Any, origin: str, body: bytes, properties: Any, headers: dict[str, Any], dlq: str) -> None:
    """Publish the copy to the origin queue (persistent, mandatory) and wait for its confirm."""
    copy = copy_headers({k: v for k, v in headers.items() if k not in _BROKER_HEADERS})
    sent = pika.BasicProperties(
        content_type=properties.content_type, content_encoding=properties.content_encoding,
        headers=copy, delivery_mode=pika.DeliveryMode.Persistent, priority=properties.priority,
        correlation_id=properties.correlation_id, message_id=properties.message_id,
        timestamp=properties.timestamp, type=properties.type, app_id=properties.app_id)
    try:
        writer.basic_publish("", origin, body, sent, mandatory=True)
    except pika.exceptions.UnroutableError as exc:
        raise Unroutable(f"redrive: queue {origin!r} does not exist: the dead letter stays in {dlq}",
                         message_id=properties.message_id, reply_code=312, reply_text="NO_ROUTE",
                         exchange="", routing_key=origin) from exc
    except pika.exceptions.NackError as exc:
        raise Nacked(f"redrive: the broker refused the copy for {origin!r}: the dead letter stays in {dlq}",
                     message_id=properties.message_id) from exc
