"""``check`` against topics and queues created with good and bad settings on the real brokers (single node and the
3-broker cluster): each bad setting is reported with its severity, a good setup has no error, and the command's exit
code follows the errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pika
import pytest

import reliable_messaging as rm
from reliable_messaging._check import Finding, Severity, check
from reliable_messaging.testing import KafkaEndpoint, RabbitMQEndpoint, wait_for

from ..kafka._helpers import make_topic


def errors(findings: list[Finding]) -> list[str]:
    return [f.message for f in findings if f.severity is Severity.ERROR]


def warnings(findings: list[Finding]) -> list[str]:
    return [f.message for f in findings if f.severity is Severity.WARNING]


def command(*args: str) -> tuple[int, list[dict[str, str]], str]:
    done = subprocess.run([sys.executable, "-m", "reliable_messaging", "check", "--json", *args],
                          capture_output=True, text=True, timeout=120)
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines() if line.strip()], done.stderr


# -- Kafka ----------------------------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_kafka_topic_declared_by_the_library_and_its_group_lag(kafka_endpoint: KafkaEndpoint, unique_name: str) -> None:
    url = f"kafka://{kafka_endpoint.bootstrap_servers}"
    code, found, err = command(url, "--topic", unique_name)
    assert code == 1 and any("does not exist" in f["message"] for f in found if f["severity"] == "error"), found

    handled: list[str] = []
    with rm.connect(url) as broker:
        broker.declare(unique_name, source=unique_name)
        for i in range(10):
            broker.publish(unique_name, f"m{i}").result(timeout=30)
        consumer = broker.consumer(unique_name, lambda m: handled.append(m.message_id), group=f"{unique_name}-g")
        consumer.start()
        wait_for(lambda: len(handled) == 10, 60, "10 messages handled")
        consumer.stop()
        for i in range(5):
            broker.publish(unique_name, f"late {i}").result(timeout=30)

    findings = check(url, topic=unique_name, group=f"{unique_name}-g")
    assert errors(findings) == [], findings
    # one broker: replication factor 1 cannot be better, and is said
    assert any("replication factor 1" in w for w in warnings(findings)), findings
    assert any("dead-letter and retry topics exist" in f.message for f in findings), findings
    assert any(f.subject == f"group {unique_name}-g" and "lag 5 record(s)" in f.message for f in findings), findings
    code, found, err = command(url, "--topic", unique_name)
    assert code == 0, (found, err)


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_kafka_unclean_leader_election_and_missing_dead_letter_topic(
        kafka_endpoint: KafkaEndpoint, unique_name: str) -> None:
    make_topic(kafka_endpoint.bootstrap_servers, unique_name, config={"unclean.leader.election.enable": "true"})
    url = f"kafka://{kafka_endpoint.bootstrap_servers}"
    findings = check(url, topic=unique_name)
    assert any("unclean.leader.election.enable=true" in e for e in errors(findings)), findings
    assert any(".DLT" in w and "missing" in w for w in warnings(findings)), findings
    # at-most-once promises no durability: the same topic is no error there
    assert errors(check(url, topic=unique_name, guarantee="at-most-once")) == []


@pytest.mark.kafka
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("min_isr", "severity"), [("3", Severity.ERROR), ("1", Severity.WARNING), ("2", Severity.OK)])
def test_kafka_cluster_min_insync_replicas(kafka_cluster: KafkaEndpoint, unique_name: str, min_isr: str,
                                          severity: Severity) -> None:
    """RF 3: min.insync.replicas 3 stops acks=all with one broker down (error), 1 makes acks=all worth acks=1
    (warning), 2 is right (ok)."""
    topic = f"{unique_name}-{min_isr}"
    make_topic(kafka_cluster.bootstrap_servers, topic, replication_factor=3, config={"min.insync.replicas": min_isr})
    findings = check(f"kafka://{kafka_cluster.bootstrap_servers}", topic=topic)
    about = [f for f in findings if "min.insync.replicas" in f.message]
    assert [f.severity for f in about] == [severity], findings
    assert any(f.severity is Severity.OK and f.message == "replication factor 3" for f in findings), findings


# -- RabbitMQ -------------------------------------------------------------------------------------


@pytest.fixture
def channel(rabbitmq_endpoint: RabbitMQEndpoint) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_endpoint.url))
    try:
        yield connection.channel()
    finally:
        connection.close()


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_rabbitmq_queue_declared_by_the_library_has_no_error(rabbitmq_endpoint: RabbitMQEndpoint,
                                                              unique_name: str) -> None:
    code, found, err = command(rabbitmq_endpoint.url, "--queue", unique_name)
    assert code == 1 and any("does not exist" in f["message"] for f in found), (found, err)
    with rm.connect(rabbitmq_endpoint.url) as broker:
        broker.declare(unique_name, source=unique_name)
    findings = check(rabbitmq_endpoint.url, queue=unique_name)
    assert errors(findings) == [] and warnings(findings) == [], findings
    assert any(f"dead letters go through '{unique_name}.dlx'" in f.message for f in findings), findings
    code, found, err = command(rabbitmq_endpoint.url, "--queue", unique_name)
    assert code == 0, (found, err)
    assert "guest:guest" not in err + json.dumps(found)


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_rabbitmq_bad_queues_are_reported(rabbitmq_endpoint: RabbitMQEndpoint, unique_name: str,
                                          channel: pika.adapters.blocking_connection.BlockingChannel) -> None:
    url = rabbitmq_endpoint.url
    transient = f"{unique_name}.transient"
    channel.queue_declare(transient, durable=False)
    found = check(url, queue=transient)
    assert any("not durable" in e for e in errors(found)), found
    assert any("no x-dead-letter-exchange" in w for w in warnings(found)), found
    assert errors(check(url, queue=transient, guarantee="at-most-once")) == []

    nowhere = f"{unique_name}.nowhere"
    channel.queue_declare(nowhere, durable=True, arguments={"x-dead-letter-exchange": f"{unique_name}.nodlx"})
    assert any("does not exist: dead letters are dropped" in e for e in errors(check(url, queue=nowhere)))

    unbound = f"{unique_name}.unbound"
    channel.exchange_declare(f"{unique_name}.dlx-unbound", exchange_type="direct", durable=True)
    channel.queue_declare(unbound, durable=True, arguments={"x-dead-letter-exchange": f"{unique_name}.dlx-unbound"})
    assert any("to no queue" in e for e in errors(check(url, queue=unbound)))

    quorum = f"{unique_name}.quorum"
    channel.queue_declare(quorum, durable=True, arguments={"x-queue-type": "quorum"})
    found = check(url, queue=quorum)
    assert any("without x-delivery-limit" in w for w in warnings(found)), found

    # Without the management API: a warning that says so, and the queue's existence over AMQP.
    found = check(url, queue=quorum, management_url="http://guest:guest@127.0.0.1:1")
    assert [f.severity for f in found] == [Severity.WARNING, Severity.OK], found
    assert "guest:guest" not in found[0].message
    found = check(url, queue=f"{unique_name}.missing", management_url="http://127.0.0.1:1")
    assert errors(found) and "does not exist" in errors(found)[0], found
