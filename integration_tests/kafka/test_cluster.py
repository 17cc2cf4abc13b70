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
  Around the shrink there is a window in which the metadata already shows it but
  the leader's partition does not: a write landing there is appended, never
  answered, and fails with DeliveryTimeout, never as a success (see that test).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
from confluent_kafka import KafkaException
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
    """(leader node id, in-sync replica ids) of partition 0, as the first broker that knows a leader for it says.

    A metadata request goes to whichever broker the client picks, and each broker applies the metadata log on
    its own: right after ``make_topic`` (which saw the leader on one broker) another may not know the topic
    yet, and one that was just restarted may still be catching up.
    """
    state: list[tuple[int, list[int]]] = []

    def known() -> bool:
        try:
            metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
        except KafkaException:  # no broker answered in time: nodes come and go in these tests
            return False
        info = metadata.topics.get(topic)
        partition = info.partitions.get(0) if info is not None and info.error is None else None
        if partition is None or partition.leader < 0:
            return False
        state.append((partition.leader, list(partition.isrs)))
        return True

    wait_for(known, 30, f"a broker to know a leader for {topic}")
    return state[-1]


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
        assert producer.flush(150) is True, "every message got a delivery report"
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
    """With the ISR below min.insync.replicas no acks=all write is acknowledged: each fails typed; acks=1 works.

    The quorum fences the killed follower and shrinks the ISR to 2 < 3, but the metadata shows that before
    the leader's partition applies it, and the ISR the leader checks writes against is its partition's
    (measured on the local cluster, with the brokers' request log at DEBUG):
    - a metadata answer can come from any broker (a client bootstrapped through the leader alone still
      sent ``list_topics`` to another broker in 26 of 60 tries), and a follower may apply the change first;
    - the leader itself updates its metadata cache, then applies the change to the partitions it leads one
      by one (21 of them once: ours came 536 ms after the cache; 100-350 ms is common under load).
    A write landing in that window is appended while the ISR still counts 3 and then never answered: Kafka
    4 holds the high watermark while the ISR is below min.insync.replicas (KIP-966), until the request times
    out (30 s) or the follower is back (then it succeeds, long after the client gave up). Its future fails
    with DeliveryTimeout. The broker reads nothing more from that connection until it answers, so a write
    already sent behind it times out too (librdkafka opens a new connection once the held one timed out).

    So the leader is probed until it refuses a write itself, each probe on a producer (connection) of its
    own; a probe may time out (in the window), none may succeed. A refusal shows the partition applied the
    shrink, and the dead follower cannot rejoin: from then on the outcomes below are certain.
    """
    bootstrap = kafka_cluster.bootstrap_servers
    make_topic(bootstrap, topic, partitions=1, replication_factor=3, config={"min.insync.replicas": "3"})
    leader, _ = partition_state(bootstrap, topic)
    follower = next(n for n in (1, 2, 3) if n != leader)
    broker_faults.kill(kafka_cluster.node(follower))
    # Only a hint (see above) that spares probing through the session timeout, when every probe would wait.
    wait_for(lambda: follower not in partition_state(bootstrap, topic)[1], 60, "the metadata to show the ISR shrink")

    probe = KafkaProducerConfig(bootstrap_servers=bootstrap, enable_idempotence=False, retries=0,
                                delivery_timeout=3.0)
    probes: list[str] = []
    deadline = time.monotonic() + 60
    while not probes or probes[-1] != "NotEnoughReplicas":
        assert time.monotonic() < deadline, f"the leader refused no acks=all write within 60 s: {probes}"
        # Never a success: 2 of 3 replicas are in sync.
        with KafkaProducer(probe) as producer, pytest.raises((NotEnoughReplicas, DeliveryTimeout)) as probed:
            producer.publish(topic, b"probe: needs three replicas").result(timeout=30)
        probes.append(type(probed.value).__name__)

    bounded = KafkaProducerConfig(bootstrap_servers=bootstrap, enable_idempotence=False, retries=0,
                                  delivery_timeout=8.0)
    with KafkaProducer(bounded) as producer:
        future = producer.publish(topic, b"needs three replicas")
        with pytest.raises(NotEnoughReplicas) as info:
            future.result(timeout=30)
    assert info.value.code == "NOT_ENOUGH_REPLICAS" and info.value.retriable
    assert info.value.message_id == future.message_id

    idempotent = KafkaProducerConfig(bootstrap_servers=bootstrap, delivery_timeout=5.0)
    with KafkaProducer(idempotent) as producer:
        future = producer.publish(topic, b"needs three replicas")
        with pytest.raises(DeliveryTimeout):  # librdkafka retried NOT_ENOUGH_REPLICAS until the deadline
            future.result(timeout=30)

    # acks=1 waits for the leader alone: the partition still takes writes, only acks=all is refused.
    with KafkaProducer(KafkaProducerConfig(bootstrap_servers=bootstrap, acks="1", delivery_timeout=8.0)) as producer:
        assert producer.publish(topic, b"leader only").result(timeout=30).offset is not None
    print(f"probes until the leader refused one: {probes}")
