"""Secrets stay secret: a password in the URL and SASL secrets in the settings appear in no log line (DEBUG
included), error message or repr, along the failure paths a service meets — refused credentials, an unreachable
broker, a SASL handshake against a plaintext listener, the command's checks and audits."""

from __future__ import annotations

import logging
import subprocess
import sys
import urllib.parse

import pytest

import reliable_messaging as rm
from reliable_messaging.testing import KafkaEndpoint, RabbitMQEndpoint

SECRET = "s3cr3t-Pa55"
SASL = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN", "sasl.username": "svc",
        "sasl.password": SECRET}


def leaks(caplog: pytest.LogCaptureFixture, *texts: str) -> list[str]:
    """Every log record (message, arguments, traceback) and text that holds the secret."""
    found = []
    for record in caplog.records:
        rendered = logging.Formatter().format(record)  # the message with its args and exc_info
        if SECRET in rendered:
            found.append(rendered[:300])
    return found + [t[:300] for t in texts if SECRET in t]


def with_password(url: str, password: str = SECRET) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"guest:{password}@{parts.hostname}:{parts.port}"))


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_rabbitmq_refused_credentials_and_an_unreachable_port(
        rabbitmq_endpoint: RabbitMQEndpoint, caplog: pytest.LogCaptureFixture, unique_name: str) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    for url in (with_password(rabbitmq_endpoint.url), f"amqp://guest:{SECRET}@127.0.0.1:1/%2F"):
        with rm.connect(url, connect_timeout=3.0) as broker:
            texts.append(repr(broker))
            future = broker.publish(unique_name, b"x")
            with pytest.raises(rm.ReliableMessagingError) as info:
                future.result(timeout=30)
            texts += [str(info.value), repr(info.value)]
            consumer = broker.consumer(unique_name, lambda m: None)
            texts.append(repr(consumer))
            with pytest.raises(rm.ReliableMessagingError) as info:
                consumer.start()
            texts += [str(info.value), repr(info.value), repr(consumer.health())]
        with pytest.raises(rm.ReliableMessagingError) as info:
            rm.check(url, queue=unique_name, timeout=3.0)
        texts.append(str(info.value))
    assert leaks(caplog, *texts) == []


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_kafka_sasl_secrets_against_a_plaintext_listener_and_an_unreachable_broker(
        kafka_endpoint: KafkaEndpoint, caplog: pytest.LogCaptureFixture, unique_name: str) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    for servers in (kafka_endpoint.bootstrap_servers, "127.0.0.1:1"):
        with rm.connect(f"kafka://{servers}", extra=SASL, connect_timeout=3.0, delivery_timeout=5.0) as broker:
            texts.append(repr(broker))
            with pytest.raises(rm.ReliableMessagingError) as info:
                broker.publish(unique_name, b"x").result(timeout=30)
            texts += [str(info.value), repr(info.value)]
            consumer = broker.consumer(unique_name, lambda m: None, group=unique_name)
            consumer.start()
            texts += [repr(consumer), repr(consumer.health())]
    texts += [repr(rm.KafkaProducerConfig(bootstrap_servers="127.0.0.1:1", extra=SASL)),
              repr(rm.KafkaConsumerConfig(bootstrap_servers="127.0.0.1:1", group_id="g", extra=SASL))]
    assert "sasl.password': '***'" in texts[-1], texts[-1]
    assert leaks(caplog, *texts) == []


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_the_command_prints_no_password(rabbitmq_endpoint: RabbitMQEndpoint) -> None:
    url = with_password(rabbitmq_endpoint.url)
    for args in (["verify", url, "-n", "10", "-k", "0"], ["check", url, "--queue", "nowhere"],
                 ["redrive", url, "--from", "nowhere"], ["-vv", "check", url, "--queue", "nowhere"]):
        done = subprocess.run([sys.executable, "-m", "reliable_messaging", *args], capture_output=True, text=True,
                              timeout=90)
        assert done.returncode != 0, (args, done.stdout, done.stderr)
        assert SECRET not in done.stdout + done.stderr, (args, done.stdout[-500:], done.stderr[-2000:])
