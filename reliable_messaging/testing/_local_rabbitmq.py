"""Local RabbitMQ and Redis nodes, from Debian's packages.

Part of :mod:`reliable_messaging.testing._local` (see there for the layout and the node lifecycle).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from ._local import (
    HOST,
    RABBITMQ_DIST_PORT,
    RABBITMQ_MANAGEMENT_PORT,
    RABBITMQ_PORT,
    REDIS_PORT,
    BrokerSetupError,
    LocalNode,
    _is_root,
    _run,
    ensure_debian_package,
    port_open,
    run_dir,
)

__all__ = ["rabbitmq_node", "rabbitmqctl", "redis_node"]


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
            # The management HTTP API: `reliable-messaging check` reads queue arguments there.
            f"management.tcp.ip = {HOST}",
            f"management.tcp.port = {node.ports['management']}",
            "",
        ])
    )
    (config / "enabled_plugins").write_text("[rabbitmq_management].\n")
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
        directory=run_dir() / "rabbitmq", ports={"client": RABBITMQ_PORT, "dist": RABBITMQ_DIST_PORT,
                                                       "management": RABBITMQ_MANAGEMENT_PORT},
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
