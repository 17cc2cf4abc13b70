"""The test-support pieces that need no broker: the TCP proxy (against a local echo server) and endpoints."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from reliable_messaging.testing import FaultsUnsupported, KafkaEndpoint, RabbitMQEndpoint, TcpProxy, _endpoints


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            received = getattr(self.server, "received", None)
            if received is not None:
                received.append(data)
            self.request.sendall(data)


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[0], server.server_address[1]
    server.shutdown()
    server.server_close()


def _roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def _broken(sock: socket.socket) -> bool:
    """True once the connection is reset or closed by the far side (within 5 s); False if it still echoes."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            sock.sendall(b"x")
            if sock.recv(16) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            return True
        time.sleep(0.01)
    return False


def _refused(host: str, port: int) -> bool:
    """True if a new connection is reset, either before connect() returns or right after."""
    try:
        sock = socket.create_connection((host, port), timeout=5)
    except (ConnectionResetError, ConnectionRefusedError):
        return True
    with sock:
        return _broken(sock)


def test_proxy_forwards_bytes_both_ways(echo_server: tuple[str, int]) -> None:
    with TcpProxy(*echo_server) as proxy, socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        payload = bytes(range(256)) * 4096  # 1 MiB, more than one socket buffer
        assert _roundtrip(sock, payload) == payload
        assert proxy.live_connections == 1


def test_cut_resets_live_connections(echo_server: tuple[str, int]) -> None:
    with TcpProxy(*echo_server) as proxy:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=5)
        assert _roundtrip(sock, b"ping") == b"ping"
        assert proxy.cut() == 1
        assert _broken(sock)
        sock.close()
        assert proxy.live_connections == 0
        # A new connection works again.
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as again:
            assert _roundtrip(again, b"pong") == b"pong"


def test_withhold_replies_delivers_requests_but_drops_answers_until_the_cut() -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    server.received = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with TcpProxy(*server.server_address) as proxy:
            sock = socket.create_connection((proxy.host, proxy.port), timeout=5)
            assert _roundtrip(sock, b"before") == b"before"
            assert proxy.withhold_replies() == 1
            sock.sendall(b"lost-answer")
            deadline = time.monotonic() + 5
            while b"".join(server.received) != b"beforelost-answer" and time.monotonic() < deadline:  # type: ignore[attr-defined]
                time.sleep(0.01)
            assert b"".join(server.received) == b"beforelost-answer"  # type: ignore[attr-defined]
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(16)  # the upstream answered; the proxy dropped it
            assert proxy.cut() == 1
            assert _broken(sock)
            sock.close()
            with socket.create_connection((proxy.host, proxy.port), timeout=5) as again:
                assert _roundtrip(again, b"after") == b"after"  # new connections are not withheld
    finally:
        server.shutdown()
        server.server_close()


def test_refuse_then_accept(echo_server: tuple[str, int]) -> None:
    with TcpProxy(*echo_server) as proxy:
        proxy.refuse()
        assert _refused(proxy.host, proxy.port)
        proxy.accept()
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
            assert _roundtrip(sock, b"hello") == b"hello"


def test_proxy_to_a_dead_upstream_closes_the_client() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with TcpProxy("127.0.0.1", dead_port) as proxy:
        assert _refused(proxy.host, proxy.port)


def test_rabbitmq_url_via_keeps_credentials_and_vhost() -> None:
    endpoint = RabbitMQEndpoint("amqp://user:pw@broker.example:5673/vh?heartbeat=5", "environment")
    assert (endpoint.host, endpoint.port) == ("broker.example", 5673)
    assert endpoint.url_via("127.0.0.1", 40000) == "amqp://user:pw@127.0.0.1:40000/vh?heartbeat=5"
    with pytest.raises(FaultsUnsupported, match="not controlled by this test run"):
        endpoint.controllable_node()


def test_kafka_endpoint_without_nodes_refuses_faults() -> None:
    with pytest.raises(FaultsUnsupported, match="-m 'not fault'"):
        KafkaEndpoint("kafka.example:9092", "environment").node(1)


def test_environment_addresses_win(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("RELIABLE_MESSAGING_RUN_DIR", str(tmp_path))  # no local brokers known there
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka.example:9092")
    monkeypatch.setenv("RABBITMQ_URL", "amqp://u:p@rabbit.example:5672/%2F")
    kafka = _endpoints.resolve_kafka()
    assert (kafka.bootstrap_servers, kafka.source, dict(kafka.nodes)) == ("kafka.example:9092", "environment", {})
    rabbit = _endpoints.resolve_rabbitmq()
    assert (rabbit.url, rabbit.node) == ("amqp://u:p@rabbit.example:5672/%2F", None)


def test_no_broker_anywhere_says_how_to_start_one(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("RELIABLE_MESSAGING_RUN_DIR", str(tmp_path))
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "KAFKA_CLUSTER_BOOTSTRAP_SERVERS", "RABBITMQ_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)

    class NoDocker(_endpoints.ContainerPool):
        def docker_available(self) -> bool:
            return False

    for resolve in (_endpoints.resolve_kafka, _endpoints.resolve_rabbitmq, _endpoints.resolve_redis):
        with pytest.raises(_endpoints.BrokersUnavailable, match=r"scripts/brokers up all"):
            resolve(NoDocker())
    with pytest.raises(_endpoints.BrokersUnavailable, match=r"scripts/brokers up kafka-cluster"):
        _endpoints.resolve_kafka_cluster()
