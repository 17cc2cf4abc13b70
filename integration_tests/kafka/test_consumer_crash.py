"""SIGKILL the consumer process mid-stream, restart it, and count what each commit mode repeats or loses.

The consumer process (:mod:`._consumer_process`) fsyncs every processed id to a
file from inside its handler, before any commit. After the crash a new process
with the same group (and static membership, so it gets the partitions back at
once) finishes the stream. The file then says, per message id, how often it was
processed:

=================  ============================================  ==================================
mode               promise                                       checked here
=================  ============================================  ==================================
MANUAL             at least once; at most 1 repeat per crash      every id, duplicates <= 1
MANUAL_BATCH       at least once; at most ``commit_every``        every id, duplicates <= commit_every
STORE_OFFSETS      at least once; repeats what was processed      every id, every duplicate processed
                   after the last background commit              within one commit interval of the kill
AUTO               neither: offsets are stored when librdkafka    ids are lost (the seed's warning)
                   hands a record out, before the handler runs
BEFORE             at most once: each fetched batch committed     no id twice; a crash loses ids, a
                   before it is handled                          graceful stop none
=================  ============================================  ==================================
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from reliable_messaging import KafkaProducer, KafkaProducerConfig
from reliable_messaging.testing import KafkaEndpoint, wait_for

from ._helpers import make_topic

pytestmark = [pytest.mark.kafka, pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
TOTAL = 300


@dataclass
class Processed:
    lines: list[tuple[str, float, int]]

    @property
    def counts(self) -> Counter[str]:
        return Counter(mid for mid, _, _ in self.lines)


def read_processed(path: Path) -> Processed:
    if not path.exists():
        return Processed([])
    lines = []
    for line in path.read_text().splitlines():
        mid, at, pid = line.split("\t")
        lines.append((mid, float(at), int(pid)))
    return Processed(lines)


class ConsumerProcess:
    def __init__(self, tmp: Path, bootstrap: str, topic: str, group: str, mode: str, *extra: str) -> None:
        self.out = tmp / "processed.tsv"
        self.log = tmp / "consumer.log"
        self.args = [sys.executable, "-m", "integration_tests.kafka._consumer_process", "--bootstrap", bootstrap,
                     "--topic", topic, "--group", group, "--mode", mode, "--out", str(self.out),
                     "--log", str(self.log), "--instance", f"{group}-instance", *extra]
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=subprocess.PIPE, text=True)

    def wait_assigned(self, timeout: float = 30) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded: the process prints within 60 s, pytest-timeout guards
        assert line.strip() == "ASSIGNED", f"consumer process did not get partitions: {line!r}\n{self.logs()}"

    def kill(self) -> float:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        killed_at = time.time()
        self.proc.wait(timeout=10)
        return killed_at

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            assert self.proc.returncode == 0, f"consumer process exited with {self.proc.returncode}\n{self.logs()}"

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def logs(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""


def publish_ids(bootstrap: str, topic: str) -> list[str]:
    with KafkaProducer(KafkaProducerConfig(bootstrap_servers=bootstrap)) as producer:
        futures = [producer.publish(topic, f"job {i}".encode(), partition=i % 2) for i in range(TOTAL)]
        return [f.result(timeout=30).message_id for f in futures]


def crash_and_restart(tmp_path: Path, bootstrap: str, topic: str, group: str, mode: str, *extra: str,
                      kill_after: int = 100, finish: bool = True, graceful: bool = False
                      ) -> tuple[list[str], Processed, float, int]:
    """Publish TOTAL ids, SIGKILL the consumer after ``kill_after`` are processed, restart it.

    ``graceful``: SIGTERM instead (the process stops its consumer: a clean stop, not a crash).

    Returns (published ids, processed lines, kill time, lines processed before the kill).
    """
    make_topic(bootstrap, topic, partitions=2)
    ids = publish_ids(bootstrap, topic)
    first = ConsumerProcess(tmp_path, bootstrap, topic, group, mode, *extra)
    second = ConsumerProcess(tmp_path, bootstrap, topic, group, mode, *extra)
    try:
        first.start()
        first.wait_assigned()
        wait_for(lambda: len(read_processed(first.out).lines) >= kill_after, 60, f"{kill_after} records")
        if graceful:
            killed_at = time.time()
            first.terminate()
        else:
            killed_at = first.kill()
        before_kill = len(read_processed(first.out).lines)
        assert before_kill < TOTAL, "the kill must land mid-stream"
        second.start()
        second.wait_assigned()
        if finish:
            wait_for(lambda: set(read_processed(second.out).counts) >= set(ids), 60,
                       f"every id after the restart\n{second.logs()}")
        else:
            # Give the restarted consumer time to fetch whatever its committed offsets leave.
            time.sleep(4)
        second.terminate()
    finally:
        for proc in (first, second):
            proc.close()
    return ids, read_processed(first.out), killed_at, before_kill


def duplicates(processed: Processed) -> int:
    return sum(n - 1 for n in processed.counts.values())


def test_manual_commit_repeats_at_most_one_record_per_crash(
    kafka_endpoint: KafkaEndpoint, topic: str, group_id: str, tmp_path: Path
) -> None:
    ids, processed, _, before = crash_and_restart(tmp_path, kafka_endpoint.bootstrap_servers, topic, group_id,
                                                  "manual", "--delay", "0.002")
    assert set(processed.counts) == set(ids), "every record processed at least once"
    assert duplicates(processed) <= 1, f"per-message commit repeated {duplicates(processed)} records"
    assert len({pid for _, _, pid in processed.lines}) == 2 and before >= 100


def test_manual_batch_repeats_at_most_commit_every(
    kafka_endpoint: KafkaEndpoint, topic: str, group_id: str, tmp_path: Path
) -> None:
    commit_every = 20
    ids, processed, _, before = crash_and_restart(
        tmp_path, kafka_endpoint.bootstrap_servers, topic, group_id, "manual_batch",
        "--commit-every", str(commit_every), "--commit-interval", "60", "--delay", "0.002", kill_after=110,
    )
    assert before >= 110
    assert set(processed.counts) == set(ids), "every record processed at least once"
    # Without any commit the restart would repeat all `before` (>= 110) records.
    assert duplicates(processed) <= commit_every, f"batch commit repeated {duplicates(processed)} records"


def test_store_offsets_repeats_only_what_followed_the_last_background_commit(
    kafka_endpoint: KafkaEndpoint, topic: str, group_id: str, tmp_path: Path
) -> None:
    interval, slack = 0.5, 1.0
    ids, processed, killed_at, _ = crash_and_restart(
        tmp_path, kafka_endpoint.bootstrap_servers, topic, group_id, "store_offsets",
        "--commit-interval", str(interval), "--delay", "0.01", kill_after=200,
    )
    assert set(processed.counts) == set(ids), "every record processed at least once"
    first_seen: dict[str, float] = {}
    for mid, at, _ in processed.lines:
        first_seen.setdefault(mid, at)
    cutoff = killed_at - interval - slack
    # The first run lasted long enough that, without working background commits, records
    # processed well before the cutoff would be repeated too.
    assert min(first_seen.values()) < cutoff - 0.5
    repeated = [mid for mid, n in processed.counts.items() if n > 1]
    # librdkafka commits the stored offsets every `interval`: only records processed after the last
    # commit before the kill come again (slack: the commit's round trip and scheduling on 2 cores).
    late = [mid for mid in repeated if first_seen[mid] < cutoff]
    assert late == [], f"{len(late)} repeated records were processed long before the kill"


def test_auto_commit_loses_records_on_a_crash(
    kafka_endpoint: KafkaEndpoint, topic: str, group_id: str, tmp_path: Path
) -> None:
    """The seed's warning, shown: with auto-commit a crash loses records that were never processed.

    librdkafka stores each record's offset when it hands the record to the
    application and commits stored offsets every ``auto.commit.interval.ms``, so
    the commit runs ahead of the handler. Here the consumer takes a batch of
    records, is killed while working through it, and its successor starts after
    the batch: the unprocessed rest of the batch is gone.
    """
    ids, processed, _, before = crash_and_restart(
        tmp_path, kafka_endpoint.bootstrap_servers, topic, group_id, "auto",
        "--commit-interval", "0.2", "--delay", "0.02", kill_after=30, finish=False,
    )
    lost = set(ids) - set(processed.counts)
    assert before < TOTAL
    assert lost, "auto-commit should have lost the records fetched but not processed before the kill"
    print(f"auto-commit crash: {before} processed before SIGKILL, {len(lost)} of {TOTAL} records lost, "
          f"{duplicates(processed)} repeated")


def test_commit_before_handling_never_repeats_a_record_after_a_crash(
    kafka_endpoint: KafkaEndpoint, topic: str, group_id: str, tmp_path: Path
) -> None:
    """At-most-once (the preset's mode): the crash loses the rest of the fetched batch, and repeats nothing.

    It used to be auto-commit, which repeats too: what was handled since the last background commit."""
    ids, processed, _, before = crash_and_restart(
        tmp_path, kafka_endpoint.bootstrap_servers, topic, group_id, "before", "--delay", "0.02",
        kill_after=30, finish=False)
    lost = set(ids) - set(processed.counts)
    assert duplicates(processed) == 0, f"{duplicates(processed)} records handled twice under at-most-once"
    assert lost and len(lost) <= 500, f"{len(lost)} lost: the rest of one fetched batch (<= 500) was expected"
    print(f"commit-before crash: {before} processed before SIGKILL, {len(lost)} of {TOTAL} lost, 0 repeated")


def test_commit_before_handling_loses_nothing_on_a_graceful_stop(
    kafka_endpoint: KafkaEndpoint, topic: str, group_id: str, tmp_path: Path
) -> None:
    """Stopped cleanly mid-batch, the consumer commits back to the first record it did not handle."""
    ids, processed, _, before = crash_and_restart(
        tmp_path, kafka_endpoint.bootstrap_servers, topic, group_id, "before", "--delay", "0.02",
        kill_after=30, graceful=True)
    assert before < TOTAL
    assert set(processed.counts) == set(ids), f"{len(set(ids) - set(processed.counts))} lost on a graceful stop"
    assert duplicates(processed) == 0, f"{duplicates(processed)} records handled twice"


def test_environment_allows_sigkill() -> None:
    # The crash tests rely on POSIX signals; fail loudly rather than skip on a platform without them.
    assert hasattr(signal, "SIGKILL") and os.name == "posix"
