"""The RabbitMQ adapter's public names, and the pika internals the adapter relies on."""

from __future__ import annotations

import inspect

import pika

import reliable_messaging
import reliable_messaging._rabbitmq as adapter
from reliable_messaging._rabbitmq._connection import Connection


def test_exports_are_sorted_complete_and_importable_from_the_package() -> None:
    assert list(adapter.__all__) == sorted(adapter.__all__)
    for name in adapter.__all__:
        assert name in reliable_messaging.__all__
        assert getattr(reliable_messaging, name) is getattr(adapter, name)


def test_basic_properties_positional_order_used_on_the_publish_path() -> None:
    # RabbitMQPublisher.publish builds BasicProperties positionally (cheaper per message).
    names = list(inspect.signature(pika.BasicProperties.__init__).parameters)[1:14]
    assert names == ["content_type", "content_encoding", "headers", "delivery_mode", "priority", "correlation_id",
                     "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id"]


def test_pika_internals_behind_corked_writes_exist() -> None:
    # Connection.cork() overrides these private pika methods; if pika renames them the override must go.
    assert callable(pika.SelectConnection._output_marshaled_frames)
    assert callable(pika.SelectConnection._adapter_emit_data)
    assert Connection._output_marshaled_frames is not pika.SelectConnection._output_marshaled_frames
