"""The benchmark runs and prints its ratios: it cannot rot. Speed is not asserted (noisy CI machines)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from reliable_messaging.testing import KafkaEndpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(240)
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
