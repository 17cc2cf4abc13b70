"""The ``unique_name`` teardown deletes what a test created on the brokers, and never fails a test.

The proof runs a small test session of its own (pytester, in a subprocess, with the plugin
enabled as a user enables it): its one test creates Kafka topics and consumer groups and RabbitMQ queues and
exchanges from the fixture names, checks they exist, and writes the names down. Once that
session has ended, this test checks with raw clients that every one of them is gone.

One group belongs to a consumer the inner test SIGKILLs: it is normally still a member at
teardown (until its 3 s session times out), so the retry at the end of the inner session deletes it.
"""

from __future__ import annotations

import json
import socket
import time

import pika
import pika.exceptions
import pytest
from confluent_kafka.admin import AdminClient

from reliable_messaging.testing import KafkaEndpoint, RabbitMQEndpoint, _cleanup, wait_for

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.timeout(120)

INNER_TEST = '''
import json
import subprocess
import sys

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from reliable_messaging import RabbitMQExchangeType, RabbitMQTopology
from reliable_messaging._kafka._topology import create_topics

MEMBER = """
import sys
from confluent_kafka import Consumer
consumer = Consumer({"bootstrap.servers": sys.argv[1], "group.id": sys.argv[2], "session.timeout.ms": 3000})
consumer.subscribe([sys.argv[3]], on_assign=lambda c, parts: print("assigned", flush=True))
while True:
    consumer.poll(0.1)
"""


def join_then_die(bootstrap, group, topic):
    """A group member that never leaves: a consumer process killed with SIGKILL once it owns partitions."""
    child = subprocess.Popen([sys.executable, "-c", MEMBER, bootstrap, group, topic], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "assigned"
    finally:
        child.kill()
        child.wait()


def test_creates_names(kafka_endpoint, rabbitmq_endpoint, unique_name, topic, queue_name, group_id, request):
    bootstrap = kafka_endpoint.bootstrap_servers
    topics = [topic, f"{topic}.DLT", f"{topic}.retry.1", unique_name, f"{unique_name}.DLT"]
    create_topics(bootstrap, {name: 1 for name in topics})
    groups = [group_id, f"{unique_name}-g"]
    for group in groups:  # a committed offset makes the group exist without a live member
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
        consumer.commit(offsets=[TopicPartition(topic, 0, 0)], asynchronous=False)
        consumer.close()
    groups.append(f"{unique_name}-killed")
    join_then_die(bootstrap, groups[-1], topic)
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive: a collected client fails its futures
    listed = admin.list_consumer_groups().result(10)
    assert not listed.errors and set(groups) <= {g.group_id for g in listed.valid}

    # The consumer's shapes: a work queue with DLX/DLQ and retry queues, and the facade's (source = unique_name).
    topology = (RabbitMQTopology.work_queue(queue_name) + RabbitMQTopology.retry_queues(queue_name, 4)
                + RabbitMQTopology.work_queue(unique_name, exchange_type=RabbitMQExchangeType.TOPIC, routing_key="#"))
    topology.declare(rabbitmq_endpoint.url)
    names = {"topics": topics, "groups": groups,
             "queues": [q.name for q in topology.queues], "exchanges": [e.name for e in topology.exchanges]}
    assert len(names["queues"]) == 7 and len(names["exchanges"]) == 4
    (request.config.rootpath / "names.json").write_text(json.dumps(names))
'''


def _topics(bootstrap: str) -> set[str]:
    return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics)


def _groups(bootstrap: str) -> set[str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive: a collected client fails its futures
    listed = admin.list_consumer_groups(request_timeout=10).result(15)
    assert not listed.errors, listed.errors
    return {g.group_id for g in listed.valid}


def _rabbitmq_exists(url: str, kind: str, name: str) -> bool:
    """Passive declare: 404 NOT_FOUND when ``name`` does not exist."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        if kind == "queue":
            channel.queue_declare(name, passive=True)
        else:
            channel.exchange_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return False
        raise
    finally:
        if connection.is_open:
            connection.close()


@pytest.mark.kafka
@pytest.mark.rabbitmq
def test_teardown_deletes_what_the_test_created(
    pytester: pytest.Pytester, kafka_endpoint: KafkaEndpoint, rabbitmq_endpoint: RabbitMQEndpoint
) -> None:
    pytester.makepyfile(test_inner=INNER_TEST)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-p", "reliable_messaging.testing.plugin",
                                           timeout=90)
    result.assert_outcomes(passed=1)
    names = json.loads((pytester.path / "names.json").read_text())

    bootstrap = kafka_endpoint.bootstrap_servers
    # The cleanup waits for DeleteTopics to complete; the metadata a fresh client reads may lag a moment.
    wait_for(lambda: not set(names["topics"]) & _topics(bootstrap), 5, f"topics {names['topics']} deleted")
    assert not set(names["groups"]) & _groups(bootstrap)
    url = rabbitmq_endpoint.url
    left = [(kind, name) for kind in ("queue", "exchange") for name in names[f"{kind}s"]
            if _rabbitmq_exists(url, kind, name)]
    assert left == []


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_cleanup_against_a_down_broker_logs_and_returns_in_time(caplog: pytest.LogCaptureFixture) -> None:
    """A broker a fault test killed may still be down at teardown: a warning, no exception, bounded time."""
    port = _closed_port()
    began = time.monotonic()
    assert not _cleanup.delete_kafka_names(f"127.0.0.1:{port}", "down-00000000", timeout=1.0).complete
    assert not _cleanup.delete_rabbitmq_names(f"amqp://guest:guest@127.0.0.1:{port}/%2F", "down-00000000",
                                              timeout=1.0)
    assert time.monotonic() - began < 4.0
    warnings = [r.getMessage() for r in caplog.records if r.name == "reliable_messaging.testing.cleanup"]
    assert len(warnings) == 2 and all("down-00000000" in w for w in warnings), warnings


def test_retrying_against_a_broker_that_stays_down_gives_up_in_time() -> None:
    port = _closed_port()
    names = frozenset({"down-00000000"})
    left = {_cleanup.Cleanup("kafka", f"127.0.0.1:{port}", names),
            _cleanup.Cleanup("rabbitmq", f"amqp://guest:guest@127.0.0.1:{port}/%2F", names)}
    began = time.monotonic()
    assert _cleanup.retry(left, within=1.5) == left
    assert time.monotonic() - began < 4.0


def test_rabbitmq_candidates_follow_the_library_naming() -> None:
    queues, exchanges = _cleanup.rabbitmq_candidates("x-1234abcd")
    for base in ("x-1234abcd", "q.x-1234abcd", "t.x-1234abcd", "g.x-1234abcd"):
        assert {base, f"{base}.dlq", f"{base}.retry.1", f"{base}.retry.9"} <= set(queues)
        assert {base, f"{base}.dlx"} <= set(exchanges)
