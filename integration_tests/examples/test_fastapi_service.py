"""``examples/fastapi_service.py`` run as a user runs it: a real uvicorn process, real HTTP, real brokers.

The service is started as a subprocess on a free port with BROKER_URL / SOURCE / DEDUP_PATH in its
environment; the test talks to it with an ``httpx.Client`` only, then sends SIGTERM and checks that it
stopped gracefully (exit 0, every order handled once, in order per customer).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reliable_messaging.testing import KafkaEndpoint, RabbitMQEndpoint

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "fastapi_service.py"
ORDERS = 40
ACCESS_LOG = re.compile(r'INFO: +[0-9.]+:[0-9]+ - "')
CUSTOMERS = 5
PER_CUSTOMER = ORDERS // CUSTOMERS  # posted one customer after another: one customer's orders overlap in the
# consumer (a POST takes a few ms, the handler up to 20), so only its per-key lanes keep them in order


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Service:
    """The example's process; its stdout and stderr go to files, read when an assertion needs them."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.port = free_port()
        self.stdout_path, self.stderr_path = cwd / "service.out", cwd / "service.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "--port", str(self.port)], env=env, cwd=cwd,
                                         stdout=out, stderr=err)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10.0)

    def output(self) -> str:
        """The service's output for a failure message, without uvicorn's access log (one line per request)."""
        out = "".join(line for line in self.stdout_path.read_text(errors="replace").splitlines(keepends=True)
                      if not ACCESS_LOG.match(line))
        return f"--- service stdout\n{out}\n--- service stderr\n{self.stderr_path.read_text(errors='replace')[-6000:]}"

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``predicate`` under a deadline; fail with the service's output if it never holds or the process
        exits meanwhile."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                pytest.fail(f"the service exited with {self.proc.returncode} while waiting for {what}\n"
                            f"{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:g}s waiting for {what}\n{self.output()}")
            time.sleep(0.1)

    def get(self, path: str) -> Any:
        response = self.http.get(path)
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text}\n{self.output()}"
        return response.json()

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def service(broker: str, request: pytest.FixtureRequest, unique_name: str, tmp_path: Path) -> Iterator[Service]:
    """The service on ``broker`` (the test's parameter), consuming and publishing ``unique_name``."""
    if broker == "kafka":
        kafka: KafkaEndpoint = request.getfixturevalue("kafka_endpoint")
        url = f"kafka://{kafka.bootstrap_servers}"
    else:
        rabbitmq: RabbitMQEndpoint = request.getfixturevalue("rabbitmq_endpoint")
        url = rabbitmq.url
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BROKER_URL": url, "SOURCE": unique_name,
           "DEDUP_PATH": str(tmp_path / "dedup.sqlite3")}
    running = Service(env, tmp_path)
    try:
        yield running
    finally:
        running.stop()


def answers(service: Service) -> bool:
    try:
        return service.http.get("/health", timeout=1.0).status_code == 200
    except httpx.TransportError:  # not listening yet
        return False


def order(n: int) -> dict[str, str]:
    return {"id": f"order-{n:03d}", "customer": f"customer-{n // PER_CUSTOMER}", "amount": f"{n + 1}.50"}


@pytest.mark.parametrize("broker", [pytest.param("kafka", marks=pytest.mark.kafka),
                                    pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
@pytest.mark.timeout(120)
def test_fastapi_service(broker: str, service: Service, unique_name: str) -> None:
    service.wait_until(lambda: answers(service), 45, "GET /health to answer 200")
    assert f"consuming {unique_name} with 16 handlers" in service.stdout_path.read_text()

    for n in range(ORDERS):
        response = service.http.post("/orders", json=order(n))
        assert response.status_code == 202, f"order {n}: {response.status_code} {response.text}\n{service.output()}"
        body = response.json()
        assert body == {"message_id": f"order-{n:03d}", "destination": unique_name}, body

    invalid = service.http.post("/orders", json={"id": "order-999", "customer": "customer-0", "amount": "-1"})
    assert invalid.status_code == 422, invalid.text
    assert [error["loc"] for error in invalid.json()["detail"]] == [["body", "amount"]], invalid.text

    service.wait_until(lambda: service.get("/processed")["processed"] >= ORDERS, 45, f"{ORDERS} orders processed")
    time.sleep(1.0)  # a redelivered or repeated order would show up here
    processed = service.get("/processed")
    assert processed["processed"] == processed["distinct"] == ORDERS, processed
    assert processed["repeated"] == [], processed
    for c in range(CUSTOMERS):  # published one after another (each POST awaited its confirm): handled in that order
        mine = [f"order-{n:03d}" for n in range(c * PER_CUSTOMER, (c + 1) * PER_CUSTOMER)]
        assert processed["by_customer"][f"customer-{c}"] == mine, processed["by_customer"]

    # A client retrying a POST sends the same order id: a 202 again, and the dedup store skips the handler.
    again = service.http.post("/orders", json=order(7))
    assert again.status_code == 202, again.text
    service.wait_until(lambda: service.get("/health")["consumer"]["deduplicated"] >= 1, 30,
                       "the retried order to be deduplicated")
    health = service.get("/health")
    assert health["consuming"] is True and health["error"] is None, health
    assert health["consumer"]["processed"] == ORDERS and health["consumer"]["deduplicated"] == 1, health
    publisher = health["broker"]["publisher"]
    assert publisher["confirmed"] == ORDERS + 1 and publisher["failed"] == 0, publisher
    assert service.get("/processed")["processed"] == ORDERS
    for probe in ("/livez", "/readyz"):
        answer = service.http.get(probe, timeout=5)
        assert answer.status_code == 200 and answer.json()["problems"] == [], answer.text
    metrics = service.http.get("/metrics/", timeout=5)
    assert metrics.status_code == 200
    handled = [line for line in metrics.text.splitlines()
               if line.startswith("reliable_messaging_consumer_processed_total{")]
    assert len(handled) == 1 and float(handled[0].rsplit(" ", 1)[1]) == ORDERS, handled

    service.proc.send_signal(signal.SIGTERM)
    try:
        returncode = service.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the service did not exit within 30 s of SIGTERM\n{service.output()}")
    assert returncode == 0, f"exit status {returncode}\n{service.output()}"
    out = service.stdout_path.read_text()
    assert f"stopped gracefully: processed {ORDERS} orders" in out, service.output()
    assert "Traceback" not in service.stderr_path.read_text(), service.output()
