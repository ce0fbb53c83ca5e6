"""JSON numbers that keep their text from the upstream to a Go template (decision 14).

Theory of operation: the OpenBao Agent decodes the upstream's replies with Go's json.Number, so
its templates print each number's text as the reply has it. Python's ``json`` keeps the value
only, and its ``repr`` is not always that text: ``-0`` (OpenBao's answer for a number written
as ``-0.0``) becomes ``0``, ``1e-7`` becomes ``1e-07``, ``0.00001`` becomes ``1e-05``; from
an upstream that answered a number as written, ``1e3`` and ``1.50`` would be ``1000.0``, ``1.5``.
So the upstream's replies are decoded with :func:`loads`, which gives a plain ``int`` or
``float`` wherever that value gives the text back as a Go template prints it (``5432``,
``0.25``, ``1.5e+300``: nearly every number), and for the others a :class:`LiteralFloat` or
:class:`LiteralInt`: a ``float`` (``int``) with the number's text in ``.text``. Code that only
reads numbers sees a float or an int and needs no change.

In msgpack (the cache's sealed entries, the snapshot, the render worker's requests) such a
number, and an integer beyond msgpack's 64 bits, is the extension type :data:`EXT_JSON_NUMBER`
whose payload is the number's JSON text (ASCII). :func:`packb` writes it; :func:`unpackb` reads
it back exactly (the same ``LiteralFloat``, or the big ``int``), :func:`unpackb_plain` as the
plain number (``1e-07``: what Jinja2 templates and v1 ``get`` clients see). A value packed
before this existed holds plain floats only and unpacks as before.

Pure (the standard library and msgpack): the sandboxed render worker imports it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import msgpack

EXT_JSON_NUMBER = 1             # msgpack extension type: a JSON number as its text


class LiteralFloat(float):
    """A JSON number whose float does not give its text back: the value, and ``text``."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> LiteralFloat:
        self = super().__new__(cls, text)
        self.text = text
        return self


class LiteralInt(int):
    """A JSON integer whose int does not give its text back (``-0``): the value, and ``text``.

    (An ``int`` subclass cannot have slots; JSON's grammar leaves ``-0`` as the only such int.)
    """

    text: str

    def __new__(cls, text: str) -> LiteralInt:
        self = super().__new__(cls, text)
        self.text = text
        return self


LITERALS = (LiteralFloat, LiteralInt)


def go_text(value: float) -> str:
    """How a Go template prints a plain float it is handed (``gotemplate.values.to_go``):
    Python's shortest round-trip text without a trailing ``.0``."""
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


def number(text: str) -> Any:
    """The value of the JSON number ``text``: a plain int or float when it gives the text back,
    else a LiteralInt or LiteralFloat holding it.

    Raises:
        ValueError: ``text`` is no number (``int()``'s digit limit included); the message
            never holds the text (a secret's).
    """
    try:
        if "." in text or "e" in text or "E" in text:
            value = float(text)
            return value if go_text(value) == text else LiteralFloat(text)
        integer = int(text)
    except ValueError:
        raise ValueError("not a JSON number") from None
    return integer if str(integer) == text else LiteralInt(text)


def _int(text: str) -> Any:
    # the hot case first: an int whose text is its own (all but "-0")
    return LiteralInt(text) if text == "-0" else int(text)


def _float(text: str) -> Any:
    value = float(text)
    return value if go_text(value) == text else LiteralFloat(text)


def _constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


MAX_DEPTH = 100     # arrays and objects within each other, at most


def loads(text: str | bytes) -> Any:
    """``json.loads`` keeping each number's text where its Python value would lose it.

    NaN and Infinity are refused, as Go's decoder refuses them, and so are documents nested
    more than ``MAX_DEPTH`` deep: OpenBao stores up to 10,000 levels, Python's decoder stops
    near 1,000 with a RecursionError, and every recursive step after it (msgpack, JSON for the
    HTTP face, a template) near there too, so whoever can write a secret could otherwise stop
    the agent or each reader of that secret.

    Raises:
        ValueError: ``text`` is not JSON, or is nested deeper than ``MAX_DEPTH``.
    """
    try:
        value = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    _check_depth(value)
    return value


def _check_depth(value: Any) -> None:
    """Raises ValueError if ``value`` nests lists and dicts deeper than ``MAX_DEPTH``."""
    level: list[Any] = [value]
    for _ in range(MAX_DEPTH):
        level = [child for item in level
                 for child in (item.values() if isinstance(item, dict) else
                               item if isinstance(item, list) else ())
                 if isinstance(child, (dict, list))]
        if not level:
            return
    raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")


def literal_text(value: Any) -> str | None:
    """The JSON text a number keeps (LiteralFloat, LiteralInt), or None for any other value."""
    return value.text if isinstance(value, LITERALS) else None


# --- msgpack ---------------------------------------------------------------------------------


def _ext(text: str) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_JSON_NUMBER, text.encode("ascii"))


def _default(obj: Any) -> Any:
    """msgpack ``default`` (with ``strict_types``, so number subclasses come here)."""
    if isinstance(obj, LITERALS):
        return _ext(obj.text)
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):             # beyond 64 bits (msgpack asks only then), or a subclass
        value = int(obj)
        return _ext(str(value)) if not -(1 << 63) <= value < (1 << 64) else value
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, (tuple, list)):
        return list(obj)
    raise TypeError(f"cannot pack a value of type {type(obj).__name__}")


def packb(value: Any) -> bytes:
    """msgpack bytes of ``value`` with every kept number text as :data:`EXT_JSON_NUMBER`
    (read-only mappings and tuples from ``frozen`` pack as maps and arrays).

    Raises:
        TypeError: ``value`` holds something msgpack cannot pack.
    """
    packed: bytes = msgpack.packb(value, default=_default, strict_types=True,
                                  use_bin_type=True)
    return packed


def exact_ext_hook(code: int, data: bytes) -> Any:
    """msgpack ``ext_hook``: :data:`EXT_JSON_NUMBER` as the number with its text
    (:class:`LiteralFloat`, :class:`LiteralInt`, or plain where the texts agree)."""
    if code != EXT_JSON_NUMBER:
        return msgpack.ExtType(code, data)
    return number(data.decode("ascii"))


def plain_ext_hook(code: int, data: bytes) -> Any:
    """msgpack ``ext_hook``: :data:`EXT_JSON_NUMBER` as the plain number (v1 clients)."""
    if code != EXT_JSON_NUMBER:
        return msgpack.ExtType(code, data)
    value = number(data.decode("ascii"))
    return float(value) if isinstance(value, float) else int(value)


def unpackb(packed: bytes) -> Any:
    """``packed`` (from :func:`packb`) back, each number with its text (LiteralFloat ...)."""
    return msgpack.unpackb(packed, raw=False, strict_map_key=False, ext_hook=exact_ext_hook)


def unpackb_texts(packed: bytes) -> tuple[Any, bool]:
    """``unpackb(packed)``, and whether it held a number as text (then :func:`dumps` writes
    it as JSON with that text, where ``json.dumps`` would write Python's)."""
    found = False

    def hook(code: int, data: bytes) -> Any:
        nonlocal found
        found = found or code == EXT_JSON_NUMBER
        return exact_ext_hook(code, data)

    value = msgpack.unpackb(packed, raw=False, strict_map_key=False, ext_hook=hook)
    return value, found


def unpackb_plain(packed: bytes) -> Any:
    """``packed`` back with plain numbers: ``1e-7`` is ``1e-07``, a big integer an ``int``."""
    return msgpack.unpackb(packed, raw=False, strict_map_key=False, ext_hook=plain_ext_hook)


def unpackb_with(packed: bytes, convert: Callable[[str], Any]) -> Any:
    """``packed`` back with each number kept as text made ``convert(text)`` (the render worker:
    the Go engine's json.Number)."""
    def hook(code: int, data: bytes) -> Any:
        if code != EXT_JSON_NUMBER:
            return msgpack.ExtType(code, data)
        return convert(data.decode("ascii"))

    return msgpack.unpackb(packed, raw=False, strict_map_key=False, ext_hook=hook)


def holds_text(packed: bytes) -> bool:
    """Whether ``packed`` holds a number as text (so its plain form differs)."""
    return unpackb_texts(packed)[1]


def plain_packed(packed: bytes) -> bytes:
    """``packed`` with every number made plain (v1 ``get``'s wire form): only an integer
    beyond 64 bits stays :data:`EXT_JSON_NUMBER`, since msgpack has no other way to hold it."""
    return packb(unpackb_plain(packed))


# --- JSON out ----------------------------------------------------------------------------------


def dumps(value: Any, *, default: Callable[[Any], Any] | None = None,
          ensure_ascii: bool = False) -> str:
    """Compact JSON of ``value`` with each kept number as its text (``1e-7``), keys in their
    order: what OpenBao itself answers for the same data. NaN and infinities are refused.

    Raises:
        TypeError: a value JSON cannot hold (after ``default``). ValueError: NaN or inf.
    """
    out: list[str] = []
    _dump(value, out, default, ensure_ascii, 0)
    return "".join(out)


def _dump(value: Any, out: list[str], default: Callable[[Any], Any] | None,
          ensure_ascii: bool, depth: int) -> None:
    if depth > 500:
        raise ValueError("value nested too deeply")
    text = literal_text(value)
    if text is not None:
        out.append(text)
    elif isinstance(value, Mapping):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(",")
            out.append(json.dumps(str(key), ensure_ascii=ensure_ascii))
            out.append(":")
            _dump(item, out, default, ensure_ascii, depth + 1)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _dump(item, out, default, ensure_ascii, depth + 1)
        out.append("]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("NaN or an infinity has no JSON text")
    elif value is None or isinstance(value, (str, int, float)):
        out.append(json.dumps(value, ensure_ascii=ensure_ascii))
    elif default is not None:
        _dump(default(value), out, default, ensure_ascii, depth + 1)
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as JSON")
