"""Every program in ``examples/`` runs as a user runs it, against the real brokers, and keeps its promises.

Each example is started as a subprocess (``python examples/<name>.py``) with the broker addresses
in ``KAFKA_BOOTSTRAP_SERVERS`` / ``RABBITMQ_URL``, a unique ``--name`` and a deadline; the test
asserts its exit code and the lines that say what happened at the broker.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reliable_messaging.testing import KafkaEndpoint, RabbitMQEndpoint

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

both_brokers = [pytest.param("kafka", marks=pytest.mark.kafka), pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]


@pytest.fixture
def broker_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment of an example: the address of each broker the test is marked for."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if request.node.get_closest_marker("kafka"):
        kafka: KafkaEndpoint = request.getfixturevalue("kafka_endpoint")
        env["KAFKA_BOOTSTRAP_SERVERS"] = kafka.bootstrap_servers
    if request.node.get_closest_marker("rabbitmq"):
        rabbitmq: RabbitMQEndpoint = request.getfixturevalue("rabbitmq_endpoint")
        env["RABBITMQ_URL"] = rabbitmq.url
    return env


def run_example(script: str, *args: str, env: dict[str, str], cwd: Path, timeout: float = 60) -> str:
    """Run ``examples/<script>`` to completion; its stdout, after asserting it exited 0."""
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=timeout, check=False)
    assert result.returncode == 0, (f"{script} exited {result.returncode}\n--- stdout\n{result.stdout}"
                                    f"\n--- stderr\n{result.stderr[-4000:]}")
    return result.stdout


@pytest.mark.kafka
@pytest.mark.timeout(75)
def test_kafka_manual_commit_consumer(broker_env: dict[str, str], unique_name: str, tmp_path: Path) -> None:
    out = run_example("kafka_manual_commit_consumer.py", "--name", unique_name, "--timeout", "40", env=broker_env,
                      cwd=tmp_path)
    assert "handled order-1 (attempt 1" in out and "handled order-3 (attempt 1" in out
    assert f"handled order-2 (attempt 2, from {unique_name}.retry.1@" in out, "Retry() went through the retry topic"
    assert (f"dead letter poison in {unique_name}.DLT: retries exhausted after 3 attempts: "
            "ValueError: cannot parse 'poison'") in out
    assert "summary: handled=3 retried=3 dead-lettered=1" in out


@pytest.mark.rabbitmq
@pytest.mark.timeout(75)
def test_rabbitmq_manual_ack_consumer(broker_env: dict[str, str], unique_name: str, tmp_path: Path) -> None:
    out = run_example("rabbitmq_manual_ack_consumer.py", "--name", unique_name, "--timeout", "40", env=broker_env,
                      cwd=tmp_path)
    assert "handled order-1 (attempt 1" in out and "handled order-3 (attempt 1" in out
    assert "handled order-2 (attempt 2" in out, "Retry() went through the TTL retry queue"
    assert (f"dead letter poison in {unique_name}.dlq: retries exhausted after 3 attempts: "
            "ValueError: cannot parse 'poison'") in out
    summary = re.search(r"summary: handled=3 retried=3 dead-lettered=1 acks=(\d+) rejects=0\n", out)
    assert summary is not None, out
    # basic.ack frames: one per settled delivery at most, fewer when acks coalesce (multiple=True)
    assert 1 <= int(summary.group(1)) <= 7  # 7 deliveries (order-2 twice, poison 3 times), all acked


@pytest.mark.parametrize("broker", both_brokers)
@pytest.mark.timeout(60)
def test_idempotent_consumer_sqlite(broker: str, broker_env: dict[str, str], unique_name: str,
                                    tmp_path: Path) -> None:
    dedup = tmp_path / "dedup.sqlite3"
    out = run_example("idempotent_consumer_sqlite.py", broker, "--name", unique_name, "--dedup-path", str(dedup),
                      "--timeout", "30", env=broker_env, cwd=tmp_path)
    assert out.count("charged 10.00 EUR to ACME (message id payment-42") == 1, out
    assert "first run: handler ran 1 time(s), duplicates skipped: 1" in out, "the producer's resend was skipped"
    assert "after restart: handler ran 0 time(s), duplicates skipped: 1" in out, "the SQLite file outlived the run"
    assert "guarantee=effectively-once" in out and "dedup=SQLiteDedupStore" in out
    assert dedup.exists()


@pytest.mark.kafka
@pytest.mark.rabbitmq
@pytest.mark.timeout(60)
def test_publisher_confirms_and_returns(broker_env: dict[str, str], unique_name: str, tmp_path: Path) -> None:
    out = run_example("publisher_confirms_and_returns.py", "--name", unique_name, env=broker_env, cwd=tmp_path)
    assert out.count("rabbitmq: confirmed ") == 5
    assert re.search(rf"rabbitmq: returned \w+: Unroutable 312 NO_ROUTE \(exchange '{re.escape(unique_name)}', "
                     r"routing key 'invoice.voided'\)", out), out
    assert re.search(rf"kafka: acknowledged \w+ at {re.escape(unique_name)}\[0\]@0\n", out), out


@pytest.mark.parametrize("broker", both_brokers)
@pytest.mark.timeout(60)
def test_asyncio_service(broker: str, broker_env: dict[str, str], unique_name: str, tmp_path: Path) -> None:
    out = run_example("asyncio_service.py", broker, "--name", unique_name, "--timeout", "30", env=broker_env,
                      cwd=tmp_path)
    assert "published 5 events, each acknowledged by the broker" in out
    assert sorted(re.findall(r"handled (event \d) \(on the service loop: True\)", out)) == [
        f"event {n}" for n in range(5)]
    assert "stopped gracefully: handled 5 of 5 events" in out


@pytest.mark.rabbitmq
@pytest.mark.timeout(60)
def test_asyncio_service_shuts_down_gracefully_on_sigterm(broker_env: dict[str, str], unique_name: str,
                                                          tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "asyncio_service.py"), "rabbitmq", "--serve",
                             "--name", unique_name, "--timeout", "30"],
                            env=broker_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        wanted = {"serving until Ctrl-C or SIGTERM\n", "all events handled\n"}
        for line in proc.stdout:  # the test's timeout bounds this read
            seen.append(line)
            if wanted <= set(seen):
                break
        assert wanted <= set(seen), "".join(seen)
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(seen) + rest + err[-4000:]
    assert "stopped gracefully: handled 5 of 5 events" in rest
