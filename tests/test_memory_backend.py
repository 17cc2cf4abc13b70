"""The in-process ``memory://`` backend passes the backend contract suite, with no broker.

The same tests run against real Kafka and RabbitMQ in ``integration_tests/facade``; here they run in
milliseconds, as a service's unit tests would use the backend.
"""

from __future__ import annotations

import pytest

import reliable_messaging as rm
from reliable_messaging.testing import wait_for
from reliable_messaging.testing.contract import BrokerContract, Recorder


class TestMemoryBackend(BrokerContract):
    @pytest.fixture
    def url(self, unique_name: str) -> str:
        return f"memory://{unique_name}"


class TestMemoryBackendConcurrent(TestMemoryBackend):
    consumer_settings = {"concurrency": 16}  # noqa: RUF012


def test_brokers_on_one_name_share_messages_and_other_names_do_not(unique_name: str) -> None:
    recorder = Recorder()
    with rm.connect(f"memory://{unique_name}") as service, rm.connect(f"memory://{unique_name}") as client, \
            rm.connect(f"memory://{unique_name}-other") as other:
        service.consumer("orders", recorder).start()
        client.publish("orders", b"from the client").result(timeout=5)
        other.publish("orders", b"elsewhere").result(timeout=5)
        wait_for(lambda: recorder.bodies() == [b"from the client"], 5, "the client's message")


def test_routing_by_pattern_and_unroutable_under_at_least_once(unique_name: str) -> None:
    url = f"memory://{unique_name}"
    eu, us = Recorder(), Recorder()
    with rm.connect(url) as broker:
        broker.declare("orders", source="orders-eu", pattern="eu.*")
        broker.declare("orders", source="orders-us", pattern="us.#")
        broker.consumer("orders-eu", eu).start()
        broker.consumer("orders-us", us).start()
        for key in ("eu.fr", "us.ny.nyc"):
            broker.publish("orders", key.encode(), key=key).result(timeout=5)
        for key in ("apac.jp", "eu.de.berlin"):  # "*" is one word exactly
            with pytest.raises(rm.Unroutable):
                broker.publish("orders", key.encode(), key=key).result(timeout=5)
        wait_for(lambda: eu.bodies() == [b"eu.fr"] and us.bodies() == [b"us.ny.nyc"], 5, "routed messages")
        assert broker.stats().publisher.failures["unroutable"] == 2
    with rm.connect(url, guarantee="at-most-once") as broker:  # not told about a message no source takes
        assert broker.publish("nowhere-bound", b"x", key="k").result(timeout=5).destination == "nowhere-bound"


def test_settings_and_urls_are_checked_at_connect() -> None:
    with pytest.raises(rm.ConfigurationError):
        rm.connect("memory://x", prefetch=5)
    with pytest.raises(rm.ConfigurationError):
        rm.connect("memory://a/b")
    with pytest.raises(rm.ConfigurationError):
        rm.connect("memory://x", guarantee="at-most-once", dedup=rm.MemoryDedupStore())
