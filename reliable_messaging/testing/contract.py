"""The backend contract suite: the tests every broker behind ``reliable_messaging.connect`` passes.

Written once, run against each backend: ``integration_tests/facade`` runs it on real Kafka and
RabbitMQ (adding the crash tests only real brokers can take), ``tests/test_memory_backend.py`` on the
in-process ``memory://`` backend, with no broker. A service can run it against its own broker setup::

    from reliable_messaging.testing.contract import BrokerContract

    class TestOurBroker(BrokerContract):
        @pytest.fixture
        def url(self) -> str:
            return "amqp://..."

A subclass provides the ``url`` fixture; it may override ``settings`` (connect() keywords),
``consumer_settings`` (consumer() keywords: the suite runs once more with ``{"concurrency": 16}``),
``read_dead_letters`` (default: read them through the facade itself) and ``settle`` (wait until
consumers are ready to receive, e.g. a Kafka group's assignment).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import reliable_messaging as rm
from reliable_messaging import Broker, Delivery, Message, Reject, Retry, RetryPolicy, connect
from reliable_messaging.testing import wait_for

from ._contract_base import FAST_RETRY, ContractBase, Recorder
from ._contract_concurrency import ConcurrencyContract

__all__ = ["FAST_RETRY", "BrokerContract", "ContractBase", "Recorder"]


class BrokerContract(ConcurrencyContract):
    """Tests every backend must pass through ``reliable_messaging.connect``."""

    # -- the contract ---------------------------------------------------------------------------------

    @pytest.mark.timeout(90)
    def test_round_trip_keeps_body_key_headers_and_message_id(self, broker: Broker, unique_name: str) -> None:
        recorder = Recorder()
        self.started(broker, unique_name, recorder)
        futures = [broker.publish(unique_name, f"body {i}", key="customer-7", headers={"n": str(i)})
                   for i in range(10)]
        deliveries = [f.result(timeout=30) for f in futures]
        assert all(isinstance(d, Delivery) and d.destination == unique_name for d in deliveries)
        wait_for(lambda: len(recorder.seen) == 10, 60, "10 messages")
        assert recorder.bodies() == [f"body {i}".encode() for i in range(10)]
        assert [m.message_id for m in recorder.seen] == [f.message_id for f in futures]
        for i, message in enumerate(recorder.seen):
            assert message.key == b"customer-7"
            assert message.header("n") == str(i)
            assert (message.attempt, message.redelivered, message.source) == (1, False, unique_name)

    @pytest.mark.timeout(90)
    def test_a_handled_message_is_acknowledged_and_not_seen_again(self, broker: Broker, unique_name: str) -> None:
        first = Recorder()
        consumer = self.started(broker, unique_name, first)
        for i in range(5):
            broker.publish(unique_name, f"{i}").result(timeout=30)
        wait_for(lambda: len(first.seen) == 5, 60, "5 messages")
        consumer.stop()
        broker.publish(unique_name, b"after the restart").result(timeout=30)
        second = Recorder()
        self.started(broker, unique_name, second)
        wait_for(lambda: len(second.seen) >= 1, 60, "the next message")
        time.sleep(0.5)  # anything acknowledged but still redelivered would arrive alongside it
        assert second.bodies() == [b"after the restart"]

    @pytest.mark.timeout(90)
    def test_closing_the_broker_stops_its_consumers_and_settles_publishes(self, url: str, unique_name: str) -> None:
        recorder = Recorder()
        broker = connect(url, name=unique_name, **self.settings)
        consumer = self.started(broker, unique_name, recorder)
        futures = [broker.publish(unique_name, f"{i}") for i in range(50)]
        wait_for(lambda: len(recorder.seen) >= 1, 60, "the consumer to run")
        assert consumer.running
        broker.close()
        assert not consumer.running
        assert all(f.done() for f in futures), "close() settles every pending publish"
        with pytest.raises(rm.ClosedError):
            broker.publish(unique_name, b"after close")

    @pytest.mark.timeout(90)
    def test_retry_signal_delivers_again_with_the_next_attempt(self, broker: Broker, unique_name: str) -> None:
        def script(message: Message) -> None:
            if message.attempt == 1:
                raise Retry("not yet", delay=0.3)

        recorder = Recorder(script)
        consumer = self.started(broker, unique_name, recorder)
        future = broker.publish(unique_name, b"twice")
        wait_for(lambda: len(recorder.seen) == 2, 60, "the retried delivery")
        assert [m.attempt for m in recorder.seen] == [1, 2]
        assert {m.message_id for m in recorder.seen} == {future.message_id}
        wait_for(lambda: consumer.stats.processed == 1, 10, "the ack")
        assert consumer.stats.retried == 1

    @pytest.mark.timeout(90)
    def test_reject_dead_letters_at_once_and_the_consumer_goes_on(
        self, broker: Broker, url: str, unique_name: str
    ) -> None:
        def script(message: Message) -> None:
            if message.body == b"poison":
                raise Reject("order 17 does not exist")

        recorder = Recorder(script)
        self.started(broker, unique_name, recorder)
        bad = broker.publish(unique_name, b"poison")
        broker.publish(unique_name, b"fine")
        wait_for(lambda: recorder.bodies().count(b"fine") == 1, 60, "the next message to be handled")
        letters = self.read_dead_letters(url, unique_name, 1)
        assert letters[0]["body"] == b"poison"
        assert recorder.bodies().count(b"poison") == 1, "Reject must not retry"
        assert letters[0]["message_id"] == bad.message_id
        assert letters[0]["headers"]["x-rm-reason"] == "order 17 does not exist"
        assert letters[0]["headers"]["x-rm-error-type"] == "reliable_messaging._errors.Reject"

    @pytest.mark.timeout(120)
    def test_failures_retry_then_dead_letter_when_attempts_run_out(
        self, broker: Broker, url: str, unique_name: str
    ) -> None:
        def script(message: Message) -> None:
            if message.body == b"always fails":
                raise ValueError("downstream said no")

        recorder = Recorder(script)
        consumer = self.started(broker, unique_name, recorder)
        broker.publish(unique_name, b"always fails").result(timeout=30)
        letters = self.read_dead_letters(url, unique_name, 1, timeout=60)
        assert letters[0]["body"] == b"always fails"
        attempts = [m.attempt for m in recorder.seen if m.body == b"always fails"]
        assert attempts == [1, 2, 3]
        # The same headers on every broker (reliable_messaging._headers).
        headers = letters[0]["headers"]
        assert headers["x-rm-origin"] == unique_name
        assert str(headers["x-rm-attempt"]) == "3"
        assert headers["x-rm-error-type"] == "builtins.ValueError"
        assert headers["x-rm-error-message"] == "downstream said no"
        assert headers["x-rm-reason"] == "retries exhausted after 3 attempts: ValueError: downstream said no"
        assert int(headers["x-rm-first-failure"]) <= int(time.time() * 1000)
        broker.publish(unique_name, b"next").result(timeout=30)
        wait_for(lambda: b"next" in recorder.bodies(), 30, "the consumer to keep running")
        assert consumer.stats.dead_lettered == 1

    @pytest.mark.timeout(120)
    def test_errors_not_retryable_dead_letter_at_once_and_an_error_rule_sets_its_attempts(
        self, broker: Broker, url: str, unique_name: str
    ) -> None:
        once = RetryPolicy(max_attempts=2, initial_delay=0.1, max_delay=0.1, jitter=0.0)
        policy = RetryPolicy(max_attempts=3, initial_delay=0.2, max_delay=1.0, jitter=0.0,
                             not_retryable=(ValueError,), by_error={TimeoutError: once})

        def script(message: Message) -> None:
            if message.body == b"invalid":
                raise ValueError("qty < 0")
            if message.body == b"slow":
                raise TimeoutError("payment service")

        recorder = Recorder(script)
        self.started(broker, unique_name, recorder, retry=policy)
        broker.publish(unique_name, b"invalid").result(timeout=30)
        broker.publish(unique_name, b"slow").result(timeout=30)
        letters = {letter["body"]: letter["headers"] for letter in self.read_dead_letters(url, unique_name, 2, 60)}
        assert letters[b"invalid"]["x-rm-reason"] == "not retryable: ValueError: qty < 0"
        assert str(letters[b"invalid"]["x-rm-attempt"]) == "1"
        assert letters[b"slow"]["x-rm-reason"] == "retries exhausted after 2 attempts: TimeoutError: payment service"
        assert str(letters[b"slow"]["x-rm-attempt"]) == "2"
        assert sorted((m.body, m.attempt) for m in recorder.seen) == [(b"invalid", 1), (b"slow", 1), (b"slow", 2)]

    @pytest.mark.timeout(90)
    def test_undecodable_message_is_dead_lettered_without_retries(
        self, broker: Broker, url: str, unique_name: str
    ) -> None:
        recorder = Recorder()
        self.started(broker, unique_name, recorder, decoder=json.loads)
        broker.publish(unique_name, b"{not json").result(timeout=30)
        broker.publish(unique_name, b'{"order": 1}').result(timeout=30)
        wait_for(lambda: len(recorder.seen) == 1, 60, "the decodable message")
        assert recorder.seen[0].value == {"order": 1}
        assert self.read_dead_letters(url, unique_name, 1)[0]["body"] == b"{not json"

    @pytest.mark.timeout(90)
    def test_async_handler_and_awaited_publishes(self, url: str, unique_name: str) -> None:
        async def service() -> list[bytes]:
            seen: list[bytes] = []
            done = asyncio.Event()
            loop = asyncio.get_running_loop()

            async def handler(message: Message) -> None:
                await asyncio.sleep(0)
                seen.append(message.body)
                if len(seen) == 3:
                    done.set()

            async with connect(url, name=unique_name, **self.settings) as broker:
                await broker.consumer(unique_name, handler, group=unique_name, loop=loop,
                                      **self.consumer_settings).start()
                deliveries = [await broker.publish(unique_name, f"async {i}") for i in range(3)]
                assert [d.destination for d in deliveries] == [unique_name] * 3
                await asyncio.wait_for(done.wait(), 60)
            return seen

        assert asyncio.run(service()) == [b"async 0", b"async 1", b"async 2"]

    # -- duplicates are processed once ------------------------------------------------------------

    @pytest.mark.timeout(90)
    def test_a_republished_message_is_processed_once(self, url: str, unique_name: str, tmp_path: Path) -> None:
        recorder = Recorder()
        with connect(url, guarantee="effectively-once", dedup_path=tmp_path / "dedup.sqlite3", name=unique_name,
                     **self.settings) as broker:
            consumer = self.started(broker, unique_name, recorder)
            # A producer that lost the ack resends the same message id.
            first = broker.publish(unique_name, b"charge 10 EUR", message_id="payment-1")
            second = broker.publish(unique_name, b"charge 10 EUR", message_id="payment-1")
            broker.publish(unique_name, b"end", message_id="end").result(timeout=30)
            assert first.result(timeout=30).message_id == second.result(timeout=30).message_id == "payment-1"
            wait_for(lambda: consumer.stats.processed + consumer.stats.deduplicated == 3, 60, "3 deliveries")
            assert recorder.bodies() == [b"charge 10 EUR", b"end"]
            assert consumer.stats.deduplicated == 1

    @pytest.mark.timeout(90)
    def test_a_custom_dedup_key_is_processed_once_and_acknowledged(
        self, url: str, unique_name: str, tmp_path: Path
    ) -> None:
        # A business key instead of the message id: the SQLite store's per-message path (no batch claim).
        recorder = Recorder()
        with connect(url, guarantee="effectively-once", dedup_path=tmp_path / "dedup.sqlite3", name=unique_name,
                     **self.settings) as broker:
            consumer = self.started(broker, unique_name, recorder, dedup_key=lambda m: m.body.decode())
            for body in (b"order-7", b"order-7", b"order-8"):  # each publish gets its own message id
                broker.publish(unique_name, body).result(timeout=30)
            wait_for(lambda: consumer.stats.processed + consumer.stats.deduplicated == 3, 60, "3 deliveries")
            assert recorder.bodies() == [b"order-7", b"order-8"]
            assert consumer.stats.deduplicated == 1
            consumer.stop()  # waits for the acks, which wait for the done records' group commit
            broker.publish(unique_name, b"after the restart").result(timeout=30)
            second = Recorder()
            self.started(broker, unique_name, second, dedup=None)
            wait_for(lambda: len(second.seen) >= 1, 60, "the next message")
            time.sleep(0.5)  # anything handled but left unacknowledged would arrive alongside it
            assert second.bodies() == [b"after the restart"]

    # -- stopping ---------------------------------------------------------------------------------------

    @pytest.mark.timeout(90)
    def test_a_handler_raising_a_base_exception_stops_the_consumer_visibly(
        self, url: str, unique_name: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """SystemExit from a library the handler calls: run() raises it, error says why, the message comes back."""
        caplog.set_level(logging.ERROR, logger="reliable_messaging")

        def handler(message: Message) -> None:
            if message.body == b"exit":
                sys.exit(3)

        with connect(url, retry=FAST_RETRY, name=unique_name, **self.settings) as broker:
            # Declared first: `running` is true once the consumer's thread runs, before it declared its queue, and
            # a publish to an exchange without its queue is unroutable (seen on RabbitMQ).
            broker.declare(unique_name, source=unique_name)
            consumer = broker.consumer(unique_name, handler, group=unique_name, **self.consumer_settings)
            raised: list[BaseException] = []

            def run() -> None:
                try:
                    consumer.run()
                except BaseException as exc:  # noqa: BLE001 - what run() raises is the point
                    raised.append(exc)

            runner = threading.Thread(target=run)
            runner.start()
            wait_for(lambda: consumer.running, 30, "the consumer to run")
            broker.publish(unique_name, b"exit").result(timeout=30)
            runner.join(60)
            assert not runner.is_alive(), "run() returned"
            assert len(raised) == 1 and isinstance(raised[0], SystemExit) and raised[0].code == 3
            assert not consumer.running
            assert isinstance(consumer.error, rm.HandlerAborted)
            assert isinstance(consumer.error.__cause__, SystemExit)
            assert any("SystemExit" in r.getMessage() for r in caplog.records), "logged"
            # Not acknowledged: the next consumer of the source gets the message.
            recorder = Recorder()
            self.started(broker, unique_name, recorder)
            wait_for(lambda: recorder.bodies() == [b"exit"], 60, "the message to come back")

    @pytest.mark.timeout(90)
    def test_a_background_consumer_whose_handler_raises_keyboard_interrupt_stops_with_an_error(
        self, url: str, unique_name: str
    ) -> None:
        def handler(message: Message) -> None:
            raise KeyboardInterrupt

        with connect(url, retry=FAST_RETRY, name=unique_name, **self.settings) as broker:
            consumer = self.started(broker, unique_name, handler)
            broker.publish(unique_name, b"x").result(timeout=30)
            wait_for(lambda: not consumer.running, 60, "the consumer to stop")
            assert isinstance(consumer.error, rm.HandlerAborted)
            assert isinstance(consumer.error.__cause__, KeyboardInterrupt)
            assert consumer.stats.processed == 0

    @pytest.mark.timeout(90)
    def test_stop_waits_for_a_slow_handler_and_its_message_goes_nowhere_else_meanwhile(
        self, url: str, unique_name: str
    ) -> None:
        started, release = threading.Event(), threading.Event()

        def slow(message: Message) -> None:
            started.set()
            assert release.wait(60)

        with connect(url, retry=FAST_RETRY, name=unique_name, **self.settings) as broker:
            consumer = self.started(broker, unique_name, slow)
            self.settle(consumer)
            broker.publish(unique_name, b"slow").result(timeout=30)
            assert started.wait(60)
            began = time.monotonic()
            assert consumer.stop(timeout=1.0) is False, "the handler is still running"
            assert 0.9 <= time.monotonic() - began < 5
            assert consumer.running, "it keeps its channel / partition until the handler returns"
            other = Recorder()
            self.started(broker, unique_name, other)  # a second consumer of the same source
            time.sleep(3)
            assert other.seen == [], "the message was handed to another consumer while its handler ran"
            release.set()
            wait_for(lambda: not consumer.running, 30, "the first consumer to finish, acknowledge and close")
            assert consumer.stats.processed == 1
            assert consumer.stop(timeout=1.0) is True
            time.sleep(3)  # the second consumer now has the source to itself: nothing may come back
            assert other.seen == [], "acknowledged when the handler returned"

    @pytest.mark.timeout(120)
    def test_health_shows_ready_a_handler_over_its_limit_and_stopped(self, broker: Broker, unique_name: str) -> None:
        release = threading.Event()

        def handle(message: Message) -> None:
            if message.body == b"slow":
                release.wait(60)

        consumer = broker.consumer(unique_name, handle, **{"group": unique_name, **self.consumer_settings})
        assert consumer.health().problems == ("not running",)
        consumer.start()
        self.settle(consumer)
        wait_for(lambda: consumer.health().ready, 30, "the consumer to be ready")
        broker.publish(unique_name, b"slow").result(timeout=30)
        wait_for(lambda: consumer.health().in_flight == 1, 30, "the handler to run")
        time.sleep(0.5)
        stuck = consumer.health(handler_within=0.3)
        assert (stuck.live, stuck.ready, stuck.connected) == (False, False, True), stuck
        assert stuck.longest_handler >= 0.5 and "a handler has been running" in stuck.problems[0]
        assert consumer.health().live, "without a handler limit a slow handler is not stuck"
        release.set()
        wait_for(lambda: consumer.health(handler_within=0.3).ready and consumer.health().in_flight == 0, 30,
                 "the handler to finish")
        assert consumer.stop(30) is True
        after = consumer.health()
        assert (after.running, after.live, after.ready) == (False, False, False)

    # -- a claim held by a live consumer --------------------------------------------------------------

    @pytest.mark.timeout(90)
    def test_a_message_claimed_by_a_live_consumer_is_handed_back_with_growing_delays(
        self, url: str, unique_name: str, tmp_path: Path
    ) -> None:
        """Not hot-looped: the copies made while it waits are few, each waits longer (x-rm-deferrals)."""
        path = tmp_path / "dedup.sqlite3"
        holder = rm.SQLiteDedupStore(path)  # another live consumer instance, holding the message's claim
        key = f"{unique_name}/held-1"  # the facade's key: <group or queue>/<message id>
        assert holder.claim(key) is rm.ClaimResult.ACQUIRED
        recorder = Recorder()
        try:
            backoff = RetryPolicy(max_attempts=3, initial_delay=0.2, multiplier=3.0, max_delay=5.0, jitter=0.0)
            with connect(url, guarantee="effectively-once", dedup_path=path, retry=backoff, name=unique_name,
                         **self.settings) as broker:
                consumer = self.started(broker, unique_name, recorder)
                broker.publish(unique_name, b"held", message_id="held-1").result(timeout=30)
                wait_for(lambda: consumer.stats.bounced >= 1, 60, "the first hand-back")
                time.sleep(6)
                bounced = consumer.stats.bounced
                # Hand-backs after 0.2, 0.6, 1.8, 5 s: 4 within 6 s of the first; a fixed 0.2 s gives 12 or more.
                assert 3 <= bounced <= 6, bounced
                assert recorder.seen == [], "never run while another consumer holds it"
                holder.release(key)
                wait_for(lambda: len(recorder.seen) == 1, 30, "the message, once the claim is released")
                assert recorder.seen[0].attempt == 1, "hand-backs use up no attempt"
                assert int(recorder.seen[0].header(rm.DEFERRALS_HEADER) or 0) >= 3
        finally:
            holder.close()

    # -- topology, stats, misuse ----------------------------------------------------------------------

    @pytest.mark.timeout(90)
    def test_a_source_declared_first_keeps_what_is_published_before_its_consumer_starts(
        self, broker: Broker, unique_name: str
    ) -> None:
        """declare() makes the source (with its dead-letter and retry parts) before anyone consumes: messages
        published then wait for the consumer, who sees them in order; delete() removes it all."""
        broker.declare(unique_name, source=unique_name)
        futures = [broker.publish(unique_name, f"early {i}", key="k") for i in range(3)]
        assert [f.result(timeout=30).destination for f in futures] == [unique_name] * 3
        recorder = Recorder()
        consumer = self.started(broker, unique_name, recorder)
        wait_for(lambda: len(recorder.seen) == 3, 60, "the messages published before the consumer started")
        assert recorder.bodies() == [b"early 0", b"early 1", b"early 2"]
        assert consumer.stop(timeout=30) is True
        broker.delete(unique_name, source=unique_name)
        broker.delete(unique_name, source=unique_name)  # deleting what is gone is not an error

    @pytest.mark.timeout(90)
    def test_stats_have_the_same_shape_on_every_backend(self, broker: Broker, unique_name: str) -> None:
        def script(message: Message) -> None:
            if message.body == b"poison":
                raise Reject("no")

        consumer = self.started(broker, unique_name, Recorder(script))
        for body in (b"one", b"two", b"poison"):
            broker.publish(unique_name, body).result(timeout=30)
        assert broker.flush(30) is True
        wait_for(lambda: consumer.stats.processed == 2 and consumer.stats.dead_lettered == 1, 60, "3 outcomes")
        stats = broker.stats()
        assert isinstance(stats, rm.BrokerStats) and isinstance(stats.publisher, rm.PublisherStats)
        publisher = stats.publisher
        assert (publisher.published, publisher.confirmed, publisher.failed, publisher.in_flight) == (3, 3, 0, 0)
        assert set(publisher.failures) == {"nacked", "unroutable", "timeout", "too_large", "unavailable", "other"}
        (name, consumer_stats), = stats.consumers.items()
        assert unique_name in name
        assert (consumer_stats.processed, consumer_stats.failed, consumer_stats.dead_lettered) == (2, 1, 1)

    @pytest.mark.timeout(90)
    def test_misuse_gets_the_same_error_on_every_backend(self, broker: Broker, unique_name: str) -> None:
        consumer = self.started(broker, unique_name, Recorder())
        with pytest.raises(rm.ConfigurationError, match="already running"):
            consumer.start()
        assert consumer.stop(timeout=30) is True
        with pytest.raises(rm.ClosedError):
            consumer.start()
        assert consumer.stop(timeout=1) is True, "stopping twice is harmless"
        for bad in ({"body": object()}, {"key": 7}, {"headers": {"h": object()}}, {"message_id": ""}):
            arguments: dict[str, Any] = {"body": b"x", **bad}
            body = arguments.pop("body")
            with pytest.raises(rm.InvalidMessage):
                broker.publish(unique_name, body, **arguments)
        with pytest.raises(rm.ConfigurationError):
            broker.consumer("", Recorder())
        assert isinstance(broker.flush(1), bool) and isinstance(broker.ping(10), bool)

    # -- typed payloads -------------------------------------------------------------------------------

    @pytest.mark.timeout(90)
    def test_typed_payloads_round_trip_and_an_invalid_one_is_dead_lettered_at_once(
        self, broker: Broker, url: str, unique_name: str
    ) -> None:
        import dataclasses

        import msgspec
        import pydantic

        class Order(pydantic.BaseModel):
            id: int
            item: str
            qty: int

        class Line(msgspec.Struct):
            sku: str
            qty: int

        @dataclasses.dataclass
        class Note:
            text: str

        orders: list[tuple[Order, Message]] = []
        others: list[Any] = []
        def take_order(order: Order, message: Message) -> None:
            orders.append((order, message))

        self.started(broker, unique_name, take_order, payload=Order)
        self.started(broker, f"{unique_name}-lines", lambda line: others.append(line), payload=Line)
        self.started(broker, f"{unique_name}-notes", lambda note: others.append(note), payload=Note)
        broker.publish(unique_name, Order(id=1, item="book", qty=2), key="customer-1").result(timeout=30)
        broker.publish(unique_name, {"id": 2, "item": "pen", "qty": "a dozen"}).result(timeout=30)  # invalid
        broker.publish(unique_name, {"id": 3, "item": "ink", "qty": 1}).result(timeout=30)  # a dict is JSON too
        broker.publish(f"{unique_name}-lines", Line(sku="s-1", qty=5)).result(timeout=30)
        broker.publish(f"{unique_name}-notes", Note(text="hello")).result(timeout=30)
        wait_for(lambda: len(orders) == 2 and len(others) == 2, 60, "the valid payloads")
        assert [order for order, _ in orders] == [Order(id=1, item="book", qty=2), Order(id=3, item="ink", qty=1)]
        assert orders[0][1].key == b"customer-1", "the Message stays reachable"
        assert orders[0][1].header("content-type") == "application/json"
        assert sorted(map(repr, others)) == sorted([repr(Line(sku="s-1", qty=5)), repr(Note(text="hello"))])
        (letter,) = self.read_dead_letters(url, unique_name, 1)
        headers = letter["headers"]
        assert headers["x-rm-error-type"] == "reliable_messaging._payload.InvalidPayload"
        assert "qty" in headers["x-rm-error-message"] and "a dozen" not in headers["x-rm-error-message"], \
            "the field path, not the payload's value"
        assert str(headers["x-rm-attempt"]) == "1", "no retry makes an invalid payload valid"
        with pytest.raises(rm.InvalidMessage):
            broker.publish(unique_name, object())  # not encodable: fails at the call
