"""Plain records to JSON and back, by their type hints: one rule for every value the protocol carries.

Dataclasses become objects of their fields, enums their spelling, tuples and lists arrays, paths
strings. Decoding walks the target type's hints, so what comes back is the record the engine made,
typed as it was (a ``Lease`` gets the proxy as its engine). A value that does not fit its type is a
protocol error, never a half-built record.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from chronos.errors import InvalidRequestError
from chronos.lease import Lease, LeaseOps
from chronos.model import LeaseRecord, build, plain_fields

__all__ = ["CodecError", "decode", "encode"]


class CodecError(InvalidRequestError):
    """A value on the wire that does not fit the type it must have."""


_PLAIN = frozenset({type(None), bool, int, str})


def encode(value: Any) -> Any:
    """``value`` as plain JSON data."""
    if type(value) in _PLAIN:  # most of a record's fields, checked first
        return value
    if value is None or isinstance(value, (bool, int, str)):
        return value.value if isinstance(value, enum.Enum) else value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")  # JSON has no infinity
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Lease):
        return encode(value.record)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _encode_record(value)
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [encode(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    raise CodecError(f"cannot send a {type(value).__name__} over the protocol")


def _encode_record(value: Any) -> dict[str, Any]:
    """A dataclass as the object of its fields; plain and finite float fields (most of them) taken as they are."""
    state = getattr(value, "__dict__", None)
    out: dict[str, Any] = {}
    for name in _field_names(value.__class__):
        field = state[name] if state is not None else getattr(value, name)
        kind = type(field)
        if kind in _PLAIN or (kind is float and math.isfinite(field)):
            out[name] = field
        elif isinstance(field, enum.Enum):
            out[name] = field.value
        elif kind is tuple and all(type(item) in _PLAIN for item in field):  # a lease's devices, their uuids
            out[name] = list(field)
        else:
            out[name] = encode(field)
    return out


@lru_cache(maxsize=256)
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@lru_cache(maxsize=256)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_Decoder = Callable[[Any, "LeaseOps | None"], Any]


def decode(kind: Any, data: Any, engine: LeaseOps | None = None) -> Any:
    """``data`` (plain JSON) read back as a ``kind``; ``engine`` is what a decoded Lease acts through.

    Each type's reader is worked out once from its hints and kept (every answer of the service is
    read on the client's critical path)."""
    try:
        reader = _decoder(kind)
    except TypeError:  # an unhashable type form: worked out afresh
        reader = _decoder.__wrapped__(kind)
    return reader(data, engine)


@lru_cache(maxsize=512)
def _decoder(kind: Any) -> _Decoder:
    """The reader of ``kind``, by its form (the same rules, in the same order, as written out below)."""
    if kind is Any:
        return lambda data, engine: data
    if kind is Lease:
        return _lease_decoder()
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return _union_decoder(kind)
    if kind is type(None):
        return _none
    if origin in (tuple, list, set, frozenset):
        return _sequence_decoder(kind, origin)
    if origin is dict:
        return _dict_decoder(kind)
    if isinstance(kind, type):
        if issubclass(kind, enum.Enum):
            return _enum_decoder(kind)
        if dataclasses.is_dataclass(kind):
            return _dataclass_decoder(kind)
        return _plain_decoder(kind)

    def unreadable(data: Any, engine: LeaseOps | None) -> Any:
        raise CodecError(f"cannot read a {kind!r}")

    return unreadable


def _lease_decoder() -> _Decoder:
    def read(data: Any, engine: LeaseOps | None) -> Any:
        if engine is None:
            raise CodecError("a lease needs an engine to act through")
        return Lease(decode(LeaseRecord, data), engine)

    return read


def _union_decoder(kind: Any) -> _Decoder:
    arms = typing.get_args(kind)
    optional = type(None) in arms
    readers = [_decoder(arm) for arm in arms if arm is not type(None)]
    if len(readers) == 1:  # ``X | None``, most of a record's fields: one reader, no loop
        only = readers[0]

        def read_one(data: Any, engine: LeaseOps | None) -> Any:
            if data is None and optional:
                return None
            try:
                return only(data, engine)
            except CodecError as exc:
                raise CodecError(f"{data!r} fits none of {kind}: {exc}") from None

        return read_one

    def read(data: Any, engine: LeaseOps | None) -> Any:
        if data is None and optional:
            return None
        errors = []
        for reader in readers:
            try:
                return reader(data, engine)
            except CodecError as exc:
                errors.append(str(exc))
        raise CodecError(f"{data!r} fits none of {kind}: {'; '.join(errors)}")

    return read


def _none(data: Any, engine: LeaseOps | None) -> Any:
    if data is not None:
        raise CodecError(f"expected nothing, got {data!r}")
    return None


def _sequence_decoder(kind: Any, origin: Any) -> _Decoder:
    args = typing.get_args(kind)
    if origin is tuple and args and args[-1] is not Ellipsis:
        readers = [_decoder(a) for a in args]

        def read_fixed(data: Any, engine: LeaseOps | None) -> Any:
            if not isinstance(data, list):
                raise CodecError(f"expected an array, got {type(data).__name__}")
            if len(readers) != len(data):
                raise CodecError(f"expected {len(readers)} items, got {len(data)}")
            return tuple(r(d, engine) for r, d in zip(readers, data, strict=True))

        return read_fixed
    item = _decoder(args[0] if args else Any)

    def read(data: Any, engine: LeaseOps | None) -> Any:
        if not isinstance(data, list):
            raise CodecError(f"expected an array, got {type(data).__name__}")
        return origin([item(d, engine) for d in data])

    return read


def _dict_decoder(kind: Any) -> _Decoder:
    key, value = typing.get_args(kind) or (str, Any)
    reader = _decoder(value)

    def read(data: Any, engine: LeaseOps | None) -> Any:
        if not isinstance(data, dict):
            raise CodecError(f"expected an object, got {type(data).__name__}")
        return {_key(key, k): reader(v, engine) for k, v in data.items()}

    return read


def _key(kind: Any, text: str) -> Any:
    """An object key read back as its type (JSON keys are strings; a per-device dict keys by index)."""
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise CodecError(f"expected a number as key, got {text!r}") from None
    return str(text)


def _enum_decoder(kind: type[enum.Enum]) -> _Decoder:
    def read(data: Any, engine: LeaseOps | None) -> Any:
        try:
            return kind(data)
        except ValueError:
            raise CodecError(f"{data!r} is not a {kind.__name__}") from None

    return read


def _dataclass_decoder(kind: type) -> _Decoder:
    made: list[list[tuple[str, _Decoder]]] = []  # worked out on first use: a record may hold its own kind
    plain = plain_fields(kind) is not None  # made without its __init__ when every field is given

    def read(data: Any, engine: LeaseOps | None) -> Any:
        if not isinstance(data, dict):
            raise CodecError(f"expected a {kind.__name__} object, got {type(data).__name__}")
        if not made:
            hints = _hints(kind)
            made.append([(f.name, _decoder(hints[f.name])) for f in dataclasses.fields(kind) if f.init])
        values = {name: reader(data[name], engine) for name, reader in made[0] if name in data}
        if len(values) == len(made[0]) and plain:  # every field given: what __init__ would have stored
            return build(kind, values)
        try:
            return kind(**values)
        except TypeError as exc:
            raise CodecError(f"incomplete {kind.__name__}: {exc}") from None

    return read


def _plain_decoder(kind: type) -> _Decoder:
    """The reader of one plain type; the value's exact type is tried first (what JSON gives back)."""

    def refuse(data: Any) -> Any:
        raise CodecError(f"expected {kind.__name__}, got {type(data).__name__}")

    if kind is float:
        def read_float(data: Any, engine: LeaseOps | None) -> Any:
            if type(data) is float:
                return data
            if data in ("inf", "-inf"):
                return float(data)
            if isinstance(data, (int, float)) and not isinstance(data, bool):
                return float(data)
            return refuse(data)

        return read_float
    if kind is int:
        def read_int(data: Any, engine: LeaseOps | None) -> Any:
            if type(data) is int or (isinstance(data, int) and not isinstance(data, bool)):
                return data
            return refuse(data)

        return read_int
    if kind is Path:
        def read_path(data: Any, engine: LeaseOps | None) -> Any:
            return Path(data) if isinstance(data, str) else refuse(data)

        return read_path
    if kind in (str, bool, dict, list):
        def read_same(data: Any, engine: LeaseOps | None) -> Any:
            return data if isinstance(data, kind) else refuse(data)

        return read_same

    def read_none(data: Any, engine: LeaseOps | None) -> Any:
        return refuse(data)

    return read_none
