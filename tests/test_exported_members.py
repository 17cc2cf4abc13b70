"""The public face: every public name is listed in __all__, __all__ is sorted and every name resolves."""

from __future__ import annotations

import subprocess
import sys

import reliable_messaging


def test_all_names_resolve() -> None:
    for name in reliable_messaging.__all__:
        assert getattr(reliable_messaging, name) is not None, name


def test_all_is_sorted_and_unique() -> None:
    names = reliable_messaging.__all__
    assert len(names) == len(set(names))
    core = [n for n in names if n not in reliable_messaging._LAZY]
    # Constants (UPPER_CASE) first, then classes and functions, each group sorted.
    assert core == sorted(core, key=lambda n: (not n.isupper(), n))
    lazy = [n for n in names if n in reliable_messaging._LAZY]
    assert lazy == sorted(lazy, key=lambda n: (not n.isupper(), n)) or lazy == [
        *sorted(n for n in lazy if reliable_messaging._LAZY[n] == "._kafka"),
        *sorted(n for n in lazy if reliable_messaging._LAZY[n] == "._rabbitmq"),
    ]


def test_every_public_attribute_is_listed() -> None:
    public = {
        name for name, value in vars(reliable_messaging).items()
        if not name.startswith("_") and not isinstance(value, type(sys)) and name != "annotations"
    }
    assert public <= set(reliable_messaging.__all__), public - set(reliable_messaging.__all__)


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
