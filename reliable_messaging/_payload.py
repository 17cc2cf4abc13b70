"""Typed payloads: publish models and values, hand handlers validated objects.

Publishing (:func:`encode`): ``bytes`` (and ``bytearray``/``memoryview``) go as they are, ``str`` as UTF-8;
anything else is JSON, with ``content-type: application/json``:

- a pydantic model: ``model_dump_json()`` (pydantic's own Rust encoder);
- a msgspec ``Struct``: ``msgspec.json.encode``;
- a dataclass, dict, list, number, bool or ``None``: msgspec's encoder when msgspec is installed (it takes
  dataclasses too, and is several times faster than the standard library), else ``json.dumps``.

A value that cannot be encoded raises :class:`~reliable_messaging.InvalidMessage` at the call.

Consuming (:func:`payload_type` and :class:`PayloadDecoder`): a handler whose first parameter is annotated
with a pydantic model, a msgspec ``Struct`` or a dataclass (or ``consumer(..., payload=Type)``) gets the
body decoded and validated into that type; a second parameter, if the handler has one, gets the
:class:`~reliable_messaging.Message`. A body that does not parse or validate is dead-lettered at once (no
retry makes it valid), with the error's field paths and messages in ``x-rm-error-message`` — never the
payload's values.

Why by hand: this is the glue between the codecs (pydantic, msgspec, the standard library), each doing the
actual work; the libraries do not agree on one entry point.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable
from typing import Any, get_type_hints

from ._errors import ConfigurationError, InvalidMessage
from ._message import Message

__all__ = ["CONTENT_TYPE_HEADER", "JSON", "InvalidPayload", "PayloadDecoder", "encode", "payload_type"]

CONTENT_TYPE_HEADER = "content-type"
JSON = "application/json"

try:  # optional codecs: the extras [pydantic] and [msgspec]
    import pydantic as _pydantic
except ImportError:  # pragma: no cover - exercised where pydantic is not installed
    _pydantic = None  # type: ignore[assignment]
try:
    import msgspec as _msgspec
except ImportError:  # pragma: no cover
    _msgspec = None  # type: ignore[assignment]


class InvalidPayload(InvalidMessage):
    """A consumed body that does not decode into the handler's payload type (dead-lettered at once)."""


def encode(value: object) -> tuple[bytes, str | None]:
    """``value`` as the body to send, and its content type (None for bytes and text)."""
    cls = value.__class__
    if cls is bytes:
        return value, None  # type: ignore[return-value]
    if isinstance(value, bytearray | memoryview):
        return bytes(value), None
    if isinstance(value, str):
        return value.encode("utf-8"), None
    try:
        if _pydantic is not None and isinstance(value, _pydantic.BaseModel):
            return value.model_dump_json().encode("utf-8"), JSON
        if _msgspec is not None:
            return _msgspec.json.encode(value), JSON
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"), JSON
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidMessage(f"cannot encode a {cls.__name__} as JSON: {exc}") from exc
    except Exception as exc:
        raise InvalidMessage(f"cannot encode a {cls.__name__} as JSON: {type(exc).__name__}: {exc}") from exc


def _is_payload_class(tp: object) -> bool:
    if not isinstance(tp, type) or issubclass(tp, Message):
        return False
    if _pydantic is not None and issubclass(tp, _pydantic.BaseModel):
        return True
    if _msgspec is not None and issubclass(tp, _msgspec.Struct):
        return True
    return dataclasses.is_dataclass(tp)


def payload_type(handler: Callable[..., Any]) -> type | None:
    """The payload type a handler declares with its first parameter's annotation, if any."""
    try:
        parameters = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):
        return None
    if not parameters:
        return None
    target = handler if inspect.isfunction(handler) or inspect.ismethod(handler) else type(handler).__call__
    try:
        hints = get_type_hints(target)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: no payload type
        return None
    annotation = hints.get(parameters[0].name)
    return annotation if _is_payload_class(annotation) else None


def wants_message(handler: Callable[..., Any]) -> bool:
    """Whether a payload handler takes the Message as a second positional parameter."""
    try:
        parameters = [p for p in inspect.signature(handler).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(parameters) >= 2


class PayloadDecoder:
    """bytes -> an instance of ``cls``, validated; :class:`InvalidPayload` with field paths otherwise."""

    def __init__(self, cls: type) -> None:
        if not _is_payload_class(cls):
            raise ConfigurationError(f"payload must be a pydantic model, a msgspec Struct or a dataclass, got "
                                     f"{cls!r}", field="payload")
        self.cls = cls
        self._decode: Callable[[bytes], Any]
        if _pydantic is not None and issubclass(cls, _pydantic.BaseModel):
            self._decode = cls.model_validate_json
        elif _msgspec is not None:  # msgspec decodes and validates Structs and dataclasses alike
            self._decode = _msgspec.json.Decoder(cls).decode
        elif _pydantic is not None:  # a dataclass, validated by pydantic
            self._decode = _pydantic.TypeAdapter(cls).validate_json
        else:
            fields = {f.name for f in dataclasses.fields(cls)}

            def plain(body: bytes) -> Any:
                data = json.loads(body)
                if not isinstance(data, dict):
                    raise InvalidPayload(f"{cls.__name__}: expected a JSON object")
                return cls(**{k: v for k, v in data.items() if k in fields})

            self._decode = plain

    def __call__(self, body: bytes) -> Any:
        try:
            return self._decode(body)
        except InvalidPayload:
            raise
        except Exception as exc:  # noqa: BLE001 - each codec's errors, described without the payload's values
            raise InvalidPayload(f"{self.cls.__name__}: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    """The error's field paths and messages, without the input (which may hold personal data)."""
    if _pydantic is not None and isinstance(exc, _pydantic.ValidationError):
        parts = [f"{'.'.join(str(p) for p in error['loc']) or '(root)'}: {error['msg']}"
                 for error in exc.errors(include_url=False, include_input=False)]
        return f"{exc.error_count()} validation error(s): " + "; ".join(parts)
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON: {exc.msg} at position {exc.pos}"
    if isinstance(exc, TypeError):
        return f"does not match the fields: {type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}"[:500]
