"""RabbitMQ adapter on pika: publisher, consumer, topology, error mapping."""

try:
    import pika  # noqa: F401 - fail here, with the install command, not deep inside a call
except ImportError as exc:  # pragma: no cover - exercised by the extras test in a subprocess
    raise ImportError(
        "the RabbitMQ backend of reliable_messaging needs pika: pip install 'reliable-messaging[rabbitmq]'"
    ) from exc
