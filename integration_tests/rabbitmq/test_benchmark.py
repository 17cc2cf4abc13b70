"""The benchmark cannot rot: it runs end to end with a few messages and prints its ratios (speed is not asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from reliable_messaging.testing import RabbitMQEndpoint

pytestmark = [pytest.mark.rabbitmq]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_rabbitmq.py"


@pytest.mark.timeout(120)
def test_benchmark_runs_and_prints_ratios(rabbitmq_endpoint: RabbitMQEndpoint) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--messages", "300", "--repeat", "1", "--url",
                          rabbitmq_endpoint.url], capture_output=True, text=True, timeout=110, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    for label in ("publish  RabbitMQPublisher / pika select", "publish  pika select / pika blocking",
                  "consume  RabbitMQConsumer / pika select"):
        assert re.search(rf"ratio {re.escape(label)}\s+= \d+\.\d+x", out.stdout), out.stdout
