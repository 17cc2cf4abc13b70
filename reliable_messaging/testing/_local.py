"""Real brokers on this machine without Docker: Kafka (KRaft, jars from Maven Central),
RabbitMQ (Debian's ``rabbitmq-server``) and Redis (Debian's ``redis-server``).

Everything here is stdlib-only so it runs before the project's dependencies are
installed. Each node is a :class:`LocalNode`: it knows its command, ports,
data/log directories and pid file, and can be started, checked, SIGKILLed and
restarted. The fault helpers of the pytest plugin use the same objects.

Layout (both overridable by environment variables):

- ``RELIABLE_MESSAGING_CACHE_DIR`` (default ``~/.cache/reliable-messaging``):
  downloaded Kafka jars, one folder per version. Never inside the repository.
- ``RELIABLE_MESSAGING_RUN_DIR`` (default ``/tmp/reliable-messaging-<uid>``):
  per node data, logs, pid file and ``node.json`` (what was started, and how).
  Under ``/tmp`` because RabbitMQ runs as the ``rabbitmq`` user, which cannot
  enter root's home directory.

Every wait has a deadline and every failure is one :class:`BrokerSetupError`
line naming the cause and the log file to read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CLUSTER_NODE_IDS",
    "KAFKA_VERSION",
    "BrokerSetupError",
    "LocalNode",
    "cluster_bootstrap",
    "kafka_cluster_nodes",
    "kafka_single_node",
    "local_nodes",
    "rabbitmq_node",
    "redis_node",
]

KAFKA_VERSION = os.environ.get("RELIABLE_MESSAGING_KAFKA_VERSION", "4.1.1")
"""Apache Kafka release whose jars run the local brokers (KRaft mode needs no ZooKeeper)."""
LOG4J_VERSION = "2.24.3"
"""The broker's POM has no SLF4J binding (the release tarball adds one); without it the broker logs nothing."""

DEFAULT_READY_TIMEOUT = 120.0
"""Seconds a node may take to become ready: a first Kafka start formats storage and warms the JVM,
a RabbitMQ start boots Erlang; on a loaded 2-core CI machine either can take tens of seconds."""

HOST = "127.0.0.1"
KAFKA_PORT, KAFKA_CONTROLLER_PORT = 9092, 9093
KAFKA_PROXIED_PORT, KAFKA_PROXY_PORT = 9094, 9095
"""The single node has a third listener on 9094 that *advertises* 9095: a TCP proxy listening on
9095 and forwarding to 9094 carries every connection of a client bootstrapped through it, so the
proxy can cut live Kafka connections (Kafka clients connect to advertised addresses)."""
CLUSTER_NODE_IDS = (1, 2, 3)
CLUSTER_BASE_PORT = 19092
"""Cluster node n listens on 19092 + 2(n-1) (broker) and 19093 + 2(n-1) (controller)."""
RABBITMQ_PORT, RABBITMQ_DIST_PORT = 5672, 25672
REDIS_PORT = 6379


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
"""Brokers this Python process spawned itself (e.g. a restart inside a test run), kept so that a killed
one is reaped (no zombie) and a running one is not garbage-collected with a ResourceWarning."""


class BrokerSetupError(RuntimeError):
    """A broker could not be installed, started or reached; the message is one line naming the cause."""


def cache_dir() -> Path:
    return Path(os.environ.get("RELIABLE_MESSAGING_CACHE_DIR", "~/.cache/reliable-messaging")).expanduser()


def run_dir() -> Path:
    default = Path(tempfile.gettempdir()) / f"reliable-messaging-{os.getuid()}"
    return Path(os.environ.get("RELIABLE_MESSAGING_RUN_DIR", str(default))).expanduser()


def _is_root() -> bool:
    return os.geteuid() == 0


# ---------------------------------------------------------------------------------------------
# small process and socket helpers
# ---------------------------------------------------------------------------------------------


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed child not yet reaped) is not alive for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _process_text(pid: int) -> str:
    """A process's command line and environment, for recognising our own nodes."""
    parts = []
    for name in ("cmdline", "environ"):
        try:
            parts.append(Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return " ".join(parts)


def _cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def _wait(predicate: Callable[[], bool], deadline: float, interval: float = 0.2) -> bool:
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _run(cmd: Sequence[str], *, timeout: float, what: str, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False
        )
    except FileNotFoundError as exc:
        raise BrokerSetupError(f"{what}: command not found: {cmd[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise BrokerSetupError(f"{what}: `{' '.join(cmd[:3])} ...` did not finish within {timeout:.0f}s") from exc


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


# ---------------------------------------------------------------------------------------------
# installation: Java + Kafka jars, Debian packages
# ---------------------------------------------------------------------------------------------


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


def ensure_debian_package(executable: str, package: str, candidates: Iterable[str] = ()) -> Path:
    """Find ``executable`` (or one of ``candidates``); install Debian's ``package`` when root and missing."""
    def find() -> Path | None:
        for path in candidates:
            if Path(path).exists():
                return Path(path)
        found = shutil.which(executable)
        return Path(found) if found else None

    found = find()
    if found is not None:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise BrokerSetupError(
            f"`{executable}` is not installed and apt-get is not available to install {package}; "
            f"install {package} with your package manager, or point the tests at running brokers"
        )
    if not _is_root():
        raise BrokerSetupError(
            f"`{executable}` is not installed; run as root: apt-get install -y {package}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = _run([apt, "-q", "update"], timeout=600, what="apt-get update", env=env)
    if out.returncode != 0:
        raise BrokerSetupError(f"apt-get update failed: {_last_line(out.stderr) or out.returncode}")
    out = _run([apt, "install", "-y", "-q", "--no-install-recommends", package], timeout=900,
               what=f"apt-get install {package}", env=env)
    if out.returncode != 0:
        raise BrokerSetupError(f"apt-get install {package} failed: {_last_line(out.stderr) or out.returncode}")
    found = find()
    if found is None:
        raise BrokerSetupError(f"apt-get installed {package} but `{executable}` is still not found")
    return found


# ---------------------------------------------------------------------------------------------
# nodes
# ---------------------------------------------------------------------------------------------


@dataclass
class LocalNode:
    """One broker process managed by this module.

    A pid from the pid file is trusted only if the process's command line or
    environment mentions this node's directory (Kafka: its config path; RabbitMQ:
    ``RABBITMQ_MNESIA_BASE``) or its working directory is that directory (Redis
    rewrites its process title), so a stale pid file can never make ``down`` or
    ``kill`` signal an unrelated process.
    """

    name: str
    kind: str  # "kafka" | "rabbitmq" | "redis"
    directory: Path
    ports: dict[str, int]
    node_id: int | None = None
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    start_grace: float = 0.0
    """Seconds a node may have no live pid right after spawning (RabbitMQ's -detached launcher forks
    and the node writes its pid file only once Erlang has booted)."""
    _prepare: Callable[[LocalNode], None] | None = field(default=None, repr=False)
    _spawn: Callable[[LocalNode], None] | None = field(default=None, repr=False)
    _ready: Callable[[LocalNode], bool] | None = field(default=None, repr=False)

    # -- paths ---------------------------------------------------------------------------------
    @property
    def pid_file(self) -> Path:
        return self.directory / "pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "logs" / "stdout.log"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.ports['client']}"

    # -- state ---------------------------------------------------------------------------------
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not pid_alive(pid):
            return None
        if str(self.directory) in _process_text(pid) or _cwd(pid) == self.directory:
            return pid
        return None

    def is_running(self) -> bool:
        return self.pid() is not None

    def is_ready(self) -> bool:
        if not self.is_running():
            return False
        return self._ready(self) if self._ready is not None else port_open(self.ports["client"])

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, *, timeout: float | None = None) -> None:
        """Start the node (idempotent: a running node is left alone) and wait until it is ready."""
        timeout = self.ready_timeout if timeout is None else timeout
        if self.is_running():
            self.wait_ready(timeout)
            return
        (self.directory / "logs").mkdir(parents=True, exist_ok=True)
        if self._prepare is not None:  # installs and formats: fails on a missing prerequisite first
            self._prepare(self)
        for purpose, port in self.ports.items():
            if not port_free(port):
                raise BrokerSetupError(
                    f"{self.name}: port {port} ({purpose}) is already in use by a process this tool did not "
                    f"start; stop it, or point the tests at it with the environment variables "
                    f"(python -m reliable_messaging.testing.brokers env)"
                )
        assert self._spawn is not None
        self._spawn(self)
        self.wait_ready(timeout)
        self._write_state()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ok = _wait(lambda: self.is_ready() or not self._may_still_start(deadline), deadline, interval=0.25)
        if ok and self.is_ready():
            return
        running = self.is_running()
        last = _tail(self.log_file) or "(no output)"
        if running:
            self.kill()
            cause = f"did not become ready within {timeout:.0f}s (stopped it)"
        else:
            cause = "exited during start-up"
        raise BrokerSetupError(f"{self.name} {cause}; last log lines: {last} (full log: {self.log_file})")

    def _may_still_start(self, deadline: float) -> bool:
        # A process that died during start-up cannot become ready: stop waiting at once.
        if self.is_running():
            return True
        started = getattr(self, "_spawned_at", 0.0)
        return time.monotonic() - started < self.start_grace and time.monotonic() < deadline

    def kill(self) -> None:
        """SIGKILL the node's process and wait (under a deadline) until it is gone."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            child.wait(timeout=30)
        if not _wait(lambda: not pid_alive(pid), time.monotonic() + 30, interval=0.05):
            raise BrokerSetupError(f"{self.name}: pid {pid} still alive 30s after SIGKILL")
        # Wait until the OS lets go of the listening ports, so a restart can bind them again.
        _wait(lambda: all(port_free(p) for p in self.ports.values()), time.monotonic() + 30, interval=0.1)

    def stop(self, timeout: float = 30.0) -> bool:
        """Graceful stop (SIGTERM), SIGKILL after ``timeout``. Returns True if something was stopped."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        if not _wait(lambda: not pid_alive(pid), time.monotonic() + timeout, interval=0.1):
            self.kill()
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            child.wait(timeout=30)
        return True

    def restart(self, *, timeout: float | None = None) -> None:
        self.kill()
        self.start(timeout=timeout)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _write_state(self) -> None:
        state = {"name": self.name, "kind": self.kind, "ports": self.ports, "node_id": self.node_id,
                 "pid": self.pid(), "started_at": time.time(), "log": str(self.log_file)}
        (self.directory / "node.json").write_text(json.dumps(state, indent=2))

    def _popen(self, cmd: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, cwd=self.directory,
            )
        _CHILDREN[proc.pid] = proc
        self.pid_file.write_text(str(proc.pid))
        self._spawned_at = time.monotonic()


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


# -- RabbitMQ ---------------------------------------------------------------------------------

_RABBITMQ_BIN_DIRS = ("/usr/lib/rabbitmq/bin",)


def _rabbitmq_bin(tool: str) -> str:
    for directory in _RABBITMQ_BIN_DIRS:
        path = Path(directory) / tool
        if path.exists():
            return str(path)
    found = shutil.which(tool)
    if found is None:
        raise BrokerSetupError(f"RabbitMQ's `{tool}` is not installed (Debian: apt-get install -y rabbitmq-server)")
    return found


def _rabbitmq_env(node: LocalNode) -> dict[str, str]:
    d = node.directory
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": node.name,
        "RABBITMQ_NODE_IP_ADDRESS": HOST,
        "RABBITMQ_NODE_PORT": str(node.ports["client"]),
        "RABBITMQ_DIST_PORT": str(node.ports["dist"]),
        "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
        "RABBITMQ_LOG_BASE": str(d / "logs"),
        "RABBITMQ_CONFIG_FILE": str(d / "config" / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "config" / "enabled_plugins"),
        "RABBITMQ_PID_FILE": str(node.pid_file),
    }
    if _is_root():
        # The node runs as the `rabbitmq` user; its Erlang cookie lives in that user's home.
        env["HOME"] = "/var/lib/rabbitmq"
    return env


def _as_rabbitmq_user(cmd: list[str], env: dict[str, str]) -> list[str]:
    if not _is_root():
        return cmd
    passed = [f"{k}={v}" for k, v in env.items() if k.startswith("RABBITMQ_") or k == "HOME"]
    return ["runuser", "-u", "rabbitmq", "--", "env", *passed, *cmd]


def _rabbitmq_prepare(node: LocalNode) -> None:
    ensure_debian_package("rabbitmq-server", "rabbitmq-server", [f"{d}/rabbitmq-server" for d in _RABBITMQ_BIN_DIRS])
    config = node.directory / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "rabbitmq.conf").write_text(
        "\n".join([
            f"listeners.tcp.default = {HOST}:{node.ports['client']}",
            "loopback_users.guest = true",
            "log.console = false",
            "log.file.level = info",
            # consumer_timeout: an unacknowledged delivery older than this closes the channel
            # (PRECONDITION_FAILED). 30 min is RabbitMQ's default; tests that show it set their own.
            "consumer_timeout = 1800000",
            "",
        ])
    )
    (config / "enabled_plugins").write_text("[].\n")
    if _is_root():
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(node.directory)], check=True, timeout=60)


def _rabbitmq_spawn(node: LocalNode) -> None:
    env = _rabbitmq_env(node)
    node.pid_file.unlink(missing_ok=True)
    log = node.log_file
    # runuser's PAM session starts at a soft limit of 1024 open files, which RabbitMQ reads as its file
    # handle budget: a node recovering more durable queues than that (a test suite run many times on
    # one node) crawls. Raise the soft limit to the hard one, as the packaged systemd unit does.
    raise_nofile = 'ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@"'
    cmd = _as_rabbitmq_user(["sh", "-c", raise_nofile, "sh", _rabbitmq_bin("rabbitmq-server"), "-detached"], env)
    with open(log, "ab") as out:
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=60, check=False,
                       cwd=node.directory)
    node._spawned_at = time.monotonic()


def rabbitmqctl(node: LocalNode, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = _rabbitmq_env(node)
    cmd = _as_rabbitmq_user([_rabbitmq_bin("rabbitmqctl"), "-n", node.name, *args], env)
    return _run(cmd, timeout=timeout, what="rabbitmqctl", env=env)


def _rabbitmq_ready(node: LocalNode) -> bool:
    if not port_open(node.ports["client"]):
        return False
    out = rabbitmqctl(node, "await_startup", "--timeout", "5", timeout=30)
    return out.returncode == 0


def rabbitmq_node() -> LocalNode:
    node = LocalNode(
        name=f"rm-test@{socket.gethostname().split('.')[0]}", kind="rabbitmq",
        directory=run_dir() / "rabbitmq", ports={"client": RABBITMQ_PORT, "dist": RABBITMQ_DIST_PORT},
        start_grace=30.0,
    )
    node._prepare = _rabbitmq_prepare
    node._spawn = _rabbitmq_spawn
    node._ready = _rabbitmq_ready
    return node


# -- Redis ------------------------------------------------------------------------------------


def _redis_spawn(node: LocalNode) -> None:
    server = ensure_debian_package("redis-server", "redis-server")
    (node.directory / "config").mkdir(parents=True, exist_ok=True)
    node._popen([
        str(server), "--bind", HOST, "--port", str(node.ports["client"]), "--dir", str(node.directory),
        "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
        "--pidfile", str(node.directory / "config" / "redis.pid"),
    ])


def _redis_ready(node: LocalNode) -> bool:
    try:
        with socket.create_connection((HOST, node.ports["client"]), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_node() -> LocalNode:
    node = LocalNode(name="redis", kind="redis", directory=run_dir() / "redis", ports={"client": REDIS_PORT})
    node._spawn = _redis_spawn
    node._ready = _redis_ready
    return node


def local_nodes() -> dict[str, LocalNode]:
    """Every node this module knows how to run, by name."""
    nodes = [kafka_single_node(), *kafka_cluster_nodes(), rabbitmq_node(), redis_node()]
    return {node.name: node for node in nodes}
