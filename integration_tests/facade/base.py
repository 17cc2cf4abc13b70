"""The facade's contract on real brokers: the backend contract suite, plus what only real brokers can take.

:class:`~reliable_messaging.testing.contract.BrokerContract` holds the tests every backend passes
(``memory://`` too). Here come the ones that need a broker outliving the process: a consumer
SIGKILLed between its done record and its ack, and one message id delivered to two consumer
instances sharing Redis. A subclass per broker supplies the ``url`` fixture and the raw-client probes.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import reliable_messaging as rm
from reliable_messaging import Broker, Message, connect
from reliable_messaging.testing import wait_for
from reliable_messaging.testing.contract import FAST_RETRY, BrokerContract, Recorder

__all__ = ["FAST_RETRY", "FacadeContract", "Recorder"]

HERE = Path(__file__).parent


class FacadeContract(BrokerContract):
    """The contract suite plus the crash and shared-store tests real brokers must pass."""

    two_instance_settings: dict[str, Any] = {}  # noqa: RUF012 - per-broker constants, overridden by subclasses

    def prepare_two_places(self, url: str, source: str) -> None:
        """Make ``source`` able to hand two copies of a message to two consumer instances at once."""
        raise NotImplementedError

    def publish_to_two_places(self, broker: Broker, source: str, message_id: str, body: bytes) -> None:
        """Publish the same message id twice so that two consumer instances each get one copy."""
        raise NotImplementedError

    @pytest.mark.fault
    @pytest.mark.slow
    @pytest.mark.timeout(180)
    @pytest.mark.parametrize("stall_writer", [False, True], ids=["writer-running", "file-never-written"])
    def test_redelivered_after_a_crash_between_done_and_ack_is_processed_once(
        self, url: str, unique_name: str, tmp_path: Path, stall_writer: bool
    ) -> None:
        """SIGKILL right after mark_done returned: the broker redelivers (no ack/commit), the store remembers.

        With the store's writer stalled (as if another process held the file's lock), every done record
        exists only in the dead process's journal: the restarted store replays it. And the consumer
        did not wait for the file to acknowledge: RabbitMQ runs with prefetch 1, so the 2nd to 5th
        deliveries came only after the acks of the ones before them.
        """
        with connect(url, name=unique_name, **self.settings) as broker:
            # Declare the source (and create its topics) first, so messages published now are kept.
            broker.consumer(unique_name, lambda m: None, group=unique_name).start().stop()
            ids = [broker.publish(unique_name, f"{i}").message_id for i in range(10)]
            assert broker.flush(30)
        dedup, log = tmp_path / "dedup.sqlite3", tmp_path / "handled.log"
        cmd = [sys.executable, str(HERE / "_dedup_consumer.py"), url, unique_name, unique_name, str(dedup), str(log),
               "10"]
        crash = ["--crash-after", "5", *(["--stall-writer"] if stall_writer else [])]
        crashed = subprocess.run([*cmd, *crash], capture_output=True, text=True, timeout=120, check=False)
        assert crashed.returncode == -9, crashed.stderr[-2000:]
        before_crash = log.read_text().split()
        assert len(before_crash) == 5, "the process died in the 5th message's mark_done"
        assert len(set(before_crash)) == 5 and set(before_crash) <= set(ids)
        if stall_writer:
            with sqlite3.connect(dedup) as conn:
                written = conn.execute("SELECT count(*) FROM rm_dedup WHERE owner IS NULL").fetchone()[0]
            conn.close()
            assert written == 0, "no done record reached the file: only the journal has them"
        restarted = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert restarted.returncode == 0, restarted.stderr[-2000:]
        stats = json.loads(restarted.stdout.strip().splitlines()[-1])
        runs = log.read_text().split()
        assert sorted(runs) == sorted(ids), "every message handled exactly once across the crash"
        assert stats["deduplicated"] >= 1, "the message marked done before the crash must come back and be skipped"
        assert stats["processed"] == len(ids) - len(before_crash)

    @pytest.mark.redis
    @pytest.mark.timeout(120)
    def test_a_message_delivered_to_two_consumer_instances_is_processed_once(
        self, url: str, unique_name: str, redis_endpoint: Any
    ) -> None:
        store_a = rm.RedisDedupStore(redis_endpoint.url, prefix=f"{unique_name}:")
        store_b = rm.RedisDedupStore(redis_endpoint.url, prefix=f"{unique_name}:")
        self.prepare_two_places(url, unique_name)
        handled: list[tuple[str, str]] = []
        seen = [0, 0]
        lock = threading.Lock()

        def instance(name: str, index: int) -> Callable[[Message], None]:
            def handler(message: Message) -> None:
                with lock:
                    seen[index] += 1
                    handled.append((name, message.message_id))
                time.sleep(0.3)  # both copies are in flight together: the claim decides
            return handler

        settings = {**self.settings, **self.two_instance_settings}
        with connect(url, guarantee="effectively-once", dedup=store_a, name=unique_name, **settings) as a, \
                connect(url, guarantee="effectively-once", dedup=store_b, name=unique_name, **settings) as b:
            consumer_a = self.started(a, unique_name, instance("a", 0), group=unique_name)
            consumer_b = self.started(b, unique_name, instance("b", 1), group=unique_name)
            self.settle(consumer_a, consumer_b)
            for n in range(5):
                self.publish_to_two_places(a, unique_name, f"order-{n}", f"order {n}".encode())
            total = lambda: sum(c.stats.processed + c.stats.deduplicated for c in (consumer_a, consumer_b))  # noqa: E731
            wait_for(lambda: total() == 10, 90, "both copies of every message to be settled")
        assert sorted(mid for _, mid in handled) == [f"order-{n}" for n in range(5)], handled
        # Ten deliveries settled, five handler runs: every second copy was recognised and skipped.
        assert consumer_a.stats.deduplicated + consumer_b.stats.deduplicated == 5
        assert sum(seen) == 5
        store_a.close()
        store_b.close()
