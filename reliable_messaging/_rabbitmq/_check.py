"""What a RabbitMQ queue's settings do to a guarantee (:func:`reliable_messaging.check` for ``amqp://``).

AMQP cannot read a queue's arguments (a passive declare says only that it exists), so they come from the management
HTTP API: the queue (durable, type, ``x-dead-letter-exchange``, ``x-delivery-limit``), its dead-letter exchange and
that exchange's bindings, and the cluster's nodes. Four GETs with basic auth: ``urllib`` from the standard library
does them, so the RabbitMQ extra needs no HTTP client.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pika
import pika.exceptions

from .._broker import Guarantee
from .._check import Finding, Severity
from .._errors import BrokerUnavailable
from .._log import redact
from ._topology import _blocking_channel

__all__ = ["check_queue", "management_url_of"]

ERROR, WARNING, OK = Severity.ERROR, Severity.WARNING, Severity.OK

MANAGEMENT_PORT = 15672
"""The management plugin's default port (``management.tcp.port``)."""


def management_url_of(url: str) -> str:
    """``http://user:password@host:15672`` for ``amqp://user:password@host:5672/vhost`` (https for amqps)."""
    parts = urllib.parse.urlsplit(url)
    scheme = "https" if parts.scheme == "amqps" else "http"
    credentials = ""
    if parts.username is not None:
        credentials = parts.username + (f":{parts.password}" if parts.password is not None else "") + "@"
    return f"{scheme}://{credentials}{parts.hostname or 'localhost'}:{MANAGEMENT_PORT}"


class _Api:
    def __init__(self, base: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(base)
        user = urllib.parse.unquote(parts.username or "guest")
        password = urllib.parse.unquote(parts.password or "guest")
        self.root = f"{parts.scheme}://{parts.hostname}:{parts.port or MANAGEMENT_PORT}/api"
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.timeout = timeout

    def get(self, *path: str) -> Any:
        """The JSON at ``/api/<path>`` (each segment URL-encoded, the vhost "/" too), or None for 404."""
        url = self.root + "".join("/" + urllib.parse.quote(p, safe="") for p in path)
        request = urllib.request.Request(url, headers={"Authorization": self.auth})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise


def check_queue(url: str, queue: str, guarantee: Guarantee, *, management_url: str | None = None,
                timeout: float = 10.0) -> list[Finding]:
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(url).path[1:] or "/")
    api = _Api(management_url or management_url_of(url), timeout)
    try:
        nodes = api.get("nodes")
        info = api.get("queues", vhost, queue)
    except (OSError, ValueError) as exc:  # URLError, HTTPError (401...), timeouts, a non-JSON answer
        reason = getattr(exc, "reason", None) or exc
        findings = [Finding(WARNING, "management API", f"not reachable at {redact(api.root)} ({reason}): queue "
                            "arguments not checked; enable the rabbitmq_management plugin or pass its URL")]
        exists = _exists(url, queue, timeout)
        findings.append(Finding(OK, queue, "queue exists") if exists else
                        Finding(ERROR, queue, f"queue {queue!r} does not exist: unroutable publishes fail "
                                "(mandatory) and consumers find nothing; declare it (broker.declare)"))
        return findings
    findings = []
    if info is None:
        return [Finding(ERROR, queue, f"queue {queue!r} does not exist in vhost {vhost!r}: mandatory publishes "
                        "fail as unroutable, others are dropped; declare it (broker.declare)")]
    durable = guarantee is not Guarantee.AT_MOST_ONCE
    arguments: dict[str, Any] = info.get("arguments") or {}
    kind = info.get("type") or arguments.get("x-queue-type") or "classic"
    if not info.get("durable"):
        findings.append(Finding(ERROR if durable else OK, queue, "not durable: a broker restart deletes the queue "
                                "with its messages, persistent or not"))
    else:
        findings.append(Finding(OK, queue, f"durable {kind} queue"))
    if kind == "classic" and len(nodes or []) > 1:
        findings.append(Finding(WARNING if durable else OK, queue, f"a classic queue on a {len(nodes)}-node "
                                f"cluster lives on one node ({info.get('node')}): use a quorum queue "
                                "(queue_type='quorum')"))
    if info.get("auto_delete") or info.get("exclusive"):
        findings.append(Finding(ERROR if durable else OK, queue, "auto-delete or exclusive: the queue goes "
                                "away with its consumer or connection, with its messages"))
    if kind == "quorum":
        limit = arguments.get("x-delivery-limit")
        if limit is None:
            findings.append(Finding(WARNING, queue, "quorum queue without x-delivery-limit: a message that "
                                    "kills its consumer is redelivered forever (RabbitMQ 3.x has no default)"))
        else:
            findings.append(Finding(OK, queue, f"x-delivery-limit={limit}"))
    findings.extend(_dead_letter(api, vhost, queue, arguments))
    return findings


def _dead_letter(api: _Api, vhost: str, queue: str, arguments: dict[str, Any]) -> list[Finding]:
    dlx = arguments.get("x-dead-letter-exchange")
    if dlx is None:
        return [Finding(WARNING, queue, "no x-dead-letter-exchange: a message the broker dead-letters (delivery "
                        "limit, TTL, overflow, a consumer's reject) is dropped")]
    if dlx == "":  # the default exchange routes by queue name
        target = arguments.get("x-dead-letter-routing-key")
        if target is None or api.get("queues", vhost, target) is None:
            return [Finding(ERROR, queue, f"dead-letters to the default exchange with routing key {target!r}, "
                            "which names no queue: dead letters are dropped")]
        return [Finding(OK, queue, f"dead letters go to queue {target!r}")]
    if api.get("exchanges", vhost, dlx) is None:
        return [Finding(ERROR, queue, f"dead-letter exchange {dlx!r} does not exist: dead letters are dropped")]
    bindings = api.get("exchanges", vhost, dlx, "bindings", "source") or []
    key = arguments.get("x-dead-letter-routing-key")
    queues = [b["destination"] for b in bindings if b.get("destination_type") == "queue"
              and (key is None or b.get("routing_key") in (key, "#"))]
    if not queues:
        return [Finding(ERROR, queue, f"dead-letter exchange {dlx!r} routes "
                        + (f"key {key!r} " if key is not None else "")
                        + "to no queue: dead letters are dropped")]
    return [Finding(OK, queue, f"dead letters go through {dlx!r} to {', '.join(sorted(queues))}")]


def _exists(url: str, queue: str, timeout: float) -> bool:
    with _blocking_channel(url, timeout, "reliable-messaging check", redact(url)) as channel:
        try:
            channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return False
            raise BrokerUnavailable(f"checking queue {queue!r}: {exc.reply_code} {exc.reply_text}") from exc
        return True
