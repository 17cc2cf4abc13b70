"""Integration tests of the RabbitMQ adapter against a real broker (no mocks)."""
