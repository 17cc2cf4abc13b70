"""A RabbitMQConsumer in its own process, for tests that SIGKILL it.

    python -m integration_tests.rabbitmq.consumer_process --url URL --queue Q --log FILE
        [--ack-mode manual|auto] [--prefetch N] [--sleep SECONDS]

For every message it appends ``<message_id> <redelivered> <attempt>`` to the log file (flushed
and fsynced before the handler goes on, so the test sees exactly what was handed to the
handler), then sleeps ``--sleep`` seconds, the time a test has to kill it mid-processing.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from reliable_messaging import (  # after the path tweak, so the checkout is importable
    RabbitMQAckMode,
    RabbitMQConsumer,
    RabbitMQConsumerConfig,
    RabbitMQMessage,
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--ack-mode", default="manual", choices=[m.value for m in RabbitMQAckMode])
    parser.add_argument("--prefetch", type=int, default=10)
    parser.add_argument("--sleep", type=float, default=60.0)
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a test that times out asks for the stacks
    # Ctrl-C as in a terminal, even when the test run inherited SIGINT ignored (a shell without job
    # control starts `cmd &` so; Python then installs no KeyboardInterrupt handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log = open(args.log, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def handler(message: RabbitMQMessage) -> None:
        log.write(f"{message.message_id} {int(message.redelivered)} {message.attempt}\n")
        log.flush()
        os.fsync(log.fileno())
        time.sleep(args.sleep)

    config = RabbitMQConsumerConfig(url=args.url, connection_name=f"consumer process {os.getpid()}",
                                    prefetch=args.prefetch, ack_mode=RabbitMQAckMode(args.ack_mode))
    RabbitMQConsumer(config, args.queue, handler).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
