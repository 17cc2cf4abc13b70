"""OpenTelemetry tracing on the in-process backend: one trace from publish() to every handler attempt."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import reliable_messaging as rm
from reliable_messaging.otel import instrument
from reliable_messaging.testing import wait_for

FAST = rm.RetryPolicy(max_attempts=3, initial_delay=0.05, max_delay=0.05, jitter=0.0)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def spans(exporter: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is kind]


@pytest.mark.parametrize("use_async", [False, True])
def test_every_attempt_is_a_child_of_the_publish_and_says_what_comes_next(
        exporter: InMemorySpanExporter, provider: TracerProvider, use_async: bool) -> None:
    def decide(message: rm.Message) -> None:
        if message.body == b"twice" and message.attempt == 1:
            raise rm.Retry("not yet")
        if message.body == b"bad":
            raise rm.Reject("invalid")

    async def async_handler(message: rm.Message) -> None:
        await asyncio.sleep(0)
        decide(message)

    with instrument(rm.connect("memory://otel-unit", retry=FAST), tracer_provider=provider) as broker:
        broker.consumer("orders", async_handler if use_async else decide).start()
        for body in (b"once", b"twice", b"bad"):
            broker.publish("orders", body).result(timeout=5)
        wait_for(lambda: len(spans(exporter, SpanKind.CONSUMER)) == 4, 10, "4 handler calls")

    [*producers] = spans(exporter, SpanKind.PRODUCER)
    assert {p.name for p in producers} == {"send orders"} and len(producers) == 3
    by_id = {p.attributes["messaging.message.id"]: p for p in producers}  # type: ignore[index]
    for consumer in spans(exporter, SpanKind.CONSUMER):
        producer = by_id[consumer.attributes["messaging.message.id"]]  # type: ignore[index]
        assert consumer.name == "process orders"
        assert consumer.context.trace_id == producer.context.trace_id, "one trace from publish to handler"
        assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id
    attempts = sorted((c.attributes["messaging.reliable.attempt"], [e.name for e in c.events],  # type: ignore[index]
                       c.status.status_code) for c in spans(exporter, SpanKind.CONSUMER))
    assert attempts == [(1, [], StatusCode.UNSET), (1, ["exception", "dead_letter"], StatusCode.ERROR),
                        (1, ["exception", "retry"], StatusCode.ERROR), (2, [], StatusCode.UNSET)]


def test_a_refused_publish_ends_its_span_with_the_error(exporter: InMemorySpanExporter,
                                                        provider: TracerProvider) -> None:
    with instrument(rm.connect("memory://otel-refused"), tracer_provider=provider) as broker:
        broker.publish("q", b"x").result(timeout=5)
    with pytest.raises(rm.ClosedError):
        broker.publish("q", b"after close")
    [ok, closed] = spans(exporter, SpanKind.PRODUCER)
    assert ok.status.status_code is StatusCode.UNSET
    assert closed.status.status_code is StatusCode.ERROR and closed.events[0].name == "exception"


def test_will_retry_agrees_with_the_consumers() -> None:
    policy = rm.RetryPolicy(max_attempts=3, not_retryable=(ValueError,),
                            by_error={TimeoutError: rm.RetryPolicy(max_attempts=2)})
    assert policy.will_retry(KeyError(), 2) and not policy.will_retry(KeyError(), 3)
    assert not policy.will_retry(ValueError(), 1) and not policy.will_retry(rm.Reject("x"), 1)
    assert policy.will_retry(TimeoutError(), 1) and not policy.will_retry(TimeoutError(), 2)
    assert policy.will_retry(rm.Retry("later"), 2) and not policy.will_retry(rm.Retry("later"), 3)


def test_instrument_takes_only_brokers() -> None:
    with pytest.raises(rm.ConfigurationError):
        instrument("memory://x")  # type: ignore[arg-type]
