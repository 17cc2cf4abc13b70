"""The pure parts of the delivery audit and its command: promises, settings parsing, argument checks."""

from __future__ import annotations

import click
import pytest

from reliable_messaging import ConfigurationError, Guarantee
from reliable_messaging._cli import parse_setting
from reliable_messaging._verify import promise_of, verify


def test_each_guarantee_promises_what_the_readme_says() -> None:
    assert promise_of(Guarantee.AT_MOST_ONCE, kills=3, concurrency=16)[1:] == (0, False)
    assert promise_of(Guarantee.AT_LEAST_ONCE, kills=3, concurrency=16)[1:] == (None, True)
    # effectively-once: the handlers running when the process died, per kill
    assert promise_of(Guarantee.EFFECTIVELY_ONCE, kills=3, concurrency=16)[1:] == (48, True)
    assert promise_of(Guarantee.EFFECTIVELY_ONCE, kills=0, concurrency=1)[1:] == (0, True)


@pytest.mark.parametrize(("text", "expected"), [
    ("prefetch=50", ("prefetch", 50)),
    ("allow_weaker=true", ("allow_weaker", True)),
    ("commit_mode=auto", ("commit_mode", "auto")),
    ("acks=all", ("acks", "all")),
    ("session_timeout=6.5", ("session_timeout", 6.5)),
    (" name = x=y", ("name", " x=y")),
])
def test_settings_parse_as_json_or_else_as_text(text: str, expected: tuple[str, object]) -> None:
    assert parse_setting(text) == expected


@pytest.mark.parametrize("text", ["prefetch", "=5", ""])
def test_a_setting_without_a_field_name_is_a_usage_error(text: str) -> None:
    with pytest.raises(click.BadParameter, match="field=value"):
        parse_setting(text)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"guarantee": "exactly-once"}, "guarantee"),
    ({"messages": 0}, "messages"),
    ({"kill_every": -1}, "kill_every"),
    ({"concurrency": 0}, "concurrency"),
    ({"settings": {"no_such_setting": 1}}, None),
    ({"cut_every": 0}, "cut_every"), ({"cut_every": True}, "cut_every"),
    ({"cut_every": 1.0}, "cut_every"),  # kafka://127.0.0.1:1 is not the local broker: its clients cannot be proxied
])
def test_invalid_arguments_fail_before_anything_connects(kwargs: dict[str, object], field: str | None) -> None:
    # An unreachable address: connecting would hang for the timeout, so a quick error shows nothing connected.
    with pytest.raises(ConfigurationError) as info:
        verify("kafka://127.0.0.1:1", **kwargs)  # type: ignore[arg-type]
    if field is not None:
        assert info.value.field == field


def test_an_in_process_broker_cannot_be_audited() -> None:
    with pytest.raises(ConfigurationError, match="outside the process"):
        verify("memory://")


def test_the_management_api_defaults_to_the_amqp_urls_host_and_credentials() -> None:
    from reliable_messaging._rabbitmq._check import management_url_of

    assert management_url_of("amqp://app:s%40cret@mq.internal:5672/prod") == "http://app:s%40cret@mq.internal:15672"
    assert management_url_of("amqps://mq.internal/%2F") == "https://mq.internal:15672"


@pytest.mark.parametrize(("url", "kwargs", "field"), [
    ("kafka://127.0.0.1:1", {"queue": "q"}, "topic"),
    ("amqp://127.0.0.1:1/%2F", {"topic": "t"}, "queue"),
    ("memory://", {"topic": "t"}, "url"),
    ("kafka://127.0.0.1:1", {"topic": "t", "guarantee": "exactly-once"}, "guarantee"),
    ("kafka://127.0.0.1:1", {"topic": "t", "timeout": 0}, "timeout"),
])
def test_check_refuses_what_it_cannot_check_before_connecting(url: str, kwargs: dict[str, object],
                                                              field: str) -> None:
    from reliable_messaging import check

    with pytest.raises(ConfigurationError) as info:
        check(url, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
