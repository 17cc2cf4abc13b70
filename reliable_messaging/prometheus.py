"""Prometheus metrics of brokers (extra ``prometheus``: ``pip install "reliable-messaging[prometheus]"``).

A collector that reads :meth:`Broker.stats() <reliable_messaging.Broker.stats>` when Prometheus scrapes, so
publishing and consuming pay nothing for it: the counters are the ones the library keeps anyway, with the
same names on every backend::

    import reliable_messaging as rm
    from reliable_messaging.prometheus import serve_metrics

    broker = rm.connect("kafka://127.0.0.1:9092", name="billing")
    server = serve_metrics(broker, port=9464)     # http://127.0.0.1:9464/metrics
    ...
    server.close()

Or register :class:`BrokerCollector` on a registry of your own (``registry.register(BrokerCollector(broker))``)
and serve it with the rest of the service's metrics (e.g. ``prometheus_client.make_asgi_app``).

Families (every one labelled ``broker`` = the broker's ``name`` and ``backend`` = its URL scheme; consumer
families also ``source`` and ``group``, ``group`` empty where the broker has none):

- ``reliable_messaging_published_total``, ``_confirmed_total``, ``_republished_total``,
  ``_publish_failures_total`` (label ``reason``: nacked, unroutable, timeout, too_large, unavailable, other),
  ``_publish_in_flight`` (gauge);
- ``reliable_messaging_consumer_<field>_total`` for every :class:`~reliable_messaging.ConsumerStats` field
  (processed, failed, retried, dead_lettered, deduplicated, bounced, undecodable) and every backend extra
  (Kafka: commits, commit_failures, deferred, republish_failures).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._broker import Broker
from ._errors import ConfigurationError
from ._handling import ConsumerStats

__all__ = ["BrokerCollector", "MetricsServer", "serve_metrics"]

_PREFIX = "reliable_messaging"
_CONSUMER_FIELDS = tuple(f.name for f in dataclasses.fields(ConsumerStats) if f.name != "extra")


class BrokerCollector(Collector):
    """Reads each broker's stats at collection time; brokers can be added later (:meth:`add`)."""

    def __init__(self, *brokers: Broker) -> None:
        self._lock = threading.Lock()
        self._brokers: list[Broker] = []
        for broker in brokers:
            self.add(broker)

    def add(self, broker: Broker) -> None:
        if not isinstance(broker, Broker):
            raise ConfigurationError(f"BrokerCollector takes brokers (from rm.connect()), got {type(broker).__name__}",
                                     field="broker")
        with self._lock:
            if broker not in self._brokers:
                self._brokers.append(broker)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            brokers = list(self._brokers)
        labels = ["broker", "backend"]
        published = CounterMetricFamily(f"{_PREFIX}_published", "publish() calls accepted", labels=labels)
        confirmed = CounterMetricFamily(f"{_PREFIX}_confirmed", "publishes the broker acknowledged", labels=labels)
        republished = CounterMetricFamily(f"{_PREFIX}_republished",
                                          "publishes sent again after a connection loss", labels=labels)
        failures = CounterMetricFamily(f"{_PREFIX}_publish_failures", "publishes failed, by reason",
                                       labels=[*labels, "reason"])
        in_flight = GaugeMetricFamily(f"{_PREFIX}_publish_in_flight", "publishes not settled yet", labels=labels)
        consumer_labels = [*labels, "source", "group"]
        consumer: dict[str, CounterMetricFamily] = {}

        def family(name: str) -> CounterMetricFamily:
            if name not in consumer:
                consumer[name] = CounterMetricFamily(f"{_PREFIX}_consumer_{name}",
                                                     f"consumer messages: {name.replace('_', ' ')}",
                                                     labels=consumer_labels)
            return consumer[name]

        for name in _CONSUMER_FIELDS:
            family(name)
        for broker in brokers:
            stats = broker.stats()
            ids = [broker.name, broker.url.partition(":")[0]]
            pub = stats.publisher
            published.add_metric(ids, pub.published)
            confirmed.add_metric(ids, pub.confirmed)
            republished.add_metric(ids, pub.republished)
            in_flight.add_metric(ids, pub.in_flight)
            for reason, count in pub.failures.items():
                failures.add_metric([*ids, reason], count)
            # Consumers of one source in one group (a second one started in the process) are one series.
            totals: dict[tuple[str, str], collections.Counter[str]] = {}
            for key, counters in stats.consumers.items():
                total = totals.setdefault(stats.sources.get(key, (key, "")), collections.Counter())
                total.update({name: getattr(counters, name) for name in _CONSUMER_FIELDS})
                total.update(dict(counters.extra))
            for (source, group), total in totals.items():
                for name, count in total.items():
                    family(name).add_metric([*ids, source, group], count)
        yield from (published, confirmed, republished, failures, in_flight)
        yield from consumer.values()


class MetricsServer:
    """The HTTP server of :func:`serve_metrics`; :meth:`close` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread, registry: CollectorRegistry) -> None:
        self._server = server
        self._thread = thread
        self.registry = registry
        self.port: int = server.server_port

    def close(self, timeout: float = 5.0) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve_metrics(*brokers: Broker, port: int = 9464, addr: str = "127.0.0.1",
                  registry: CollectorRegistry | None = None, collectors: Iterable[Collector] = ()) -> MetricsServer:
    """Serve ``/metrics`` for ``brokers`` on ``addr:port`` (port 0: any free one, see ``.port``) from a thread.

    ``registry``: serve this registry (the brokers' collector is added to it); default: a new one with
    only the brokers' families (plus ``collectors``), so the process's default registry stays the service's.
    """
    registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
    registry.register(BrokerCollector(*brokers))
    for collector in collectors:
        registry.register(collector)
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(server, thread, registry)
