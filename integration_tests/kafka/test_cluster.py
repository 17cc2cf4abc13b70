"""The 3-broker cluster (RF 3, min.insync.replicas=2): leader failover and too few replicas.

The cluster's nodes are combined broker+controller KRaft nodes, so a killed node
also leaves the controller quorum. That shapes what a producer sees:

- one node down: the quorum (2 of 3) elects a new leader for the partitions
  the dead node led once its session times out (``broker.session.timeout.ms``,
  6 s here); librdkafka retries into the new leader, and idempotence keeps the
  retries from duplicating anything.
- two nodes down: no quorum, so no leader election and no ISR shrink either.
  The leader cannot complete an ``acks=all`` write, nor tell the producer
  NOT_ENOUGH_REPLICAS; the write times out and the future fails with
  :class:`DeliveryTimeout` (typed, at ``delivery_timeout``; documented).
- NOT_ENOUGH_REPLICAS itself comes back when the ISR really is smaller than
  ``min.insync.replicas`` (here: a topic requiring 3 with one node down). An
  idempotent producer retries it until ``delivery_timeout`` (DeliveryTimeout);
  with bounded ``retries`` the future fails with :class:`NotEnoughReplicas`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
from confluent_kafka.admin import AdminClient

from reliable_messaging import (
    DeliveryError,
    DeliveryFuture,
    DeliveryTimeout,
    KafkaProducer,
    KafkaProducerConfig,
    NotEnoughReplicas,
)
from reliable_messaging.testing import KafkaEndpoint, wait_for
from reliable_messaging.testing.plugin import BrokerFaults

from ._helpers import make_topic, read_all

pytestmark = [pytest.mark.kafka, pytest.mark.fault, pytest.mark.slow]

TOTAL = 50_000


def partition_state(bootstrap: str, topic: str) -> tuple[int, list[int]]:
    """(leader node id, in-sync replica ids) of partition 0."""
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    partition = metadata.topics[topic].partitions[0]
    return partition.leader, list(partition.isrs)


def isr_seen_by_leader(bootstrap: str, topic: str) -> list[int]:
    """The in-sync replicas of partition 0 in the leader's own metadata (a fresh client bootstrapped
    through the leader alone asks it): other brokers may have applied an ISR change before it has."""
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    broker = metadata.brokers[metadata.topics[topic].partitions[0].leader]
    return partition_state(f"{broker.host}:{broker.port}", topic)[1]


def in_sync(bootstrap: str, topic: str, node: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            leader, isr = partition_state(bootstrap, topic)
        except Exception:  # metadata briefly unavailable while nodes come and go
            return False
        return leader >= 0 and node in isr and len(isr) == 3
    return check


@pytest.mark.timeout(300)
def test_leader_killed_twice_while_producing_keeps_every_acknowledged_message_exactly_once(
    kafka_cluster: KafkaEndpoint, broker_faults: BrokerFaults, topic: str
) -> None:
    bootstrap = kafka_cluster.bootstrap_servers
    make_topic(bootstrap, topic, partitions=1, replication_factor=3)
    wait_for(in_sync(bootstrap, topic, 1), 60, "a fully replicated partition")
    producer = KafkaProducer(KafkaProducerConfig(bootstrap_servers=bootstrap))
    futures: list[DeliveryFuture] = []
    killed: list[int] = []
    restarts: list[threading.Thread] = []

    def publish(count: int, per_second: float) -> None:
        for _ in range(count // 100):
            began = time.monotonic()
            futures.extend(producer.publish(topic, b"x" * 100) for _ in range(100))
            time.sleep(max(0.0, 100 / per_second - (time.monotonic() - began)))

    def kill_leader() -> None:
        leader, _ = partition_state(bootstrap, topic)
        assert leader >= 0
        broker_faults.kill(kafka_cluster.node(leader))
        killed.append(leader)
        node = kafka_cluster.node(leader)
        restart = threading.Thread(target=broker_faults.start, args=(node,))
        restarts.append(restart)
        restart.start()

    try:
        publish(10_000, 5_000)
        kill_leader()  # with the last batches still in flight
        publish(15_000, 2_500)  # through the election: librdkafka queues and retries
        restarts[0].join(120)
        wait_for(in_sync(bootstrap, topic, killed[0]), 90, f"node {killed[0]} back in the ISR")
        publish(5_000, 5_000)
        kill_leader()
        publish(20_000, 2_500)
        assert producer.flush(150) == 0, "every message got a delivery report"
    finally:
        producer.close(timeout=30)
        for restart in restarts:
            restart.join(120)
    wait_for(in_sync(bootstrap, topic, killed[-1]), 90, f"node {killed[-1]} back in the ISR")

    assert len(futures) == TOTAL and all(f.done() for f in futures)
    assert len(killed) == 2
    acknowledged = [f.message_id for f in futures if f.exception() is None]
    failures = [f.exception() for f in futures if f.exception() is not None]
    assert all(isinstance(e, DeliveryError) for e in failures), {type(e).__name__ for e in failures}
    assert len(acknowledged) >= TOTAL * 0.99, f"{len(failures)} failures: {failures[:3]}"

    in_log = Counter(r.header("message-id") for r in read_all(bootstrap, topic, timeout=120))
    assert [mid for mid, n in in_log.items() if n > 1] == [], "idempotence: no message stored twice"
    missing = [mid for mid in acknowledged if mid not in in_log]
    assert missing == [], f"{len(missing)} acknowledged messages are not in the log"
    assert set(in_log) <= {f.message_id for f in futures}
    print(f"leaders killed: {killed}; acknowledged {len(acknowledged)}, failed {len(failures)}, "
          f"in log {len(in_log)}")


@pytest.mark.timeout(180)
def test_two_of_three_brokers_down_fails_publishing_with_a_typed_error(
    kafka_cluster: KafkaEndpoint, broker_faults: BrokerFaults, topic: str
) -> None:
    bootstrap = kafka_cluster.bootstrap_servers
    make_topic(bootstrap, topic, partitions=1, replication_factor=3)
    with KafkaProducer(KafkaProducerConfig(bootstrap_servers=bootstrap, delivery_timeout=8.0)) as producer:
        assert producer.publish(topic, b"all up").result(timeout=30).offset == 0
        leader, _ = partition_state(bootstrap, topic)
        followers = [n for n in (1, 2, 3) if n != leader]
        for node in followers:  # the leader survives, alone: it cannot reach min.insync.replicas
            broker_faults.kill(kafka_cluster.node(node))
        began = time.monotonic()
        future = producer.publish(topic, b"two down")
        with pytest.raises((DeliveryTimeout, NotEnoughReplicas)) as info:
            future.result(timeout=60)
        elapsed = time.monotonic() - began
    assert info.value.message_id == future.message_id
    # Without a controller quorum this cluster answers with a timeout (see the module docstring).
    assert isinstance(info.value, DeliveryTimeout), type(info.value)
    assert elapsed < 30, f"the typed failure took {elapsed:.1f}s (delivery_timeout is 8s)"


@pytest.mark.timeout(180)
def test_isr_below_min_insync_replicas_is_not_enough_replicas(
    kafka_cluster: KafkaEndpoint, broker_faults: BrokerFaults, topic: str
) -> None:
    bootstrap = kafka_cluster.bootstrap_servers
    make_topic(bootstrap, topic, partitions=1, replication_factor=3, config={"min.insync.replicas": "3"})
    leader, _ = partition_state(bootstrap, topic)
    follower = next(n for n in (1, 2, 3) if n != leader)
    broker_faults.kill(kafka_cluster.node(follower))
    # The remaining quorum fences the dead node and shrinks the ISR to 2 < 3; waited for as the leader
    # reports it. Its metadata answer can still run ahead of the partition state it appends with: a
    # produce that lands in that gap is appended while the ISR still counts 3, and then never answered,
    # since Kafka 4 holds the high watermark while the ISR is below min.insync.replicas (KIP-966). The
    # future fails with DeliveryTimeout ("may or may not have been stored": it was, and becomes visible
    # once the ISR recovers). Of 47 runs in one machine's broker logs (some under added CPU load), the 7
    # that timed out each left the record in the leader's log (end offset 1), the 40 others did not.
    wait_for(lambda: follower not in isr_seen_by_leader(bootstrap, topic), 60, "the leader to shrink the ISR")

    bounded = KafkaProducerConfig(bootstrap_servers=bootstrap, enable_idempotence=False, retries=0,
                                  delivery_timeout=8.0)
    raced: list[DeliveryTimeout] = []
    with KafkaProducer(bounded) as producer:
        while True:
            future = producer.publish(topic, b"needs three replicas")
            with pytest.raises((NotEnoughReplicas, DeliveryTimeout)) as info:
                future.result(timeout=30)  # never a Delivery: no acks=all write succeeds with 2 of 3
            if isinstance(info.value, NotEnoughReplicas):
                break
            raced.append(info.value)  # appended in the gap described above
            assert len(raced) < 3, f"the leader still appends acks=all writes with ISR < 3: {raced}"
    assert info.value.code == "NOT_ENOUGH_REPLICAS" and info.value.retriable
    assert info.value.message_id == future.message_id

    idempotent = KafkaProducerConfig(bootstrap_servers=bootstrap, delivery_timeout=5.0)
    with KafkaProducer(idempotent) as producer:
        future = producer.publish(topic, b"needs three replicas")
        with pytest.raises(DeliveryTimeout):  # librdkafka retried NOT_ENOUGH_REPLICAS until the deadline
            future.result(timeout=30)
