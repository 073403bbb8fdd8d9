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
from functools import lru_cache
from pathlib import Path
from typing import Any

from chronos.errors import InvalidRequestError
from chronos.lease import Lease, LeaseOps
from chronos.model import LeaseRecord

__all__ = ["CodecError", "decode", "encode"]


class CodecError(InvalidRequestError):
    """A value on the wire that does not fit the type it must have."""


def encode(value: Any) -> Any:
    """``value`` as plain JSON data."""
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
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [encode(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    raise CodecError(f"cannot send a {type(value).__name__} over the protocol")


@lru_cache(maxsize=256)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def decode(kind: Any, data: Any, engine: LeaseOps | None = None) -> Any:
    """``data`` (plain JSON) read back as a ``kind``; ``engine`` is what a decoded Lease acts through."""
    if kind is Any:
        return data
    if kind is Lease:
        if engine is None:
            raise CodecError("a lease needs an engine to act through")
        return Lease(decode(LeaseRecord, data), engine)
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(kind)
        if data is None and type(None) in arms:
            return None
        errors = []
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return decode(arm, data, engine)
            except CodecError as exc:
                errors.append(str(exc))
        raise CodecError(f"{data!r} fits none of {kind}: {'; '.join(errors)}")
    if kind is type(None):
        if data is not None:
            raise CodecError(f"expected nothing, got {data!r}")
        return None
    if origin in (tuple, list, set, frozenset):
        if not isinstance(data, list):
            raise CodecError(f"expected an array, got {type(data).__name__}")
        args = typing.get_args(kind)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(data):
                raise CodecError(f"expected {len(args)} items, got {len(data)}")
            return tuple(decode(a, d, engine) for a, d in zip(args, data, strict=True))
        item = args[0] if args else Any
        items = [decode(item, d, engine) for d in data]
        return origin(items)
    if origin is dict:
        if not isinstance(data, dict):
            raise CodecError(f"expected an object, got {type(data).__name__}")
        key, value = typing.get_args(kind) or (str, Any)
        return {_key(key, k): decode(value, v, engine) for k, v in data.items()}
    if isinstance(kind, type):
        return _decode_type(kind, data, engine)
    raise CodecError(f"cannot read a {kind!r}")


def _key(kind: Any, text: str) -> Any:
    """An object key read back as its type (JSON keys are strings; a per-device dict keys by index)."""
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise CodecError(f"expected a number as key, got {text!r}") from None
    return str(text)


def _decode_type(kind: type, data: Any, engine: LeaseOps | None) -> Any:
    if issubclass(kind, enum.Enum):
        try:
            return kind(data)
        except ValueError:
            raise CodecError(f"{data!r} is not a {kind.__name__}") from None
    if dataclasses.is_dataclass(kind):
        if not isinstance(data, dict):
            raise CodecError(f"expected a {kind.__name__} object, got {type(data).__name__}")
        hints = _hints(kind)
        values = {f.name: decode(hints[f.name], data[f.name], engine)
                  for f in dataclasses.fields(kind) if f.init and f.name in data}
        try:
            return kind(**values)
        except TypeError as exc:
            raise CodecError(f"incomplete {kind.__name__}: {exc}") from None
    if kind is float:
        if data in ("inf", "-inf"):
            return float(data)
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return float(data)
    elif kind is int:
        if isinstance(data, int) and not isinstance(data, bool):
            return data
    elif kind is Path:
        if isinstance(data, str):
            return Path(data)
    elif kind in (str, bool):
        if isinstance(data, kind):
            return data
    elif kind is dict or kind is list:
        if isinstance(data, kind):
            return data
    raise CodecError(f"expected {kind.__name__}, got {type(data).__name__}")
