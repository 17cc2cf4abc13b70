"""The consumer under real faults: a SIGKILLed consumer process, a cut TCP connection, consumer_timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reliable_messaging import (
    RabbitMQConsumer,
    RabbitMQConsumerConfig,
    RabbitMQMessage,
    RabbitMQQueue,
    RabbitMQTopology,
    RetryPolicy,
)
from reliable_messaging.testing import RabbitMQEndpoint, wait_for
from reliable_messaging.testing.plugin import ProxiedEndpoint

from ._helpers import Admin

pytestmark = [pytest.mark.rabbitmq, pytest.mark.fault]

ROOT = Path(__file__).resolve().parents[2]


def _retry_queues(queue: str, max_attempts: int = 5) -> tuple[str, ...]:
    return tuple(q.name for q in RabbitMQTopology.retry_queues(queue, max_attempts).queues)


class ConsumerProcess:
    """``consumer_process.py`` in a child process; the log file says what its handler received."""

    def __init__(self, url: str, queue: str, log: Path, *, ack_mode: str, prefetch: int, sleep: float) -> None:
        self.log = log
        # stderr to a file, not a pipe: a pipe nobody reads blocks a chatty process once it is full
        self.stderr_path = log.with_suffix(".stderr")
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "integration_tests.rabbitmq.consumer_process", "--url", url, "--queue", queue,
             "--log", str(log), "--ack-mode", ack_mode, "--prefetch", str(prefetch), "--sleep", str(sleep)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._stderr, start_new_session=True,
        )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def lines(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [line.split() for line in self.log.read_text().splitlines() if line.strip()]

    def wait_for_lines(self, count: int, timeout: float) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"consumer process exited with {self.proc.returncode}: {self.stderr()[-2000:]}")
            return len(self.lines()) >= count

        wait_for(ready, timeout, f"the consumer process to handle {count} message(s)")

    def wait_exit(self, timeout: float) -> int:
        """The exit code; if the process is still running after ``timeout``, fail with its threads' stacks."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGUSR1)  # consumer_process.py dumps every thread's stack
            time.sleep(1.0)
            self.proc.kill()
            self.proc.wait(timeout=10)
            stacks = self.stderr()[-6000:]
            raise AssertionError(f"the consumer process did not exit within {timeout}s:\n{stacks}") from None

    def sigkill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        assert self.proc.returncode == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._stderr.close()


@pytest.fixture
def processes() -> Iterator[list[ConsumerProcess]]:
    started: list[ConsumerProcess] = []
    yield started
    for proc in started:
        proc.close()


@pytest.mark.timeout(90)
def test_sigkilled_manual_ack_consumer_gets_its_unacked_messages_redelivered(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, tmp_path: Path,
    processes: list[ConsumerProcess],
) -> None:
    topology = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name),))
    admin.declare(topology)
    admin.cleanup(queues=_retry_queues(queue_name))
    ids = [f"m-{i:02d}" for i in range(30)]
    admin.publish("", queue_name, [i.encode() for i in ids], message_ids=ids)
    proc = ConsumerProcess(rabbitmq_endpoint.url, queue_name, tmp_path / "handled.log", ack_mode="manual",
                           prefetch=10, sleep=120)
    processes.append(proc)
    proc.wait_for_lines(1, 30)  # the handler is now stuck in its first message
    wait_for(lambda: admin.count(queue_name) == 20, 10, "the broker to push `prefetch` messages to the consumer")
    proc.sigkill()

    (started_id, redelivered, attempt) = proc.lines()[0]
    assert (started_id, redelivered, attempt) == ("m-00", "0", "1")
    # The dead consumer acknowledged nothing: all 30 are back, the 10 it held flagged redelivered.
    wait_for(lambda: admin.count(queue_name) == 30, 10, "the unacked messages to return to the queue")
    got = admin.drain(queue_name)
    assert sorted(g.message_id or "" for g in got) == ids
    assert sorted(g.message_id or "" for g in got if g.redelivered) == ids[:10]
    assert not any(g.redelivered for g in got if g.message_id in ids[10:])


@pytest.mark.timeout(90)
def test_ctrl_c_stops_gracefully_finishing_and_acking_the_current_message(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, tmp_path: Path,
    processes: list[ConsumerProcess],
) -> None:
    topology = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name),))
    admin.declare(topology)
    admin.cleanup(queues=_retry_queues(queue_name))
    ids = [f"m-{i:02d}" for i in range(20)]
    admin.publish("", queue_name, [i.encode() for i in ids], message_ids=ids)
    proc = ConsumerProcess(rabbitmq_endpoint.url, queue_name, tmp_path / "handled.log", ack_mode="manual",
                           prefetch=5, sleep=1.5)
    processes.append(proc)
    proc.wait_for_lines(1, 30)
    proc.proc.send_signal(signal.SIGINT)  # run() turns Ctrl-C into stop()
    assert proc.wait_exit(20) == 0
    handled = [line[0] for line in proc.lines()]
    assert handled == ["m-00"], "stop() lets the current message finish and takes no new one"
    # The finished message was acknowledged before the channel closed; the prefetched ones went back.
    got = admin.drain(queue_name)
    assert sorted(g.message_id or "" for g in got) == ids[1:]


@pytest.mark.timeout(90)
def test_sigkilled_auto_ack_consumer_loses_its_prefetched_messages(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, tmp_path: Path,
    processes: list[ConsumerProcess],
) -> None:
    """Documents the seed's warning: with auto-ack, whatever the broker pushed is gone when the process dies."""
    topology = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name),))
    admin.declare(topology)
    total = 200
    admin.publish("", queue_name, [b"x" * 100] * total, message_ids=[f"m-{i}" for i in range(total)])
    proc = ConsumerProcess(rabbitmq_endpoint.url, queue_name, tmp_path / "handled.log", ack_mode="auto",
                           prefetch=10, sleep=0.2)
    processes.append(proc)
    proc.wait_for_lines(3, 30)
    # basic.qos does not limit an auto-ack consumer: the broker pushes the whole queue at once.
    wait_for(lambda: admin.count(queue_name) == 0, 10, "the broker to push every message to the consumer")
    proc.sigkill()
    handled = len(proc.lines())
    time.sleep(0.5)
    remaining = admin.count(queue_name)
    lost = total - handled - remaining
    assert remaining == 0, "nothing goes back to the queue: the broker forgot each message when it sent it"
    assert handled < 20 and lost > total - 20, f"handled {handled}, lost {lost}"


@pytest.mark.timeout(90)
def test_consumer_survives_tcp_cuts_and_every_message_is_handled(
    rabbitmq_proxy: ProxiedEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology.work_queue(queue_name)
    admin.declare(topology)
    admin.cleanup(queues=_retry_queues(queue_name))
    total = 400
    admin.publish(queue_name, queue_name, [f"{i}".encode() for i in range(total)],
                  message_ids=[f"m-{i}" for i in range(total)])
    handled: list[tuple[str, bool]] = []

    def handler(message: RabbitMQMessage) -> None:
        handled.append((message.message_id, message.redelivered))
        time.sleep(0.002)

    config = RabbitMQConsumerConfig(url=rabbitmq_proxy.address, connection_name=connection_name, prefetch=20,
                                    reconnect=RetryPolicy(max_attempts=50, initial_delay=0.05, max_delay=0.5))
    consumer = RabbitMQConsumer(config, queue_name, handler, topology=topology)
    with consumer:
        for threshold in (100, 250):
            wait_for(lambda t=threshold: len(handled) >= t, 30, f"{threshold} messages handled")
            assert rabbitmq_proxy.proxy.cut() == 1
        wait_for(lambda: {m for m, _ in handled} == {f"m-{i}" for i in range(total)}, 30, "every message handled")
        wait_for(lambda: admin.count(queue_name) == 0, 10, "the queue to be empty")
    # At-least-once: a message handled before a cut whose ack died with the connection came back,
    # flagged redelivered. (Redelivered ones that the dead connection had only prefetched are handled
    # once, also flagged.) Acks that belonged to a dead channel were dropped, never sent on a new one.
    seen: set[str] = set()
    for message_id, redelivered in handled:
        if message_id in seen:
            assert redelivered, f"{message_id} was handled twice without the redelivered flag"
        seen.add(message_id)
    assert consumer.stats.extra["connections"] == 3 and consumer.stats.extra["channel_failures"] == 0
    assert admin.count(queue_name) == 0


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_consumer_timeout_closes_the_channel_and_the_message_is_redelivered(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    """RabbitMQ has an acknowledgement timeout (consumer_timeout), checked on the channel tick.

    3.10 has no per-queue x-consumer-timeout: the test lowers the node-wide setting at runtime
    (and the tick interval, 60 s by default) for channels opened meanwhile, and restores both.
    A channel reads consumer_timeout when it opens: a channel a reconnect opened before the restore
    landed (rabbitmqctl takes seconds on a busy machine) times out as well if the handler is released
    just as its tick comes, and the message then comes a third time, milliseconds after the second.
    """
    from reliable_messaging.testing import _local

    node = rabbitmq_endpoint.controllable_node()
    assert isinstance(node, _local.LocalNode), "needs a local node to change consumer_timeout with rabbitmqctl"

    def env(key: str) -> str:
        out = _local.rabbitmqctl(node, "eval", f"application:get_env(rabbit, {key}).")
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def set_env(key: str, value: str) -> None:
        out = _local.rabbitmqctl(node, "eval", f"application:set_env(rabbit, {key}, {value}).")
        assert out.returncode == 0, out.stderr

    original_timeout, original_tick = env("consumer_timeout"), env("channel_tick_interval")
    assert original_timeout.startswith("{ok,") and original_tick.startswith("{ok,")
    topology = RabbitMQTopology.work_queue(queue_name)
    admin.declare(topology)
    admin.cleanup(queues=_retry_queues(queue_name))
    admin.publish(queue_name, queue_name, [b"slow"], message_ids=["slow"])
    calls: list[tuple[bool, float]] = []
    release = threading.Event()

    def handler(message: RabbitMQMessage) -> None:
        calls.append((message.redelivered, time.monotonic()))
        if len(calls) == 1:
            release.wait(20)  # far longer than consumer_timeout

    config = RabbitMQConsumerConfig(url=rabbitmq_endpoint.url, connection_name=connection_name)
    consumer = RabbitMQConsumer(config, queue_name, handler, topology=topology)
    # A channel reads consumer_timeout when it opens, and the tick interval each time it re-arms its tick.
    set_env("consumer_timeout", "1000")
    set_env("channel_tick_interval", "500")
    try:
        consumer.start()
        # The consuming channel is open and has read the 1000 ms: restored now, reconnects get the default.
        set_env("consumer_timeout", original_timeout[4:-1])
        wait_for(lambda: consumer.stats.extra["channel_failures"] >= 1, 20,
                 "the broker to close the channel: delivery acknowledgement timed out")
    finally:
        set_env("consumer_timeout", original_timeout[4:-1])
        set_env("channel_tick_interval", original_tick[4:-1])
    extra = consumer.stats.extra
    try:
        release.set()
        # >= 2, not == 2: a further redelivery (see above) can follow the second call within milliseconds.
        wait_for(lambda: len(calls) >= 2, 20, "the redelivery of the timed-out message")
        wait_for(lambda: consumer.stats.processed == len(calls) and extra["stale_results"] + extra["acks"] == len(calls)
                 and extra["acks"] >= 1, 10, "the handler calls to finish and the message to be acknowledged")
    finally:
        release.set()
        consumer.stop()
    assert [redelivered for redelivered, _t in calls] == [False] + [True] * (len(calls) - 1)
    # The first call's ack belonged to the closed channel: it was dropped, not sent on the new one (each
    # result is either dropped as stale or acknowledged; a stale ack sent on a new channel would ack its tag 1).
    assert extra["stale_results"] >= 1 and extra["stale_results"] + extra["acks"] == len(calls)
    assert extra["channel_failures"] >= len(calls) - 1
    assert admin.count(queue_name) == 0
