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
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    "start_cluster",
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
RABBITMQ_PORT, RABBITMQ_DIST_PORT, RABBITMQ_MANAGEMENT_PORT = 5672, 25672, 15672
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
# installation: Debian packages (Java and the Kafka jars: _local_kafka)
# ---------------------------------------------------------------------------------------------


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


# The brokers, in their own modules (they use the helpers above).
from ._local_kafka import (  # noqa: E402
    cluster_bootstrap,
    kafka_cluster_nodes,
    kafka_libs,  # noqa: F401 - re-exported
    kafka_single_node,
    require_java,  # noqa: F401 - re-exported
    start_cluster,
)
from ._local_rabbitmq import rabbitmq_node, rabbitmqctl, redis_node  # noqa: E402, F401 - rabbitmqctl re-exported


def local_nodes() -> dict[str, LocalNode]:
    """Every node this module knows how to run, by name."""
    nodes = [kafka_single_node(), *kafka_cluster_nodes(), rabbitmq_node(), redis_node()]
    return {node.name: node for node in nodes}
