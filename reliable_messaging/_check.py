"""Broker settings that quietly undo a guarantee: ``reliable-messaging check`` and :func:`check`.

A guarantee preset sets the client's side (acks, confirms, commits); what the broker was told about the topic or
queue decides the rest. A topic with one replica loses acknowledged messages with its broker; ``min.insync.replicas``
at 1 makes ``acks=all`` no stronger than ``acks=1``; a queue that is not durable disappears with a restart, with its
messages; a dead-letter exchange bound to nothing drops what the consumer rejects. :func:`check` reads the broker's
actual settings and returns findings with a severity; each backend knows its own rules (``_kafka._check``,
``_rabbitmq._check``).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from ._broker import Guarantee
from ._errors import ConfigurationError

__all__ = ["Finding", "Severity", "check"]


class Severity(str, enum.Enum):
    """How bad a finding is: ``error`` undoes the guarantee (the command exits 1), ``warning`` weakens it or
    leaves it to luck, ``ok`` is a setting checked and found right."""

    ERROR = "error"
    WARNING = "warning"
    OK = "ok"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One setting checked: its severity, what it is about (a topic, queue, exchange, group) and why it matters."""

    severity: Severity
    subject: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"severity": self.severity.value, "subject": self.subject, "message": self.message}


def check(
    url: str,
    *,
    topic: str | None = None,
    queue: str | None = None,
    guarantee: Guarantee | str = Guarantee.AT_LEAST_ONCE,
    group: str | None = None,
    management_url: str | None = None,
    timeout: float = 10.0,
) -> list[Finding]:
    """Read the broker's settings for ``topic`` (``kafka://``) or ``queue`` (``amqp://``) and judge them against
    ``guarantee``. Kafka: ``group`` adds the consumer group's lag. RabbitMQ: queue arguments come from the
    management HTTP API (``management_url``, default ``http://<host>:15672`` with the URL's credentials); without
    it only the queue's existence is checked, with a warning that says so.

    Raises :class:`ConfigurationError` for invalid arguments and
    :class:`~reliable_messaging.BrokerUnavailable` when the broker cannot be reached within ``timeout``.
    """
    try:
        preset = Guarantee(guarantee)
    except ValueError:
        raise ConfigurationError(f"guarantee must be one of {', '.join(g.value for g in Guarantee)}, "
                                 f"got {guarantee!r}", field="guarantee") from None
    scheme = url.split("://", 1)[0].lower() if isinstance(url, str) and "://" in url else ""
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigurationError(f"timeout must be a number of seconds > 0, got {timeout!r}", field="timeout")
    if scheme == "kafka":
        if not topic or queue:
            raise ConfigurationError("a kafka:// URL is checked for a topic: give topic=, not queue=", field="topic")
        from ._kafka._check import check_topic

        return check_topic(url.split("://", 1)[1].strip("/"), topic, preset, group=group, timeout=timeout)
    if scheme in ("amqp", "amqps"):
        if not queue or topic or group:
            raise ConfigurationError("an amqp:// URL is checked for a queue: give queue=, not topic= or group=",
                                     field="queue")
        from ._rabbitmq._check import check_queue

        return check_queue(url, queue, preset, management_url=management_url, timeout=timeout)
    raise ConfigurationError("check needs a kafka://, amqp:// or amqps:// URL", field="url")
