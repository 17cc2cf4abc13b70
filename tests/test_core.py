"""Broker-independent logic: errors, message helpers, delivery futures, retry policy, handler outcomes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import pytest

from reliable_messaging import (
    ClaimResult,
    ConfigurationError,
    DedupStore,
    Delivery,
    DeliveryFailed,
    DeliveryFuture,
    DeliveryTimeout,
    Disposition,
    InvalidMessage,
    Message,
    Reject,
    Retry,
    RetryPolicy,
    StoreUnavailable,
    is_transient,
)
from reliable_messaging._handling import HandlerRunner
from reliable_messaging._message import coerce_body, new_message_id

NO_SLEEP = RetryPolicy(max_attempts=3, initial_delay=0.1, max_delay=1.0, jitter=0.0, sleep=lambda s: None)


def msg(attempt: int = 1, message_id: str = "m-1", body: bytes = b"x") -> Message:
    return Message(body=body, value=body, message_id=message_id, key=None, attempt=attempt, source="q")


# -- errors -------------------------------------------------------------------------------------


def test_configuration_error_is_a_value_error_naming_the_field() -> None:
    exc = ConfigurationError("acks must be 0, 1 or 'all'", field="acks")
    assert isinstance(exc, ValueError)
    assert exc.field == "acks"


def test_transient_is_a_short_explicit_list() -> None:
    assert is_transient(DeliveryTimeout("slow"))
    assert is_transient(DeliveryFailed("leader moved", code="NOT_LEADER", retriable=True))
    assert not is_transient(DeliveryFailed("too big", code="MSG_SIZE_TOO_LARGE", retriable=False))
    assert not is_transient(RuntimeError("anything"))
    assert isinstance(DeliveryTimeout("x"), TimeoutError)


def test_retry_signal_refuses_negative_delay() -> None:
    with pytest.raises(ValueError, match="delay must be >= 0"):
        Retry(delay=-1)


# -- messages -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "expected"), [
    (b"raw", b"raw"), (bytearray(b"ba"), b"ba"), (memoryview(b"mv"), b"mv"), ("täxt", "täxt".encode()),
])
def test_coerce_body(body: object, expected: bytes) -> None:
    assert coerce_body(body) == expected


@pytest.mark.parametrize("body", [None, 42, {"a": 1}, ["x"]])
def test_coerce_body_rejects_other_types_with_a_typed_error(body: object) -> None:
    with pytest.raises(InvalidMessage, match="message body must be bytes"):
        coerce_body(body)


def test_message_ids_are_unique_32_hex_chars() -> None:
    ids = {new_message_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in list(ids)[:10])


def test_message_header_decodes_bytes() -> None:
    m = Message(body=b"", value=b"", message_id="1", key=None, headers={"a": b"\xc3\xa4", "n": 3})
    assert m.header("a") == "ä"
    assert m.header("n") == "3"
    assert m.header("missing") is None


def test_delivery_future_works_with_concurrent_futures_and_asyncio() -> None:
    future = DeliveryFuture("abc")
    delivery = Delivery(message_id="abc", destination="t", partition=0, offset=7)
    threading.Timer(0.05, future.set_result, args=(delivery,)).start()
    done, _ = concurrent.futures.wait([future], timeout=5)
    assert future in done
    assert future.result() is delivery

    async def main() -> Delivery:
        f = DeliveryFuture("def")
        asyncio.get_running_loop().call_later(0.01, f.set_result, delivery)
        return await f

    assert asyncio.run(main()) is delivery


def test_delivery_future_failure_is_raised_by_await() -> None:
    async def main() -> None:
        f = DeliveryFuture("x")
        f.set_exception(DeliveryTimeout("no ack", message_id="x"))
        await f

    with pytest.raises(DeliveryTimeout):
        asyncio.run(main())


# -- retry policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_attempts": 0}, "max_attempts"), ({"initial_delay": -1}, "initial_delay"),
    ({"multiplier": 0.5}, "multiplier"), ({"initial_delay": 5, "max_delay": 1}, "max_delay"),
    ({"jitter": -0.1}, "jitter"),
    ({"not_retryable": (ValueError, "KeyError")}, "not_retryable"), ({"not_retryable": 3}, "not_retryable"),
    ({"by_error": {ValueError: 3}}, "by_error"), ({"by_error": {"ValueError": RetryPolicy()}}, "by_error"),
    ({"by_error": [1, 2]}, "by_error"),
    ({"max_attempts": 3, "by_error": {TimeoutError: RetryPolicy(max_attempts=4)}}, "by_error"),
    ({"by_error": {TimeoutError: RetryPolicy(not_retryable=(KeyError,))}}, "by_error"),
])
def test_retry_policy_validates_at_construction(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy(**kwargs)
    assert info.value.field == field


def test_retry_delays_grow_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=3.0, multiplier=2.0, jitter=0.0)
    assert [policy.delay_for(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_retry_delays_have_bounded_jitter() -> None:
    policy = RetryPolicy(initial_delay=1.0, max_delay=100, jitter=0.5)
    delays = [policy.delay_for(1) for _ in range(200)]
    assert all(1.0 <= d <= 1.5 for d in delays)
    assert len(set(delays)) > 1


def test_retrying_retries_only_transient_errors_and_never_really_sleeps() -> None:
    slept: list[float] = []
    policy = RetryPolicy(max_attempts=4, initial_delay=1, jitter=0, sleep=slept.append)
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise DeliveryTimeout("broker slow")
        return "ok"

    assert policy.retrying(what="publish")(flaky) == "ok"
    assert calls == 3
    assert slept == [1.0, 2.0]

    def broken() -> None:
        raise ValueError("not transient")

    with pytest.raises(ValueError, match="not transient"):
        policy.retrying()(broken)


def test_retrying_stops_after_max_attempts_and_reraises_the_last_error() -> None:
    policy = RetryPolicy(max_attempts=3, jitter=0, sleep=lambda s: None)
    attempts: list[int] = []

    def always() -> None:
        attempts.append(1)
        raise DeliveryTimeout("still down")

    with pytest.raises(DeliveryTimeout, match="still down"):
        policy.retrying()(always)
    assert len(attempts) == 3


# -- handler outcomes -----------------------------------------------------------------------------


def test_success_acks() -> None:
    runner: HandlerRunner[Message] = HandlerRunner(lambda m: None, retry=NO_SLEEP)
    outcome = runner.invoke(msg())
    assert outcome.disposition is Disposition.ACK
    assert runner.stats.processed == 1


def test_failure_retries_with_policy_delay_then_dead_letters_when_exhausted() -> None:
    def fail(m: Message) -> None:
        raise KeyError("boom")

    runner: HandlerRunner[Message] = HandlerRunner(fail, retry=NO_SLEEP)
    first = runner.invoke(msg(attempt=1))
    assert first.disposition is Disposition.RETRY
    assert first.delay == 0.1
    assert isinstance(first.error, KeyError)
    assert runner.invoke(msg(attempt=2)).disposition is Disposition.RETRY
    last = runner.invoke(msg(attempt=3))
    assert last.disposition is Disposition.DEAD_LETTER
    assert "retries exhausted after 3 attempts: KeyError" in last.reason
    assert (runner.stats.failed, runner.stats.retried, runner.stats.dead_lettered) == (3, 2, 1)


def test_errors_not_retryable_dead_letter_at_once_and_say_so() -> None:
    class InvalidOrder(ValueError):
        pass

    policy = RetryPolicy(max_attempts=3, initial_delay=0.1, jitter=0.0, not_retryable=(ValueError,))

    def fail(m: Message) -> None:
        raise InvalidOrder("qty < 0")

    runner: HandlerRunner[Message] = HandlerRunner(fail, retry=policy)
    outcome = runner.invoke(msg(attempt=1))
    assert outcome.disposition is Disposition.DEAD_LETTER, "a subclass of a type not retryable"
    assert outcome.reason == "not retryable: InvalidOrder: qty < 0"
    assert (runner.stats.failed, runner.stats.retried, runner.stats.dead_lettered) == (1, 0, 1)
    # An explicit Retry is the handler's own decision: retried as usual.
    explicit = RetryPolicy(not_retryable=(Exception,), jitter=0.0, initial_delay=0.1)
    assert HandlerRunner(lambda m: (_ for _ in ()).throw(Retry("later")), retry=explicit) \
        .invoke(msg(attempt=1)).disposition is Disposition.RETRY


def test_an_error_rule_sets_its_own_attempts_and_delays() -> None:
    slow = RetryPolicy(max_attempts=2, initial_delay=5.0, max_delay=5.0, jitter=0.0)
    policy = RetryPolicy(max_attempts=4, initial_delay=0.1, jitter=0.0, by_error={TimeoutError: slow})
    assert policy.by_error == ((TimeoutError, slow),)
    assert policy.for_error(TimeoutError()) is slow and policy.for_error(KeyError()) is policy

    def fail(m: Message) -> None:
        raise TimeoutError("payment service")

    runner: HandlerRunner[Message] = HandlerRunner(fail, retry=policy)
    first = runner.invoke(msg(attempt=1))
    assert (first.disposition, first.delay) == (Disposition.RETRY, 5.0)
    last = runner.invoke(msg(attempt=2))
    assert last.disposition is Disposition.DEAD_LETTER
    assert last.reason == "retries exhausted after 2 attempts: TimeoutError: payment service"
    other = HandlerRunner(lambda m: {}["missing"], retry=policy)
    assert [other.invoke(msg(attempt=n)).disposition for n in (1, 2, 3, 4)] == [Disposition.RETRY] * 3 + [
        Disposition.DEAD_LETTER], "other errors keep the policy's own 4 attempts"
    assert hash(policy) == hash(RetryPolicy(max_attempts=4, initial_delay=0.1, jitter=0.0,
                                            by_error=((TimeoutError, slow),)))


def test_retry_signal_overrides_delay_and_reject_dead_letters_at_once() -> None:
    def retry(m: Message) -> None:
        raise Retry("later", delay=7.5)

    outcome = HandlerRunner(retry, retry=NO_SLEEP).invoke(msg())
    assert outcome.disposition is Disposition.RETRY
    assert outcome.delay == 7.5

    def reject(m: Message) -> None:
        raise Reject("invalid order")

    outcome = HandlerRunner(reject, retry=NO_SLEEP).invoke(msg(attempt=1))
    assert outcome.disposition is Disposition.DEAD_LETTER
    assert outcome.reason == "invalid order"


def test_undecodable_body_dead_letters_without_calling_the_handler() -> None:
    import json

    called: list[Message] = []
    runner: HandlerRunner[Message] = HandlerRunner(called.append, retry=NO_SLEEP, decoder=json.loads)
    value, outcome = runner.decode(b"{not json")
    assert value is None
    assert outcome is not None
    assert outcome.disposition is Disposition.DEAD_LETTER
    assert outcome.reason.startswith("undecodable: JSONDecodeError")
    assert runner.decode(b'{"a": 1}') == ({"a": 1}, None)
    assert called == []


def test_async_handler_runs_on_a_private_loop() -> None:
    seen: list[str] = []

    async def handler(m: Message) -> None:
        await asyncio.sleep(0.001)
        seen.append(m.message_id)

    runner: HandlerRunner[Message] = HandlerRunner(handler, retry=NO_SLEEP)
    try:
        assert runner.invoke(msg(message_id="a1")).disposition is Disposition.ACK
        assert seen == ["a1"]

        async def failing(m: Message) -> None:
            raise Reject("async no")

        runner.handler = failing
        assert runner.invoke(msg()).disposition is Disposition.DEAD_LETTER
    finally:
        runner.close()


class RecordingStore(DedupStore):
    """An in-test store recording calls, to pin down the claim -> run -> mark/release protocol."""

    def __init__(self, answer: ClaimResult = ClaimResult.ACQUIRED, fail: bool = False) -> None:
        super().__init__()
        self.answer, self.fail, self.calls = answer, fail, []

    def claim(self, key: str) -> ClaimResult:
        self.calls.append(("claim", key))
        if self.fail:
            raise StoreUnavailable("redis down")
        return self.answer

    def mark_done(self, key: str) -> None:
        self.calls.append(("done", key))

    def release(self, key: str) -> None:
        self.calls.append(("release", key))


def test_dedup_protocol_success_marks_done_failure_releases() -> None:
    store = RecordingStore()
    runner: HandlerRunner[Message] = HandlerRunner(lambda m: None, retry=NO_SLEEP, dedup=store)
    runner.invoke(msg(message_id="k1"))
    assert store.calls == [("claim", "k1"), ("done", "k1")]

    def fail(m: Message) -> None:
        raise OSError("disk")

    store.calls.clear()
    runner.handler = fail
    assert runner.invoke(msg(message_id="k2")).disposition is Disposition.RETRY
    assert store.calls == [("claim", "k2"), ("release", "k2")]


def test_dedup_done_acks_without_calling_the_handler() -> None:
    called: list[Message] = []
    runner: HandlerRunner[Message] = HandlerRunner(called.append, retry=NO_SLEEP,
                                                   dedup=RecordingStore(ClaimResult.DONE))
    outcome = runner.invoke(msg())
    assert outcome.disposition is Disposition.ACK
    assert outcome.deduplicated
    assert called == []
    assert runner.stats.deduplicated == 1


@pytest.mark.parametrize("store", [RecordingStore(ClaimResult.IN_PROGRESS), RecordingStore(fail=True)])
def test_dedup_in_progress_or_unavailable_bounces_without_using_an_attempt(store: RecordingStore) -> None:
    called: list[Message] = []
    runner: HandlerRunner[Message] = HandlerRunner(called.append, retry=NO_SLEEP, dedup=store)
    outcome = runner.invoke(msg(attempt=3))  # the last allowed attempt: still not dead-lettered
    assert outcome.disposition is Disposition.RETRY
    assert not outcome.counts_attempt
    assert called == []


def test_custom_dedup_key() -> None:
    store = RecordingStore()
    runner: HandlerRunner[Message] = HandlerRunner(lambda m: None, retry=NO_SLEEP, dedup=store,
                                                   dedup_key=lambda m: f"order:{m.body.decode()}")
    runner.invoke(msg(body=b"42"))
    assert store.calls[0] == ("claim", "order:42")


def test_handler_must_be_callable() -> None:
    with pytest.raises(TypeError, match="handler must be callable"):
        HandlerRunner("not callable", retry=NO_SLEEP)  # type: ignore[arg-type]


def test_message_ids_stay_unique_across_threads_and_forks() -> None:
    import os

    seen: list[str] = []
    threads = [threading.Thread(target=lambda: seen.extend(new_message_id() for _ in range(5000))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 20_000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: its ids must not repeat the parent's next ones
        os.write(write, new_message_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_id = os.read(read, 64).decode()
    parent_next = new_message_id()
    assert child_id != parent_next
    assert child_id[:16] != parent_next[:16]
