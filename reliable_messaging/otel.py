"""OpenTelemetry tracing across the broker (extra ``otel``: ``pip install "reliable-messaging[otel]"``).

:func:`instrument` makes a broker trace what it does, on every backend:

- ``publish()`` opens a PRODUCER span ``send <destination>``, writes its W3C trace context into the message's
  headers (``traceparent``, ``tracestate``), and ends the span when the broker answers (an error status with the
  exception if it refused the message);
- each handler call of its consumers opens a CONSUMER span ``process <source>``, the child of the producer's
  span carried in the headers, so one trace runs from the publishing request to the handler. Retry copies and
  dead letters keep the headers: every attempt is a child of the same producer span. A failed attempt records
  the exception and an event, ``retry`` or ``dead_letter``, saying what happens next.

::

    from reliable_messaging.otel import instrument

    broker = instrument(rm.connect(url))             # the global TracerProvider, or tracer_provider=...

Consumers created before :func:`instrument` are not traced. Attributes follow OpenTelemetry's messaging
conventions (``messaging.system``, ``messaging.destination.name``, ``messaging.message.id``,
``messaging.operation.type``) plus ``messaging.reliable.attempt``.

Written here rather than taken from an instrumentation package: OpenTelemetry's confluent-kafka and pika
instrumentations patch the clients' own produce/consume calls, which this library calls from its I/O threads
and batches, so their spans would not line up with a publish() future or a handler call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode

from ._broker import Broker
from ._dispatch import is_async
from ._errors import ConfigurationError
from ._message import DeliveryFuture, Message, OutgoingHeaders
from ._retry import RetryPolicy

__all__ = ["Tracing", "instrument"]

_SYSTEMS = {"kafka": "kafka", "amqp": "rabbitmq", "amqps": "rabbitmq", "memory": "memory"}


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads trace context from message headers (bytes on Kafka, str on RabbitMQ)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        return [value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


_GETTER = _HeaderGetter()


def instrument(broker: Broker, *, tracer_provider: trace.TracerProvider | None = None) -> Broker:
    """Trace ``broker``'s publishes and its consumers created from now on; returns the broker."""
    if not isinstance(broker, Broker):
        raise ConfigurationError(f"instrument() takes a broker (from rm.connect()), got {type(broker).__name__}",
                                 field="broker")
    from ._version import __version__

    tracer = trace.get_tracer("reliable_messaging", __version__, tracer_provider=tracer_provider)
    broker._tracing = Tracing(tracer, _SYSTEMS.get(broker.url.partition(":")[0], "other"))
    return broker


class Tracing:
    """The spans of one instrumented broker (:func:`instrument`); used by :class:`Broker`."""

    def __init__(self, tracer: trace.Tracer, system: str) -> None:
        self._tracer = tracer
        self._system = system

    def publish(self, destination: str, headers: OutgoingHeaders | None, message_id: str | None,
                send: Callable[[dict[str, Any]], DeliveryFuture]) -> DeliveryFuture:
        """Open the producer span, inject its context into a copy of ``headers``, ``send`` them, end on the answer."""
        span = self._tracer.start_span(f"send {destination}", kind=SpanKind.PRODUCER, attributes={
            "messaging.system": self._system, "messaging.destination.name": destination,
            "messaging.operation.type": "send"})
        carrier: dict[str, Any] = dict(headers or {})
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        try:
            future = send(carrier)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        span.set_attribute("messaging.message.id", future.message_id)

        def settled(done: Any) -> None:
            error = done.exception()
            if error is not None:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            span.end()

        future.add_done_callback(settled)
        return future

    def wrap(self, handler: Callable[[Any], Any], source: str, retry: RetryPolicy) -> Callable[[Any], Any]:
        """``handler`` inside a consumer span, the child of the context in the message's headers."""
        tracer, system = self._tracer, self._system

        @contextlib.contextmanager
        def span_for(message: Message) -> Iterator[None]:
            parent = propagate.extract(message.headers, getter=_GETTER)
            span = tracer.start_span(f"process {source}", context=parent, kind=SpanKind.CONSUMER, attributes={
                "messaging.system": system, "messaging.destination.name": source,
                "messaging.message.id": message.message_id, "messaging.operation.type": "process",
                "messaging.reliable.attempt": message.attempt})
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                yield
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                span.add_event("retry" if retry.will_retry(exc, message.attempt) else "dead_letter",
                               {"messaging.reliable.attempt": message.attempt})
                raise
            finally:
                otel_context.detach(token)
                span.end()

        if is_async(handler):
            async def traced_async(message: Message) -> Any:
                with span_for(message):
                    return await handler(message)

            return traced_async

        def traced(message: Message) -> Any:
            with span_for(message):
                return handler(message)

        return traced
