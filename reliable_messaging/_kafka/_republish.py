"""Where a failed Kafka record goes: a copy to ``<topic>.retry.<n>`` (with a due time) or ``<topic>.DLT``.

A failed record is not retried in place, which would stall its partition: a copy goes to a retry
topic with the attempt it waits for and the time it is due, and the original's offset counts as
processed once the broker has the copy (``acks=all``). When the attempts are used up (or the
handler raised :class:`~reliable_messaging.Reject`, or the record could not be decoded) the copy
goes to the dead-letter topic instead. Both carry the library's headers (:mod:`.._headers`):
origin topic, partition and offset, first failure, attempt, reason, error type and message.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import _headers as h
from .._errors import ReliableMessagingError
from .._handling import Disposition, Outcome
from .._log import limit_repeats
from .._message import MESSAGE_ID_HEADER, header_count
from ._config import KafkaConsumerConfig, KafkaProducerConfig
from ._message import KafkaMessage
from ._producer import KafkaProducer
from ._topology import TopicNames

__all__ = ["Republisher"]

logger = limit_repeats(logging.getLogger("reliable_messaging.kafka.consumer"))

_PRODUCER_SECURITY_PREFIXES = ("security.", "sasl.", "ssl.")


class Republisher:
    """Publishes retry and dead-letter copies for one consumer (its own producer unless given one)."""

    def __init__(self, config: KafkaConsumerConfig, names: TopicNames, levels: int,
                 producer: KafkaProducer | None = None) -> None:
        self.config = config
        self.names = names
        self.levels = levels
        self._producer = producer
        self._own_producer = producer is None

    def settle(self, message: KafkaMessage, outcome: Outcome) -> bool:
        """Republish a failed record to its retry or dead-letter topic; True once the broker has it."""
        return self.settle_many([(message, outcome)])[0]

    def settle_many(self, failed: list[tuple[KafkaMessage, Outcome]]) -> list[bool]:
        """:meth:`settle` for several records: all published at once, then waited for."""
        return self._publish_all([self._copy(message, outcome) for message, outcome in failed])

    def _copy(self, message: KafkaMessage, outcome: Outcome) -> tuple[str, KafkaMessage, dict[str, Any]]:
        retry = outcome.disposition is Disposition.RETRY
        attempt = message.attempt + 1 if retry and outcome.counts_attempt else message.attempt
        deferrals = None if outcome.counts_attempt else header_count(message.headers.get(h.DEFERRALS)) + 1
        out = h.failure_headers(message.headers, origin=message.source, reason=outcome.reason, error=outcome.error,
                                attempt=attempt, deferrals=deferrals)
        out.pop(MESSAGE_ID_HEADER, None)  # publish() writes it from message_id
        out.setdefault(h.ORIGIN_PARTITION, str(message.partition))
        out.setdefault(h.ORIGIN_OFFSET, str(message.offset))
        if retry:
            topic = self.names.retry(message.source, min(max(attempt - 1, 1), self.levels))
            out[h.DUE] = str(int(time.time() * 1000) + round(outcome.delay * 1000))
        else:
            topic = self.names.dead_letter(message.source)
        return topic, message, {k: str(v) if isinstance(v, int) else v for k, v in out.items()}

    def _publish_all(self, copies: list[tuple[str, KafkaMessage, dict[str, Any]]]) -> list[bool]:
        producer = self._producer
        if producer is None:
            producer = self._producer = KafkaProducer(KafkaProducerConfig(
                bootstrap_servers=self.config.bootstrap_servers,
                client_id=f"{self.config.client_id}-republisher",
                linger=0.0,
                delivery_timeout=30.0,
                extra={k: v for k, v in self.config.extra.items() if k.startswith(_PRODUCER_SECURITY_PREFIXES)},
            ))
        futures: list[Any] = []
        for topic, message, headers in copies:
            try:
                futures.append(producer.publish(topic, message.body, key=message.key, headers=headers,
                                                message_id=message.message_id))
            except ReliableMessagingError as exc:
                futures.append(exc)
        deadline = time.monotonic() + producer.config.delivery_timeout + 10.0
        results: list[bool] = []
        for (topic, message, _headers), future in zip(copies, futures, strict=True):
            try:
                if isinstance(future, ReliableMessagingError):
                    raise future
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except (ReliableMessagingError, TimeoutError) as exc:  # not stored: the record is read again
                logger.warning("could not publish message %s to %s (%s: %s); %s[%d]@%d will be read again",
                               message.message_id, topic, type(exc).__name__, exc, message.topic,
                               message.partition, message.offset)
                results.append(False)
                continue
            results.append(True)
        return results

    def close(self) -> None:
        if self._own_producer and self._producer is not None:
            self._producer.close()
