"""OpenTelemetry through real brokers: the W3C trace context crosses Kafka and RabbitMQ in the message headers,
through the retry copies and to the dead letter, so every handler attempt is a child of its publish."""

from __future__ import annotations

import time

import pika
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import reliable_messaging as rm
from reliable_messaging.otel import instrument
from reliable_messaging.testing import wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("broker", ["kafka", "rabbitmq"])
def test_one_trace_from_publish_to_every_attempt_and_the_dead_letter(broker: str, url: str, unique_name: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    dead: list[rm.Message] = []

    def handle(message: rm.Message) -> None:
        if message.body == b"twice" and message.attempt == 1:
            raise rm.Retry("not yet", delay=0.2)
        if message.body == b"bad":
            raise rm.Reject("invalid")

    def consumers() -> list:  # type: ignore[type-arg]
        return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CONSUMER]

    with instrument(rm.connect(url, name=unique_name), tracer_provider=provider) as b:
        b.consumer(unique_name, handle, group=unique_name).start()
        for body in (b"once", b"twice", b"bad"):
            b.publish(unique_name, body).result(timeout=30)
        wait_for(lambda: len(consumers()) == 4, 60, "4 handler calls")
        letter = dead_letter(url, b, unique_name, dead)

    producers = {p.attributes["messaging.message.id"]: p  # type: ignore[index]
                 for p in exporter.get_finished_spans() if p.kind is SpanKind.PRODUCER}
    assert len(producers) == 3
    handled = [c for c in consumers() if c.name == f"process {unique_name}"]
    assert len(handled) == 4
    for span in handled:
        producer = producers[span.attributes["messaging.message.id"]]  # type: ignore[index]
        assert span.context.trace_id == producer.context.trace_id
        assert span.parent is not None and span.parent.span_id == producer.context.span_id
    events = sorted((s.attributes["messaging.reliable.attempt"], [e.name for e in s.events][1:])  # type: ignore[index]
                    for s in handled)
    assert events == [(1, []), (1, ["dead_letter"]), (1, ["retry"]), (2, [])], events
    # The dead letter carries the context too: whoever reads it continues the same trace.
    _version, trace_id, _span, _flags = letter["traceparent"].split("-")
    assert int(trace_id, 16) == producers[letter["message_id"]].context.trace_id


def dead_letter(url: str, b: rm.Broker, source: str, dead: list[rm.Message]) -> dict[str, str]:
    """The dead letter's ``traceparent`` header and message id (RabbitMQ: read raw, the DLQ is the library's)."""
    if url.startswith("amqp"):
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = connection.channel()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                method, properties, _body = channel.basic_get(f"{source}.dlq", auto_ack=True)
                if method is not None:
                    return {"traceparent": str(properties.headers["traceparent"]),
                            "message_id": properties.message_id}
                time.sleep(0.1)
        finally:
            connection.close()
        raise AssertionError("no dead letter")
    b.consumer(b.dead_letter_source(source), dead.append, group=f"{source}.dlt-reader").start()
    wait_for(lambda: len(dead) == 1, 60, "the dead letter")
    raw = dead[0].headers["traceparent"]
    return {"traceparent": raw.decode() if isinstance(raw, bytes) else str(raw), "message_id": dead[0].message_id}
