"""This repository's own tests use the broker fixtures the way a user's project enables them."""

pytest_plugins = ["reliable_messaging.testing.plugin"]
