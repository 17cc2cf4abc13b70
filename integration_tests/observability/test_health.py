"""consumer.health() through a real network fault: a cut connection makes a consumer not ready (still live),
and ready again once it has reconnected by itself, on both brokers."""

from __future__ import annotations

import pytest

import reliable_messaging as rm
from reliable_messaging.testing import wait_for
from reliable_messaging.testing.plugin import ProxiedEndpoint


@pytest.mark.fault
@pytest.mark.timeout(150)
@pytest.mark.parametrize("broker", ["kafka", "rabbitmq"])
def test_a_cut_connection_makes_a_consumer_not_ready_until_it_has_reconnected(
        broker: str, request: pytest.FixtureRequest, unique_name: str) -> None:
    endpoint: ProxiedEndpoint = request.getfixturevalue(f"{broker}_proxy")
    url = f"kafka://{endpoint.address}" if broker == "kafka" else endpoint.address
    seen: list[bytes] = []
    with rm.connect(url, name=unique_name) as b:
        consumer = b.consumer(unique_name, lambda m: seen.append(m.body), group=unique_name)
        consumer.start()
        wait_for(lambda: consumer.health().ready, 60, "the consumer to be ready")
        endpoint.proxy.refuse()
        assert endpoint.proxy.cut() >= 1
        # Kafka: librdkafka's next statistics (every 5 s) show no broker up; RabbitMQ: the channel is gone.
        wait_for(lambda: not consumer.health().ready, 30, "not ready while the broker is unreachable")
        away = consumer.health()
        assert (away.live, away.running, away.connected) == (True, True, False), away
        assert "not connected to the broker" in away.problems
        endpoint.proxy.accept()
        wait_for(lambda: consumer.health().ready, 60, "ready again once reconnected")
        b.publish(unique_name, b"after the cut").result(timeout=30)
        wait_for(lambda: seen == [b"after the cut"], 60, "the consumer to consume again")
