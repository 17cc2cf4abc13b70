"""RedisDedupStore without a server: optional import, configuration. Its behaviour against a real
Redis is in ``integration_tests/dedup``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import redis

from reliable_messaging import ConfigurationError
from reliable_messaging._dedup import RedisDedupStore


def test_reliable_messaging_imports_without_redis_and_the_store_names_the_extra() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["redis"] = None  # as if redis-py were not installed
        import reliable_messaging
        from reliable_messaging._dedup import MemoryDedupStore, RedisDedupStore, SQLiteDedupStore
        try:
            RedisDedupStore("redis://127.0.0.1:6379/0")
        except ImportError as exc:
            print(exc)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pip install 'reliable-messaging[redis]'" in result.stdout


def test_missing_redis_raises_import_error_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ImportError, match=r"pip install 'reliable-messaging\[redis\]'"):
        RedisDedupStore("redis://127.0.0.1:6379/0")


def test_constructing_from_a_url_does_not_connect() -> None:
    store = RedisDedupStore("redis://127.0.0.1:1/0")  # nothing listens on port 1
    store.close()


@pytest.mark.parametrize(
    ("url_or_client", "kwargs", "field"),
    [
        ("http://127.0.0.1:6379", {}, "url_or_client"),
        (42, {}, "url_or_client"),
        ("redis://127.0.0.1:6379/0", {"prefix": 1}, "prefix"),
        ("redis://127.0.0.1:6379/0", {"socket_timeout": 0}, "socket_timeout"),
        ("redis://127.0.0.1:6379/0", {"socket_timeout": None}, "socket_timeout"),
        ("redis://127.0.0.1:6379/0", {"lease": 10, "ttl": 5}, "ttl"),
    ],
)
def test_bad_parameters_fail_at_construction(url_or_client: object, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RedisDedupStore(url_or_client, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_a_client_without_socket_timeout_is_refused() -> None:
    client = redis.Redis(host="127.0.0.1", port=1, socket_timeout=None)
    try:
        with pytest.raises(ConfigurationError, match="socket_timeout"):
            RedisDedupStore(client)
    finally:
        client.close()


def test_repr_hides_the_password() -> None:
    store = RedisDedupStore("redis://user:s3cret@127.0.0.1:1/0")
    try:
        assert "s3cret" not in repr(store)
        assert "redis://user:***@127.0.0.1:1/0" in repr(store)
    finally:
        store.close()
