"""``reliable-messaging verify`` run as a user runs it: a subprocess against the real brokers, its consumer process
SIGKILLed at random moments. It must report a held promise when the preset keeps it, and a broken one — with a
non-zero exit — when a setting undoes it: an audit that cannot fail shows nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from reliable_messaging.testing import KafkaEndpoint, RabbitMQEndpoint

pytestmark = [pytest.mark.fault, pytest.mark.slow]

BROKERS = [pytest.param("kafka", marks=pytest.mark.kafka), pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]


def run(*args: str, timeout: float = 240) -> tuple[int, list[dict[str, Any]], str]:
    """The command's exit code, its JSON reports (one per line) and its stderr."""
    done = subprocess.run([sys.executable, "-m", "reliable_messaging", "verify", "--json", *args],
                          capture_output=True, text=True, timeout=timeout)
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, reports, done.stderr


@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.timeout(300)
def test_effectively_once_holds_with_kills_and_at_most_once_repeats_nothing(broker: str, url: str) -> None:
    code, reports, err = run(url, "-g", "effectively-once", "-g", "at-most-once", "-n", "1500", "-k", "400")
    assert len(reports) == 2, err
    once, at_most = reports
    assert once["guarantee"] == "effectively-once" and once["kills"] >= 2, once
    assert once["confirmed"] == 1500 and once["lost"] == 0, once
    assert once["duplicates_processed"] <= once["kills"], once  # the one handler running per kill
    assert once["held"] is True, once
    # at-most-once: a kill loses what was taken and not handled (reported, as its promise allows), never repeats
    assert at_most["guarantee"] == "at-most-once" and at_most["kills"] >= 2, at_most
    assert at_most["duplicates_processed"] == 0, at_most
    assert at_most["lost"] > 0, f"no loss with {at_most['kills']} kills mid-stream: was anything killed? {at_most}"
    assert at_most["held"] is True, at_most
    assert code == 0, err
    print(f"{broker}: effectively-once {once}\n{broker}: at-most-once {at_most}")


@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.timeout(300)
def test_effectively_once_holds_with_kills_and_connections_cut(broker: str, url: str) -> None:
    """--cut-connections: the consumer goes through a TCP proxy that resets its connections about every half second
    (Kafka: through the local broker's proxied listener), on top of the kills; the promise still holds."""
    code, reports, err = run(url, "-g", "effectively-once", "-n", "3000", "-k", "1000", "--cut-connections",
                             "--cut-every", "0.5")
    assert len(reports) == 1, err
    [report] = reports
    assert report["cuts"] >= 2 and report["kills"] >= 1, report
    assert report["lost"] == 0 and report["duplicates_processed"] <= report["kills"], report
    assert report["held"] is True and code == 0, (report, err)
    print(f"{broker}: effectively-once with cuts {report}")


@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.timeout(300)
def test_a_setting_that_undoes_at_least_once_is_caught(broker: str, url: str) -> None:
    """Auto-commit (Kafka) or auto-ack (RabbitMQ) under an at-least-once claim, with kills: work is lost, and the
    audit says so and exits 1.

    Auto-commit loses a record when a background commit, which covers everything fetched, lands while its batch
    is being handled and the kill comes before the batch is done: with the 5 s default interval a kill mostly
    finds the last commit before the batch, and repeats instead (lost 0 measured). Committing every 0.1 s, as a
    user tuning it "to repeat less" would, makes the loss the common case."""
    weaker = ["--set", "commit_mode=auto", "--set", "commit_interval=0.1"] if broker == "kafka" \
        else ["--set", "ack_mode=auto"]
    code, reports, err = run(url, "-g", "at-least-once", "-n", "1500", "-k", "400", *weaker,
                             "--set", "allow_weaker=true")
    assert len(reports) == 1, err
    report = reports[0]
    assert report["lost"] > 0 and report["held"] is False, report
    assert code == 1, (code, err)
    # and the same run with the preset's own settings holds
    code, reports, err = run(url, "-g", "at-least-once", "-n", "1500", "-k", "400")
    assert reports and reports[0]["lost"] == 0 and reports[0]["held"] is True, (reports, err)
    assert code == 0, err


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_bad_input_and_an_unreachable_broker_end_with_their_exit_codes(kafka_endpoint: KafkaEndpoint) -> None:
    url = f"kafka://{kafka_endpoint.bootstrap_servers}"
    code, reports, err = run(url, "--set", "no_such_setting=1")
    assert code == 2 and not reports and "no_such_setting" in err, (code, err)
    code, reports, err = run(url, "-g", "exactly-once")
    assert code == 2 and "exactly-once" in err, (code, err)
    # Nothing listens on port 1: creating the topic times out, and the run ends, typed.
    code, reports, err = run("kafka://127.0.0.1:1", "-n", "5", "--set", "delivery_timeout=2", timeout=90)
    assert code == 3 and "BrokerUnavailable" in err, (code, err)
    secret = "amqp://guest:s3cr3t-pw@127.0.0.1:1/%2F"
    code, reports, err = run(secret, "-n", "5", "--set", "delivery_timeout=2", timeout=60)
    assert code == 3, (code, err)
    assert "s3cr3t-pw" not in err, err


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_sigterm_stops_the_audit_and_cleans_up(rabbitmq_endpoint: RabbitMQEndpoint) -> None:
    """Stopped mid-run, verify kills its consumer process, deletes its queues and exits 130, in bounded time."""
    before = audit_queues(rabbitmq_endpoint.url)
    proc = subprocess.Popen([sys.executable, "-m", "reliable_messaging", "verify", rabbitmq_endpoint.url,
                             "-n", "20000", "-k", "0", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not (children := consumer_pids(proc.pid)):  # publishing done, its consumer process started
            assert proc.poll() is None and time.monotonic() < deadline, "verify did not get to consuming"
            time.sleep(0.1)
        mine = audit_queues(rabbitmq_endpoint.url) - before
        assert mine, "the audit's queues exist while it runs"
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, err)
    assert not [pid for pid in children if alive(pid)], "the audit's consumer process outlived it"
    assert not mine & audit_queues(rabbitmq_endpoint.url), "the audit's queues were left behind"


def consumer_pids(parent: int) -> list[int]:
    """The verify consumer processes that ``parent`` started."""
    found = subprocess.run(["pgrep", "-P", str(parent), "-f", "reliable_messaging._verify_consumer"],
                           capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def audit_queues(url: str) -> set[str]:
    """The rm-verify-* queues on the broker (management API: the local broker enables it)."""
    from reliable_messaging._rabbitmq._check import _Api, management_url_of

    queues = _Api(management_url_of(url), 10.0).get("queues") or []
    return {q["name"] for q in queues if q["name"].startswith("rm-verify-")}
