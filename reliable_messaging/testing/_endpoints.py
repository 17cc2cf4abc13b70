"""Where the test brokers are, and how to hurt them.

Endpoints are resolved in this order:

1. addresses from the environment: ``KAFKA_BOOTSTRAP_SERVERS``,
   ``KAFKA_CLUSTER_BOOTSTRAP_SERVERS``, ``RABBITMQ_URL``, ``REDIS_URL``;
2. brokers started on this machine by ``python -m reliable_messaging.testing.brokers up``
   (found through their state in the run directory);
3. testcontainers (official ``apache/kafka``, ``rabbitmq:*-management`` and
   ``redis`` images) when a Docker engine answers;
4. otherwise :class:`BrokersUnavailable`, saying how to start brokers.

An endpoint that maps to a process or container this package controls carries
:class:`BrokerNode` handles, so fault tests can SIGKILL and restart it; an
endpoint given only as an address cannot be hurt, and fault helpers say so.
"""

from __future__ import annotations

import importlib
import os
import socket
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import _local

__all__ = [
    "BrokerNode",
    "BrokersUnavailable",
    "FaultsUnsupported",
    "KafkaEndpoint",
    "RabbitMQEndpoint",
    "RedisEndpoint",
    "resolve_kafka",
    "resolve_kafka_cluster",
    "resolve_rabbitmq",
    "resolve_redis",
]

KAFKA_IMAGE = os.environ.get("RELIABLE_MESSAGING_KAFKA_IMAGE", f"apache/kafka:{_local.KAFKA_VERSION}")
RABBITMQ_IMAGE = os.environ.get("RELIABLE_MESSAGING_RABBITMQ_IMAGE", "rabbitmq:3.13-management")
REDIS_IMAGE = os.environ.get("RELIABLE_MESSAGING_REDIS_IMAGE", "redis:7")

HOW_TO_START = (
    "start local brokers with `scripts/brokers up all` (or `python -m reliable_messaging.testing.brokers up all`), "
    "or set KAFKA_BOOTSTRAP_SERVERS / KAFKA_CLUSTER_BOOTSTRAP_SERVERS / RABBITMQ_URL / REDIS_URL, "
    "or start a Docker engine for testcontainers"
)


class BrokersUnavailable(RuntimeError):
    """No broker could be found or started for the tests."""


class FaultsUnsupported(RuntimeError):
    """The endpoint is only an address: this process cannot kill or restart it."""


class BrokerNode(Protocol):
    """A broker process or container that fault tests may kill and restart."""

    name: str

    def kill(self) -> None:
        """SIGKILL the broker and wait until it is gone."""

    def start(self, *, timeout: float | None = None) -> None:
        """Start it again and wait until it serves clients."""

    def restart(self, *, timeout: float | None = None) -> None:
        """kill() then start()."""

    def is_running(self) -> bool:
        """True while the process/container is alive."""


def _norm(address: str) -> str:
    host, _, port = address.strip().rpartition(":")
    if host in ("localhost", "", "0.0.0.0"):
        host = _local.HOST
    return f"{host}:{port}"


@dataclass(frozen=True)
class KafkaEndpoint:
    """A Kafka bootstrap address and, when controllable, its broker nodes by ``node.id``.

    ``proxy_upstream``/``proxy_listen``: a listener whose *advertised* address is
    ``proxy_listen``; a :class:`~reliable_messaging.testing.TcpProxy` listening
    there and forwarding to ``proxy_upstream`` carries every connection of a
    client bootstrapped through it.
    """

    bootstrap_servers: str
    source: str
    nodes: Mapping[int, BrokerNode] = field(default_factory=dict)
    proxy_upstream: tuple[str, int] | None = None
    proxy_listen: tuple[str, int] | None = None

    def node(self, node_id: int) -> BrokerNode:
        if node_id not in self.nodes:
            raise FaultsUnsupported(
                f"Kafka node {node_id} at {self.bootstrap_servers} ({self.source}) is not controlled by this "
                "test run; fault tests need brokers started by `scripts/brokers up` or testcontainers "
                "(deselect them with -m 'not fault')"
            )
        return self.nodes[node_id]


@dataclass(frozen=True)
class RabbitMQEndpoint:
    url: str
    source: str
    node: BrokerNode | None = None

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or _local.HOST

    @property
    def port(self) -> int:
        return urllib.parse.urlsplit(self.url).port or 5672

    def url_via(self, host: str, port: int) -> str:
        """The same URL (credentials, vhost, query) pointed at ``host:port``, e.g. a proxy."""
        parts = urllib.parse.urlsplit(self.url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def controllable_node(self) -> BrokerNode:
        if self.node is None:
            raise FaultsUnsupported(
                f"RabbitMQ at {self.url} ({self.source}) is not controlled by this test run; fault tests need "
                "a node started by `scripts/brokers up` or testcontainers (deselect them with -m 'not fault')"
            )
        return self.node


@dataclass(frozen=True)
class RedisEndpoint:
    url: str
    source: str
    node: BrokerNode | None = None


# ---------------------------------------------------------------------------------------------
# resolution
# ---------------------------------------------------------------------------------------------


def _running_local(nodes: list[_local.LocalNode]) -> bool:
    return bool(nodes) and all(n.is_running() for n in nodes)


def resolve_kafka(containers: ContainerPool | None = None) -> KafkaEndpoint:
    node = _local.kafka_single_node()
    local = {node.node_id or 1: node}
    proxy = ((_local.HOST, _local.KAFKA_PROXIED_PORT), (_local.HOST, _local.KAFKA_PROXY_PORT))
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if given:
        ours = {_norm(a) for a in given.split(",")} == {node.address} and node.is_running()
        return KafkaEndpoint(given, "environment", local if ours else {},
                             proxy[0] if ours else None, proxy[1] if ours else None)
    if _running_local([node]):
        return KafkaEndpoint(node.address, "local", local, *proxy)
    if containers is not None and containers.docker_available():
        return containers.kafka()
    raise BrokersUnavailable(f"no Kafka broker for the tests: {HOW_TO_START}")


def resolve_kafka_cluster() -> KafkaEndpoint:
    nodes = _local.kafka_cluster_nodes()
    by_id = {n.node_id or 0: n for n in nodes}
    given = os.environ.get("KAFKA_CLUSTER_BOOTSTRAP_SERVERS")
    if given:
        ours = {_norm(a) for a in given.split(",")} == {n.address for n in nodes}
        return KafkaEndpoint(given, "environment", dict(by_id) if ours else {})
    if _running_local(nodes):
        return KafkaEndpoint(_local.cluster_bootstrap(), "local", dict(by_id))
    raise BrokersUnavailable(
        "no 3-broker Kafka cluster for the tests: start one with `scripts/brokers up kafka-cluster`, "
        "or set KAFKA_CLUSTER_BOOTSTRAP_SERVERS (fault tests also need to control its nodes)"
    )


def resolve_rabbitmq(containers: ContainerPool | None = None) -> RabbitMQEndpoint:
    node = _local.rabbitmq_node()
    given = os.environ.get("RABBITMQ_URL")
    if given:
        parts = urllib.parse.urlsplit(given)
        ours = _norm(f"{parts.hostname}:{parts.port or 5672}") == node.address and node.is_running()
        return RabbitMQEndpoint(given, "environment", node if ours else None)
    if node.is_running():
        return RabbitMQEndpoint(f"amqp://guest:guest@{node.address}/%2F", "local", node)
    if containers is not None and containers.docker_available():
        return containers.rabbitmq()
    raise BrokersUnavailable(f"no RabbitMQ broker for the tests: {HOW_TO_START}")


def resolve_redis(containers: ContainerPool | None = None) -> RedisEndpoint:
    node = _local.redis_node()
    given = os.environ.get("REDIS_URL")
    if given:
        parts = urllib.parse.urlsplit(given)
        ours = _norm(f"{parts.hostname}:{parts.port or 6379}") == node.address and node.is_running()
        return RedisEndpoint(given, "environment", node if ours else None)
    if node.is_running():
        return RedisEndpoint(f"redis://{node.address}/0", "local", node)
    if containers is not None and containers.docker_available():
        return containers.redis()
    raise BrokersUnavailable(f"no Redis server for the tests: {HOW_TO_START}")


# ---------------------------------------------------------------------------------------------
# testcontainers (users with Docker)
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((_local.HOST, 0))
        return int(sock.getsockname()[1])


class ContainerNode:
    """A broker container; fault helpers kill and start it with the Docker API.

    Host ports are bound explicitly (not randomly) when the container is
    created, so a restarted container keeps them and clients' addresses stay valid.
    """

    def __init__(self, name: str, container: Any, ready: Callable[[], bool], ready_timeout: float = 120.0):
        self.name = name
        self._container = container
        self._ready = ready
        self._ready_timeout = ready_timeout

    def _docker(self) -> Any:
        return self._container.get_wrapped_container()

    def is_running(self) -> bool:
        wrapped = self._docker()
        wrapped.reload()
        return bool(wrapped.status == "running")

    def kill(self) -> None:
        self._docker().kill(signal="SIGKILL")
        deadline = time.monotonic() + 30
        while self.is_running():
            if time.monotonic() > deadline:
                raise RuntimeError(f"container {self.name} still running 30s after SIGKILL")
            time.sleep(0.1)

    def start(self, *, timeout: float | None = None) -> None:
        if not self.is_running():
            self._docker().start()
        self.wait_ready(self._ready_timeout if timeout is None else timeout)

    def restart(self, *, timeout: float | None = None) -> None:
        self.kill()
        self.start(timeout=timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready():
            if time.monotonic() > deadline:
                raise BrokersUnavailable(f"container {self.name} did not become ready within {timeout:.0f}s")
            time.sleep(0.5)

    def stop(self) -> None:
        self._container.stop()


class ContainerPool:
    """Starts at most one container per broker for a test session, and stops them at its end."""

    def __init__(self) -> None:
        self._docker_ok: bool | None = None
        self._nodes: list[ContainerNode] = []
        self._cache: dict[str, Any] = {}

    def docker_available(self) -> bool:
        if self._docker_ok is None:
            try:
                # importlib: the repository's own docker/ folder (compose files) would shadow the SDK for mypy.
                docker = importlib.import_module("docker")
                client = docker.from_env(timeout=5)
                client.ping()
                self._docker_ok = True
            except Exception:  # noqa: BLE001 - no SDK, no socket, no daemon: all mean "no Docker here"
                self._docker_ok = False
        return self._docker_ok

    def _container(self, image: str, env: Mapping[str, str], ports: Mapping[int, int]) -> Any:
        from testcontainers.core.container import DockerContainer

        container = DockerContainer(image)
        for key, value in env.items():
            container = container.with_env(key, value)
        for inner, outer in ports.items():
            container = container.with_bind_ports(inner, outer)
        return container.start()

    def kafka(self) -> KafkaEndpoint:
        if "kafka" not in self._cache:
            client, proxied, proxy = _free_port(), _free_port(), _free_port()
            container = self._container(KAFKA_IMAGE, {
                "KAFKA_NODE_ID": "1",
                "KAFKA_PROCESS_ROLES": "broker,controller",
                "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093,PROXIED://:9094",
                "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://localhost:{client},PROXIED://localhost:{proxy}",
                "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,PROXIED:PLAINTEXT",
                "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
                "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
                "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
                "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
                "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
                "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
                "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
                "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
                "KAFKA_GROUP_MIN_SESSION_TIMEOUT_MS": "3000",
            }, {9092: client, 9094: proxied})
            node = ContainerNode("kafka-container", container,
                                 lambda: _local.port_open(client) and _kafka_answers(f"127.0.0.1:{client}"))
            node.wait_ready(120)
            self._nodes.append(node)
            self._cache["kafka"] = KafkaEndpoint(f"127.0.0.1:{client}", "container", {1: node},
                                                 (_local.HOST, proxied), (_local.HOST, proxy))
        endpoint: KafkaEndpoint = self._cache["kafka"]
        return endpoint

    def rabbitmq(self) -> RabbitMQEndpoint:
        if "rabbitmq" not in self._cache:
            port = _free_port()
            container = self._container(RABBITMQ_IMAGE, {}, {5672: port})
            node = ContainerNode("rabbitmq-container", container, lambda: _amqp_answers(port))
            node.wait_ready(120)
            self._nodes.append(node)
            self._cache["rabbitmq"] = RabbitMQEndpoint(f"amqp://guest:guest@127.0.0.1:{port}/%2F", "container", node)
        endpoint: RabbitMQEndpoint = self._cache["rabbitmq"]
        return endpoint

    def redis(self) -> RedisEndpoint:
        if "redis" not in self._cache:
            port = _free_port()
            container = self._container(REDIS_IMAGE, {}, {6379: port})
            node = ContainerNode("redis-container", container, lambda: _local.port_open(port))
            node.wait_ready(60)
            self._nodes.append(node)
            self._cache["redis"] = RedisEndpoint(f"redis://127.0.0.1:{port}/0", "container", node)
        endpoint: RedisEndpoint = self._cache["redis"]
        return endpoint

    def close(self) -> None:
        for node in self._nodes:
            node.stop()
        self._nodes.clear()
        self._cache.clear()


def _kafka_answers(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    try:
        return bool(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=2).brokers)
    except Exception:  # noqa: BLE001 - a readiness probe: any failure means "not yet"
        return False


def _amqp_answers(port: int) -> bool:
    """True once the broker answers the AMQP protocol header with its connection.start."""
    try:
        with socket.create_connection((_local.HOST, port), timeout=2) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(8)[:1] == b"\x01"
    except OSError:
        return False
