"""SIGKILL a consumer process at random moments, several times, and count lost and repeated work.

The consumer is the facade as a user writes it (``_consumer.py``): its handler appends each message
id to a log file and fsyncs it, a side effect that outlives the process. The test publishes
``MESSAGES`` confirmed messages, kills the consumer with SIGKILL ``KILLS`` times at random handled
counts (so in the middle of a fetched batch, of a group of waiting deliveries, of a commit step),
restarts it on the same store each time, and finally lets it drain. Then:

- **lost** = published ids never handled: must be 0;
- **repeats** = handler runs beyond the first per id: at most ``KILLS x`` the per-crash bound the
  README states for the configuration (effectively-once: the one handler that was running);
- **drain** = seconds from the last restart until every id was handled: bounded, so a dead
  consumer's claims cannot hold its messages back (they were held for the 60 s lease once).

The random seed is printed with every failure; ``RM_KILL_SEED`` replays a run, and ``RM_KILL_REPORT=<file>``
appends each run's figures to that file as a JSON line.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reliable_messaging import connect
from reliable_messaging._kafka._config import DEFAULT_COMMIT_EVERY
from reliable_messaging._rabbitmq._config import DEFAULT_PREFETCH
from reliable_messaging.testing import KafkaEndpoint, RabbitMQEndpoint, RedisEndpoint

pytestmark = [pytest.mark.fault, pytest.mark.slow]

HERE = Path(__file__).parent
MESSAGES = 3000
KILLS = 3

KAFKA_SETTINGS: dict[str, Any] = {"session_timeout": 6.0}
"""The killed member stays in the group until its session times out: the restarted consumer gets
the partition after that (Kafka's rebalance, not the library's), so the drain bound includes it."""


@dataclass
class Run:
    """One scenario's kills and what the log showed."""

    seed: int
    targets: list[int]
    kill_counts: list[int] = field(default_factory=list)
    after_signal: list[int] = field(default_factory=list)
    """SIGTERM: messages handled between the signal and the process's exit, per stop."""
    drain: float = 0.0
    lost: int = 0
    repeats: int = 0
    repeated_ids: int = 0

    def describe(self) -> str:
        after = f" handled after SIGTERM {self.after_signal};" if self.after_signal else ""
        return (f"seed={self.seed} kills at handled counts {self.kill_counts} (targets {self.targets});{after} "
                f"lost={self.lost} repeats={self.repeats} ({self.repeated_ids} ids) drain={self.drain:.1f}s")


class Log:
    """The handlers' log, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self._offset = 0
        self._partial = b""

    def ids(self) -> list[str]:
        """The message ids handled, in the order the handlers logged them."""
        return [line.split(" ", 1)[0] for line in self.lines]

    def refresh(self) -> int:
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
            self._offset += len(chunk)
            data = self._partial + chunk
            *complete, self._partial = data.split(b"\n")
            self.lines.extend(line.decode() for line in complete)
        return len(self.lines)


def _start(url: str, source: str, group: str, log: Path, store: str, settings: dict[str, Any],
           stderr: Path, extra: list[str] | None = None) -> subprocess.Popen[str]:
    err = stderr.open("a")
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_consumer.py"), url, source, group, str(log), "--store", store,
         "--settings", json.dumps(settings), *(extra or [])],
        stdout=err, stderr=err, text=True)
    err.close()
    return proc


def kill_at_random(url: str, source: str, group: str, store: str, tmp: Path, *, settings: dict[str, Any],
                   messages: int = MESSAGES, kills: int = KILLS, drain_deadline: float = 90.0,
                   extra: list[str] | None = None, sig: signal.Signals = signal.SIGKILL, keys: int = 16) -> Run:
    """Publish, kill the consumer ``kills`` times at random handled counts, drain; count what happened.

    ``extra``: more arguments of ``_consumer.py`` (concurrency, handler delay). ``sig``: the signal;
    SIGTERM asks for a graceful stop, which must end the process (exit code 0) within 60 s."""
    seed = int(os.environ.get("RM_KILL_SEED") or random.SystemRandom().randrange(1 << 30))
    rng = random.Random(seed)
    # Distinct random targets over the first 80%, at least 5% apart so each run handles something.
    targets: list[int] = []
    while len(targets) < kills:
        candidate = rng.randrange(messages // 20, messages * 8 // 10)
        if all(abs(candidate - t) >= messages // 20 for t in targets):
            targets.append(candidate)
    targets.sort()
    run = Run(seed=seed, targets=targets)
    ids = [f"{source}-{i:06d}" for i in range(messages)]
    with connect(url) as broker:
        if url.startswith("amqp"):
            # Declare the queue before publishing (the consumer declares the same topology).
            broker.topology(source).declare(url, connection_name="kill-test topology")  # type: ignore[attr-defined]
        futures = [broker.publish(source, f"body {i}".encode(), key=f"k{i % keys}", message_id=mid)
                   for i, mid in enumerate(ids)]
        for future in futures:
            future.result(timeout=60)

    log = Log(tmp / "handled.log")
    stderr = tmp / "consumer.stderr"
    try:
        for target in targets:
            if log.refresh() >= messages:
                break  # a graceful stop finished everything: nothing left to stop this process in
            proc = _start(url, source, group, log.path, store, settings, stderr, extra)
            deadline = time.monotonic() + 90
            # At least one message handled by this process (the last one may have drained past the target).
            target = max(target, log.refresh() + 1)
            while log.refresh() < target:
                if proc.poll() is not None:
                    pytest.fail(f"the consumer exited with {proc.returncode} before the kill; {run.describe()}; "
                                f"stderr:\n{stderr.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait(30)  # reaped here: a Popen left running fails a later test's teardown instead
                    pytest.fail(f"only {len(log.lines)} handled of {target} within 90 s; {run.describe()}; "
                                f"stderr:\n{stderr.read_text()[-3000:]}")
                time.sleep(0.002)
            proc.send_signal(sig)
            run.kill_counts.append(log.refresh())
            if sig is signal.SIGKILL:
                proc.wait(30)
            else:
                try:
                    code = proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(30)
                    pytest.fail(f"the consumer did not stop within 60 s of {sig.name}; {run.describe()}")
                assert code == 0, f"exit code {code} after {sig.name}; stderr:\n{stderr.read_text()[-3000:]}"
                run.after_signal.append(log.refresh() - run.kill_counts[-1])
        proc = _start(url, source, group, log.path, store, settings, stderr, extra)
        started = time.monotonic()
        wanted = set(ids)
        try:
            while not wanted.issubset(log.ids()):
                log.refresh()
                if time.monotonic() - started > drain_deadline:
                    break
                if proc.poll() is not None:
                    pytest.fail(f"the consumer exited with {proc.returncode}; {run.describe()}; "
                                f"stderr:\n{stderr.read_text()[-3000:]}")
                time.sleep(0.01)
            run.drain = time.monotonic() - started
            time.sleep(0.5)  # anything still in flight
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    finally:
        log.refresh()
    counts = Counter(log.ids())
    run.lost = len(wanted - counts.keys())
    run.repeats = sum(counts.values()) - len(counts)
    run.repeated_ids = sum(1 for c in counts.values() if c > 1)
    print(run.describe())
    report = os.environ.get("RM_KILL_REPORT")  # figures over many runs: one JSON line per scenario run
    if report:
        with open(report, "a") as out:
            out.write(json.dumps({"broker": url.split(":", 1)[0], "store": store.split(":", 1)[0], "seed": seed,
                                  "extra": " ".join(extra or []), "signal": sig.name,
                                  "kills": run.kill_counts, "after_signal": run.after_signal,
                                  "lost": run.lost, "repeats": run.repeats,
                                  "repeated_ids": run.repeated_ids, "drain": round(run.drain, 2)}) + "\n")
    return run


@pytest.fixture(params=["sqlite", "redis", "none"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The effectively-once preset with its default SQLite store or a Redis store; "none": at-least-once."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'dedup.sqlite3'}"
    if request.param == "redis":
        redis: RedisEndpoint = request.getfixturevalue("redis_endpoint")
        return f"redis:{redis.url}"
    return "none"


def repeats_bound(store: str, at_least_once: int) -> int:
    """Handler runs a kill may repeat: effectively-once, the one handler running; else the preset's window."""
    return 1 if store != "none" else at_least_once


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_kafka_consumer_killed_at_random_moments(
        kafka_endpoint: KafkaEndpoint, topic: str, store: str, tmp_path: Path) -> None:
    """At-least-once repeats at most ``commit_every`` (10,000) records per kill: the records processed since
    the last acknowledged offset commit. The figure measured is printed (README: "Crash bounds")."""
    url = f"kafka://{kafka_endpoint.bootstrap_servers}"
    run = kill_at_random(url, topic, f"{topic}-g", store, tmp_path, settings=KAFKA_SETTINGS)
    assert run.lost == 0, run.describe()
    assert run.repeats <= KILLS * repeats_bound(store, DEFAULT_COMMIT_EVERY), run.describe()
    # The killed member holds its partition until its session times out (6 s here): then a few seconds.
    assert run.drain <= KAFKA_SETTINGS["session_timeout"] + 10, run.describe()


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_rabbitmq_consumer_killed_at_random_moments(
        rabbitmq_endpoint: RabbitMQEndpoint, queue_name: str, store: str, tmp_path: Path) -> None:
    """At-least-once repeats at most ``prefetch`` (100) deliveries per kill: those handled, not yet acked."""
    run = kill_at_random(rabbitmq_endpoint.url, queue_name, "unused", store, tmp_path, settings={})
    assert run.lost == 0, run.describe()
    assert run.repeats <= KILLS * repeats_bound(store, DEFAULT_PREFETCH), run.describe()
    assert run.drain <= 10, run.describe()
