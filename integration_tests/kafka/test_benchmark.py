"""The benchmark runs and prints its ratios: it cannot rot. Speed is not asserted (noisy CI machines)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from reliable_messaging.testing import KafkaEndpoint, _cleanup

REPO = Path(__file__).resolve().parents[2]

BENCH_NAME = re.compile(r"bench-(produce|consume|raw|lib)-[0-9a-f]{8}")
"""How benchmarks/bench_kafka.py names its topics and consumer groups (not from the test's fixtures)."""


def _bench_names(bootstrap: str) -> set[str]:
    """The benchmark's topics and consumer groups now on the cluster."""
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive: a collected client fails its futures
    groups = admin.list_consumer_groups(request_timeout=10).result(15).valid
    names = {*admin.list_topics(timeout=10).topics, *(g.group_id for g in groups)}
    return {name for name in names if BENCH_NAME.fullmatch(name)}


@pytest.fixture
def delete_bench_names(kafka_endpoint: KafkaEndpoint) -> Iterator[None]:
    """Delete the topics and groups the benchmark created during the test: it picks their names itself."""
    bootstrap = kafka_endpoint.bootstrap_servers
    before = _bench_names(bootstrap)
    yield
    for name in sorted(_bench_names(bootstrap) - before):
        _cleanup.delete_kafka_names(bootstrap, name)


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.usefixtures("delete_bench_names")
def test_benchmark_runs_and_prints_ratios(kafka_endpoint: KafkaEndpoint) -> None:
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_kafka.py", "--messages", "3000", "--runs", "1", "--manual-sample", "50",
         "--bootstrap", kafka_endpoint.bootstrap_servers],
        cwd=REPO, capture_output=True, text=True, timeout=220, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"ratio producer library/raw: \d+\.\d\d", out.stdout), out.stdout
    assert re.search(r"ratio consumer MANUAL_BATCH/raw: \d+\.\d\d \(vs tuned raw: \d+\.\d\d", out.stdout), out.stdout
    assert re.search(r"per-message commit \(MANUAL\): [\d,]+ msgs/s", out.stdout), out.stdout
    for variant in ("producer raw (delivery callbacks)", "producer library (acks=all, futures)",
                    "consumer library MANUAL_BATCH", "consumer library STORE_OFFSETS"):
        assert re.search(rf"{re.escape(variant)}\s+[\d,]+\s+\d+\.\d\dx", out.stdout), variant
