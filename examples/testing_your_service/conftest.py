"""Enables reliable_messaging's broker fixtures for this project's tests (they are opt-in).

kafka_endpoint / rabbitmq_endpoint find the brokers from KAFKA_BOOTSTRAP_SERVERS / RABBITMQ_URL (or local ones,
or testcontainers where Docker runs); topic / queue_name / group_id are per-test names whose topics, queues and
groups are deleted after the test.
"""

pytest_plugins = ["reliable_messaging.testing.plugin"]
