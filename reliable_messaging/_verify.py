"""A delivery audit through the library itself: ``reliable-messaging verify`` and :func:`verify`.

Publishes ``messages`` uniquely numbered messages under a guarantee preset (plus any settings), then consumes them
in a **separate consumer process** (:mod:`._verify_consumer`) whose handler appends each message id to a file and
fsyncs it — a side effect that outlives the process, as a service's database write does. That process is SIGKILLed
every ``kill_every`` handled messages (a random point between 0.5 and 1.5 times that, so mid-batch, mid-commit,
mid-acknowledgement) and restarted on the same dedup store; at the end one more process drains the rest. Then:

- ``lost``: confirmed ids never handled;
- ``duplicates_processed``: handler runs beyond the first per id (the side effect repeated);
- ``duplicates_delivered``: those, plus the deliveries of an already-handled id that the dedup store absorbed (as
  the consumer processes reported them every 0.2 s: a lower bound, a killed process's last moments are missing);
- ``held``: whether the guarantee's promise held — at-most-once: nothing handled twice; at-least-once: nothing lost;
  effectively-once: nothing lost and at most ``concurrency`` handler runs repeated per kill (the handlers that were
  running when the process died: their side effect happened, their done record did not).

Written by hand rather than with a chaos tool: what is counted is the handler's own side effect across real
process deaths, which only the library's consumer and a log it fsyncs can show.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ._broker import Guarantee
from ._dedup import MemoryDedupStore
from ._errors import ConfigurationError, ReliableMessagingError
from ._facade import connect
from ._log import redact
from .testing._local import KAFKA_PORT, KAFKA_PROXIED_PORT, KAFKA_PROXY_PORT
from .testing._proxy import TcpProxy

__all__ = ["VerifyReport", "verify"]

logger = logging.getLogger("reliable_messaging.verify")

KAFKA_AUDIT_SETTINGS: dict[str, Any] = {"session_timeout": 6.0}
"""Kafka settings of the audit unless given: a SIGKILLed member stays in the group until its session times out
(45 s by default) and its partitions wait for it; 6 s keeps a run with several kills short. Shown in the report."""

_QUIET = 8.0
"""The drain ends once every confirmed id was handled, or when nothing was handled for this long (at-most-once: the
lost ones never come); before the last process handled its first message, for this plus the session timeout."""


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """What one audit run found. ``held`` is the verdict; the rest is the evidence."""

    broker: str
    """The URL's scheme: kafka, amqp, amqps, memory."""
    url: str
    """The URL with its password replaced."""
    guarantee: str
    settings: dict[str, Any]
    """The settings given to ``connect`` (the audit's own Kafka session timeout included)."""
    concurrency: int
    sent: int
    confirmed: int
    publish_failed: int
    received_unique: int
    lost: int
    duplicates_delivered: int
    duplicates_processed: int
    dead_lettered: int
    kills: int
    repeat_bound: int | None
    """The most handler repeats the guarantee allows in this run (None: any number)."""
    promise: str
    held: bool
    seconds: float
    cuts: int = 0
    """Times the consumer processes' connections were cut (``cut_every``)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def promise_of(guarantee: Guarantee, kills: int, concurrency: int) -> tuple[str, int | None, bool]:
    """(the promise in words, the repeat bound, whether losses break it)."""
    if guarantee is Guarantee.AT_MOST_ONCE:
        return "no message handled twice (a crash may lose some)", 0, False
    if guarantee is Guarantee.AT_LEAST_ONCE:
        return "no confirmed message lost (a crash may repeat some)", None, True
    bound = kills * concurrency
    return f"nothing lost; at most {concurrency} handler run(s) repeated per kill", bound, True


def verify(
    url: str,
    *,
    guarantee: Guarantee | str = Guarantee.EFFECTIVELY_ONCE,
    messages: int = 2000,
    kill_every: int | None = 500,
    concurrency: int = 1,
    settings: Mapping[str, Any] | None = None,
    destination: str | None = None,
    workdir: str | Path | None = None,
    seed: int | None = None,
    timeout: float = 300.0,
    progress: Callable[[int, int, int], None] | None = None,
    cut_every: float | None = None,
) -> VerifyReport:
    """Run the audit against the broker at ``url`` and return what it found (see the module docstring).

    ``destination``: the topic/queue to use (default: a new ``rm-verify-<random>``, deleted afterwards).
    ``kill_every``: None or 0 runs one consumer process to the end, no kills. ``progress(handled, total, kills)``
    is called about 10 times a second. ``cut_every``: the consumer processes connect through a TCP proxy this run
    starts, which resets all their connections every 0.5 to 1.5 times that many seconds (RabbitMQ: any broker;
    Kafka: the local broker of ``reliable-messaging brokers up``, whose proxied listener advertises the proxy).
    Raises :class:`ConfigurationError` for invalid arguments and
    :class:`ReliableMessagingError` when the run cannot be carried out (unreachable broker, a consumer process
    that dies on its own, ``timeout`` seconds passed).
    """
    try:
        preset = Guarantee(guarantee)
    except ValueError:
        raise ConfigurationError(f"guarantee must be one of {', '.join(g.value for g in Guarantee)}, "
                                 f"got {guarantee!r}", field="guarantee") from None
    if not isinstance(messages, int) or isinstance(messages, bool) or messages < 1:
        raise ConfigurationError(f"messages must be an int >= 1, got {messages!r}", field="messages")
    if kill_every is not None and (not isinstance(kill_every, int) or kill_every < 0):
        raise ConfigurationError(f"kill_every must be an int >= 0 or None, got {kill_every!r}", field="kill_every")
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise ConfigurationError(f"concurrency must be an int >= 1, got {concurrency!r}", field="concurrency")
    if cut_every is not None and (isinstance(cut_every, bool) or not isinstance(cut_every, int | float)
                                  or cut_every <= 0):
        raise ConfigurationError(f"cut_every must be a number of seconds > 0 or None, got {cut_every!r}",
                                 field="cut_every")
    if cut_every:
        _proxiable(url)
    scheme = url.split("://", 1)[0].lower() if isinstance(url, str) and "://" in url else ""
    if scheme == "memory":
        raise ConfigurationError("verify needs a broker outside the process (kafka://, amqp://): an in-process "
                                 "broker dies with the consumer it would audit", field="url")
    options = dict(KAFKA_AUDIT_SETTINGS if scheme == "kafka" else {})
    options.update(settings or {})
    # Invalid settings fail here, before anything is published (connect() validates without connecting).
    connect(url, guarantee=preset, dedup=_no_store(preset), **options).close()

    rng = random.Random(seed if seed is not None else random.SystemRandom().randrange(1 << 30))
    run_id = uuid.uuid4().hex[:8]
    source = destination or f"rm-verify-{run_id}"
    began = time.monotonic()
    deadline = began + timeout
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="rm-verify-"))
        work = Path(workdir)
        work.mkdir(parents=True, exist_ok=True)
        log_path, stderr_path = work / f"{source}.handled", work / f"{source}.stderr"
        log_path.unlink(missing_ok=True)
        ids = [f"{run_id}-{i:07d}" for i in range(messages)]
        if destination is None:  # on every way out, an interrupted run's too
            stack.callback(_delete, url, options, source)
        consumer_url, cutter = url, None
        if cut_every:  # before publishing: a Kafka URL that cannot be proxied is refused with nothing sent
            proxy, consumer_url = _proxy_for(url)
            stack.enter_context(proxy)
            cutter = _Cutter(proxy, cut_every, rng)
            stack.callback(cutter.stop)  # before the proxy closes (callbacks run last in, first out)
        confirmed_ids, failed = _publish(url, preset, options, source, ids, deadline)
        args = _ConsumerArgs(url=consumer_url, guarantee=preset, settings=options, source=source, group=f"{source}-g",
                             log=log_path, dedup=work / f"{source}.dedup.sqlite3", concurrency=concurrency,
                             stderr=stderr_path)
        log = _Log(log_path)
        kills = 0
        stats: list[Path] = []
        # Before its first message a process may wait for the group (Kafka: the killed member's session).
        first_wait = _QUIET + float(options.get("session_timeout", 0.0)) + 5.0

        def report_progress() -> None:
            if progress is not None:
                progress(log.count, len(confirmed_ids), kills)

        # Kill after each process handled a random 0.5-1.5 x kill_every, while 10 % are left; a process that goes
        # quiet first (at-most-once: what is left was lost) is killed all the same, and the drain comes next.
        while kill_every and log.refresh() < len(confirmed_ids) * 9 // 10:
            proc, stat = args.start(len(stats))
            stats.append(stat)
            try:
                base = log.refresh()
                target = base + max(1, round(kill_every * rng.uniform(0.5, 1.5)))
                last, last_change = base, time.monotonic()
                while log.refresh() < target:
                    _check_alive(proc, args, "before the kill")
                    now = time.monotonic()
                    if now > deadline:
                        raise ReliableMessagingError(f"verify: timed out after {timeout:g} s")
                    if log.count != last:
                        last, last_change = log.count, now
                    elif now - last_change > (_QUIET if log.count > base else first_wait):
                        break
                    report_progress()
                    time.sleep(0.005)
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
            kills += 1
            report_progress()
            if log.count < target:
                break
        proc, stat = args.start(len(stats))
        stats.append(stat)
        try:
            wanted = set(confirmed_ids)
            last_count, last_change, restarted = log.refresh(), time.monotonic(), log.count
            while not wanted.issubset(log.seen):
                count = log.refresh()
                now = time.monotonic()
                if count != last_count:
                    last_count, last_change = count, now
                elif now - last_change > (_QUIET if count > restarted else first_wait):
                    break  # nothing more comes (at-most-once: the lost ones)
                if now > deadline:
                    break  # reported as lost below: the run's own deadline, not an exception
                _check_alive(proc, args, "while draining")
                report_progress()
                time.sleep(0.01)
            time.sleep(0.5)  # a repeat still in flight would show up here
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.refresh()
        report_progress()
        cuts = cutter.stop() if cutter is not None else 0
        counts = Counter(log.ids)
        consumer_stats = [_read_stats(path) for path in stats]

    lost = len(set(confirmed_ids) - counts.keys())
    processed_twice = sum(counts.values()) - len(counts)
    absorbed = sum(s.get("deduplicated", 0) for s in consumer_stats)
    promise, bound, losses_break = promise_of(preset, kills, concurrency)
    held = (bound is None or processed_twice <= bound) and not (losses_break and lost)
    return VerifyReport(
        broker=scheme, url=redact(url), guarantee=preset.value, settings=dict(options), concurrency=concurrency,
        sent=messages, confirmed=len(confirmed_ids), publish_failed=failed, received_unique=len(counts),
        lost=lost, duplicates_delivered=processed_twice + absorbed, duplicates_processed=processed_twice,
        dead_lettered=sum(s.get("dead_lettered", 0) for s in consumer_stats), kills=kills, repeat_bound=bound,
        promise=promise, held=held, seconds=round(time.monotonic() - began, 2), cuts=cuts)


def _proxiable(url: str) -> None:
    """ConfigurationError unless the consumers of ``url`` can be run through a proxy.

    Kafka clients connect to the addresses the broker advertises, not to the bootstrap address: only a listener
    that advertises the proxy keeps them on it. The local broker has one (PROXIED)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "kafka" and parts.netloc not in {f"127.0.0.1:{KAFKA_PORT}", f"localhost:{KAFKA_PORT}"}:
        raise ConfigurationError("cutting Kafka connections needs the local broker (reliable-messaging brokers up; "
                                 f"kafka://127.0.0.1:{KAFKA_PORT}), whose proxied listener advertises the proxy",
                                 field="cut_every")


def _proxy_for(url: str) -> tuple[TcpProxy, str]:
    """A started proxy in front of the broker of ``url``, and the URL that goes through it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "kafka":
        proxy = TcpProxy("127.0.0.1", KAFKA_PROXIED_PORT, listen_port=KAFKA_PROXY_PORT)
        try:
            proxy.start()
        except OSError as exc:
            raise ReliableMessagingError(f"verify: cannot listen on the Kafka proxy port {KAFKA_PROXY_PORT}: {exc} "
                                         "(another run or test using it?)") from exc
        return proxy, f"kafka://127.0.0.1:{KAFKA_PROXY_PORT}"
    proxy = TcpProxy(parts.hostname or "localhost", parts.port or 5672).start()
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{proxy.host}:{proxy.port}" if userinfo else f"{proxy.host}:{proxy.port}"
    return proxy, urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class _Cutter:
    """Resets every connection through ``proxy`` every 0.5-1.5 x ``every`` seconds, on a thread of its own."""

    def __init__(self, proxy: TcpProxy, every: float, rng: random.Random) -> None:
        self._proxy = proxy
        self._stop = threading.Event()
        self.cuts = 0
        delays = [every * rng.uniform(0.5, 1.5) for _ in range(10_000)]
        self._thread = threading.Thread(target=self._run, args=(delays,), name="rm-verify-cutter", daemon=True)
        self._thread.start()

    def _run(self, delays: list[float]) -> None:
        for delay in delays:
            if self._stop.wait(delay):
                return
            if self._proxy.cut():
                self.cuts += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.cuts


def _publish(url: str, preset: Guarantee, options: dict[str, Any], source: str, ids: list[str],
             deadline: float) -> tuple[list[str], int]:
    """Declare the source, publish every id; (the ids whose publish succeeded, how many failed)."""
    confirmed: list[str] = []
    failed = 0
    with connect(url, guarantee=preset, dedup=_no_store(preset), name=f"{source}-publisher", **options) as broker:
        broker.declare(source, source=source)
        futures = [(mid, broker.publish(source, f"verify {mid}".encode(), key=f"k{i % 16}", message_id=mid))
                   for i, mid in enumerate(ids)]
        for mid, future in futures:
            try:
                future.result(timeout=max(1.0, deadline - time.monotonic()))
            except ReliableMessagingError as exc:
                failed += 1
                logger.debug("publish of %s failed: %s", mid, exc)
            except TimeoutError:
                failed += 1
            else:
                confirmed.append(mid)
    if not confirmed:
        raise ReliableMessagingError(f"verify: none of {len(ids)} messages was confirmed by {redact(url)}")
    return confirmed, failed


def _no_store(preset: Guarantee) -> MemoryDedupStore | None:
    """The dedup store of the audit's own (publishing) broker, which consumes nothing: the preset's settings without
    opening its SQLite file."""
    return MemoryDedupStore() if preset is Guarantee.EFFECTIVELY_ONCE else None


def _delete(url: str, options: dict[str, Any], source: str) -> None:
    try:
        with connect(url, dedup=None, **options) as broker:
            broker.delete(source, source=source, timeout=15.0)
    except ReliableMessagingError as exc:  # cleanup only: the report stands
        logger.warning("verify: could not delete %s: %s", source, exc)


@dataclasses.dataclass
class _ConsumerArgs:
    url: str
    guarantee: Guarantee
    settings: dict[str, Any]
    source: str
    group: str
    log: Path
    dedup: Path
    concurrency: int
    stderr: Path

    def start(self, n: int) -> tuple[subprocess.Popen[bytes], Path]:
        stats = self.log.with_name(f"{self.log.name}.stats.{n}")
        spec = {"url": self.url, "guarantee": self.guarantee.value, "settings": self.settings,
                "source": self.source, "group": self.group, "log": str(self.log), "dedup": str(self.dedup),
                "concurrency": self.concurrency, "stats": str(stats)}
        with self.stderr.open("ab") as err:
            # The spec on stdin, not argv: the URL may hold a password, and argv is visible to every user.
            proc = subprocess.Popen([sys.executable, "-m", "reliable_messaging._verify_consumer"],
                                    stdin=subprocess.PIPE, stdout=err, stderr=err)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec).encode())
        proc.stdin.close()
        return proc, stats

    def tail(self) -> str:
        text = self.stderr.read_text(errors="replace")[-2000:] if self.stderr.exists() else ""
        return f"; its output ends with:\n{redact(text)}" if text.strip() else ""


def _check_alive(proc: subprocess.Popen[bytes], args: _ConsumerArgs, when: str) -> None:
    if proc.poll() is not None:
        raise ReliableMessagingError(f"verify: the consumer process exited with {proc.returncode} {when}"
                                     f"{args.tail()}")


def _read_stats(path: Path) -> dict[str, int]:
    try:
        loaded: dict[str, int] = json.loads(path.read_text())
    except (OSError, ValueError):  # killed before its first snapshot, or mid-write of one (written atomically)
        return {}
    return loaded


class _Log:
    """The handlers' log, read incrementally: one message id per line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids: list[str] = []
        self.seen: set[str] = set()
        self._offset = 0
        self._partial = b""

    @property
    def count(self) -> int:
        return len(self.ids)

    def refresh(self) -> int:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return len(self.ids)
        self._offset += len(chunk)
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        for line in complete:
            mid = line.decode()
            self.ids.append(mid)
            self.seen.add(mid)
        return len(self.ids)
