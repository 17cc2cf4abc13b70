"""Bring real brokers up and down on this machine, without Docker.

Usage::

    python -m reliable_messaging.testing.brokers up [kafka] [kafka-cluster] [rabbitmq] [redis] [all]
    python -m reliable_messaging.testing.brokers status
    python -m reliable_messaging.testing.brokers env          # export lines for the running brokers
    python -m reliable_messaging.testing.brokers kill NODE    # SIGKILL one node (fault drills)
    python -m reliable_messaging.testing.brokers restart NODE
    python -m reliable_messaging.testing.brokers down [...]   # stops only what this tool started

``up`` is idempotent, installs what is missing (RabbitMQ/Redis from Debian's
packages when run as root, Kafka's jars from Maven Central into a cache outside
the repository), waits for readiness under a deadline and prints how long each
node took. Any failure is one line on stderr naming the cause, exit code 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ._local import (
    DEFAULT_READY_TIMEOUT,
    BrokerSetupError,
    LocalNode,
    cluster_bootstrap,
    kafka_cluster_nodes,
    kafka_single_node,
    rabbitmq_node,
    redis_node,
    start_cluster,
)

TARGETS = ("kafka", "kafka-cluster", "rabbitmq", "redis")
DEFAULT_UP = ("kafka", "rabbitmq")


def _selected(names: Sequence[str], default: Sequence[str]) -> list[str]:
    chosen = list(names) or list(default)
    if "all" in chosen:
        return list(TARGETS)
    unknown = [n for n in chosen if n not in TARGETS]
    if unknown:
        raise BrokerSetupError(f"unknown broker {unknown[0]!r}; choose from {', '.join(TARGETS)} or all")
    return chosen


def _nodes(target: str) -> list[LocalNode]:
    if target == "kafka":
        return [kafka_single_node()]
    if target == "kafka-cluster":
        return kafka_cluster_nodes()
    if target == "rabbitmq":
        return [rabbitmq_node()]
    return [redis_node()]


def env_lines(targets: Sequence[str] = TARGETS, *, running_only: bool = True) -> list[str]:
    """``export`` lines pointing the test fixtures at the local brokers."""
    lines = []
    for target in targets:
        nodes = _nodes(target)
        if running_only and not all(n.is_running() for n in nodes):
            continue
        if target == "kafka":
            lines.append(f"export KAFKA_BOOTSTRAP_SERVERS={nodes[0].address}")
        elif target == "kafka-cluster":
            lines.append(f"export KAFKA_CLUSTER_BOOTSTRAP_SERVERS={cluster_bootstrap()}")
        elif target == "rabbitmq":
            lines.append(f"export RABBITMQ_URL=amqp://guest:guest@{nodes[0].address}/%2F")
        elif target == "redis":
            lines.append(f"export REDIS_URL=redis://{nodes[0].address}/0")
    return lines


def _rss_mib(node: LocalNode) -> float | None:
    pid = node.pid()
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def up(targets: Sequence[str], timeout: float) -> None:
    for target in targets:
        nodes = _nodes(target)
        if all(n.is_ready() for n in nodes):
            print(f"{target}: already running ({', '.join(n.address for n in nodes)})", file=sys.stderr)
            continue
        began = time.monotonic()
        if target == "kafka-cluster":
            start_cluster(nodes, timeout)
        else:
            nodes[0].start(timeout=timeout)
        rss = sum(_rss_mib(n) or 0 for n in nodes)
        print(
            f"{target}: ready in {time.monotonic() - began:.1f}s at {', '.join(n.address for n in nodes)} "
            f"(RSS {rss:.0f} MiB; logs {nodes[0].log_file.parent})",
            file=sys.stderr,
        )


def down(targets: Sequence[str]) -> None:
    for target in targets:
        for node in _nodes(target):
            if node.stop():
                print(f"{node.name}: stopped", file=sys.stderr)


def status() -> int:
    rc = 0
    for target in TARGETS:
        for node in _nodes(target):
            pid = node.pid()
            if pid is None:
                print(f"{node.name:18} stopped")
                continue
            ready = node.is_ready()
            rc |= 0 if ready else 1
            rss = _rss_mib(node)
            print(f"{node.name:18} {'ready' if ready else 'NOT READY':9} pid {pid:<8} {node.address:16} "
                  f"RSS {rss or 0:.0f} MiB  log {node.log_file.parent}")
    return rc


def _node_by_name(name: str) -> LocalNode:
    for target in TARGETS:
        for node in _nodes(target):
            if node.name == name or (target == "rabbitmq" and name == "rabbitmq"):
                return node
    raise BrokerSetupError(f"unknown node {name!r} (see `status` for names)")


def main(argv: Sequence[str] | None = None, prog: str = "python -m reliable_messaging.testing.brokers") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status", "env", "kill", "restart"])
    parser.add_argument("targets", nargs="*", help=f"{', '.join(TARGETS)} or all (kill/restart: a node name)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_READY_TIMEOUT,
                        help="seconds each broker may take to become ready (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            targets = _selected(args.targets, DEFAULT_UP)
            up(targets, args.timeout)
            print("\n".join(env_lines(targets)))
        elif args.command == "down":
            down(_selected(args.targets, TARGETS))
        elif args.command == "status":
            return status()
        elif args.command == "env":
            print("\n".join(env_lines(_selected(args.targets, TARGETS))))
        elif args.command in ("kill", "restart"):
            if len(args.targets) != 1:
                raise BrokerSetupError(f"{args.command} takes exactly one node name (see `status`)")
            node = _node_by_name(args.targets[0])
            node.kill() if args.command == "kill" else node.restart(timeout=args.timeout)
    except BrokerSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
