"""The contract suite's tests of concurrent handlers and of services running on an event loop (see :mod:`.contract`)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from reliable_messaging import Broker, Message, connect
from reliable_messaging._facade import backend
from reliable_messaging.testing import wait_for

from ._contract_base import ContractBase

__all__ = ["ConcurrencyContract"]


class ConcurrencyContract(ContractBase):
    """Concurrent handlers (threads and coroutines), handler timeouts, and a service on asyncio."""

    @pytest.mark.timeout(120)
    @pytest.mark.parametrize("kind", ["threads", "async"])
    def test_concurrent_handlers_run_side_by_side_and_keep_each_keys_order(
        self, broker: Broker, unique_name: str, kind: str
    ) -> None:
        """concurrency=8: different keys at once (8 seen running together), one key one at a time, in order."""
        keys, per_key = 8, 6
        lock = threading.Lock()
        running: dict[bytes, int] = {}
        seen: dict[bytes, list[bytes]] = {}
        overlaps: list[bytes] = []
        peak = [0]

        def enter(message: Message) -> None:
            key = message.key or b""
            with lock:
                if running.get(key):
                    overlaps.append(key)
                running[key] = running.get(key, 0) + 1
                peak[0] = max(peak[0], sum(running.values()))

        def leave(message: Message) -> None:
            key = message.key or b""
            with lock:
                running[key] -= 1
                seen.setdefault(key, []).append(message.body)

        def handler(message: Message) -> None:
            enter(message)
            time.sleep(0.15)
            leave(message)

        async def async_handler(message: Message) -> None:
            enter(message)
            await asyncio.sleep(0.15)
            leave(message)

        self.started(broker, unique_name, handler if kind == "threads" else async_handler,
                     **{"concurrency": 8, **self.consumer_settings})
        for i in range(per_key):
            for k in range(keys):
                broker.publish(unique_name, f"{k}:{i}", key=f"key-{k}")
        assert broker.flush(30) is True
        wait_for(lambda: sum(map(len, seen.values())) == keys * per_key, 90, "every message")
        assert overlaps == [], "two messages of one key ran at once"
        for k in range(keys):
            assert seen[f"key-{k}".encode()] == [f"{k}:{i}".encode() for i in range(per_key)], f"key-{k} in order"
        assert peak[0] >= 4, f"at most {peak[0]} handlers ran at once"

    @pytest.mark.timeout(120)
    def test_a_handler_over_its_timeout_is_a_failed_attempt_and_its_late_result_is_ignored(
        self, broker: Broker, unique_name: str
    ) -> None:
        calls: list[int] = []

        def handler(message: Message) -> None:
            calls.append(message.attempt)
            if message.attempt == 1:
                time.sleep(3)  # over handler_timeout: the retry goes on meanwhile

        consumer = self.started(broker, unique_name, handler, handler_timeout=0.5)
        broker.publish(unique_name, b"slow once").result(timeout=30)
        wait_for(lambda: consumer.stats.processed == 1, 60, "the second attempt")
        time.sleep(4)  # the first attempt's late return counts for nothing
        assert calls == [1, 2]
        stats = consumer.stats
        assert (stats.processed, stats.failed, stats.retried, stats.dead_lettered) == (1, 1, 1, 0)

    @pytest.mark.timeout(120)
    def test_start_publish_and_stop_do_not_block_the_event_loop(
        self, url: str, unique_name: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A service connects, starts a consumer, publishes and awaits confirms, consumes and stops, all from
        coroutines: no step the loop runs takes 50 ms (asyncio's debug mode reports every slower one; the
        blocking parts run off the loop). A ticker's worst gap per phase is printed and held under 250 ms: it
        also counts the machine's scheduling noise and other threads holding the GIL (124 ms was seen once during
        publish on a 2-core machine busy with a pip install and another broker client, with no slow step), which is
        why the 50 ms check is on the loop's own steps; a blocking connect or stop takes far longer than 250 ms."""
        caplog.set_level(logging.WARNING, logger="asyncio")
        stalls: dict[str, float] = {}
        # connect() imports its backend (and the broker's client) on first use: tens of milliseconds, once per
        # process, as any import. A service imports before it serves; so does this test.
        backend(url.partition(":")[0])

        async def service() -> int:
            loop = asyncio.get_running_loop()
            loop.slow_callback_duration = 0.05
            worst = [0.0]
            ticking = True

            async def ticker() -> None:
                last = loop.time()
                while ticking:
                    await asyncio.sleep(0.005)
                    now = loop.time()
                    worst[0] = max(worst[0], now - last - 0.005)
                    last = now

            async def phase(name: str) -> None:
                await asyncio.sleep(0.02)  # the ticker runs: a stall of this phase is counted in it
                stalls[name] = worst[0]
                worst[0] = 0.0

            tick = asyncio.create_task(ticker())
            await asyncio.sleep(0.05)
            await phase("idle")
            seen: list[bytes] = []

            async def handler(message: Message) -> None:
                seen.append(message.body)

            async with connect(url, name=unique_name, **self.settings) as broker:
                await phase("connect")
                consumer = await broker.consumer(unique_name, handler, group=unique_name,
                                                 **self.consumer_settings).start()
                await phase("start")
                for i in range(20):
                    await broker.publish(unique_name, f"m{i}")
                await phase("publish")
                deadline = loop.time() + 60
                while len(seen) < 20 and loop.time() < deadline:
                    await asyncio.sleep(0.01)
                await phase("consume")
                assert await consumer.stop() is True
                await phase("stop")
            await phase("close")
            ticking = False
            await tick
            return len(seen)

        assert asyncio.run(service(), debug=True) == 20
        print(f"worst ticker gaps (ms): { {k: round(v * 1000, 1) for k, v in stalls.items()} }")  # noqa: T201 - the figures, with -s
        slow = [r.getMessage() for r in caplog.records if r.name == "asyncio" and "took" in r.getMessage()]
        assert slow == [], f"steps of the event loop took 50 ms or more: {slow}"
        assert max(stalls.values()) <= 0.25, f"the ticker waited 250 ms or more (seconds by phase): {stalls}"
