"""Job arguments as Que stores them: a compact JSON array in a ``json`` column.

The ``json`` type keeps the exact text it is given, and Ruby and Go workers read it, so the
arguments are checked up front (only values every language decodes the same way) and
serialised compactly, without ASCII escaping of non-ASCII text.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from sqlalchemy.dialects.postgresql import JSON
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from ._errors import InvalidJobError

#: The deepest nesting of lists and dicts accepted, the args array being level 1: Ruby Que
#: 0.14.3 parses args with ``JSON.parse``, whose ``max_nesting`` is 100.
MAX_DEPTH = 100

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _check(value: Any, path: str, within: dict[int, str]) -> None:
    """Raise :class:`InvalidJobError` naming the first value under ``path`` that is not plain
    JSON: only str, int, float (finite), bool, None, lists/tuples and str-keyed dicts, with no
    list or dict inside itself, nested at most :data:`MAX_DEPTH` deep. ``within`` maps the id
    of each list and dict that encloses ``value`` to its path, outermost first."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        # Python refuses to write ints of more than sys.get_int_max_str_digits() digits
        # (4300 by default); well below that, no need to try.
        if value.bit_length() > _INT_BITS_ALWAYS_WRITTEN:
            try:
                int.__repr__(value)
            except ValueError:
                raise InvalidJobError(
                    f"{path} is an int of more than {_max_int_digits()} digits, which Python "
                    "does not convert to text (see sys.set_int_max_str_digits); pass it as a str"
                ) from None
        return
    if isinstance(value, str):
        _check_str(value, f"{path} is {value!r}, which")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidJobError(
                f"{path} is {value!r}; NaN and Infinity are not valid JSON and other "
                "languages' Que workers cannot decode them"
            )
        return
    if isinstance(value, list | tuple | dict):
        if id(value) in within:
            raise InvalidJobError(
                f"{path} is {within[id(value)]} itself (a reference cycle), which JSON cannot hold"
            )
        if len(within) >= MAX_DEPTH:
            top = list(within.values())[1]  # the enclosing argument: within keeps nesting order
            raise InvalidJobError(
                f"{top} nests lists and dicts more than {MAX_DEPTH} levels deep (the args array "
                "being level 1), which Ruby Que cannot read: its JSON.parse stops at "
                f"{MAX_DEPTH} and the job would stay locked by a Ruby worker for good"
            )
        within[id(value)] = path
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InvalidJobError(
                        f"{path} has the key {key!r} of type {type(key).__name__}; JSON object "
                        "keys must be str (a non-str key would come back as a different value)"
                    )
                _check_str(key, f"{path} has the key {key!r}, which")
                _check(item, f"{path}[{key!r}]", within)
        else:
            for index, item in enumerate(value):
                _check(item, f"{path}[{index}]", within)
        del within[id(value)]
        return
    raise InvalidJobError(
        f"{path} is {value!r} of type {type(value).__name__}, which is not JSON-serialisable; "
        "pass str, int, float, bool, None, list or dict (convert it yourself, e.g. str(value))"
    )


def _check_str(value: str, subject: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidJobError(f"{subject} is not valid UTF-8 text (lone surrogate)") from None


#: Ints up to this many bits have fewer than 640 digits, the lowest limit Python can be set to.
_INT_BITS_ALWAYS_WRITTEN = 2000


def _max_int_digits() -> int:
    get_limit = getattr(sys, "get_int_max_str_digits", None)  # Python 3.10.7 and later
    return int(get_limit()) if get_limit is not None else 4300


def dump_args(args: Sequence[Any]) -> str:
    """Return the compact JSON array text for ``args`` after checking every value.

    :raises InvalidJobError: naming the first argument that is not plain JSON.
    """
    if isinstance(args, str | bytes) or not isinstance(args, Sequence):
        raise InvalidJobError(
            f"args must be a list of positional arguments, got {args!r} "
            f"of type {type(args).__name__}"
        )
    # Fast path for flat arguments of plain scalars (the usual ids and strings): written
    # directly, exactly as the encoder would write them. Anything else, or any refusal
    # (NaN, a lone surrogate), takes the walk, which names the bad value.
    try:
        return "[" + ",".join([_SCALAR_WRITERS[type(arg)](arg) for arg in args]) + "]"
    except (KeyError, ValueError):
        pass
    _check(args, "args", {})
    return _encoder.encode(list(args))


def _write_str(value: str) -> str:
    value.encode("utf-8")  # raises on a lone surrogate
    return _encode_str(value)


def _write_float(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(value)
    return float.__repr__(value)


# json's own C string encoder without ASCII escaping (what ensure_ascii=False uses).
_encode_str = json.encoder.encode_basestring
_SCALAR_WRITERS: dict[type, Any] = {
    str: _write_str,
    int: int.__repr__,
    float: _write_float,
    bool: lambda value: "true" if value else "false",
    type(None): lambda value: "null",
}


class CompactJSON(TypeDecorator[list[Any]]):
    """A PostgreSQL ``json`` column written as compact, checked JSON text.

    Binding sends the text itself (cast to ``json`` by the dialect), so what is stored is
    byte for byte what :func:`dump_args` produced, whatever ``json_serializer`` the Engine has.
    """

    impl = JSON
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Any:
        def process(value: Any) -> str | None:
            if value is None:
                return None
            if isinstance(value, _PreDumped):
                return str(value)
            return dump_args(value)

        return process


class _PreDumped(str):
    """Argument text already produced by :func:`dump_args`, so it is not checked twice."""

    __slots__ = ()
