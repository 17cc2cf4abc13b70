"""pytest plugin: real-broker fixtures for reliable_messaging and for services built on it.

Registered through the ``pytest11`` entry point, so installing the package makes
these fixtures available; loading it starts nothing. Brokers are resolved
lazily, once per session, the first time a test asks for one (see
:mod:`reliable_messaging.testing._endpoints` for the order).

Fixtures
--------
``kafka_endpoint``, ``kafka_cluster``, ``rabbitmq_endpoint``, ``redis_endpoint``
    Session-scoped endpoints (:class:`KafkaEndpoint`, ...).
``unique_name``, ``topic``, ``queue_name``, ``group_id``
    Per-test names: the test's name plus 8 random hex characters.
``connection_name``
    The test's node id: name client connections after it to find them in broker logs.
``tcp_proxy``
    Factory: ``tcp_proxy(host, port)`` -> a started :class:`TcpProxy`, closed after the test.
``rabbitmq_proxy``, ``kafka_proxy``
    A proxy in front of the broker and the address to give the client through it.
``broker_faults``
    Kill/restart helper; after the test, every node it killed is running again.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from ._endpoints import (
    BrokerNode,
    BrokersUnavailable,
    ContainerPool,
    FaultsUnsupported,
    KafkaEndpoint,
    RabbitMQEndpoint,
    RedisEndpoint,
    resolve_kafka,
    resolve_kafka_cluster,
    resolve_rabbitmq,
    resolve_redis,
)
from ._proxy import TcpProxy

_MARKERS = {
    "kafka": "needs a real Kafka broker",
    "rabbitmq": "needs a real RabbitMQ broker",
    "redis": "needs a real Redis server",
    "fault": "kills brokers or consumer processes, or cuts TCP connections",
    "slow": "takes more than a few seconds",
}


def pytest_configure(config: pytest.Config) -> None:
    registered = "\n".join(config.getini("markers"))
    for name, text in _MARKERS.items():
        if not re.search(rf"^{name}\b", registered, re.MULTILINE):
            config.addinivalue_line("markers", f"{name}: {text}")


def _unavailable(exc: Exception) -> None:
    pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def _rm_containers() -> Iterator[ContainerPool]:
    pool = ContainerPool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def kafka_endpoint(_rm_containers: ContainerPool) -> KafkaEndpoint:
    try:
        return resolve_kafka(_rm_containers)
    except BrokersUnavailable as exc:
        _unavailable(exc)
        raise


@pytest.fixture(scope="session")
def kafka_cluster() -> KafkaEndpoint:
    try:
        return resolve_kafka_cluster()
    except BrokersUnavailable as exc:
        _unavailable(exc)
        raise


@pytest.fixture(scope="session")
def rabbitmq_endpoint(_rm_containers: ContainerPool) -> RabbitMQEndpoint:
    try:
        return resolve_rabbitmq(_rm_containers)
    except BrokersUnavailable as exc:
        _unavailable(exc)
        raise


@pytest.fixture(scope="session")
def redis_endpoint(_rm_containers: ContainerPool) -> RedisEndpoint:
    try:
        return resolve_redis(_rm_containers)
    except BrokersUnavailable as exc:
        _unavailable(exc)
        raise


# -- names ------------------------------------------------------------------------------------


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """``<test name>-<8 hex>``: valid as a Kafka topic, group id and RabbitMQ queue name."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-.")[:80]
    return f"{base}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def topic(unique_name: str) -> str:
    return f"t.{unique_name}"


@pytest.fixture
def queue_name(unique_name: str) -> str:
    return f"q.{unique_name}"


@pytest.fixture
def group_id(unique_name: str) -> str:
    return f"g.{unique_name}"


@pytest.fixture
def connection_name(request: pytest.FixtureRequest) -> str:
    return str(request.node.nodeid)


# -- network faults ---------------------------------------------------------------------------


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[..., TcpProxy]]:
    proxies: list[TcpProxy] = []

    def make(upstream_host: str, upstream_port: int, *, listen_port: int = 0) -> TcpProxy:
        proxy = TcpProxy(upstream_host, upstream_port, listen_port=listen_port).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@dataclass
class ProxiedEndpoint:
    """A proxy in front of a broker and the address a client should use to go through it."""

    proxy: TcpProxy
    address: str
    """RabbitMQ: an ``amqp://`` URL; Kafka: a bootstrap servers string."""


@pytest.fixture
def rabbitmq_proxy(rabbitmq_endpoint: RabbitMQEndpoint, tcp_proxy: Callable[..., TcpProxy]) -> ProxiedEndpoint:
    proxy = tcp_proxy(rabbitmq_endpoint.host, rabbitmq_endpoint.port)
    return ProxiedEndpoint(proxy, rabbitmq_endpoint.url_via(proxy.host, proxy.port))


@pytest.fixture
def kafka_proxy(kafka_endpoint: KafkaEndpoint, tcp_proxy: Callable[..., TcpProxy]) -> ProxiedEndpoint:
    if kafka_endpoint.proxy_upstream is None or kafka_endpoint.proxy_listen is None:
        pytest.fail(
            f"Kafka at {kafka_endpoint.bootstrap_servers} ({kafka_endpoint.source}) has no proxied listener: "
            "Kafka clients connect to advertised addresses, so a proxy needs a broker listener that advertises "
            "the proxy's address (brokers from `scripts/brokers up` and testcontainers have one)",
            pytrace=False,
        )
    host, port = kafka_endpoint.proxy_upstream
    proxy = tcp_proxy(host, port, listen_port=kafka_endpoint.proxy_listen[1])
    return ProxiedEndpoint(proxy, f"{kafka_endpoint.proxy_listen[0]}:{kafka_endpoint.proxy_listen[1]}")


# -- broker faults ----------------------------------------------------------------------------


@dataclass
class BrokerFaults:
    """Kill and restart broker nodes; remembers what it killed so teardown can revive it."""

    killed: list[BrokerNode] = field(default_factory=list)

    def kill(self, node: BrokerNode) -> None:
        self.killed.append(node)
        node.kill()

    def start(self, node: BrokerNode, *, timeout: float | None = None) -> None:
        node.start(timeout=timeout)

    def restart(self, node: BrokerNode, *, timeout: float | None = None) -> None:
        self.kill(node)
        node.start(timeout=timeout)

    def revive_all(self) -> None:
        for node in self.killed:
            if not node.is_running():
                node.start()
        self.killed.clear()


@pytest.fixture
def broker_faults() -> Iterator[BrokerFaults]:
    faults = BrokerFaults()
    try:
        yield faults
    finally:
        faults.revive_all()


__all__ = [
    "BrokerFaults",
    "FaultsUnsupported",
    "ProxiedEndpoint",
    "pytest_configure",
]
