"""Local Kafka nodes: KRaft brokers from Maven Central jars, a single node and a 3-broker cluster.

Part of :mod:`reliable_messaging.testing._local` (see there for the layout and the node lifecycle).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ._local import (
    CLUSTER_BASE_PORT,
    CLUSTER_NODE_IDS,
    DEFAULT_READY_TIMEOUT,
    HOST,
    KAFKA_CONTROLLER_PORT,
    KAFKA_PORT,
    KAFKA_PROXIED_PORT,
    KAFKA_PROXY_PORT,
    KAFKA_VERSION,
    LOG4J_VERSION,
    BrokerSetupError,
    LocalNode,
    _last_line,
    _run,
    _tail,
    _wait,
    cache_dir,
    port_free,
    port_open,
    run_dir,
)

__all__ = ["cluster_bootstrap", "kafka_cluster_nodes", "kafka_libs", "kafka_single_node", "require_java",
           "start_cluster"]


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise BrokerSetupError(
            f"Java 17+ is required to run Kafka {KAFKA_VERSION}, and `java` is not on PATH "
            "(Debian: apt-get install -y openjdk-17-jre-headless)"
        )
    out = _run([java, "-version"], timeout=30, what="checking Java")
    match = re.search(r'version "(\d+)', out.stderr + out.stdout)
    if match is None or int(match.group(1)) < 17:
        raise BrokerSetupError(
            f"Java 17+ is required to run Kafka {KAFKA_VERSION}; `java -version` says: "
            f"{_last_line(out.stderr) or 'nothing'}"
        )
    return java


_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.reliable-messaging</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version></dependency>
  </dependencies>
</project>
"""


def kafka_libs(timeout: float = 900.0) -> Path:
    """The folder of Kafka's runtime jars, resolved from Maven Central once and cached."""
    target = cache_dir() / f"kafka-{KAFKA_VERSION}"
    libs = target / "libs"
    if (target / ".complete").exists() and any(libs.glob("kafka_2.13-*.jar")):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerSetupError(
            f"Maven (`mvn`) is needed once to download Kafka {KAFKA_VERSION}'s jars from Maven Central, "
            f"and it is not on PATH (Debian: apt-get install -y maven); they are cached in {target}"
        )
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="kafka-libs-", dir=target))
    (staging / "pom.xml").write_text(_POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
    out = _run(
        [mvn, "-q", "-B", "dependency:copy-dependencies", f"-DoutputDirectory={staging / 'libs'}",
         "-DincludeScope=runtime"],
        timeout=timeout, what=f"downloading Kafka {KAFKA_VERSION} jars with Maven", cwd=staging,
    )
    if out.returncode != 0 or not any((staging / "libs").glob("kafka_2.13-*.jar")):
        detail = _last_line(out.stdout + "\n" + out.stderr) or f"exit code {out.returncode}"
        shutil.rmtree(staging, ignore_errors=True)
        raise BrokerSetupError(f"Maven could not download Kafka {KAFKA_VERSION}'s jars: {detail}")
    if libs.exists():
        shutil.rmtree(libs)
    (staging / "libs").rename(libs)
    shutil.rmtree(staging, ignore_errors=True)
    (target / ".complete").write_text(KAFKA_VERSION)
    return libs



# -- Kafka ------------------------------------------------------------------------------------

_LOG4J2 = """status = warn
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""

_KAFKA_COMMON = {
    "process.roles": "broker,controller",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "group.initial.rebalance.delay.ms": "0",
    "auto.create.topics.enable": "true",
    "num.partitions": "1",
    # Fence a dead broker within a few seconds (default 9 s) so leader failover tests stay short.
    "broker.heartbeat.interval.ms": "1000",
    "broker.session.timeout.ms": "6000",
    # Consumer-group session timeouts as low as 3 s let consumer-kill tests rebalance quickly.
    "group.consumer.min.session.timeout.ms": "3000",
    "group.min.session.timeout.ms": "3000",
    "unclean.leader.election.enable": "false",
    "log.segment.bytes": str(64 * 1024 * 1024),
}


def _kafka_properties(node: LocalNode, extra: dict[str, str]) -> str:
    props = {**_KAFKA_COMMON, "node.id": str(node.node_id), "log.dirs": str(node.directory / "data"), **extra}
    return "".join(f"{key}={value}\n" for key, value in props.items())


def _kafka_ready(node: LocalNode, expected_brokers: int) -> bool:
    if not port_open(node.ports["client"]):
        return False
    try:
        from confluent_kafka.admin import AdminClient
    except ImportError:  # readiness by port only, before the clients are installed
        return True
    config: dict[str, Any] = {"bootstrap.servers": node.address, "socket.timeout.ms": 2000, "logger": _PROBE_LOGGER}
    admin = AdminClient(config)
    try:
        metadata = admin.list_topics(timeout=2)
    except Exception:  # noqa: BLE001 - any failure of a readiness probe means "not ready yet"
        return False
    return len(metadata.brokers) >= expected_brokers


_PROBE_LOGGER = logging.getLogger("reliable_messaging.testing.readiness")
"""librdkafka logs every refused connection while a broker boots; readiness probes expect those, so they go
to this logger (silent unless a user enables it) instead of stderr."""


def _kafka_spawn(node: LocalNode) -> None:
    libs = kafka_libs()
    java = require_java()
    config = node.directory / "config"
    cmd = [
        java, "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
        f"-Dkafka.logs.dir={node.directory / 'logs'}",
        f"-Dlog4j2.configurationFile={config / 'log4j2.properties'}",
        "-cp", f"{libs}/*", "kafka.Kafka", str(config / "server.properties"),
    ]
    node._popen(cmd)


def _kafka_format(node: LocalNode, properties: str, cluster_id: str, standalone: bool) -> None:
    config = node.directory / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "server.properties").write_text(properties)
    (config / "log4j2.properties").write_text(_LOG4J2)
    if (node.directory / "data" / "meta.properties").exists():
        return
    libs = kafka_libs()
    java = require_java()
    cmd = [java, "-cp", f"{libs}/*", "kafka.tools.StorageTool", "format", "-t", cluster_id,
           "-c", str(config / "server.properties")]
    if standalone:
        cmd.insert(5, "--standalone")
    out = _run(cmd, timeout=120, what=f"formatting {node.name}'s storage")
    if out.returncode != 0:
        raise BrokerSetupError(f"formatting {node.name}'s storage failed: {_last_line(out.stdout + out.stderr)}")


def _cluster_id(path: Path) -> str:
    """One KRaft cluster id per cluster, kept beside its data (22 chars of url-safe base64)."""
    if path.exists():
        return path.read_text().strip()
    import base64

    cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cid)
    return cid


def kafka_single_node() -> LocalNode:
    directory = run_dir() / "kafka"
    node = LocalNode(
        name="kafka", kind="kafka", directory=directory, node_id=1,
        ports={"client": KAFKA_PORT, "controller": KAFKA_CONTROLLER_PORT, "proxied": KAFKA_PROXIED_PORT},
    )
    listeners = (f"PLAINTEXT://{HOST}:{KAFKA_PORT},CONTROLLER://{HOST}:{KAFKA_CONTROLLER_PORT},"
                 f"PROXIED://{HOST}:{KAFKA_PROXIED_PORT}")
    properties = _kafka_properties(node, {
        "listeners": listeners,
        "advertised.listeners": (f"PLAINTEXT://{HOST}:{KAFKA_PORT},CONTROLLER://{HOST}:{KAFKA_CONTROLLER_PORT},"
                                 f"PROXIED://{HOST}:{KAFKA_PROXY_PORT}"),
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,PROXIED:PLAINTEXT",
        "controller.quorum.bootstrap.servers": f"{HOST}:{KAFKA_CONTROLLER_PORT}",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
    })
    node._prepare = lambda n: _kafka_format(n, properties, _cluster_id(directory / "cluster-id"), True)
    node._spawn = _kafka_spawn
    node._ready = lambda n: _kafka_ready(n, 1)
    return node


def cluster_bootstrap() -> str:
    return ",".join(f"{HOST}:{CLUSTER_BASE_PORT + 2 * (i - 1)}" for i in CLUSTER_NODE_IDS)


def kafka_cluster_nodes() -> list[LocalNode]:
    """Three combined broker+controller nodes: RF 3, min.insync.replicas 2."""
    base = run_dir() / "kafka-cluster"
    voters = ",".join(f"{i}@{HOST}:{CLUSTER_BASE_PORT + 2 * (i - 1) + 1}" for i in CLUSTER_NODE_IDS)
    nodes = []
    for i in CLUSTER_NODE_IDS:
        client, controller = CLUSTER_BASE_PORT + 2 * (i - 1), CLUSTER_BASE_PORT + 2 * (i - 1) + 1
        node = LocalNode(
            name=f"kafka-cluster-{i}", kind="kafka", directory=base / f"node-{i}", node_id=i,
            ports={"client": client, "controller": controller},
        )
        properties = _kafka_properties(node, {
            "listeners": f"PLAINTEXT://{HOST}:{client},CONTROLLER://{HOST}:{controller}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{client},CONTROLLER://{HOST}:{controller}",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "controller.quorum.voters": voters,
            "default.replication.factor": "3",
            "min.insync.replicas": "2",
            "offsets.topic.replication.factor": "3",
            "transaction.state.log.replication.factor": "3",
            "transaction.state.log.min.isr": "2",
            "share.coordinator.state.topic.replication.factor": "3",
            "share.coordinator.state.topic.min.isr": "2",
        })
        node._prepare = (lambda props: lambda n: _kafka_format(n, props, _cluster_id(base / "cluster-id"), False))(
            properties
        )
        node._spawn = _kafka_spawn
        # A lone restarted node is ready when it serves metadata; the cluster as a whole is checked by
        # start_cluster, which waits for all three brokers.
        node._ready = lambda n: _kafka_ready(n, 1)
        nodes.append(node)
    return nodes


def start_cluster(nodes: list[LocalNode], timeout: float = DEFAULT_READY_TIMEOUT) -> None:
    """Start the three nodes together (a KRaft quorum of 3 needs 2 voters before anyone is ready)."""
    deadline = time.monotonic() + timeout
    pending = [n for n in nodes if not n.is_running()]
    for node in pending:
        for purpose, port in node.ports.items():
            if not port_free(port):
                raise BrokerSetupError(
                    f"{node.name}: port {port} ({purpose}) is already in use by a process this tool did not start"
                )
    for node in pending:
        (node.directory / "logs").mkdir(parents=True, exist_ok=True)
        assert node._prepare is not None
        assert node._spawn is not None
        node._prepare(node)
        node._spawn(node)
    ok = _wait(lambda: all(n.is_running() for n in nodes) and _kafka_ready(nodes[0], len(nodes)), deadline, 0.5)
    if not ok:
        dead = [n for n in nodes if not n.is_running()]
        culprit = dead[0] if dead else nodes[0]
        for node in nodes:
            node.kill()
        raise BrokerSetupError(
            f"Kafka cluster did not become ready within {timeout:.0f}s ({culprit.name}: "
            f"{_tail(culprit.log_file) or 'no output'}; full log: {culprit.log_file}; stopped all three)"
        )
    for node in nodes:
        node._write_state()
