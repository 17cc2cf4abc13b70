"""What installing the package gives a user: the command, the version in one place, and no pytest fixtures forced
on their project (the plugin is opt-in)."""

from __future__ import annotations

import importlib.metadata

import reliable_messaging


def test_the_command_and_the_version() -> None:
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("reliable-messaging") == "reliable_messaging._cli:main"
    assert importlib.metadata.version("reliable-messaging") == reliable_messaging.__version__


def test_the_pytest_plugin_is_not_registered_for_every_project() -> None:
    plugins = [ep.value for ep in importlib.metadata.entry_points(group="pytest11")]
    assert not any(value.startswith("reliable_messaging") for value in plugins), plugins


def test_the_license_ships_with_the_package() -> None:
    metadata = importlib.metadata.metadata("reliable-messaging")
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in (metadata.get_all("License-File") or [])
