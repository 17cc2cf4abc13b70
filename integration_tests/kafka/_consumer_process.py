"""A KafkaConsumer in its own process, for crash tests: the test SIGKILLs it mid-stream.

Every processed record is appended to ``--out`` as ``<message id>\\t<time>\\t<pid>`` and
fsynced *inside the handler*, before the consumer commits: the file is the durable
record of what was processed, the committed offsets are what the broker remembers,
and the difference after a crash is exactly the redelivery the commit mode allows.

Prints ``ASSIGNED`` once the consumer owns partitions. SIGTERM stops it cleanly.

    python -m integration_tests.kafka._consumer_process --bootstrap B --topic T --group G \\
        --mode manual_batch --out FILE [--commit-every N] [--commit-interval S] [--delay S]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

from reliable_messaging import KafkaConsumer, KafkaConsumerConfig, KafkaMessage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--commit-every", type=int, default=1000)
    parser.add_argument("--commit-interval", type=float, default=5.0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds of work per record")
    parser.add_argument("--instance", default=None, help="group.instance.id (static membership)")
    parser.add_argument("--fetch-batch", type=int, default=500)
    parser.add_argument("--log", default=None)
    args = parser.parse_args(argv)

    logging.basicConfig(filename=args.log, level=logging.INFO,
                        format="%(asctime)s %(process)d %(threadName)s %(name)s %(levelname)s %(message)s")
    out = os.open(args.out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = os.getpid()

    def handler(message: KafkaMessage) -> None:
        if args.delay:
            time.sleep(args.delay)
        os.write(out, f"{message.message_id}\t{time.time():.6f}\t{pid}\n".encode())
        os.fsync(out)

    extra: dict[str, str | int | float | bool] = {}
    if args.instance:
        # Static membership: the restarted process takes its partitions back at once instead of
        # waiting for the killed one's session to time out.
        extra["group.instance.id"] = args.instance
    config = KafkaConsumerConfig(bootstrap_servers=args.bootstrap, group_id=args.group, commit_mode=args.mode,
                                 commit_every=args.commit_every, commit_interval=args.commit_interval,
                                 session_timeout=6.0, fetch_batch=args.fetch_batch, extra=extra)
    consumer = KafkaConsumer(config, args.topic, handler, retry_topics=False, create_topics=False)

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        consumer.stop()

    signal.signal(signal.SIGTERM, on_term)

    def announce() -> None:
        deadline = time.monotonic() + 60
        while not consumer.assignment() and time.monotonic() < deadline:
            time.sleep(0.05)
        print("ASSIGNED" if consumer.assignment() else "NOT ASSIGNED", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    consumer.run()
    os.close(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
