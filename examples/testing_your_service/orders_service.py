"""A service's consumer, as the tests below see it: a handler that stores orders, wired to a broker."""

from __future__ import annotations

import threading

import reliable_messaging as rm


class Orders:
    """Stands for the service's database."""

    def __init__(self) -> None:
        self.amounts: dict[str, int] = {}
        self.changed = threading.Condition()

    def handle(self, message: rm.Message) -> None:
        order_id, _, amount = message.body.decode().partition(":")
        if not amount.isdigit():
            raise rm.Reject(f"amount must be digits, got {amount!r}")  # dead-lettered, not retried
        with self.changed:
            self.amounts[order_id] = int(amount)
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.amounts) >= count, timeout)


def consume(broker: rm.Broker, source: str, orders: Orders, group: str) -> rm.Consumer:
    """Start the service's consumer of ``source``."""
    consumer = broker.consumer(source, orders.handle, group=group)
    consumer.start()
    return consumer
