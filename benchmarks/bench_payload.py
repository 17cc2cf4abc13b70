"""What a typed handler costs: a 10-field model validated by the library vs ``json.loads`` + manual checks.

    python benchmarks/bench_payload.py [--messages N] [--runs R]

No broker: both variants go through the consumers' shared :class:`HandlerRunner` (decode, then the
handler), the part a payload type changes, so the figure is the codec's and the library's glue, not a
broker's. Variants, interleaved per run:

- ``manual``: ``decoder=json.loads``, the handler checks the 10 fields' types itself and builds a dataclass
  (what a service writes without typed payloads);
- ``pydantic``: ``payload=Order`` (a pydantic model), validated by pydantic's Rust core;
- ``msgspec``: ``payload=OrderStruct`` (a msgspec Struct).

Prints messages/s per variant (median of R runs and the spread) and each typed variant's ratio to
``manual`` (target: >= 0.9x).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pydantic

from reliable_messaging import Message, RetryPolicy
from reliable_messaging._broker import _payload_handler
from reliable_messaging._handling import HandlerRunner
from reliable_messaging._payload import PayloadDecoder


class Order(pydantic.BaseModel):
    id: int
    customer: str
    item: str
    qty: int
    price: float
    currency: str
    paid: bool
    note: str
    region: str
    priority: int


class OrderStruct(msgspec.Struct):
    id: int
    customer: str
    item: str
    qty: int
    price: float
    currency: str
    paid: bool
    note: str
    region: str
    priority: int


@dataclasses.dataclass
class OrderData:
    id: int
    customer: str
    item: str
    qty: int
    price: float
    currency: str
    paid: bool
    note: str
    region: str
    priority: int


_TYPES = {f.name: f.type for f in dataclasses.fields(OrderData)}
_CHECK: dict[str, type | tuple[type, ...]] = {"int": int, "str": str, "float": (int, float), "bool": bool}


def manual_handler(sink: list[Any]) -> Callable[[Message], None]:
    def handle(message: Message) -> None:
        data = message.value
        if not isinstance(data, dict):
            raise ValueError("not an object")
        for name, kind in _TYPES.items():
            if not isinstance(data.get(name), _CHECK[str(kind)]):
                raise ValueError(f"{name}: wrong type")
        sink.append(OrderData(**data))

    return handle


def bodies(n: int) -> list[bytes]:
    return [json.dumps({"id": i, "customer": f"c-{i % 97}", "item": "book", "qty": 1 + i % 5, "price": 12.5,
                        "currency": "EUR", "paid": bool(i % 2), "note": "leave at the door", "region": "eu",
                        "priority": i % 3}).encode() for i in range(n)]


def run(variant: str, payloads: list[bytes]) -> float:
    sink: list[Any] = []
    if variant == "manual":
        runner: HandlerRunner[Message] = HandlerRunner(manual_handler(sink), retry=RetryPolicy(), decoder=json.loads)
    else:
        cls: type = Order if variant == "pydantic" else OrderStruct
        runner = HandlerRunner(_payload_handler(sink.append), retry=RetryPolicy(), decoder=PayloadDecoder(cls))
    began = time.perf_counter()
    for body in payloads:
        value, bad = runner.decode(body)
        assert bad is None
        runner.invoke(Message(body=body, value=value, message_id="m", key=None, source="orders"))
    elapsed = time.perf_counter() - began
    assert len(sink) == len(payloads)
    return len(payloads) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    payloads = bodies(args.messages)
    variants = ("manual", "pydantic", "msgspec")
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.runs):
        for variant in variants:
            rates[variant].append(run(variant, payloads))
    base = statistics.median(rates["manual"])
    for variant in variants:
        values = rates[variant]
        median = statistics.median(values)
        spread = f"{min(values):,.0f}..{max(values):,.0f}"
        ratio = "" if variant == "manual" else f"  ratio {median / base:.2f}x (target >= 0.9x)"
        print(f"{variant:9s} {median:>10,.0f} msg/s  (runs {spread}){ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
