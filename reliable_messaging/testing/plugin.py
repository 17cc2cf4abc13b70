"""pytest plugin: real-broker fixtures for reliable_messaging and for services built on it.

Opt-in, so that its generic fixture names do not appear in every project that installs the package: a
project enables it with ``pytest_plugins = ["reliable_messaging.testing.plugin"]`` in its root ``conftest.py``
(or ``-p reliable_messaging.testing.plugin``). Loading it starts nothing. Brokers are resolved
lazily, once per session, the first time a test asks for one (see
:mod:`reliable_messaging.testing._endpoints` for the order).

Fixtures
--------
``kafka_endpoint``, ``kafka_cluster``, ``rabbitmq_endpoint``, ``redis_endpoint``
    Session-scoped endpoints (:class:`KafkaEndpoint`, ...).
``unique_name``, ``topic``, ``queue_name``, ``group_id``
    Per-test names: the test's name plus 8 random hex characters. After the test, the Kafka
    topics and consumer groups containing the name, and the RabbitMQ queues and exchanges
    derived from it, are deleted from the brokers the test used (see :mod:`._cleanup`).
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

import gc
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from . import _cleanup
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


_RESOLVED = pytest.StashKey[dict[str, KafkaEndpoint | RabbitMQEndpoint]]()
"""Broker endpoints resolved so far in this session, by fixture name: the ``unique_name`` teardown
cleans up on these without resolving (and maybe starting) a broker the test never used."""


def _remember(config: pytest.Config, fixture: str, endpoint: KafkaEndpoint | RabbitMQEndpoint) -> None:
    config.stash.setdefault(_RESOLVED, {})[fixture] = endpoint


_INCOMPLETE = pytest.StashKey[set[_cleanup.Cleanup]]()
"""RabbitMQ cleanups a teardown could not finish (a broker still down after a fault test):
:func:`pytest_sessionfinish` runs them again."""

_KAFKA_NAMES = pytest.StashKey[dict[str, set[str]]]()
"""Every unique name cleaned up on Kafka in this session, by bootstrap servers: swept again at the end."""


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Finish the broker cleanups of the session's tests (bounded, never fails the run).

    Kafka names are all swept again, not only those whose teardown failed: a client a test left
    alive can have recreated a deleted topic since (see :mod:`._cleanup`).
    """
    stash = session.config.stash
    kafka = {_cleanup.Cleanup("kafka", bootstrap, frozenset(names))
             for bootstrap, names in stash.get(_KAFKA_NAMES, {}).items()}
    incomplete: set[_cleanup.Cleanup] = stash.get(_INCOMPLETE, set())
    pending = kafka | incomplete
    if not pending:
        return
    gc.collect()  # destroys the clients tests dropped in reference cycles, so they recreate nothing afterwards
    left = _cleanup.retry(pending)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if left and reporter is not None:  # a log record alone would go unseen at the end of a run
        reporter.write_line("reliable_messaging: could not delete all test names on the brokers: "
                            + "; ".join(sorted(str(c) for c in left)), yellow=True)


@pytest.fixture(scope="session")
def _rm_containers() -> Iterator[ContainerPool]:
    pool = ContainerPool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def kafka_endpoint(_rm_containers: ContainerPool, pytestconfig: pytest.Config) -> KafkaEndpoint:
    try:
        endpoint = resolve_kafka(_rm_containers)
    except BrokersUnavailable as exc:
        _unavailable(exc)
        raise
    _remember(pytestconfig, "kafka_endpoint", endpoint)
    return endpoint


@pytest.fixture(scope="session")
def kafka_cluster(pytestconfig: pytest.Config) -> KafkaEndpoint:
    try:
        endpoint = resolve_kafka_cluster()
    except BrokersUnavailable as exc:
        _unavailable(exc)
        raise
    _remember(pytestconfig, "kafka_cluster", endpoint)
    return endpoint


@pytest.fixture(scope="session")
def rabbitmq_endpoint(_rm_containers: ContainerPool, pytestconfig: pytest.Config) -> RabbitMQEndpoint:
    try:
        endpoint = resolve_rabbitmq(_rm_containers)
    except BrokersUnavailable as exc:
        _unavailable(exc)
        raise
    _remember(pytestconfig, "rabbitmq_endpoint", endpoint)
    return endpoint


@pytest.fixture(scope="session")
def redis_endpoint(_rm_containers: ContainerPool) -> RedisEndpoint:
    try:
        return resolve_redis(_rm_containers)
    except BrokersUnavailable as exc:
        _unavailable(exc)
        raise


# -- names ------------------------------------------------------------------------------------


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """``<test name>-<8 hex>``: valid as a Kafka topic, group id and RabbitMQ queue name.

    After the test, deletes from the brokers the test used what it created under this name.
    """
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-.")[:80]
    name = f"{base}-{uuid.uuid4().hex[:8]}"
    yield name
    _delete_broker_names(request, name)


def _delete_broker_names(request: pytest.FixtureRequest, name: str) -> None:
    """Best-effort cleanup of ``name`` on each broker endpoint the test requested (never raises).

    ``request.fixturenames`` also lists endpoints a fixture fetched with ``getfixturevalue``; the
    endpoint itself comes from the session's record, so nothing is resolved or started here.
    """
    stash = request.config.stash
    resolved = stash.get(_RESOLVED, {})
    used = [endpoint for fixture, endpoint in resolved.items() if fixture in request.fixturenames]
    for endpoint in used:
        if isinstance(endpoint, KafkaEndpoint):
            # Swept again at the end of the session whatever happens now: no need to track failures.
            stash.setdefault(_KAFKA_NAMES, {}).setdefault(endpoint.bootstrap_servers, set()).add(name)
            _cleanup.delete_kafka_names(endpoint.bootstrap_servers, name)
        else:
            cleanup = _cleanup.Cleanup("rabbitmq", endpoint.url, frozenset({name}))
            if not cleanup.run():
                stash.setdefault(_INCOMPLETE, set()).add(cleanup)


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
def broker_faults(request: pytest.FixtureRequest) -> Iterator[BrokerFaults]:
    if "unique_name" in request.fixturenames:
        # Set up unique_name first so that it is torn down last: its broker cleanup then runs
        # after revive_all() below, against running brokers instead of the ones the test killed.
        request.getfixturevalue("unique_name")
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
    "pytest_sessionfinish",
]
