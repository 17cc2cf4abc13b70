"""RabbitMQPublisher against a real broker: confirms, returns, nacks, bad input, timeouts, typed errors."""

from __future__ import annotations

import asyncio
import concurrent.futures
import decimal
import time

import pytest

from reliable_messaging import (
    BrokerUnavailable,
    ClosedError,
    ConfigurationError,
    Delivery,
    DeliveryFailed,
    DeliveryTimeout,
    InvalidMessage,
    Nacked,
    RabbitMQBinding,
    RabbitMQExchange,
    RabbitMQExchangeType,
    RabbitMQPublisher,
    RabbitMQPublisherConfig,
    RabbitMQQueue,
    RabbitMQTopology,
    RetryPolicy,
    Unroutable,
)
from reliable_messaging.testing import RabbitMQEndpoint, wait_for
from reliable_messaging.testing.plugin import ProxiedEndpoint

from ._helpers import Admin

pytestmark = [pytest.mark.rabbitmq]


def _config(url: str, name: str, **overrides: object) -> RabbitMQPublisherConfig:
    return RabbitMQPublisherConfig(url=url, connection_name=name, **overrides)  # type: ignore[arg-type]


@pytest.mark.timeout(120)
def test_ten_thousand_confirmed_publishes_are_all_acked_pipelined(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology.work_queue(queue_name)
    admin.cleanup(topology)
    n = 10_000
    with RabbitMQPublisher(_config(rabbitmq_endpoint.url, connection_name, max_in_flight=500),
                           topology=topology) as publisher:
        futures = [publisher.publish(queue_name, queue_name, f"message {i}".encode()) for i in range(n)]
        deliveries = [f.result(timeout=60) for f in futures]
        stats = publisher.stats
    assert all(isinstance(d, Delivery) for d in deliveries)
    assert [d.message_id for d in deliveries] == [f.message_id for f in futures]
    assert len({f.message_id for f in futures}) == n, "message ids must be unique"
    assert stats.confirmed == n and stats.nacked == stats.returned == stats.failed == stats.timed_out == 0
    # Pipelined: many publishes were unconfirmed at once, never more than the window.
    assert 1 < stats.max_in_flight <= 500
    # The broker confirmed batches with multiple=True, and every future still resolved.
    assert stats.multiple_acks > 0
    assert admin.count(queue_name) == n


@pytest.mark.timeout(60)
def test_unroutable_mandatory_publishes_fail_exactly_their_own_futures(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    exchange = f"{queue_name}.x"
    topology = RabbitMQTopology(
        exchanges=(RabbitMQExchange(name=exchange, type=RabbitMQExchangeType.DIRECT),),
        queues=(RabbitMQQueue(name=queue_name),),
        bindings=(RabbitMQBinding(queue=queue_name, exchange=exchange, routing_key="routed"),),
    )
    admin.cleanup(topology)
    with RabbitMQPublisher(_config(rabbitmq_endpoint.url, connection_name), topology=topology) as publisher:
        keys = ["nowhere" if i % 10 == 3 else "routed" for i in range(300)]
        futures = [publisher.publish(exchange, key, f"{i}".encode()) for i, key in enumerate(keys)]
        not_mandatory = publisher.publish(exchange, "nowhere", b"dropped silently", mandatory=False)
        concurrent.futures.wait(futures, timeout=30)
        for key, future in zip(keys, futures, strict=True):
            if key == "routed":
                assert future.result(timeout=0).message_id == future.message_id
            else:
                error = future.exception(timeout=0)
                assert isinstance(error, Unroutable), error
                assert (error.reply_code, error.reply_text) == (312, "NO_ROUTE")
                assert (error.exchange, error.routing_key) == (exchange, "nowhere")
                assert error.message_id == future.message_id
        # Without mandatory the broker drops an unroutable message and still confirms it.
        assert isinstance(not_mandatory.result(timeout=10), Delivery)
        assert publisher.stats.returned == 30
    assert admin.count(queue_name) == 270


@pytest.mark.timeout(60)
def test_reject_publish_overflow_nacks_fail_their_futures(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name, max_length=5, overflow="reject-publish"),))
    admin.cleanup(topology)
    with RabbitMQPublisher(_config(rabbitmq_endpoint.url, connection_name), topology=topology) as publisher:
        futures = [publisher.publish("", queue_name, f"{i}".encode()) for i in range(20)]
        concurrent.futures.wait(futures, timeout=30)
        outcomes = [f.exception(timeout=0) for f in futures]
        assert publisher.stats.nacked == 15
    # The broker processes a channel's publishes in order: the first five fit, the rest are refused.
    assert outcomes[:5] == [None] * 5
    for error, future in zip(outcomes[5:], futures[5:], strict=True):
        assert isinstance(error, Nacked) and error.message_id == future.message_id
    assert admin.count(queue_name) == 5
    assert [g.message_id for g in admin.drain(queue_name)] == [f.message_id for f in futures[:5]]


@pytest.mark.timeout(60)
def test_invalid_messages_fail_at_call_time_and_nothing_else_is_lost(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name),))
    admin.cleanup(topology)
    with RabbitMQPublisher(_config(rabbitmq_endpoint.url, connection_name), topology=topology) as publisher:
        first = publisher.publish("", queue_name, b"first", headers={"price": decimal.Decimal("1.50"), "n": 3})
        started = time.monotonic()
        with pytest.raises(InvalidMessage, match="body must be bytes"):
            publisher.publish("", queue_name, 42)  # type: ignore[arg-type]
        with pytest.raises(InvalidMessage, match="cannot encode floats"):
            publisher.publish("", queue_name, b"x", headers={"price": 1.5})
        with pytest.raises(InvalidMessage, match="at most 255"):
            publisher.publish("", "q" * 300, b"x")
        with pytest.raises(InvalidMessage, match="priority"):
            publisher.publish("", queue_name, b"x", priority=1000)
        assert time.monotonic() - started < 1.0
        last = publisher.publish("", queue_name, b"last", message_id="my-own-id", expiration=60)
        assert first.result(timeout=10).message_id == first.message_id
        assert last.result(timeout=10).message_id == "my-own-id"
    got = admin.drain(queue_name)
    assert [g.body for g in got] == [b"first", b"last"]
    assert got[0].headers == {"price": decimal.Decimal("1.50"), "n": 3}
    assert got[1].message_id == "my-own-id"


@pytest.mark.timeout(60)
def test_publish_to_a_missing_exchange_fails_that_message_only(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name),))
    admin.cleanup(topology)
    missing = f"{queue_name}.no-such-exchange"
    with RabbitMQPublisher(_config(rabbitmq_endpoint.url, connection_name), topology=topology) as publisher:
        futures = []
        for i in range(50):
            futures.append(publisher.publish("", queue_name, f"{i}".encode()))
            if i in (10, 30):
                futures.append(publisher.publish(missing, "k", b"lost"))
        concurrent.futures.wait(futures, timeout=30)
        failures = [f.exception(timeout=0) for f in futures]
        assert publisher.stats.channel_failures >= 1
    bad = [e for e in failures if e is not None]
    assert len(bad) == 2
    assert all(isinstance(e, DeliveryFailed) and e.code == 404 for e in bad)
    # The broker dropped the publishes after the failing one on the closed channel, and the confirms
    # of earlier ones it had stored: all were republished on a new channel. At-least-once: every
    # good message is there, some twice (same message id, for consumers to deduplicate).
    got = admin.drain(queue_name)
    assert {int(g.body) for g in got} == set(range(50))
    ids = {int(g.body): g.message_id for g in got}
    assert all(ids[int(g.body)] == g.message_id for g in got), "a duplicate must carry the original message id"


@pytest.mark.timeout(60)
def test_futures_are_awaitable_and_publish_is_thread_safe(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name),))
    admin.cleanup(topology)
    with RabbitMQPublisher(_config(rabbitmq_endpoint.url, connection_name), topology=topology) as publisher:

        async def publish_and_await() -> list[Delivery]:
            return list(await asyncio.gather(*(publisher.publish("", queue_name, b"async") for _ in range(100))))

        assert len(asyncio.run(publish_and_await())) == 100
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            batches = list(pool.map(lambda t: [publisher.publish("", queue_name, f"{t}".encode())
                                               for _ in range(500)], range(8)))
        for batch in batches:
            for future in batch:
                future.result(timeout=30)
    assert admin.count(queue_name) == 100 + 8 * 500


@pytest.mark.fault
@pytest.mark.timeout(60)
def test_delivery_timeout_while_unreachable_then_recovers(
    rabbitmq_proxy: ProxiedEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name),))
    admin.cleanup(topology)
    config = _config(rabbitmq_proxy.address, connection_name, delivery_timeout=1.5,
                     reconnect=RetryPolicy(max_attempts=200, initial_delay=0.05, max_delay=0.3, jitter=0.05))
    with RabbitMQPublisher(config, topology=topology) as publisher:
        publisher.publish("", queue_name, b"before").result(timeout=10)
        rabbitmq_proxy.proxy.refuse()
        rabbitmq_proxy.proxy.cut()
        started = time.monotonic()
        stranded = [publisher.publish("", queue_name, b"while down") for _ in range(20)]
        concurrent.futures.wait(stranded, timeout=10)
        waited = time.monotonic() - started
        assert all(isinstance(f.exception(timeout=0), DeliveryTimeout) for f in stranded)
        assert 1.0 < waited < 5.0, waited
        rabbitmq_proxy.proxy.accept()
        publisher.publish("", queue_name, b"after").result(timeout=15)
        assert publisher.stats.connections >= 2
    bodies = [g.body for g in admin.drain(queue_name)]
    assert bodies[0] == b"before" and bodies[-1] == b"after"


@pytest.mark.fault
@pytest.mark.timeout(60)
def test_close_resolves_every_pending_future(
    rabbitmq_proxy: ProxiedEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name),))
    admin.cleanup(topology)
    publisher = RabbitMQPublisher(_config(rabbitmq_proxy.address, connection_name), topology=topology)
    confirmed = publisher.publish("", queue_name, b"confirmed")
    confirmed.result(timeout=10)
    rabbitmq_proxy.proxy.refuse()
    rabbitmq_proxy.proxy.cut()
    pending = [publisher.publish("", queue_name, b"never confirmed") for _ in range(50)]
    started = time.monotonic()
    publisher.close(timeout=1.0)
    assert time.monotonic() - started < 15
    assert all(f.done() for f in pending)
    assert all(isinstance(f.exception(timeout=0), DeliveryTimeout) for f in pending)
    assert isinstance(confirmed.result(timeout=0), Delivery)
    with pytest.raises(ClosedError):
        publisher.publish("", queue_name, b"after close")
    publisher.close()  # idempotent


@pytest.mark.fault
@pytest.mark.timeout(90)
def test_connection_blocked_by_an_alarm_fails_with_timeout_then_recovers(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    from reliable_messaging.testing import _local

    node = rabbitmq_endpoint.controllable_node()
    assert isinstance(node, _local.LocalNode), "needs a local node to raise a memory alarm with rabbitmqctl"
    topology = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name),))
    admin.cleanup(topology)
    with RabbitMQPublisher(_config(rabbitmq_endpoint.url, connection_name, blocked_timeout=1.0),
                           topology=topology) as publisher:
        publisher.publish("", queue_name, b"before the alarm").result(timeout=10)
        # A memory high watermark below current use raises the memory alarm: the broker sends
        # connection.blocked to publishing connections and stops reading from them.
        assert _local.rabbitmqctl(node, "set_vm_memory_high_watermark", "0.0000001").returncode == 0
        try:
            futures = [publisher.publish("", queue_name, b"during the alarm") for _ in range(5)]
            concurrent.futures.wait(futures, timeout=20)
            errors = [f.exception(timeout=0) for f in futures]
            assert all(isinstance(e, DeliveryTimeout) and "blocked" in str(e) for e in errors), errors
            assert publisher.stats.blocked >= 1
        finally:
            assert _local.rabbitmqctl(node, "set_vm_memory_high_watermark", "0.4").returncode == 0
        wait_for(lambda: publisher.publish("", queue_name, b"after").exception(timeout=10) is None, 30,
                 "a publish to succeed once the alarm cleared", interval=0.5)


@pytest.mark.timeout(30)
def test_bad_credentials_are_a_configuration_error_in_bounded_time(
    rabbitmq_endpoint: RabbitMQEndpoint, connection_name: str
) -> None:
    url = rabbitmq_endpoint.url.replace("guest:guest@", "guest:wrong-password@")
    assert url != rabbitmq_endpoint.url
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match="refused the credentials") as info:
        RabbitMQPublisher(_config(url, connection_name))
    assert info.value.field == "url"
    assert time.monotonic() - started < 15


@pytest.mark.timeout(30)
def test_unreachable_broker_is_broker_unavailable_in_bounded_time(connection_name: str) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = _config(f"amqp://guest:guest@127.0.0.1:{port}/%2F", connection_name, connect_timeout=2.0,
                     reconnect=RetryPolicy(max_attempts=3, initial_delay=0.1, max_delay=0.2, jitter=0.0))
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        RabbitMQPublisher(config)
    assert time.monotonic() - started < 5


@pytest.mark.fault
@pytest.mark.timeout(60)
def test_a_full_buffer_slows_the_caller_down_instead_of_growing(
    rabbitmq_proxy: ProxiedEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name),))
    admin.cleanup(topology)
    config = _config(rabbitmq_proxy.address, connection_name, max_buffered=5, delivery_timeout=1.0)
    with RabbitMQPublisher(config, topology=topology) as publisher:
        rabbitmq_proxy.proxy.refuse()
        rabbitmq_proxy.proxy.cut()
        time.sleep(0.3)  # let the I/O thread see the reset: publishes now wait in the buffer, not on the wire
        waiting = [publisher.publish("", queue_name, b"queued") for _ in range(5)]
        started = time.monotonic()
        sixth = publisher.publish("", queue_name, b"one too many")
        blocked_for = time.monotonic() - started
        assert blocked_for > 0.8, "publish() must block while max_buffered publishes are waiting"
        assert isinstance(sixth.exception(timeout=10), DeliveryTimeout)
        assert all(isinstance(f.exception(timeout=10), DeliveryTimeout) for f in waiting)


@pytest.mark.timeout(60)
def test_without_confirms_futures_resolve_unacknowledged_and_a_dropped_message_goes_unnoticed(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    """At-most-once (confirms=False): a future only says the frame reached the socket.

    The same unroutable publish that fails with Unroutable under confirms + mandatory
    "succeeds" here while the broker drops it: that is what giving up confirms costs.
    """
    exchange = f"{queue_name}.x"
    topology = RabbitMQTopology(
        exchanges=(RabbitMQExchange(name=exchange, type=RabbitMQExchangeType.DIRECT),),
        queues=(RabbitMQQueue(name=queue_name),),
        bindings=(RabbitMQBinding(queue=queue_name, exchange=exchange, routing_key="routed"),),
    )
    admin.cleanup(topology)
    config = _config(rabbitmq_endpoint.url, connection_name, confirms=False, mandatory=False)
    with RabbitMQPublisher(config, topology=topology) as publisher:
        routed = [publisher.publish(exchange, "routed", f"{i}".encode()) for i in range(500)]
        dropped = publisher.publish(exchange, "nowhere", b"no queue is bound for this")
        for future in [*routed, dropped]:
            assert isinstance(future.result(timeout=10), Delivery)
        with pytest.raises(InvalidMessage, match="mandatory=True needs a publisher with confirms=True"):
            publisher.publish(exchange, "routed", b"x", mandatory=True)
        stats = publisher.stats
        assert (stats.unconfirmed, stats.confirmed, stats.returned) == (501, 0, 0)
    wait_for(lambda: admin.count(queue_name) == 500, 10, "the routed messages to arrive")
    assert [g.body for g in admin.drain(queue_name)] == [f"{i}".encode() for i in range(500)]
