"""connect(): URL schemes, guarantee presets, overrides and refused combinations — all before any connection."""

from __future__ import annotations

from pathlib import Path

import pytest

import reliable_messaging as rm
from reliable_messaging import ConfigurationError, Guarantee, MemoryDedupStore, SQLiteDedupStore, connect

KAFKA = "kafka://127.0.0.1:1,127.0.0.1:2"  # nothing listens there: connect() must not connect
AMQP = "amqp://user:secret@127.0.0.1:1/%2F"


@pytest.mark.parametrize("url", ["http://x", "kafka:/x", "", "redis://localhost:6379", "kafka://", "kafka://host"])
def test_bad_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        connect(url)
    assert info.value.field == "url"


def test_unknown_guarantee_names_the_allowed_values() -> None:
    with pytest.raises(ConfigurationError, match="at-most-once, at-least-once, effectively-once"):
        connect(KAFKA, guarantee="exactly-once")


def test_kafka_presets_set_every_knob() -> None:
    with connect(KAFKA, guarantee="at-most-once") as broker:
        assert "acks=0 idempotence=off commit=before dedup=off" in repr(broker)
    with connect(KAFKA) as broker:
        assert broker.guarantee is Guarantee.AT_LEAST_ONCE
        assert "acks=all idempotence=on commit=manual_batch dedup=off" in repr(broker)


def test_rabbitmq_presets_set_every_knob_and_hide_the_password() -> None:
    with connect(AMQP, guarantee=Guarantee.AT_MOST_ONCE) as broker:
        text = repr(broker)
        assert "confirms=off mandatory=off persistent=off ack=auto dedup=off" in text
    with connect(AMQP) as broker:
        text = repr(broker)
        assert "confirms=on mandatory=on persistent=on ack=manual dedup=off" in text
    assert "secret" not in text and "user:***@" in text


def test_effectively_once_opens_sqlite_and_closes_it(tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    broker = connect(KAFKA, guarantee="effectively-once", dedup_path=path)
    assert isinstance(broker.dedup, SQLiteDedupStore)
    assert "dedup=SQLiteDedupStore" in repr(broker)
    broker.close()
    assert path.exists()
    with pytest.raises(rm.ClosedError):
        broker.dedup.claim("k")


def test_a_given_store_is_used_and_not_closed() -> None:
    store = MemoryDedupStore()
    with connect(AMQP, guarantee="effectively-once", dedup=store) as broker:
        assert broker.dedup is store
    assert store.claim("still-open") is rm.ClaimResult.ACQUIRED


def test_knobs_stay_overridable() -> None:
    with connect(KAFKA, commit_mode="manual", linger=0.0) as broker:
        assert "acks=all idempotence=on commit=manual" in repr(broker)
        assert broker.weakened == ()
    with connect(AMQP, prefetch=7, queue_type="quorum") as broker:
        assert "persistent=on" in repr(broker)


@pytest.mark.parametrize(("url", "guarantee", "kwargs", "named"), [
    (KAFKA, "at-least-once", {"acks": 1, "enable_idempotence": False}, ["acks=1"]),
    (KAFKA, "effectively-once", {"acks": 0, "enable_idempotence": False}, ["acks=0"]),
    (KAFKA, "at-least-once", {"commit_mode": "auto"}, ["commit_mode=auto"]),
    (AMQP, "effectively-once", {"confirms": False, "mandatory": False}, ["confirms=False", "mandatory=False"]),
    (AMQP, "at-least-once", {"persistent": False}, ["persistent=False"]),
    (AMQP, "at-least-once", {"mandatory": False}, ["mandatory=False"]),
])
def test_an_override_that_breaks_the_guarantee_is_refused_unless_allowed(
        tmp_path: Path, url: str, guarantee: str, kwargs: dict[str, object], named: list[str]) -> None:
    extra: dict[str, object] = {"dedup": MemoryDedupStore()} if guarantee == "effectively-once" else {}
    with pytest.raises(ConfigurationError) as info:
        connect(url, guarantee=guarantee, **extra, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == "guarantee"
    for name in named:
        assert name in str(info.value)
    assert "allow_weaker=True" in str(info.value)
    with connect(url, guarantee=guarantee, allow_weaker=True, **extra, **kwargs) as broker:  # type: ignore[arg-type]
        assert len(broker.weakened) == len(named)
        text = repr(broker)
        assert f"guarantee={guarantee} (weakened: " in text
        for name in named:
            assert name in text


def test_an_at_most_once_preset_is_not_weakened_by_its_own_knobs() -> None:
    with connect(KAFKA, guarantee="at-most-once") as broker:
        assert broker.weakened == ()
    with connect(AMQP, guarantee="at-most-once") as broker:
        assert broker.weakened == ()


def test_a_kafka_consumer_must_name_its_group() -> None:
    """No shared default group: two services using it would split each other's messages."""
    with connect(KAFKA) as broker:
        with pytest.raises(ConfigurationError) as info:
            broker.consumer("orders", lambda m: None)
        assert info.value.field == "group"
        assert broker.consumer("orders", lambda m: None, group="billing").config.group_id == "billing"
    with connect(AMQP) as broker:  # a RabbitMQ queue is shared by its consumers: no group needed
        broker.consumer("orders", lambda m: None)


@pytest.mark.parametrize(("url", "kwargs", "field"), [
    (KAFKA, {"acks": 1, "enable_idempotence": True, "allow_weaker": True}, None),  # idempotence needs acks=all
    (KAFKA, {"allow_weaker": "yes"}, "allow_weaker"),
    (KAFKA, {"guarantee": "at-most-once", "dedup": MemoryDedupStore()}, "commit_mode"),
    (AMQP, {"guarantee": "at-most-once", "dedup": MemoryDedupStore()}, "ack_mode"),
    (AMQP, {"guarantee": "at-most-once", "mandatory": True}, "mandatory"),
    (KAFKA, {"guarantee": "effectively-once", "dedup": None}, "dedup"),
    (KAFKA, {"no_such_knob": 1}, "no_such_knob"),
    (AMQP, {"acks": "all"}, "acks"),  # a Kafka knob on RabbitMQ
    (KAFKA, {"retry": 3}, "retry"),
    (KAFKA, {"dedup": "sqlite"}, "dedup"),
])
def test_incompatible_settings_fail_at_connect(url: str, kwargs: dict[str, object], field: str | None) -> None:
    with pytest.raises(ConfigurationError) as info:
        connect(url, **kwargs)  # type: ignore[arg-type]
    if field is not None:
        assert info.value.field == field


def test_unknown_setting_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown setting 'prefetchh'; allowed: .*prefetch"):
        connect(AMQP, prefetchh=5)


def test_failed_connect_closes_the_store_it_opened(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        connect(AMQP, guarantee="effectively-once", dedup_path=tmp_path / "d.sqlite3", ack_mode="auto")
    # The store's file handle was released: the file can be opened exclusively by a new store at once.
    SQLiteDedupStore(tmp_path / "d.sqlite3").close()


def test_consumer_refuses_a_bad_source_and_a_closed_broker() -> None:
    broker = connect(AMQP)
    with pytest.raises(ConfigurationError):
        broker.consumer("", lambda m: None)
    broker.close()
    with pytest.raises(rm.ClosedError):
        broker.consumer("orders", lambda m: None)
    with pytest.raises(rm.ClosedError):
        broker.publish("orders", b"x")


def test_dead_letter_sources() -> None:
    with connect(KAFKA) as kafka, connect(AMQP) as rabbit:
        assert kafka.dead_letter_source("orders") == "orders.DLT"
        assert rabbit.dead_letter_source("orders") == "orders.dlq"


def test_the_readme_override_examples_run_as_written() -> None:
    """The README block showing overrides (no broker needed: connect() does not connect)."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL) if "allow_weaker=True" in b]
    assert len(blocks) == 1
    # Each statement keeps its broker; the Redis store of the first line becomes a memory store (no server here).
    code = re.sub(r"^rm\.connect\((.*?)\)\s*(#.*)?$", r"opened.append(rm.connect(\1))", blocks[0], flags=re.M)
    code = code.replace('rm.RedisDedupStore("redis://127.0.0.1:6379/0")', "rm.MemoryDedupStore()")
    opened: list[rm.Broker] = []
    exec(code, {"rm": rm, "url": KAFKA, "opened": opened})  # the block's knobs are Kafka's
    assert len(opened) == 3
    assert not opened[0].weakened and not opened[1].weakened
    assert opened[2].weakened, "acks=1 weakens at-least-once"
    for broker in opened:
        broker.close()


def test_an_unreachable_kafka_fails_the_futures_not_the_call() -> None:
    with connect("kafka://127.0.0.1:1", connect_timeout=2.0) as broker:
        import time

        began = time.monotonic()
        future = broker.publish("orders", b"x")
        assert time.monotonic() - began < 0.5, "publish() waited for the broker"
        with pytest.raises(rm.BrokerUnavailable, match="not sent"):
            future.result(timeout=15)
        assert broker.stats().publisher.failures["unavailable"] == 1
        assert broker.ping(1) is False


def test_the_readme_error_policy_example_runs_as_written() -> None:
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL) if "not_retryable=" in b]
    assert len(blocks) == 1
    with connect("memory://readme-error-policy") as broker:
        names: dict[str, object] = {"rm": rm, "broker": broker, "handle": lambda message: None}
        exec(blocks[0], names)
        assert len(broker.stats().consumers) == 1, "the block starts its consumer"
    policy = names["policy"]
    assert isinstance(policy, rm.RetryPolicy)
    assert policy.not_retryable == (ValueError, KeyError) and policy.for_error(TimeoutError()).max_attempts == 3
