"""What a Kafka topic's settings do to a guarantee (:func:`reliable_messaging.check` for ``kafka://``).

Read with the admin client: the topic's partitions, replicas and in-sync replicas (metadata), its
``min.insync.replicas`` and ``unclean.leader.election.enable`` (describe_configs: the effective values, whether set
on the topic or inherited from the broker), the broker's ``auto.create.topics.enable``, the retry and dead-letter
topics the consumer uses, and a consumer group's committed offsets against the end of each partition.
"""

from __future__ import annotations

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, OffsetSpec  # type: ignore[attr-defined]  # not re-exported in stubs

from .._broker import Guarantee
from .._check import Finding, Severity
from .._retry import DEFAULT_RETRY_POLICY
from ._errors import operation_error
from ._topology import TopicNames, _admin

__all__ = ["check_topic"]

ERROR, WARNING, OK = Severity.ERROR, Severity.WARNING, Severity.OK


def check_topic(bootstrap_servers: str, topic: str, guarantee: Guarantee, *, group: str | None = None,
                timeout: float = 10.0) -> list[Finding]:
    admin = _admin(bootstrap_servers, {})
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise operation_error("reading cluster metadata", exc) from exc
    findings: list[Finding] = []
    brokers = len(metadata.brokers)
    durable = guarantee is not Guarantee.AT_MOST_ONCE
    auto_create = _broker_config(admin, metadata, "auto.create.topics.enable", timeout)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        hint = (" and the broker creates topics on first use (auto.create.topics.enable=true): publishing "
                "would create it with the broker's defaults" if auto_create == "true" else
                ": publishing fails until it is created")
        findings.append(Finding(ERROR, topic, f"topic {topic!r} does not exist{hint}; create it with the "
                                "replication factor and min.insync.replicas the guarantee needs (broker.declare)"))
        return findings
    partitions = list(info.partitions.values())
    replication = min(len(p.replicas) for p in partitions)
    configs = _topic_config(admin, topic, timeout)
    min_isr = int(configs.get("min.insync.replicas", "1"))
    if replication < 3:
        severity = WARNING if durable else OK
        findings.append(Finding(severity, topic, f"replication factor {replication} (< 3): "
                                + ("an acknowledged message is lost with its only broker's disk"
                                   if replication == 1 else "one broker down leaves no margin for a second")
                                + f" ({brokers} broker(s) in the cluster)"))
    else:
        findings.append(Finding(OK, topic, f"replication factor {replication}"))
    if durable:
        if min_isr >= replication > 1:
            findings.append(Finding(ERROR, topic, f"min.insync.replicas={min_isr} >= replication factor "
                                    f"{replication}: one replica down stops every acks=all publish "
                                    "(NotEnoughReplicas); use replication factor - 1"))
        elif min_isr < 2 and replication > 1:
            findings.append(Finding(WARNING, topic, f"min.insync.replicas={min_isr}: acks=all is acknowledged by "
                                    "the leader alone when the followers fall behind, no stronger than acks=1; "
                                    "use 2 (with replication factor 3)"))
        elif replication > 1:
            findings.append(Finding(OK, topic, f"min.insync.replicas={min_isr}"))
        if configs.get("unclean.leader.election.enable") == "true":
            findings.append(Finding(ERROR, topic, "unclean.leader.election.enable=true: a replica that is out of "
                                    "sync can become leader and drop acknowledged messages"))
        short = sorted(p.id for p in partitions if len(p.isrs) < min_isr)
        if short:
            findings.append(Finding(ERROR, topic, f"partitions {short} have fewer in-sync replicas than "
                                    f"min.insync.replicas={min_isr} right now: acks=all publishes fail"))
    if auto_create == "true":
        findings.append(Finding(WARNING, "broker", "auto.create.topics.enable=true: a typo in a topic name creates "
                                "a topic with the broker's defaults instead of failing"))
    names = TopicNames()
    expected = [names.dead_letter(topic)] + [names.retry(topic, n)
                                             for n in range(1, DEFAULT_RETRY_POLICY.max_attempts)]
    missing = [name for name in expected if name not in metadata.topics]
    if missing:
        findings.append(Finding(WARNING, topic, f"{', '.join(missing)} missing: the consumer creates them on start; "
                                "until then a dead letter or retry copy has nowhere to go (or is auto-created)"))
    else:
        findings.append(Finding(OK, topic, "dead-letter and retry topics exist"))
    for name in expected:
        other = metadata.topics.get(name)
        if other is not None and other.partitions and len(other.partitions) != len(partitions):
            findings.append(Finding(WARNING, name, f"{len(other.partitions)} partitions, {topic!r} has "
                                    f"{len(partitions)}: a keyed message's retries change partition"))
    if group:
        findings.append(_lag(admin, topic, group, [p.id for p in partitions], timeout))
    return findings


def _topic_config(admin: AdminClient, topic: str, timeout: float) -> dict[str, str]:
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    try:
        entries = admin.describe_configs([resource])[resource].result(timeout=timeout)
    except KafkaException as exc:
        raise operation_error(f"reading the configuration of {topic!r}", exc) from exc
    return {name: entry.value for name, entry in entries.items() if entry.value is not None}


def _broker_config(admin: AdminClient, metadata: object, name: str, timeout: float) -> str | None:
    broker_ids = sorted(getattr(metadata, "brokers", {}))
    if not broker_ids:
        return None
    resource = ConfigResource(ConfigResource.Type.BROKER, str(broker_ids[0]))
    try:
        entries = admin.describe_configs([resource])[resource].result(timeout=timeout)
    except KafkaException as exc:
        raise operation_error("reading the broker configuration", exc) from exc
    entry = entries.get(name)
    return None if entry is None else entry.value


def _lag(admin: AdminClient, topic: str, group: str, partitions: list[int], timeout: float) -> Finding:
    tps = [TopicPartition(topic, p) for p in partitions]
    try:
        request = ConsumerGroupTopicPartitions(group, tps)
        committed = admin.list_consumer_group_offsets([request])[group].result(timeout=timeout)
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        ends = admin.list_offsets({tp: latest for tp in tps}, request_timeout=timeout)
        end = {tp.partition: future.result(timeout=timeout).offset for tp, future in ends.items()}
    except KafkaException as exc:
        raise operation_error(f"reading the offsets of group {group!r}", exc) from exc
    offsets = {tp.partition: tp.offset for tp in committed.topic_partitions}
    if all(offset < 0 for offset in offsets.values()):
        return Finding(WARNING, f"group {group}", f"no committed offsets on {topic!r}: the group has not consumed "
                       "it yet (it starts at auto_offset_reset)")
    lag = sum(max(0, end[p] - max(0, offsets.get(p, 0))) for p in partitions)
    return Finding(OK, f"group {group}", f"lag {lag:,} record(s) on {topic!r} (committed offsets vs the end of "
                   "each partition)")
