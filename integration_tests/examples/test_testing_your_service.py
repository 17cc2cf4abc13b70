"""``examples/testing_your_service/``, a service's own test suite, runs as its project runs it: pytest in that folder
(its own pytest.ini and conftest.py, which opts in to the broker fixtures), against the real brokers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reliable_messaging.testing import KafkaEndpoint, RabbitMQEndpoint

PROJECT = Path(__file__).resolve().parents[2] / "examples" / "testing_your_service"


@pytest.mark.kafka
@pytest.mark.rabbitmq
@pytest.mark.timeout(180)
def test_a_services_own_tests_use_the_fixtures(kafka_endpoint: KafkaEndpoint,
                                               rabbitmq_endpoint: RabbitMQEndpoint) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_endpoint.bootstrap_servers,
           "RABBITMQ_URL": rabbitmq_endpoint.url}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA"], cwd=PROJECT,
                          env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 passed" in done.stdout, done.stdout[-2000:]
    assert f"rootdir: {PROJECT}" in done.stdout, "the project's own configuration, not this repository's"
