"""Redis dedup store: one record of message ids shared by every consumer instance.

For consumers on several hosts, or a RabbitMQ queue with several competing
consumers, where a redelivered message can land on a different instance than
the one that processed it. Expiry is Redis's own key expiry (server time), so
instances need no synchronised clocks.

redis-py is imported when a store is constructed, not when this module is: the
``redis`` extra is optional.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from .._errors import ClosedError, ConfigurationError, StoreUnavailable
from ._base import DEFAULT_LEASE, DEFAULT_TTL, ClaimResult, DedupStore
from ._memory import ThreadTokens, check_key

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["DEFAULT_PREFIX", "DEFAULT_SOCKET_TIMEOUT", "RedisDedupStore"]

DEFAULT_PREFIX = "rm:dedup:"
"""Prepended to every message id, so dedup keys are recognisable (and scannable) in a shared Redis."""

DEFAULT_SOCKET_TIMEOUT = 2.0
"""Seconds to connect and to wait for each reply: a dedup command answers in well under a
millisecond, so two seconds without an answer means Redis is unreachable or stuck, and the
consumer hands the message back instead of blocking (and missing its broker heartbeats)."""

_DONE_VALUE = "done"
"""The value of a done record. Owner tokens are ``<hex>:<hex>``, so they never equal it."""

# Atomic on the server. SET NX PX takes a free key. Otherwise the existing value decides:
# "done" -> done; the caller's own token -> its claim is renewed (ACQUIRED); anything else is
# a live claim of another consumer (an expired one would have been deleted by Redis).
_CLAIM_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
local value = redis.call('GET', KEYS[1])
if value == ARGV[3] then
    return 2
end
if value == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
return 3
"""
_CLAIM_RESULTS = {1: ClaimResult.ACQUIRED, 2: ClaimResult.DONE, 3: ClaimResult.IN_PROGRESS}

# Delete the key only while it still holds the caller's token: after the lease expired another
# consumer may own it, and a done record must stay.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def _import_redis() -> ModuleType:
    try:
        import redis
    except ImportError as exc:
        raise ImportError("RedisDedupStore needs redis-py: pip install 'reliable-messaging[redis]'") from exc
    return redis


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisDedupStore(DedupStore):
    """Claims and done records as Redis keys ``<prefix><message id>`` with a server-side expiry.

    * :meth:`claim`: ``SET key <owner token> NX PX lease``; if the key exists, ``"done"`` means
      ``DONE``, another token ``IN_PROGRESS``. One round trip (a Lua script, atomic on the server).
    * :meth:`mark_done`: ``SET key done PX ttl``, whoever holds the claim: the work is done.
    * :meth:`release`: delete the key only if it still holds this consumer's token (Lua).

    *Ownership* is per store instance and thread: the token is a random id of this instance plus
    a number for the calling thread (never reused, unlike thread ids). A consumer whose lease ran
    out cannot release the claim of the consumer that took the key over; a thread re-claiming a
    key it holds gets ``ACQUIRED``.

    ``url_or_client``: a ``redis://`` / ``rediss://`` / ``unix://`` URL, for which the store builds
    its own client with ``socket_timeout`` for connecting and for every reply and no client-side
    retries (the handler runner already retries a message whose store was unavailable), and closes
    it in :meth:`close`; or a ``redis.Redis`` client you own (it is not closed), which must have a
    ``socket_timeout``. Every redis-py error (connection refused or lost, timeout, ``READONLY``,
    ``OOM``) raises :class:`~reliable_messaging.StoreUnavailable`, within about
    ``socket_timeout`` seconds.
    """

    def __init__(
        self,
        url_or_client: str | Redis,
        *,
        lease: float = DEFAULT_LEASE,
        ttl: float = DEFAULT_TTL,
        prefix: str = DEFAULT_PREFIX,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
    ) -> None:
        super().__init__(lease=lease, ttl=ttl)
        if not isinstance(prefix, str):
            raise ConfigurationError(f"prefix must be a str, got {prefix!r}", field="prefix")
        if isinstance(socket_timeout, bool) or not isinstance(socket_timeout, int | float) or socket_timeout <= 0:
            raise ConfigurationError(
                f"socket_timeout must be a number of seconds > 0, got {socket_timeout!r}", field="socket_timeout"
            )
        redis = _import_redis()
        self.prefix = prefix
        self.socket_timeout = float(socket_timeout)
        self._exceptions: Any = redis.exceptions
        self._redis_error: type[Exception] = redis.exceptions.RedisError
        self._client: Redis
        if isinstance(url_or_client, str):
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            try:
                self._client = redis.Redis.from_url(
                    url_or_client,
                    socket_timeout=self.socket_timeout,
                    socket_connect_timeout=self.socket_timeout,
                    retry=Retry(NoBackoff(), 0),
                )
            except ValueError as exc:
                raise ConfigurationError(
                    f"invalid Redis URL {_redact(url_or_client)!r}: {exc}", field="url_or_client"
                ) from exc
            self._owns_client = True
            self._where = _redact(url_or_client)
        elif isinstance(url_or_client, redis.Redis):
            kwargs = url_or_client.connection_pool.connection_kwargs
            if kwargs.get("socket_timeout") is None:
                raise ConfigurationError(
                    "the Redis client has no socket_timeout, so a Redis that stops answering would block "
                    "the consumer forever; create it with socket_timeout=<seconds>",
                    field="url_or_client",
                )
            self._client = url_or_client
            self._owns_client = False
            self._where = repr(url_or_client)
        else:
            raise ConfigurationError(
                f"url_or_client must be a redis:// URL or a redis.Redis client, got {url_or_client!r}",
                field="url_or_client",
            )
        self._lease_ms = _milliseconds(self.lease)
        self._ttl_ms = _milliseconds(self.ttl)
        self._token = ThreadTokens()
        self._claim_script = self._client.register_script(_CLAIM_LUA)
        self._release_script = self._client.register_script(_RELEASE_LUA)
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisDedupStore({self._where}, prefix={self.prefix!r}, lease={self.lease}, ttl={self.ttl})"

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the Redis dedup store is closed")

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        """Translate a redis-py error, most specific class first."""
        errors = self._exceptions
        if isinstance(exc, errors.TimeoutError):
            text = f"no answer within {self.socket_timeout}s"
        elif isinstance(exc, errors.ConnectionError):
            text = "cannot connect"
        else:
            text = "error"
        return StoreUnavailable(f"Redis dedup store {self._where}: {text}: {type(exc).__name__}: {exc}")

    def claim(self, key: str) -> ClaimResult:
        """Take ``key`` for ``lease`` seconds, unless it is done or another consumer holds it."""
        check_key(key)
        self._check_open()
        try:
            result = self._claim_script(
                keys=[self.prefix + key], args=[self._token(), self._lease_ms, _DONE_VALUE]
            )
        except self._redis_error as exc:
            raise self._unavailable(exc) from exc
        return _CLAIM_RESULTS[int(result)]

    def mark_done(self, key: str) -> None:
        """``SET key done PX ttl``: recorded as done for ``ttl`` seconds, on every instance."""
        check_key(key)
        self._check_open()
        try:
            self._client.set(self.prefix + key, _DONE_VALUE, px=self._ttl_ms)
        except self._redis_error as exc:
            raise self._unavailable(exc) from exc

    def release(self, key: str) -> None:
        """Delete the key if it still holds this consumer's claim; otherwise leave it alone."""
        check_key(key)
        self._check_open()
        try:
            self._release_script(keys=[self.prefix + key], args=[self._token()])
        except self._redis_error as exc:
            raise self._unavailable(exc) from exc

    def close(self) -> None:
        """Close the client if the store built it from a URL; later calls raise ClosedError."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            self._client.close()


def _redact(url: str) -> str:
    """The URL without its password, for messages and repr."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if user else f"{scheme}://***@{host}"
