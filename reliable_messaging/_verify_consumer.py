"""The consumer process of :func:`reliable_messaging.verify` (``python -m reliable_messaging._verify_consumer``).

Reads its spec (JSON) from stdin, consumes the source with the guarantee and settings given, and for every message
appends its id to the log and fsyncs it before returning: the handler's side effect, which survives the process.
Every 0.2 s it writes the consumer's stats to a file (atomically). Runs until SIGKILLed (the audit's fault) or
stopped with SIGTERM (the end of the run: then it stops gracefully).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading

from ._facade import connect
from ._message import Message


def main() -> int:
    spec = json.loads(sys.stdin.read())
    out = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def handler(message: Message) -> None:
        os.write(out, f"{message.message_id}\n".encode())
        os.fsync(out)

    stats_path = spec["stats"]

    def write_stats() -> None:
        snapshot = dataclasses.asdict(consumer.stats)
        snapshot.pop("extra", None)
        with open(f"{stats_path}.tmp", "w") as f:
            json.dump(snapshot, f)
        os.replace(f"{stats_path}.tmp", stats_path)

    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    with connect(spec["url"], guarantee=spec["guarantee"], dedup_path=spec["dedup"], name=f"{spec['source']}-consumer",
                 **spec["settings"]) as broker:
        consumer = broker.consumer(spec["source"], handler, group=spec["group"], concurrency=spec["concurrency"])
        consumer.start()
        while not stopped.wait(0.2):
            write_stats()
            if not consumer.running:
                sys.stderr.write(f"the consumer stopped: {consumer.error!r}\n")
                return 1
        consumer.stop()
        write_stats()
    return 0


if __name__ == "__main__":
    sys.exit(main())
