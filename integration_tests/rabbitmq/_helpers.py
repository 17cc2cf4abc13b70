"""Raw-pika helpers for the RabbitMQ integration tests: counts, draining, cleanup, waiting with deadlines.

Independent of the library on purpose: what the tests assert about the broker is read with
plain pika, so a bug in the adapter cannot hide itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions

from reliable_messaging import RabbitMQTopology


@dataclass
class Got:
    """One message read back with basic.get."""

    body: bytes
    message_id: str | None
    headers: dict[str, Any]
    redelivered: bool


@dataclass
class Admin:
    url: str
    name: str
    queues: set[str] = field(default_factory=set)
    exchanges: set[str] = field(default_factory=set)

    def connect(self) -> pika.BlockingConnection:
        params = pika.URLParameters(self.url)
        params.client_properties = {"connection_name": self.name}
        params.connection_attempts = 3
        params.retry_delay = 1
        params.socket_timeout = 5
        return pika.BlockingConnection(params)

    def cleanup(self, topology: RabbitMQTopology | None = None, *, queues: tuple[str, ...] = (),
                exchanges: tuple[str, ...] = ()) -> None:
        if topology is not None:
            self.queues.update(q.name for q in topology.queues)
            self.exchanges.update(e.name for e in topology.exchanges)
        self.queues.update(queues)
        self.exchanges.update(exchanges)

    def count(self, queue: str) -> int:
        """Ready messages in ``queue`` (unacknowledged ones are not counted)."""
        conn = self.connect()
        try:
            return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
        finally:
            conn.close()

    def exists(self, queue: str) -> bool:
        conn = self.connect()
        try:
            conn.channel().queue_declare(queue, passive=True)
            return True
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return False
            raise
        finally:
            if conn.is_open:
                conn.close()

    def drain(self, queue: str, *, ack: bool = True, limit: int = 1_000_000) -> list[Got]:
        """basic.get every ready message of ``queue`` (acknowledged unless ``ack=False``)."""
        conn = self.connect()
        got: list[Got] = []
        try:
            channel = conn.channel()
            while len(got) < limit:
                method, props, body = channel.basic_get(queue, auto_ack=ack)
                if method is None:
                    break
                got.append(Got(body, props.message_id, dict(props.headers or {}), bool(method.redelivered)))
            return got
        finally:
            conn.close()

    def publish(self, exchange: str, routing_key: str, bodies: list[bytes], *, message_ids: list[str] | None = None,
                headers: dict[str, Any] | None = None) -> None:
        """Raw confirmed, persistent publishes (to fill a queue independently of the library)."""
        conn = self.connect()
        try:
            channel = conn.channel()
            channel.confirm_delivery()
            for i, body in enumerate(bodies):
                mid = message_ids[i] if message_ids else f"m-{i}"
                channel.basic_publish(exchange, routing_key, body,
                                      pika.BasicProperties(delivery_mode=2, message_id=mid, headers=headers),
                                      mandatory=True)
        finally:
            conn.close()

    def declare(self, topology: RabbitMQTopology) -> None:
        self.cleanup(topology)
        topology.declare(self.url)

    def delete_queue(self, queue: str) -> None:
        conn = self.connect()
        try:
            conn.channel().queue_delete(queue)
        finally:
            conn.close()

    def delete_registered(self) -> None:
        if not self.queues and not self.exchanges:
            return
        conn = self.connect()
        try:
            for queue in sorted(self.queues):
                channel = conn.channel()
                channel.queue_delete(queue)
                channel.close()
            for exchange in sorted(self.exchanges):
                channel = conn.channel()
                channel.exchange_delete(exchange)
                channel.close()
        finally:
            conn.close()
