"""The local broker manager fails fast with one clear line: no Java, no Maven, no apt, port taken, not ready."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reliable_messaging.testing import _local
from reliable_messaging.testing._local import BrokerSetupError, LocalNode


@pytest.fixture
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH holding nothing but `sleep` and `true`, i.e. no java, mvn, apt-get or broker."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sleep", "true"):
        (bin_dir / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("RELIABLE_MESSAGING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RELIABLE_MESSAGING_RUN_DIR", str(tmp_path / "run"))
    return bin_dir


def test_missing_java_names_java(empty_path: Path) -> None:
    with pytest.raises(BrokerSetupError, match=r"Java 17\+ is required .* `java` is not on PATH"):
        _local.require_java()


def test_old_java_is_refused(empty_path: Path) -> None:
    fake = empty_path / "java"
    fake.write_text('#!/bin/sh\necho \'openjdk version "11.0.2" 2019-01-15\' >&2\n')
    fake.chmod(0o755)
    with pytest.raises(BrokerSetupError, match=r"Java 17\+ is required.*11\.0\.2"):
        _local.require_java()


def test_missing_maven_names_maven_and_cache(empty_path: Path) -> None:
    with pytest.raises(BrokerSetupError, match=r"Maven \(`mvn`\) is needed once .* cached in .*cache"):
        _local.kafka_libs()


def test_missing_package_without_apt(empty_path: Path) -> None:
    with pytest.raises(BrokerSetupError, match=r"`no-such-broker` is not installed and apt-get is not available"):
        _local.ensure_debian_package("no-such-broker", "no-such-broker")


def _node(tmp_path: Path, port: int, spawn_cmd: list[str] | None = None) -> LocalNode:
    node = LocalNode(name="fake", kind="fake", directory=tmp_path / "fake", ports={"client": port})
    if spawn_cmd is not None:
        node._spawn = lambda n: n._popen(spawn_cmd)
    node._ready = lambda n: False
    return node


def test_port_taken_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        node = _node(tmp_path, port, ["sleep", "60"])
        began = time.monotonic()
        with pytest.raises(BrokerSetupError, match=rf"port {port} \(client\) is already in use"):
            node.start(timeout=30)
        assert time.monotonic() - began < 2
        assert not node.pid_file.exists(), "nothing may be started when a port is taken"


def test_not_ready_in_time_is_stopped_and_reported(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = _node(tmp_path, port, ["sleep", "60"])
    began = time.monotonic()
    with pytest.raises(BrokerSetupError, match=r"fake did not become ready within 1s \(stopped it\)"):
        node.start(timeout=1)
    assert time.monotonic() - began < 10
    assert not node.is_running()


def test_process_dying_at_start_is_reported_at_once(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = _node(tmp_path, port, [sys.executable, "-c", "print('boom: bad config'); raise SystemExit(3)"])
    began = time.monotonic()
    with pytest.raises(BrokerSetupError, match=r"fake exited during start-up; last log lines: boom: bad config"):
        node.start(timeout=60)
    assert time.monotonic() - began < 20


def test_stale_pid_file_never_targets_an_unrelated_process(tmp_path: Path) -> None:
    unrelated = subprocess.Popen(["sleep", "30"])
    try:
        node = _node(tmp_path, 1)
        node.directory.mkdir(parents=True)
        node.pid_file.write_text(str(unrelated.pid))
        assert node.pid() is None
        node.kill()  # must not signal it
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()


def test_cli_reports_one_line_and_exit_code_1(empty_path: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # Keep the interpreter reachable while java/mvn are not.
    out = subprocess.run(
        [sys.executable, "-m", "reliable_messaging.testing.brokers", "up", "kafka", "--timeout", "5"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and ("Maven" in lines[0] or "Java" in lines[0])


def test_cli_rejects_unknown_broker() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "reliable_messaging.testing.brokers", "up", "zookeeper"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 1
    assert "unknown broker 'zookeeper'" in out.stderr
