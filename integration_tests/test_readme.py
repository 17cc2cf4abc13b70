"""The README's quick start runs as written, against the real brokers.

Each ```python block that calls ``rm.connect(`` with a literal URL is executed in a subprocess with only
two substitutions: the broker address (the fixtures') and the topic/queue name ``orders`` (a unique
one, so runs never share state). Its output must show the handler ran.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from reliable_messaging.testing import KafkaEndpoint, RabbitMQEndpoint

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_blocks() -> dict[str, str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    found = {}
    for block in blocks:
        if 'rm.connect("kafka://' in block:
            found["kafka"] = block
        elif 'rm.connect("amqp://' in block:
            found["rabbitmq"] = block
    return found


def run_block(block: str, url: str, name: str) -> str:
    code = re.sub(r'rm\.connect\("[^"]+"\)', f'rm.connect("{url}")', block)
    code = code.replace('"orders"', f'"{name}"')
    assert code.count(name) >= 2, "the quick start must publish to and consume from the same name"
    lines = [line for line in block.strip().splitlines() if line.strip()]
    assert len(lines) < 20, f"the quick start should stay under 20 lines, it has {len(lines)}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_readme_has_a_quick_start_per_broker() -> None:
    assert set(quick_start_blocks()) == {"kafka", "rabbitmq"}


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_kafka_quick_start_runs_as_written(kafka_endpoint: KafkaEndpoint, unique_name: str) -> None:
    out = run_block(quick_start_blocks()["kafka"], f"kafka://{kafka_endpoint.bootstrap_servers}", unique_name)
    assert "stored in partition 0 at offset 0" in out
    assert "handled b'{\"order\": 1}' key b'customer-7' attempt 1" in out


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_rabbitmq_quick_start_runs_as_written(rabbitmq_endpoint: RabbitMQEndpoint, unique_name: str) -> None:
    out = run_block(quick_start_blocks()["rabbitmq"], rabbitmq_endpoint.url, unique_name)
    assert "handled b'{\"order\": 1}' redelivered False" in out
