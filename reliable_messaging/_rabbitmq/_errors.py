"""The one place where pika's exceptions become reliable_messaging's.

Every pika exception that can surface from the adapter goes through
:func:`map_pika_error`, most specific class first; callers ``raise mapped from
exc`` so the original stays on ``__cause__``. No ``pika.exceptions.*`` reaches a
user.

What RabbitMQ means by its reply codes (AMQP 0-9-1):

- 403 ``ACCESS_REFUSED``: the user may not use that vhost/resource, or the name
  starts with the reserved ``amq.`` prefix. Configuration, not transient.
- 404 ``NOT_FOUND``: no such exchange/queue. On a publish this closes the channel
  and discards every publish after the failing one on that channel.
- 406 ``PRECONDITION_FAILED``: an existing queue/exchange was declared with other
  arguments (``inequivalent arg 'x-max-length' for queue 'q' ...``), or an
  unacknowledged delivery outlived ``consumer_timeout``.
- 320 ``CONNECTION_FORCED``: the broker is shutting down or an operator closed the
  connection. Transient.
"""

from __future__ import annotations

import re

import pika.exceptions

from .._errors import (
    BrokerUnavailable,
    ConfigurationError,
    ConsumerCancelled,
    DeliveryFailed,
    InvalidMessage,
    ReliableMessagingError,
    TopologyMismatch,
)

__all__ = [
    "ACCESS_REFUSED",
    "NOT_FOUND",
    "PRECONDITION_FAILED",
    "map_pika_error",
    "parse_precondition_failed",
]

ACCESS_REFUSED = 403
NOT_FOUND = 404
PRECONDITION_FAILED = 406

_INEQUIVALENT = re.compile(r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']*)'")
_NAMED = re.compile(r"(?P<kind>queue|exchange) '(?P<name>[^']*)'")


def parse_precondition_failed(reply_text: str) -> tuple[str | None, str | None]:
    """``(name, argument)`` from a PRECONDITION_FAILED reply text; either may be ``None``.

    RabbitMQ names the first argument that differs, e.g. ``PRECONDITION_FAILED -
    inequivalent arg 'x-queue-type' for queue 'orders' in vhost '/': received
    'quorum' but current is 'classic'``.
    """
    match = _INEQUIVALENT.search(reply_text)
    if match is not None:
        return match.group("name"), match.group("arg")
    named = _NAMED.search(reply_text)
    return (named.group("name") if named else None), None


def map_pika_error(exc: BaseException, *, what: str, name: str | None = None) -> ReliableMessagingError:
    """The reliable_messaging error for a pika exception raised while doing ``what``.

    ``name`` is the queue/exchange involved, when the caller knows it (used when the
    broker's reply text does not say). Most specific pika classes are tested first.
    """
    if isinstance(exc, ReliableMessagingError):
        return exc
    # -- channel closed by the broker: the reply code says why -----------------------------------
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        code, text = exc.reply_code, exc.reply_text
        if code == PRECONDITION_FAILED:
            parsed_name, argument = parse_precondition_failed(text)
            if argument is not None or "inequivalent" in text:
                target = parsed_name or name or "?"
                return TopologyMismatch(
                    f"{what}: {target!r} already exists with different arguments"
                    f"{f' ({argument!r} differs)' if argument else ''}; broker said: {text}. "
                    "Delete it or declare it with the same arguments.",
                    name=target,
                    argument=argument,
                )
            return DeliveryFailed(f"{what}: channel closed by the broker: {code} {text}", code=code)
        if code in (ACCESS_REFUSED, NOT_FOUND):
            return ConfigurationError(f"{what}: {code} {text}", field=name)
        return DeliveryFailed(f"{what}: channel closed by the broker: {code} {text}", code=code)
    if isinstance(exc, pika.exceptions.ConsumerCancelled):
        return ConsumerCancelled(f"{what}: the broker cancelled the consumer (was the queue deleted?)")
    # -- refused credentials or vhost: not transient --------------------------------------------
    if isinstance(exc, pika.exceptions.ProbableAuthenticationError | pika.exceptions.AuthenticationError):
        return ConfigurationError(f"{what}: the broker refused the credentials: {exc}", field="url")
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        return ConfigurationError(f"{what}: the broker refused access to the virtual host: {exc}", field="url")
    if isinstance(exc, pika.exceptions.IncompatibleProtocolError):
        return BrokerUnavailable(f"{what}: the peer did not speak AMQP 0-9-1 (or closed during the handshake): {exc}")
    if isinstance(exc, pika.exceptions.ConnectionClosedByBroker):
        return BrokerUnavailable(f"{what}: the broker closed the connection: {exc.reply_code} {exc.reply_text}")
    if isinstance(exc, pika.exceptions.AMQPHeartbeatTimeout):
        return BrokerUnavailable(f"{what}: no heartbeat from the broker: {exc}")
    if isinstance(exc, pika.exceptions.AMQPConnectionError):
        # StreamLostError, ConnectionWrongStateError, ConnectionClosed, ConnectionBlockedTimeout,
        # and the bare class pika raises for refused/failed TCP connections.
        detail = str(exc) or type(exc).__name__
        return BrokerUnavailable(f"{what}: {detail}")
    # -- bad values that slipped past our own validation ----------------------------------------
    if isinstance(exc, pika.exceptions.ShortStringTooLong):
        return InvalidMessage(f"{what}: a name or header key is longer than 255 bytes: {exc}")
    if isinstance(exc, pika.exceptions.UnsupportedAMQPFieldException):
        return InvalidMessage(f"{what}: a header value has a type AMQP field tables cannot carry: {exc}")
    if isinstance(exc, pika.exceptions.AMQPChannelError):
        return BrokerUnavailable(f"{what}: channel failed: {exc!r}")
    if isinstance(exc, pika.exceptions.AMQPError):
        return BrokerUnavailable(f"{what}: {exc!r}")
    if isinstance(exc, OSError):
        return BrokerUnavailable(f"{what}: {exc}")
    raise TypeError(f"not a pika or socket error: {exc!r}") from exc
