"""Redis dedup store: one record of message ids shared by every consumer instance.

For consumers on several hosts, or a RabbitMQ queue with several competing
consumers, where a redelivered message can land on a different instance than
the one that processed it. Expiry is Redis's own key expiry (server time), so
instances need no synchronised clocks.

Dead consumers: every store instance keeps an *owner key* ``<prefix>owner:<instance>`` alive
(expiry ``liveness``, renewed every ``liveness / 5`` seconds by a thread); a claim whose owner key
is gone is free. So a crashed consumer's claims are taken over at most ``liveness`` (5 s) after
it died, and at once by a process on the same host that can see it is gone (the hash
``<prefix>owners`` names each instance's process, :mod:`._process`).

The scripts read keys they compute (the owner key of a claim): they need a standalone Redis or
Sentinel, not Redis Cluster.

redis-py is imported when a store is constructed, not when this module is: the
``redis`` extra is optional.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .._errors import ClosedError, ConfigurationError, StoreUnavailable
from .._log import redact
from ._base import DEFAULT_LEASE, DEFAULT_TTL, ClaimResult, DedupStore, check_liveness
from ._memory import ThreadTokens, check_key
from ._process import INSTANCE_ID_LENGTH, ProcessIdentity, process_state, this_process

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["DEFAULT_PREFIX", "DEFAULT_SOCKET_TIMEOUT", "RedisDedupStore"]

logger = logging.getLogger("reliable_messaging.dedup")

DEFAULT_PREFIX = "rm:dedup:"
"""Prepended to every message id, so dedup keys are recognisable (and scannable) in a shared Redis."""

DEFAULT_SOCKET_TIMEOUT = 2.0
"""Seconds to connect and to wait for each reply: a dedup command answers in well under a
millisecond, so two seconds without an answer means Redis is unreachable or stuck, and the
consumer hands the message back instead of blocking (and missing its broker heartbeats)."""

_DONE_VALUE = "done"
"""The value of a done record. Owner tokens are ``<hex>:<hex>``, so they never equal it."""

# Atomic on the server, for each key: SET NX PX takes a free key. Otherwise the value decides:
# "done" -> done; the caller's own token -> its claim is renewed; another token whose owner key
# (ARGV[4] .. the token's instance id) is gone -> a dead consumer's claim, taken over; anything else
# is a live claim of another consumer (answered with its token, so the caller can look closer).
_CLAIM_LUA = """
local results = {}
for i, key in ipairs(KEYS) do
    if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
        results[i] = 1
    else
        local value = redis.call('GET', key)
        if value == ARGV[3] then
            results[i] = 2
        elseif value == ARGV[1] then
            redis.call('PEXPIRE', key, ARGV[2])
            results[i] = 1
        elseif redis.call('EXISTS', ARGV[4] .. string.sub(value, 1, tonumber(ARGV[5]))) == 0 then
            redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
            results[i] = 1
        else
            results[i] = value
        end
    end
end
return results
"""
_CLAIM_RESULTS = {1: ClaimResult.ACQUIRED, 2: ClaimResult.DONE}

# Delete each key only while it still holds the caller's token: after the lease expired another
# consumer may own it, and a done record must stay.
_RELEASE_LUA = """
for _, key in ipairs(KEYS) do
    if redis.call('GET', key) == ARGV[1] then
        redis.call('DEL', key)
    end
end
return 0
"""

_BATCH = 500
"""Keys per claim or release script call: a script blocks the server while it runs."""


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

    *Dead consumers.* A claim is live while its owner instance's key exists (see the module
    docstring): a consumer that dies frees its claims within ``liveness`` seconds (at once for a
    process on the same host). ``lease`` only bounds a claim of a *live* consumer.

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
        liveness: float | None = None,
        prefix: str = DEFAULT_PREFIX,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
    ) -> None:
        super().__init__(lease=lease, ttl=ttl)
        self.liveness = check_liveness(liveness, self.lease)
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
                    f"invalid Redis URL {redact(url_or_client)!r}: {exc}", field="url_or_client"
                ) from exc
            self._owns_client = True
            self._where = redact(url_or_client)
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
        self.instance = self._token.instance
        self._identity = this_process()
        self._owner_prefix = f"{prefix}owner:"
        self._owner_key = self._owner_prefix + self.instance
        self._owners_key = f"{prefix}owners"
        self._claim_script = self._client.register_script(_CLAIM_LUA)
        self._release_script = self._client.register_script(_RELEASE_LUA)
        self._closed = False
        self._stop = threading.Event()
        self._keepalive: threading.Thread | None = None  # started by the first call (Redis is not contacted before)
        self._register_lock = threading.Lock()

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

    # -- owners ---------------------------------------------------------------------------------------

    def _register(self) -> None:
        """On first use: announce this instance (owner key, and its process in the owners hash), forget the
        dead ones, start renewing the owner key."""
        with self._register_lock:
            if self._keepalive is not None:
                return
            me = self._identity
            identity = json.dumps([me.host, me.boot, me.pid, me.start])
            pipe = self._client.pipeline(transaction=False)
            pipe.set(self._owner_key, identity, px=_milliseconds(self.liveness))
            pipe.hset(self._owners_key, self.instance, identity)
            pipe.hgetall(self._owners_key)
            owners = pipe.execute()[2]
            self._reap_dead([_text(i) for i in owners if _text(i) != self.instance], owners)
            self._keepalive = threading.Thread(target=self._keep_alive, name=f"rm-redis-dedup-{self.instance}",
                                               daemon=True)
            self._keepalive.start()

    def _reap_dead(self, instances: list[str], known: dict[Any, Any] | None = None) -> set[str]:
        """Delete the owner keys of these instances whose process is known to be gone (it ran on this host),
        and forget instances whose owner key expired; returns the instances whose claims are free now."""
        if not instances:
            return set()
        if known is None:
            known = dict(zip(instances, self._client.hmget(self._owners_key, instances), strict=True))
        else:
            known = {_text(instance): value for instance, value in known.items()}
        owner_keys = [self._owner_prefix + instance for instance in instances]
        live = self._client.mget(owner_keys)
        dead: set[str] = set()
        for instance, owner_value in zip(instances, live, strict=True):
            raw = known.get(instance)
            # Its owner key expired (its claims are free already: forget it), or its process is gone.
            if owner_value is None or (raw is not None and _process_state(_text(raw)) is False):
                dead.add(instance)
        if dead:
            pipe = self._client.pipeline(transaction=False)
            pipe.delete(*[self._owner_prefix + instance for instance in dead])
            pipe.hdel(self._owners_key, *dead)
            pipe.execute()
            logger.info("Redis dedup store %s: %d consumer instance(s) gone; their claims are free", self._where,
                        len(dead))
        return dead

    def _keep_alive(self) -> None:
        """Renew this instance's owner key every liveness / 5 seconds until closed."""
        me = self._identity
        identity = json.dumps([me.host, me.boot, me.pid, me.start])
        every = self.liveness / 5
        failing = False
        while not self._stop.wait(every):
            try:
                if not self._client.set(self._owner_key, identity, px=_milliseconds(self.liveness), xx=True):
                    logger.warning("Redis dedup store %s: this instance's owner key had expired (no renewal for "
                                   "%.1fs): other consumers may have taken its claims over", self._where,
                                   self.liveness)
                    self._client.set(self._owner_key, identity, px=_milliseconds(self.liveness))
                    self._client.hset(self._owners_key, self.instance, identity)
                failing = False
            except self._redis_error as exc:
                if not failing:  # once per outage, not every second
                    logger.warning("Redis dedup store %s: cannot renew this instance's owner key (%s); its claims "
                                   "lapse after %.1fs without Redis", self._where, exc, self.liveness)
                failing = True

    # -- the contract ---------------------------------------------------------------------------------

    def claim(self, key: str) -> ClaimResult:
        """Take ``key`` for ``lease`` seconds, unless it is done or a live consumer holds it."""
        check_key(key)
        return self._claim([key])[key]

    def claim_batch(self, keys: Iterable[str]) -> dict[str, ClaimResult]:
        """:meth:`claim` for several keys: one script call (round trip) per 500 keys; decides every key."""
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            check_key(key)
        return self._claim(wanted) if wanted else {}

    def _claim(self, keys: list[str]) -> dict[str, ClaimResult]:
        self._check_open()
        if self._keepalive is None:
            try:
                self._register()
            except self._redis_error as exc:
                raise self._unavailable(exc) from exc
        token = self._token()
        args: list[str | int] = [token, self._lease_ms, _DONE_VALUE, self._owner_prefix, INSTANCE_ID_LENGTH]
        results: dict[str, ClaimResult] = {}
        held: dict[str, str] = {}  # key -> the instance holding a live claim
        try:
            for start in range(0, len(keys), _BATCH):
                chunk = keys[start:start + _BATCH]
                answers = self._claim_script(keys=[self.prefix + k for k in chunk], args=args)
                for key, answer in zip(chunk, answers, strict=True):
                    if isinstance(answer, int):
                        results[key] = _CLAIM_RESULTS[answer]
                    else:
                        results[key] = ClaimResult.IN_PROGRESS
                        owner = _text(answer)[:INSTANCE_ID_LENGTH]
                        if owner != self.instance:
                            held[key] = owner
            if held:  # a process on this host may be gone already: no need to wait for its owner key to expire
                dead = self._reap_dead(sorted(set(held.values())))
                again = [key for key, owner in held.items() if owner in dead]
                if again:
                    answers = self._claim_script(keys=[self.prefix + k for k in again], args=args)
                    for key, answer in zip(again, answers, strict=True):
                        results[key] = _CLAIM_RESULTS[answer] if isinstance(answer, int) else ClaimResult.IN_PROGRESS
        except self._redis_error as exc:
            raise self._unavailable(exc) from exc
        return results

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
        self.release_many([key])

    def release_many(self, keys: Iterable[str]) -> None:
        self._check_open()
        wanted = [self.prefix + key for key in keys]
        token = self._token()
        try:
            for start in range(0, len(wanted), _BATCH):
                self._release_script(keys=wanted[start:start + _BATCH], args=[token])
        except self._redis_error as exc:
            raise self._unavailable(exc) from exc

    def close(self) -> None:
        """Give up this instance's claims (its owner key goes), close the client if the store built it
        from a URL; later calls raise ClosedError."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._keepalive is None:  # never used: nothing registered
            if self._owns_client:
                self._client.close()
            return
        self._keepalive.join(self.socket_timeout + 1)
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.delete(self._owner_key)
            pipe.hdel(self._owners_key, self.instance)
            pipe.execute()
        except self._redis_error as exc:
            logger.warning("Redis dedup store %s: could not remove this instance's owner key on close (%s); it "
                           "expires within %.1fs", self._where, exc, self.liveness)
        if self._owns_client:
            self._client.close()


def _process_state(identity: str) -> bool | None:
    """:func:`process_state` of an owner's identity as stored in the owners hash (None: cannot tell)."""
    try:
        host, boot, pid, start = json.loads(identity)
        return process_state(ProcessIdentity(host=str(host), boot=str(boot), pid=int(pid), start=str(start)))
    except (ValueError, TypeError):
        return None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
