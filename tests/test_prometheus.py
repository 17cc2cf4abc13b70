"""The Prometheus collector on the in-process backend: families, labels, values, and the /metrics server."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import reliable_messaging as rm
from reliable_messaging.prometheus import BrokerCollector, serve_metrics
from reliable_messaging.testing import wait_for


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_counters_by_broker_and_consumer_and_two_consumers_of_one_source_are_one_series() -> None:
    def handle(message: rm.Message) -> None:
        if message.body == b"bad":
            raise rm.Reject("bad")

    with rm.connect("memory://prometheus-unit", name="billing") as broker:
        first = broker.consumer("orders", handle, group="g")
        second = broker.consumer("orders", handle, group="g")
        first.start()
        second.start()
        for body in (b"a", b"b", b"bad"):
            broker.publish("orders", body).result(timeout=5)
        wait_for(lambda: first.stats.processed + second.stats.processed == 2, 10, "both handled")
        wait_for(lambda: first.stats.dead_lettered + second.stats.dead_lettered == 1, 10, "the dead letter")
        registry = CollectorRegistry()
        registry.register(BrokerCollector(broker))
        found = samples(generate_latest(registry).decode())

    ids = {("broker", "billing"), ("backend", "memory")}
    orders = frozenset({*ids, ("source", "orders"), ("group", "g")})
    assert found[("reliable_messaging_consumer_processed_total", orders)] == 2
    assert found[("reliable_messaging_consumer_dead_lettered_total", orders)] == 1
    assert found[("reliable_messaging_published_total", frozenset(ids))] == 3
    assert found[("reliable_messaging_publish_failures_total", frozenset({*ids, ("reason", "nacked")}))] == 0
    consumers = {labels for name, labels in found if name == "reliable_messaging_consumer_processed_total"}
    assert consumers == {orders}, "one series for the source, its two consumers summed"


def test_serve_metrics_answers_over_http_and_close_frees_the_port() -> None:
    with rm.connect("memory://prometheus-http", name="svc") as broker:
        broker.publish("q", b"x").result(timeout=5)
        server = serve_metrics(broker, port=0)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
                text = response.read().decode()
        finally:
            server.close()
    ids = frozenset({("broker", "svc"), ("backend", "memory")})
    assert samples(text)[("reliable_messaging_published_total", ids)] == 1
    assert "python_gc" not in text, "a registry of its own: not the process's default collectors"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2)


def test_a_collector_takes_only_brokers() -> None:
    with pytest.raises(rm.ConfigurationError) as info:
        BrokerCollector("kafka://127.0.0.1:9092")  # type: ignore[arg-type]
    assert info.value.field == "broker"
