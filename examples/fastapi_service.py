"""An HTTP service on FastAPI that publishes orders and consumes them, on Kafka or RabbitMQ.

- ``POST /orders`` awaits the broker's confirm: ``await broker.publish(...)`` suspends the request,
  not the event loop, until the broker took responsibility for the order (Kafka: acks=all; RabbitMQ:
  a publisher confirm). Only then does the client get 202 with the message id; a broker that did not
  confirm gives 503 with the error's type (the client retries), never a stack trace.
- The consumer runs 16 ``async def`` handlers at once as tasks on the service's own event loop
  (``concurrency=16``, ``loop=``): orders of one customer (the message key) are handled one at a
  time in the order they were published, different customers side by side.
- ``guarantee="effectively-once"``: the order id is the message id, and a SQLite dedup store
  (``DEDUP_PATH``) remembers the ids handled, so a client that retries a POST, or a redelivery
  after a crash, does not run the handler twice.
- Graceful shutdown on SIGTERM (Kubernetes, systemd) and Ctrl-C: uvicorn stops accepting
  requests and runs the lifespan's exit, which stops the consumer (the handlers in progress
  finish and are acknowledged/committed; orders fetched but not started are left to the broker
  to deliver again), then leaving ``async with connect(...)`` flushes the publisher and closes.

``GET /health`` says whether the consumer runs (503 if not) with the consumer's and the broker's
counters; ``GET /livez`` and ``GET /readyz`` are the probes (``consumer.health()``: 503 when stuck or
stopped, resp. also when the broker is out of reach; no network call); ``GET /metrics`` serves the
counters to Prometheus; ``GET /processed`` what the handler did (kept in memory for the demo: a real service
writes to its database).

    python examples/fastapi_service.py [--host 127.0.0.1] [--port 8000]
    uvicorn examples.fastapi_service:app --port 8000

    curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"id": "o-1", "customer": "ACME", "amount": "12.50"}'

Configuration from the environment: BROKER_URL (amqp://guest:guest@127.0.0.1:5672/%2F; or
kafka://127.0.0.1:9092), SOURCE (the topic/queue, ``orders``), DEDUP_PATH (the SQLite file,
reliable_messaging_dedup.sqlite3 in the working directory).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import random
import signal
from collections.abc import AsyncIterator
from decimal import Decimal
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, make_asgi_app
from pydantic import BaseModel, Field

import reliable_messaging as rm
from reliable_messaging.prometheus import BrokerCollector

BROKER_URL = os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
SOURCE = os.environ.get("SOURCE", "orders")
DEDUP_PATH = os.environ.get("DEDUP_PATH") or rm.DEFAULT_DEDUP_PATH
HANDLERS = 16

logger = logging.getLogger("fastapi_service")


class Order(BaseModel):
    """The request body, the message body (JSON) and the handler's argument, validated at each end."""

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    customer: str = Field(min_length=1, max_length=64)
    amount: Decimal = Field(gt=0, max_digits=12, decimal_places=2)


class Ledger:
    """What the handler did. Only touched on the event loop (the handlers run there), so no lock."""

    def __init__(self) -> None:
        self.count = 0
        self.times: collections.Counter[str] = collections.Counter()  # order id -> times handled
        self.by_customer: dict[str, list[str]] = collections.defaultdict(list)  # order ids, in handling order

    def record(self, order: Order) -> None:
        self.count += 1
        self.times[order.id] += 1
        self.by_customer[order.customer].append(order.id)

    def report(self) -> dict[str, Any]:
        return {"processed": self.count, "distinct": len(self.times),
                "repeated": sorted(order_id for order_id, n in self.times.items() if n > 1),
                "by_customer": self.by_customer}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Connect, declare the topology, start consuming; on shutdown stop the consumer, then close."""
    ledger = Ledger()

    async def handle(order: Order) -> None:
        # The annotation makes the consumer decode and validate the body into an Order; one that does not
        # validate is dead-lettered at once, with the field errors in x-rm-error-message.
        # Stands for an awaited database write or HTTP call: 10 ms on average, some slower than others, which is
        # why order per customer needs the consumer's lanes (ordering="key", the default with concurrency > 1).
        await asyncio.sleep(random.uniform(0.0, 0.02))
        ledger.record(order)

    name = f"{SOURCE}-service"
    async with rm.connect(BROKER_URL, guarantee="effectively-once", dedup_path=DEDUP_PATH, name=name) as broker:
        # The topic (Kafka: with its retry and dead-letter topics) or the exchange and queue (RabbitMQ: bound
        # by "#", with its dead-letter queue), created before anything is published or consumed, so no order
        # published before the consumer subscribed is missed. Idempotent; blocking, so off the loop.
        await asyncio.to_thread(broker.declare, SOURCE, source=SOURCE)
        consumer = broker.consumer(SOURCE, handle, group=name, concurrency=HANDLERS,
                                   loop=asyncio.get_running_loop())
        await consumer.start()  # connects on an executor thread; raises what keeps it from consuming
        app.state.broker, app.state.consumer, app.state.ledger = broker, consumer, ledger
        COLLECTOR.add(broker)
        print(f"consuming {SOURCE} with {HANDLERS} handlers ({broker!r})", flush=True)
        drained = False
        try:
            yield
        finally:
            # Handlers in progress finish on this loop (which keeps running: stop() waits off the loop) and
            # are acknowledged/committed; False if some still ran after the drain timeout.
            drained = await consumer.stop()
    # Leaving `async with` flushed the publisher and closed the dedup store.
    if drained:
        print(f"stopped gracefully: processed {ledger.count} orders", flush=True)
    else:
        print(f"stopped with handlers still running: processed {ledger.count} orders", flush=True)


app = FastAPI(title="orders", lifespan=lifespan)
METRICS = CollectorRegistry()  # the broker's counters only; a service would add its own metrics here
COLLECTOR = BrokerCollector()
METRICS.register(COLLECTOR)
app.mount("/metrics", make_asgi_app(METRICS))


@app.post("/orders", status_code=202, response_model=None)
async def place_order(order: Order, request: Request) -> dict[str, str] | JSONResponse:
    """Publish the order; answer once the broker confirmed it (202), or 503 if it did not."""
    broker: rm.Broker = request.app.state.broker
    try:
        # The order id as the message id: a client retrying this POST publishes the same id again, and the
        # effectively-once consumer handles it once.
        delivery = await broker.publish(SOURCE, order, key=order.customer, message_id=order.id)
    except rm.ReliableMessagingError as exc:  # unreachable broker, nack, timeout, closed during shutdown...
        logger.warning("order %s not confirmed by the broker: %s: %s", order.id, type(exc).__name__, exc)
        return JSONResponse({"error": type(exc).__name__, "detail": "the broker did not confirm the order; retry"},
                            status_code=503, headers={"Retry-After": "1"})
    return {"message_id": delivery.message_id, "destination": delivery.destination}


@app.get("/health", response_model=None)
async def health(request: Request) -> JSONResponse:
    """Liveness/readiness: 200 while the consumer runs, 503 once it stopped (``error`` says why)."""
    consumer: rm.Consumer = request.app.state.consumer
    broker: rm.Broker = request.app.state.broker
    running = consumer.running
    body = {
        "consuming": running,
        "error": None if consumer.error is None else f"{type(consumer.error).__name__}: {consumer.error}",
        "consumer": dataclasses.asdict(consumer.stats),
        "broker": dataclasses.asdict(broker.stats()),
    }
    return JSONResponse(body, status_code=200 if running else 503)


@app.get("/livez", response_model=None)
async def livez(request: Request) -> JSONResponse:
    """Liveness: 503 if the consumer stopped, its loop stalls, or a handler ran longer than 60 s (restart me)."""
    health = request.app.state.consumer.health(handler_within=60.0)
    return JSONResponse(dataclasses.asdict(health), status_code=200 if health.live else 503)


@app.get("/readyz", response_model=None)
async def readyz(request: Request) -> JSONResponse:
    """Readiness: live and connected to the broker (503 while it is out of reach: send traffic elsewhere)."""
    health = request.app.state.consumer.health(handler_within=60.0)
    return JSONResponse(dataclasses.asdict(health), status_code=200 if health.ready else 503)


@app.get("/processed")
async def processed(request: Request) -> dict[str, Any]:
    """How many orders the handler processed, which ones more than once, and each customer's in order."""
    ledger: Ledger = request.app.state.ledger
    return ledger.report()


def _exit_after_graceful_shutdown(signum: int, frame: FrameType | None) -> None:
    # uvicorn handles SIGTERM itself (stop serving, run the lifespan's exit), then restores this handler and
    # raises the signal again, so that a process whose previous handler was the default one dies "of" it
    # (exit status -15/143). This service has already stopped gracefully by then: exit 0, which is what
    # Kubernetes and systemd read as a clean stop. (Ctrl-C: uvicorn.run() catches the KeyboardInterrupt.)
    raise SystemExit(0)


def main() -> int:
    parser = argparse.ArgumentParser(description="FastAPI service on reliable_messaging")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _exit_after_graceful_shutdown)
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
