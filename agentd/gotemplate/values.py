"""How Go values are held in Python while a template runs.

Go value                          Python value
-------------------------------   ---------------------------------------------------------
invalid reflect.Value             ``NO_VALUE`` (prints ``<no value>``)
nil interface{} (JSON null)       ``None`` (prints ``<nil>`` inside fmt, ``<no value>`` alone)
string / bool / int / float64     ``str`` / ``bool`` / ``int`` / ``float``
int64 / uint64 (from functions)   :class:`Int64` / :class:`Uint64` (an ``int`` with a Go type)
json.Number (numbers of secrets)  :class:`JsonNumber`, a ``str`` holding the JSON text
[]interface{} / []string          ``list`` / :class:`StrList`
map[string]interface{}            ``dict`` with ``str`` keys
*dependency.Secret, Scratch ...   :class:`GoStruct` (fields in declaration order, methods)
nil *T                            :class:`GoNil`

Numbers read from a secret stay :class:`JsonNumber` so they print as their JSON text, as
consul-template's json.Number does; :func:`decode_json` decodes an upstream reply that way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class _NoValue:
    _instance: _NoValue | None = None

    def __new__(cls) -> _NoValue:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_VALUE"

    def __bool__(self) -> bool:
        return False


NO_VALUE = _NoValue()


class JsonNumber(str):
    """A number from JSON kept as its text (Go's json.Number, a string kind)."""

    __slots__ = ()


class Int64(int):
    __slots__ = ()


class Uint64(int):
    __slots__ = ()


class StrList(list):  # type: ignore[type-arg]
    """A Go []string (split, secrets): distinct from []interface{} for argument typing."""


class NilStrList(StrList):
    """A nil []string: prints ``[]`` like an empty one, but encodes to JSON as ``null``."""


@dataclass(frozen=True)
class GoChan:
    """consul-template's ``loop``: a ``<-chan int64`` yielding start, start+1, ... stop-1."""

    start: int
    stop: int


@dataclass
class GoMethod:
    params: tuple[str, ...]
    impl: Callable[..., Any]
    variadic: str | None = None


@dataclass
class GoStruct:
    type_name: str  # e.g. "*dependency.Secret"
    fields: dict[str, Any]
    methods: dict[str, GoMethod] = field(default_factory=dict)
    pointer: bool = True


@dataclass(frozen=True)
class GoNil:
    """A nil pointer of a named type (``*dependency.SecretAuth``)."""

    type_name: str
    field_names: tuple[str, ...] = ()


def go_type(v: Any) -> str:
    """The Go type name fmt's %T prints."""
    if v is None or v is NO_VALUE:
        return "<nil>"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, Int64):
        return "int64"
    if isinstance(v, Uint64):
        return "uint64"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float64"
    if isinstance(v, complex):
        return "complex128"
    if isinstance(v, JsonNumber):
        return "json.Number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, StrList):
        return "[]string"
    if isinstance(v, list):
        return "[]interface {}"
    if isinstance(v, dict):
        return "map[string]interface {}"
    if isinstance(v, GoStruct):
        return v.type_name
    if isinstance(v, GoNil):
        return v.type_name
    if isinstance(v, GoChan):
        return "<-chan int64"
    return "interface {}"


def to_go(value: Any) -> Any:
    """Turn decoded upstream JSON into template values (numbers become JsonNumber)."""
    if isinstance(value, bool) or value is None or isinstance(value, (JsonNumber, str)):
        return value
    if isinstance(value, int):
        return JsonNumber(str(value))
    if isinstance(value, float):
        return JsonNumber(_py_float_text(value))
    if isinstance(value, Mapping):
        return {str(k): to_go(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_go(v) for v in value]
    return value


def _py_float_text(f: float) -> str:
    text = repr(f)
    return text[:-2] if text.endswith(".0") else text


def decode_json(text: str | bytes) -> Any:
    """json.loads keeping every number as its literal text (JsonNumber), like Go's UseNumber."""
    return json.loads(text, parse_int=JsonNumber, parse_float=JsonNumber,
                      parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


# --- encoding/json ---------------------------------------------------------------------------


class JSONError(Exception):
    pass


def json_marshal(value: Any, *, indent: str | None = None, escape_html: bool = True) -> str:
    """Go's json.Marshal / MarshalIndent(v, "", indent) for template values."""
    out: list[str] = []
    _encode(value, out, indent, escape_html, 0)
    return "".join(out)


def _encode(v: Any, out: list[str], indent: str | None, esc: bool, level: int) -> None:
    if level > 200:
        raise JSONError("json: unsupported value: encountered a cycle or too deep a value")
    if v is None or v is NO_VALUE or isinstance(v, (GoNil, NilStrList)):
        out.append("null")
    elif isinstance(v, bool):
        out.append("true" if v else "false")
    elif isinstance(v, int):
        out.append(str(int(v)))
    elif isinstance(v, float):
        out.append(json_float(v))
    elif isinstance(v, JsonNumber):
        text = str(v) or "0"
        if not _valid_json_number(text):
            raise JSONError("json: invalid number literal")
        out.append(text)
    elif isinstance(v, str):
        out.append(json_string(v, esc))
    elif isinstance(v, list):
        if not v:
            out.append("[]")
            return
        out.append("[")
        for i, item in enumerate(v):
            if i:
                out.append(",")
            if indent is not None:
                out.append("\n" + indent * (level + 1))
            _encode(item, out, indent, esc, level + 1)
        if indent is not None:
            out.append("\n" + indent * level)
        out.append("]")
    elif isinstance(v, dict):
        _encode_object(sorted(v.items()), out, indent, esc, level)
    elif isinstance(v, GoStruct):
        if any(callable(x) for x in v.fields.values()):
            raise JSONError(f"json: unsupported type: {v.type_name}")
        _encode_object(list(v.fields.items()), out, indent, esc, level)
    else:
        raise JSONError(f"json: unsupported type: {go_type(v)}")


def _encode_object(items: list[tuple[str, Any]], out: list[str], indent: str | None, esc: bool,
                   level: int) -> None:
    if not items:
        out.append("{}")
        return
    out.append("{")
    for i, (k, item) in enumerate(items):
        if i:
            out.append(",")
        if indent is not None:
            out.append("\n" + indent * (level + 1))
        out.append(json_string(k, esc))
        out.append(": " if indent is not None else ":")
        _encode(item, out, indent, esc, level + 1)
    if indent is not None:
        out.append("\n" + indent * level)
    out.append("}")


_JSON_NUMBER_CHARS = set("0123456789+-.eE")


def _valid_json_number(text: str) -> bool:
    if not set(text) <= _JSON_NUMBER_CHARS:
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def json_string(s: str, escape_html: bool = True) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif o < 0x20:
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}.get(
                ch, f"\\u{o:04x}"))
        elif (escape_html and ch in "<>&") or o in (0x2028, 0x2029):
            out.append(f"\\u{o:04x}")
        elif 0xD800 <= o < 0xE000:
            out.append("\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def json_float(f: float) -> str:
    if math.isnan(f) or math.isinf(f):
        raise JSONError(f"json: unsupported value: {format_float_shortest(f, 'g')}")
    a = abs(f)
    if a != 0 and (a < 1e-6 or a >= 1e21):
        text = format_float_shortest(f, "e")
        # Go cleans e-07 into e-7
        mant, _, exp = text.partition("e")
        sign = exp[0]
        digits = exp[1:].lstrip("0") or "0"
        return f"{mant}e{sign}{digits}"
    return format_float_shortest(f, "f")


def _shortest_digits(f: float) -> tuple[str, int]:
    """Shortest round-trip digits and decimal point position of |f| (f finite, non-zero)."""
    r = repr(abs(f))
    mant, _, exp_s = r.partition("e")
    exp = int(exp_s) if exp_s else 0
    if "." in mant:
        ip, fp = mant.split(".")
    else:
        ip, fp = mant, ""
    digits = (ip + fp).lstrip("0")
    lead_zeros = len(ip + fp) - len((ip + fp).lstrip("0"))
    dp = len(ip) + exp - lead_zeros
    digits = digits.rstrip("0") or "0"
    return digits, dp


def format_float_shortest(f: float, fmt: str) -> str:
    """strconv.FormatFloat(f, fmt, -1, 64) for fmt in 'e', 'f', 'g'."""
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    sign = "-" if math.copysign(1.0, f) < 0 else ""
    if f == 0:
        digits, dp = "0", 1
    else:
        digits, dp = _shortest_digits(f)
    if fmt == "g":
        # strconv: with the shortest precision, %e is used when exp < -4 or exp >= 6
        exp = dp - 1
        fmt = "e" if exp < -4 or exp >= 6 else "f"
    if fmt == "e":
        exp = dp - 1 if digits != "0" else 0
        mant = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        es = "-" if exp < 0 else "+"
        return f"{sign}{mant}e{es}{abs(exp):02d}"
    # 'f'
    if dp <= 0:
        return f"{sign}0." + "0" * (-dp) + digits if digits != "0" else f"{sign}0"
    if dp >= len(digits):
        return sign + digits + "0" * (dp - len(digits))
    return sign + digits[:dp] + "." + digits[dp:]
