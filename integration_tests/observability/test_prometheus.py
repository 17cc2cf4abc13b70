"""Prometheus: the brokers' counters scraped over HTTP after real scenarios, on both brokers.

Each scenario moves a known counter: a message handled, one retried once, one rejected (dead letter), a resent
message id (deduplicated), and a publish the broker refuses (RabbitMQ: unroutable with ``mandatory``; Kafka: over
``message.max.bytes``). The scrape must show those values, labelled by broker, backend, source and group.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import reliable_messaging as rm
from reliable_messaging._stats import FAILURE_REASONS
from reliable_messaging.prometheus import serve_metrics
from reliable_messaging.testing import wait_for

pytestmark = pytest.mark.timeout(120)


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``(sample name, labels) -> value`` of ``http://127.0.0.1:<port>/metrics``."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


@pytest.mark.parametrize("broker", ["kafka", "rabbitmq"])
def test_a_scrape_shows_what_happened(broker: str, url: str, unique_name: str, tmp_path: Path) -> None:
    def handle(message: rm.Message) -> None:
        if message.body == b"retry once" and message.attempt == 1:
            raise rm.Retry("not yet", delay=0.2)
        if message.body == b"reject":
            raise rm.Reject("invalid order")

    with rm.connect(url, guarantee="effectively-once", dedup_path=tmp_path / "dedup.sqlite3", name=unique_name,
                    retry=rm.RetryPolicy(max_attempts=3, initial_delay=0.2, max_delay=1.0, jitter=0.0)) as b:
        consumer = b.consumer(unique_name, handle, group=unique_name)
        consumer.start()
        with serve_metrics(b, port=0) as server:
            for body, message_id in ((b"ok", "m-1"), (b"ok", "m-1"), (b"retry once", "m-2"), (b"reject", "m-3")):
                b.publish(unique_name, body, message_id=message_id).result(timeout=30)
            if broker == "rabbitmq":
                refused = b.publish(f"{unique_name}.nowhere", b"no queue is bound")
                reason = "unroutable"
            else:
                refused = b.publish(unique_name, b"x" * 3_000_000)
                reason = "too_large"
            with pytest.raises(rm.DeliveryError):
                refused.result(timeout=30)
            wait_for(lambda: (consumer.stats.processed, consumer.stats.dead_lettered, consumer.stats.deduplicated)
                     == (2, 1, 1), 60, "2 handled, 1 dead-lettered, 1 deduplicated")
            samples = scrape(server.port)
            stats = b.stats().publisher

    backend = "kafka" if broker == "kafka" else "amqp"
    ids = {("broker", unique_name), ("backend", backend)}
    ours = {("source", unique_name), ("group", unique_name), *ids}

    def value(name: str, labels: set[tuple[str, str]]) -> float:
        return samples[(name, frozenset(labels))]

    assert value("reliable_messaging_consumer_processed_total", ours) == 2
    assert value("reliable_messaging_consumer_failed_total", ours) == 2, "the first attempt and the reject"
    assert value("reliable_messaging_consumer_retried_total", ours) == 1
    assert value("reliable_messaging_consumer_dead_lettered_total", ours) == 1
    assert value("reliable_messaging_consumer_deduplicated_total", ours) == 1
    assert value("reliable_messaging_consumer_undecodable_total", ours) == 0
    assert value("reliable_messaging_publish_failures_total", {*ids, ("reason", reason)}) == 1
    for other in (r for r in FAILURE_REASONS if r != reason):
        assert value("reliable_messaging_publish_failures_total", {*ids, ("reason", other)}) == 0
    assert value("reliable_messaging_published_total", ids) == stats.published == 5
    assert value("reliable_messaging_confirmed_total", ids) == stats.confirmed == 4
    assert value("reliable_messaging_publish_in_flight", ids) == 0
    if broker == "kafka":  # the backend's extras too
        assert ("reliable_messaging_consumer_commit_failures_total", frozenset(ours)) in samples
