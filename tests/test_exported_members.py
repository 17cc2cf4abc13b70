"""The public face: every public name is listed in __all__, __all__ is sorted and every name resolves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import reliable_messaging


def test_all_names_resolve() -> None:
    for name in reliable_messaging.__all__:
        assert getattr(reliable_messaging, name) is not None, name


def test_all_is_sorted_and_unique() -> None:
    names = reliable_messaging.__all__
    assert len(names) == len(set(names))
    # Constants (UPPER_CASE) first, then classes, then functions, each group sorted (ruff's RUF022 order).
    assert names == sorted(names, key=lambda n: (not n.isupper(), not n[0].isupper(), n))


def test_every_public_attribute_is_listed() -> None:
    public = {
        name for name, value in vars(reliable_messaging).items()
        if not name.startswith("_") and not isinstance(value, type(sys)) and name != "annotations"
    }
    assert public <= set(reliable_messaging.__all__), public - set(reliable_messaging.__all__)


def test_backend_names_are_exported_lazily_and_typed() -> None:
    import reliable_messaging._kafka as kafka
    import reliable_messaging._rabbitmq as rabbitmq

    for module, path in ((kafka, "._kafka"), (rabbitmq, "._rabbitmq")):
        for name in module.__all__:
            assert reliable_messaging._LAZY[name] == path, name
            assert name in reliable_messaging.__all__
            assert getattr(reliable_messaging, name) is getattr(module, name)
    assert set(reliable_messaging._LAZY) == {*kafka.__all__, *rabbitmq.__all__}
    # The TYPE_CHECKING block names exactly the lazy names, so mypy sees real types.
    source = (Path(reliable_messaging.__file__)).read_text()
    typed = source.split("if typing.TYPE_CHECKING:", 1)[1].split("_LAZY", 1)[0]
    for name in reliable_messaging._LAZY:
        assert f"        {name},\n" in typed, name


def test_errors_all_derive_from_the_root() -> None:
    for name in reliable_messaging.__all__:
        value = getattr(reliable_messaging, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, reliable_messaging.ReliableMessagingError), name


def test_missing_backend_client_names_the_pip_command() -> None:
    # A fresh interpreter where confluent_kafka and pika cannot be imported.
    code = (
        "import sys; sys.modules['confluent_kafka'] = None; sys.modules['pika'] = None\n"
        "import reliable_messaging\n"
        "for mod, extra in (('reliable_messaging._kafka', 'kafka'), ('reliable_messaging._rabbitmq', 'rabbitmq')):\n"
        "    try:\n"
        "        __import__(mod)\n"
        "    except ImportError as exc:\n"
        "        assert f\"pip install 'reliable-messaging[{extra}]'\" in str(exc), exc\n"
        "    else:\n"
        "        raise SystemExit(f'{mod} imported without its client')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
