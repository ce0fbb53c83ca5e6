"""Go's builtin template functions and consul-template's functions (as OpenBao's fork,
openbao-template v1.0.1, has them: the OpenBao Agent renders with it).

Builtins follow ``text/template/funcs.go``; consul-template's follow its ``template/funcs.go``
(argument order included: ``subtract b a`` is ``a - b`` so ``{{ 5 | subtract 1 }}`` is 4).
Functions that reach outside the template (``secret``, ``secrets``, ``pkiCert``, ``env``) go
through the :class:`Environment` that ``Template.execute`` puts in the state. The package's
``FUNCTIONS`` joins these tables with ``sprig.py``'s. Error messages never hold a value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import unicodedata
import urllib.parse
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from agentd.gotemplate.exec import Func, FuncError, State, truth
from agentd.gotemplate.gofmt import sprint, sprintf, sprintln
from agentd.gotemplate.values import (
    NO_VALUE,
    GoChan,
    GoMethod,
    GoNil,
    GoStruct,
    Int64,
    JSONError,
    JsonNumber,
    NilStrList,
    StrList,
    Uint64,
    go_type,
    json_marshal,
    to_go,
)

SecretLookup = Callable[[str, Mapping[str, str]], "Mapping[str, Any] | None"]

# --- comparison (funcs.go) -------------------------------------------------------------------


def _basic_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, Uint64):
        return "uint"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, complex):
        return "complex"
    if isinstance(v, str):
        return "string"
    return "invalid"


def _indirect_interface(v: Any) -> Any:
    return NO_VALUE if v is None else v


def _eq(arg1: Any, *args2: Any) -> bool:
    arg1 = _indirect_interface(arg1)
    if not args2:
        raise FuncError("missing argument for comparison")
    k1 = _basic_kind(arg1)
    for arg in args2:
        arg = _indirect_interface(arg)
        k2 = _basic_kind(arg)
        if k1 != k2:
            if {k1, k2} == {"int", "uint"}:
                if arg1 == arg:
                    return True
                continue
            if arg1 is not NO_VALUE and arg is not NO_VALUE:
                raise FuncError("incompatible types for comparison")
            continue
        if k1 == "invalid":
            nil1 = arg1 is NO_VALUE or isinstance(arg1, GoNil)
            nil2 = arg is NO_VALUE or isinstance(arg, GoNil)
            if nil1 or nil2:
                if nil1 == nil2:
                    return True
                continue
            if isinstance(arg1, (list, dict)) or isinstance(arg, (list, dict)):
                raise FuncError(f"non-comparable types {go_type(arg1)}, {go_type(arg)}")
            if arg1 is arg:
                return True
            continue
        if arg1 == arg:
            return True
    return False


def _ne(a: Any, b: Any) -> bool:
    return not _eq(a, b)


def _lt(a: Any, b: Any) -> bool:
    a, b = _indirect_interface(a), _indirect_interface(b)
    k1, k2 = _basic_kind(a), _basic_kind(b)
    if k1 in ("invalid", "bool", "complex") or k2 in ("invalid", "bool", "complex"):
        raise FuncError("invalid type for comparison")
    if k1 != k2:
        if {k1, k2} == {"int", "uint"}:
            return bool(a < b)
        raise FuncError("incompatible types for comparison")
    return bool(a < b)


def _le(a: Any, b: Any) -> bool:
    return _lt(a, b) or _eq(a, b)


def _gt(a: Any, b: Any) -> bool:
    return not _le(a, b)


def _ge(a: Any, b: Any) -> bool:
    return not _lt(a, b)


def _not(v: Any) -> bool:
    return not truth(v)


def _len(v: Any) -> int:
    v = _indirect_interface(v)
    if isinstance(v, GoNil):
        raise FuncError("len of nil pointer")
    if isinstance(v, str):
        return len(v.encode("utf-8", "surrogatepass"))
    if isinstance(v, (list, dict)):
        return len(v)
    if isinstance(v, GoChan):
        return 0  # an unbuffered channel holds nothing
    raise FuncError(f"len of type {go_type(v)}")


def _index_arg(index: Any, cap: int) -> int:
    if not isinstance(index, int) or isinstance(index, bool):
        raise FuncError(f"cannot index slice/array with type {go_type(index)}")
    if index < 0 or index >= cap:
        raise FuncError("index out of range")  # Go prints the index: it may be data
    return int(index)


def _index(item: Any, *indexes: Any) -> Any:
    item = _indirect_interface(item)
    if item is NO_VALUE:
        raise FuncError("index of untyped nil")
    for index in indexes:
        index = _indirect_interface(index)
        if isinstance(item, GoNil):
            raise FuncError("index of nil pointer")
        if isinstance(item, str):
            data = item.encode("utf-8", "surrogatepass")
            item = Uint8(data[_index_arg(index, len(data))])
        elif isinstance(item, list):
            item = item[_index_arg(index, len(item))]
        elif isinstance(item, dict):
            if not isinstance(index, str) or isinstance(index, JsonNumber):
                if index is NO_VALUE:
                    raise FuncError("value is nil; should be of type string")
                raise FuncError(f"value has type {go_type(index)}; should be string")
            item = item.get(index)
        elif item is NO_VALUE or item is None:
            raise FuncError("index of untyped nil")
        else:
            raise FuncError(f"can't index item of type {go_type(item)}")
    return item


class Uint8(Uint64):
    pass


def _slice(item: Any, *indexes: Any) -> Any:
    item = _indirect_interface(item)
    if item is NO_VALUE:
        raise FuncError("slice of untyped nil")
    if len(indexes) > 3:
        raise FuncError(f"too many slice indexes: {len(indexes)}")
    if isinstance(item, str):
        if len(indexes) > 2:
            raise FuncError("cannot 3-index slice a string")
        data = item.encode("utf-8", "surrogatepass")
        cap = len(data)
    elif isinstance(item, list):
        cap = len(item)
    else:
        raise FuncError(f"can't slice item of type {go_type(item)}")
    idx = [0, cap, cap]
    for i, index in enumerate(indexes):
        idx[i] = _index_arg(index, cap + 1)
    if idx[0] > idx[1]:
        raise FuncError("invalid slice index: low > high")
    if len(indexes) == 3 and idx[1] > idx[2]:
        raise FuncError("invalid slice index: high > max")
    if isinstance(item, str):
        return data[idx[0]:idx[1]].decode("utf-8", "surrogateescape")
    out = item[idx[0]:idx[1]]
    return StrList(out) if isinstance(item, StrList) else out


def _eval_args(args: tuple[Any, ...]) -> str:
    if len(args) == 1 and isinstance(args[0], str) and not isinstance(args[0], JsonNumber):
        return args[0]
    # printableValue: a nil argument prints as "<no value>"
    return sprint(["<no value>" if a is NO_VALUE or a is None else a for a in args])


def _html(*args: Any) -> str:
    s = _eval_args(args)
    return (s.replace("&", "&amp;").replace("'", "&#39;").replace("<", "&lt;")
            .replace(">", "&gt;").replace('"', "&#34;").replace("\x00", "\ufffd"))


def _js(*args: Any) -> str:
    s = _eval_args(args)
    out = []
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "'":
            out.append("\\'")
        elif ch == '"':
            out.append('\\"')
        elif ch in "<>&=" or ord(ch) < 0x20 or (ord(ch) >= 0x80 and not ch.isprintable()):
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return "".join(out)


def _urlquery(*args: Any) -> str:
    return urllib.parse.quote_plus(_eval_args(args), safe="-_.~")


def _print(*args: Any) -> str:
    return sprint([None if a is NO_VALUE else a for a in args])


def _printf(fmt: str, *args: Any) -> str:
    return sprintf(fmt, [None if a is NO_VALUE else a for a in args])


def _println(*args: Any) -> str:
    return sprintln([None if a is NO_VALUE else a for a in args])


def _call(fn: Any, *args: Any) -> Any:
    raise FuncError(f"non-function of type {go_type(fn)}")


BUILTINS: dict[str, Func] = {
    "and": Func(("value",), lambda *a: None, variadic="value"),
    "or": Func(("value",), lambda *a: None, variadic="value"),
    "not": Func(("value",), _not),
    "len": Func(("value",), _len),
    "index": Func(("value",), _index, variadic="value"),
    "slice": Func(("value",), _slice, variadic="value"),
    "eq": Func(("value",), _eq, variadic="value"),
    "ne": Func(("value", "value"), _ne),
    "lt": Func(("value", "value"), _lt),
    "le": Func(("value", "value"), _le),
    "gt": Func(("value", "value"), _gt),
    "ge": Func(("value", "value"), _ge),
    "print": Func((), _print, variadic="any"),
    "printf": Func(("string",), _printf, variadic="any"),
    "println": Func((), _println, variadic="any"),
    "html": Func((), _html, variadic="any"),
    "js": Func((), _js, variadic="any"),
    "urlquery": Func((), _urlquery, variadic="any"),
    "call": Func(("value",), _call, variadic="value"),
}

# --- consul-template helpers -----------------------------------------------------------------


def _b64decode(name: str, s: str, urlsafe: bool) -> str:
    try:
        if urlsafe:
            data = base64.b64decode(s.encode(), altchars=b"-_", validate=True)
        else:
            data = base64.b64decode(s.encode(), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise FuncError(f"{name}: illegal base64 data") from None
    return data.decode("utf-8", "surrogateescape")


def _to_title(s: str) -> str:
    """cases.Title(language.Und, cases.NoLower): the first cased letter after a break is
    titlecased; case-ignorable runes (apostrophes, '.', ':', marks, '_') keep the word going;
    anything else (space, digits, '-', ',', '/') breaks it."""
    out = []
    word_start = True
    for ch in s:
        if ch.isalpha() and (ch.lower() != ch.upper() or ch.istitle()):
            if word_start:
                titled = ch.title()
                out.append(titled if len(titled) == 1 else ch.upper())
                word_start = False
            else:
                out.append(ch)
        else:
            out.append(ch)
            if not (ch in "_'\u2019.:\u00b7" or
                    unicodedata.category(ch) in ("Mn", "Me", "Cf", "Lm", "Sk")):
                word_start = True
    return "".join(out)


def _in(seq: Any, v: Any) -> bool:
    if isinstance(seq, list):
        for item in seq:
            if isinstance(item, bool) or isinstance(v, bool):
                continue
            same_kind = (isinstance(item, int) and isinstance(v, int)) or (
                isinstance(item, float) and isinstance(v, float)) or (
                isinstance(item, str) and type(item) is type(v))
            if same_kind and item == v:
                return True
        return False
    if isinstance(seq, str) and isinstance(v, str) and type(seq) is type(v):
        return v in seq
    return False


def _contains_some(ret_true: bool, invert: bool) -> Callable[[list[Any], Any], bool]:
    def impl(values: list[Any], seq: Any) -> bool:
        for item in values:
            if _in(seq, item) != invert:
                return not ret_true
        return ret_true

    return impl


_PARSE_BOOL = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
               "0": False, "f": False, "F": False, "FALSE": False, "false": False,
               "False": False}


def _parse_bool(s: str) -> bool:
    if s == "":
        return False
    if s not in _PARSE_BOOL:
        raise FuncError("parseBool: strconv.ParseBool: invalid syntax")
    return _PARSE_BOOL[s]


_FLOAT_RE = re.compile(
    # strconv: underscores only between digits (or after a base prefix)
    r"[+-]?(?:(?:\d+(?:_\d+)*(?:\.(?:\d+(?:_\d+)*)?)?|\.\d+(?:_\d+)*)"
    r"(?:[eE][+-]?\d+(?:_\d+)*)?|0[xX][0-9a-fA-F_.]+[pP][+-]?\d+"
    r"|inf|infinity|nan)", re.IGNORECASE)


def _parse_float(s: str) -> float:
    if s == "":
        return 0.0
    if not _FLOAT_RE.fullmatch(s) or not any(c.isdigit() for c in s.lower().replace(
            "infinity", "1").replace("inf", "1").replace("nan", "1")):
        raise FuncError("parseFloat: strconv.ParseFloat: invalid syntax")
    try:
        text = s.replace("_", "")
        v = float.fromhex(text) if "x" in text.lower() else float(text)
    except (ValueError, OverflowError):
        raise FuncError("parseFloat: strconv.ParseFloat: invalid syntax") from None
    if math.isinf(v) and "inf" not in s.lower():
        raise FuncError("parseFloat: strconv.ParseFloat: value out of range")
    return v


_INT_RE = re.compile(r"[+-]?\d+")


def _parse_int(s: str) -> int:
    if s == "":
        return Int64(0)
    if not _INT_RE.fullmatch(s):
        raise FuncError("parseInt: strconv.ParseInt: invalid syntax")
    v = int(s)
    if not -(1 << 63) <= v < (1 << 63):
        raise FuncError("parseInt: strconv.ParseInt: value out of range")
    return Int64(v)


def _parse_uint(s: str) -> int:
    if s == "":
        return Uint64(0)
    if not re.fullmatch(r"\d+", s):
        raise FuncError("parseUint: strconv.ParseUint: invalid syntax")
    v = int(s)
    if v >= 1 << 64:
        raise FuncError("parseUint: strconv.ParseUint: value out of range")
    return Uint64(v)


def _go_json_value(v: Any) -> Any:
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, dict):
        return {k: _go_json_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_go_json_value(x) for x in v]
    return v


def _parse_json(s: str) -> Any:
    if s == "":
        return {}
    try:
        data = json.loads(s, parse_constant=_bad_constant)
    except (ValueError, RecursionError):
        raise FuncError("invalid JSON") from None
    out = _go_json_value(data)
    if _has_inf(out):
        raise FuncError("json: cannot unmarshal number into Go value of type float64")
    return out


def _bad_constant(name: str) -> Any:
    raise ValueError(name)


def _has_inf(v: Any) -> bool:
    if isinstance(v, float):
        return math.isinf(v)
    if isinstance(v, dict):
        return any(_has_inf(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_inf(x) for x in v)
    return False


def _to_json(v: Any) -> str:
    try:
        return json_marshal(v).strip()
    except JSONError as exc:
        raise FuncError(f"toJSON: {exc}") from None


def _to_json_pretty(v: Any) -> str:
    try:
        return json_marshal(v, indent="  ").strip()
    except JSONError as exc:
        raise FuncError(f"toJSONPretty: {exc}") from None


def _to_unescaped_json(v: Any) -> str:
    try:
        return json_marshal(v, escape_html=False).rstrip("\r\n")
    except JSONError as exc:
        raise FuncError(f"toUnescapedJSON: {exc}") from None


def _to_unescaped_json_pretty(v: Any) -> str:
    try:
        return json_marshal(v, indent="  ", escape_html=False).rstrip("\r\n")
    except JSONError as exc:
        raise FuncError(f"toUnescapedJSONPretty: {exc}") from None


def _split(sep: str, s: str) -> StrList:
    s = s.strip(" \t\n\r\v\f\x85\xa0")
    if s == "":
        return StrList()
    if sep == "":
        return StrList(list(s))
    return StrList(s.split(sep))


MAX_VALUE_CHARS = 1 << 24  # no function builds a bigger string (the output cap is checked after)


def check_growth(chars: int) -> None:
    """Refuse to build a string of ``chars`` characters before building it."""
    if chars > MAX_VALUE_CHARS:
        raise FuncError(f"the result would exceed {MAX_VALUE_CHARS} characters")


def replace_all(old: str, new: str, s: str) -> str:
    count = s.count(old) if old else len(s) + 1
    check_growth(len(s) + count * (len(new) - len(old)))
    return s.replace(old, new) if old else _replace_empty(s, new)


def join(sep: str, items: list[str]) -> str:
    check_growth(sum(len(x) for x in items) + len(sep) * max(len(items) - 1, 0))
    return sep.join(items)


def _indent(spaces: int, s: str) -> str:
    if spaces < 0:
        raise FuncError("indent value must be a positive integer")
    check_growth(len(s) + spaces * (s.count("\n") + 1))
    prefix = " " * spaces
    out = []
    at_line_start = True
    for ch in s:
        if at_line_start and ch != "\n":
            out.append(prefix)
        out.append(ch)
        at_line_start = ch == "\n"
    return "".join(out)


def _int64(v: int) -> Int64:
    v &= (1 << 64) - 1
    return Int64(v - (1 << 64) if v >= 1 << 63 else v)


def _num_kind(v: Any) -> str | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, Uint64):
        return "uint"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    return None


def _arith(name: str, op: Callable[[Any, Any], Any], allow_float: bool = True
           ) -> Callable[[Any, Any], Any]:
    def impl(b: Any, a: Any) -> Any:
        ka, kb = _num_kind(a), _num_kind(b)
        if ka is None or (ka == "float" and not allow_float):
            raise FuncError(f"{name}: unknown type for a value of type {go_type(a)}")
        if kb is None or (kb == "float" and not allow_float):
            raise FuncError(f"{name}: unknown type for a value of type {go_type(b)}")
        try:
            if ka == "float" or kb == "float":
                return float(op(float(a), float(b)))
            result = op(int(a), int(b))
        except ZeroDivisionError:
            raise FuncError("runtime error: integer divide by zero") from None
        if ka == "uint" and kb == "uint":
            return Uint64(result & ((1 << 64) - 1))
        return _int64(result)

    return impl


def _go_div(a: Any, b: Any) -> Any:
    if isinstance(a, float):
        if b == 0:
            if a == 0 or math.isnan(a):
                return math.nan
            return math.copysign(math.inf, a) * math.copysign(1, b)
        return a / b
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _go_mod(a: int, b: int) -> int:
    r = abs(a) % abs(b)
    return r if a >= 0 else -r


def _min_max(name: str, pick_min: bool) -> Callable[[Any, Any], Any]:
    def impl(b: Any, a: Any) -> Any:
        ka, kb = _num_kind(a), _num_kind(b)
        if ka is None:
            raise FuncError(f"{name}: unknown type for a value of type {go_type(a)}")
        if kb is None:
            raise FuncError(f"{name}: unknown type for a value of type {go_type(b)}")
        first = a < b if pick_min else a > b
        return _conv(a if first else b)  # the chosen operand keeps its own Go type

    return impl


def _conv(v: Any) -> Any:
    if isinstance(v, Uint64):
        return v
    if isinstance(v, float):
        return v
    return Int64(v)


# --- Go time layouts -------------------------------------------------------------------------

_LAYOUT_TOKENS = [
    "January", "Monday", "2006", "-07:00:00", "-0700", "-07:00", "-07", "Z07:00:00", "Z0700",
    "Z07:00", "Z07", "Jan", "Mon", "MST", "002", "__2", "01", "02", "03", "04", "05", "06",
    "15", "PM", "pm", "_2", "1", "2", "3", "4", "5",
]


def go_time_format(t: datetime, layout: str) -> str:
    """time.Time.Format for a UTC time (the zone is always UTC, as consul-template's now())."""
    out = []
    i = 0
    while i < len(layout):
        if layout[i] in ".," and i + 1 < len(layout) and layout[i + 1] in "09":
            j = i + 1
            while j < len(layout) and layout[j] == layout[i + 1]:
                j += 1
            if j >= len(layout) or not layout[j].isdigit():
                digits = j - i - 1
                frac = f"{t.microsecond * 1000:09d}"[:digits]
                if layout[i + 1] == "9":
                    frac = frac.rstrip("0")
                    out.append((layout[i] + frac) if frac else "")
                else:
                    out.append(layout[i] + frac)
                i = j
                continue
        for tok in _LAYOUT_TOKENS:
            if layout.startswith(tok, i):
                out.append(_time_token(t, tok))
                i += len(tok)
                break
        else:
            out.append(layout[i])
            i += 1
    return "".join(out)


def _time_token(t: datetime, tok: str) -> str:
    hour12 = t.hour % 12 or 12
    table = {
        "January": t.strftime("%B"), "Monday": t.strftime("%A"), "2006": f"{t.year:04d}",
        "Jan": t.strftime("%b"), "Mon": t.strftime("%a"), "MST": "UTC", "002":
        f"{t.timetuple().tm_yday:03d}", "__2": f"{t.timetuple().tm_yday:>3d}",
        "01": f"{t.month:02d}", "02": f"{t.day:02d}", "03": f"{hour12:02d}",
        "04": f"{t.minute:02d}", "05": f"{t.second:02d}", "06": f"{t.year % 100:02d}",
        "15": f"{t.hour:02d}", "PM": "PM" if t.hour >= 12 else "AM",
        "pm": "pm" if t.hour >= 12 else "am", "_2": f"{t.day:>2d}", "1": str(t.month),
        "2": str(t.day), "3": str(hour12), "4": str(t.minute), "5": str(t.second),
        "-07:00:00": "+00:00:00", "-0700": "+0000", "-07:00": "+00:00", "-07": "+00",
        "Z07:00:00": "Z", "Z0700": "Z", "Z07:00": "Z", "Z07": "Z",
    }
    return table[tok]


# --- scratch ---------------------------------------------------------------------------------


def new_scratch() -> GoStruct:
    values: dict[str, Any] = {}

    def key(k: str) -> bool:
        return k in values

    def get(k: str) -> Any:
        return values.get(k)

    def set_(k: str, v: Any) -> str:
        values[k] = v
        return ""

    def setx(k: str, v: Any) -> str:
        values.setdefault(k, v)
        return ""

    def map_set(override: bool) -> Callable[[str, str, Any], str]:
        def impl(k: str, mk: str, v: Any) -> str:
            typed = values.setdefault(k, {})
            if not isinstance(typed, dict):
                raise FuncError("the scratch value is not a map")
            if override or mk not in typed:
                typed[mk] = v
            return ""

        return impl

    def map_values(k: str) -> Any:
        typed = values.get(k)
        if not isinstance(typed, dict):
            return []
        return [typed[x] for x in sorted(typed)]

    return GoStruct(
        "*template.Scratch",
        {},
        {
            "Key": GoMethod(("string",), key),
            "Get": GoMethod(("string",), get),
            "Set": GoMethod(("string", "any"), set_),
            "SetX": GoMethod(("string", "any"), setx),
            "MapSet": GoMethod(("string", "string", "any"), map_set(True)),
            "MapSetX": GoMethod(("string", "string", "any"), map_set(False)),
            "MapValues": GoMethod(("string",), map_values),
        },
    )


# --- secrets ---------------------------------------------------------------------------------

AUTH_FIELDS = ("ClientToken", "Accessor", "Policies", "Metadata", "LeaseDuration", "Renewable")
WRAP_FIELDS = ("Token", "TTL", "CreationTime", "WrappedAccessor")


def _as_int(v: Any) -> int:
    try:
        return int(str(v)) if v not in (None, "") else 0
    except ValueError:
        try:
            return int(float(str(v)))
        except ValueError:
            return 0


def _str_list(v: Any) -> StrList:
    return StrList(str(x) for x in v) if isinstance(v, list) else StrList()


def make_secret(response: Mapping[str, Any]) -> GoStruct:
    """consul-template's *dependency.Secret from an OpenBao response."""
    resp = to_go(dict(response))
    data = resp.get("data")
    auth_resp = resp.get("auth")
    auth: Any = GoNil("*dependency.SecretAuth", AUTH_FIELDS)
    if isinstance(auth_resp, dict):
        auth = GoStruct("*dependency.SecretAuth", {
            "ClientToken": str(auth_resp.get("client_token") or ""),
            "Accessor": str(auth_resp.get("accessor") or ""),
            "Policies": _str_list(auth_resp.get("policies")),
            "Metadata": {str(k): v for k, v in auth_resp["metadata"].items()}
            if isinstance(auth_resp.get("metadata"), dict) else {},
            "LeaseDuration": _as_int(auth_resp.get("lease_duration")),
            "Renewable": bool(auth_resp.get("renewable")),
        })
    return GoStruct("*dependency.Secret", {
        "RequestID": str(resp.get("request_id") or ""),
        "LeaseID": str(resp.get("lease_id") or ""),
        "LeaseDuration": _as_int(resp.get("lease_duration")),
        "Renewable": bool(resp.get("renewable")),
        "Data": data if isinstance(data, dict) else {},
        "Warnings": _str_list(resp.get("warnings")) or NilStrList(),
        "Auth": auth,
        "WrapInfo": GoNil("*dependency.SecretWrapInfo", WRAP_FIELDS),
    })


def make_pem(response: Mapping[str, Any]) -> GoStruct:
    """openbao-template's dependency.PemEncoded{Cert, Key, CA} from a pki issue response.

    Each PEM gains the newline pem.EncodeToMemory ends with; ``.Data`` returns the value itself
    (openbao-template's wrapper "to mimic v2 secrets Data").
    """
    data = to_go(dict(response)).get("data")
    if not isinstance(data, dict):
        data = {}

    def pem(key: str) -> str:
        v = data.get(key)
        return v + "\n" if isinstance(v, str) and v else ""

    ca = pem("issuing_ca")
    chain = data.get("ca_chain")
    if isinstance(chain, list) and chain and isinstance(chain[-1], str):
        ca = chain[-1] + "\n"  # the last CA block found wins
    value = GoStruct("dependency.PemEncoded", {
        "Cert": pem("certificate"),
        "Key": pem("private_key"),
        "CA": ca,
    }, pointer=False)
    value.methods["Data"] = GoMethod((), lambda: value)
    return value


def _kv_args(rest: tuple[str, ...]) -> dict[str, str]:
    data: dict[str, str] = {}
    for item in rest:
        if not item:
            continue
        k, sep, v = item.partition("=")
        if not sep:
            raise FuncError("an argument is not a k=v pair")
        data[k.strip()] = v.strip()
    return data


class Environment:
    """What the secret, env and timestamp functions read during one execution."""

    def __init__(self, lookup: SecretLookup, env: Mapping[str, str], now: datetime) -> None:
        self.lookup = lookup
        self.env = env
        self.now = now
        self.cache: dict[tuple[str, str, tuple[tuple[str, str], ...]], Any] = {}

    def fetch(self, kind: str, path: str, kv: dict[str, str]) -> Any:
        key = (kind, path, tuple(sorted(kv.items())))
        if key not in self.cache:
            reply = self.lookup(path, kv)
            if reply is not None and not isinstance(reply, Mapping):
                raise FuncError(f"the lookup of a {kind} path returned a {type(reply).__name__}")
            self.cache[key] = reply
        return self.cache[key]


def _environment(state: State) -> Environment:
    env = state.extra.get("environment")
    assert isinstance(env, Environment)
    return env


def _secret(state: State, *args: str) -> Any:
    if not args:
        return None
    kv = _kv_args(args[1:])
    resp = _environment(state).fetch("secret", args[0], kv)
    return None if resp is None else make_secret(resp)


def _secrets(state: State, path: str) -> StrList:
    if not path:
        return NilStrList()
    resp = _environment(state).fetch("secrets", path, {})
    if resp is None:
        return NilStrList()
    data = resp.get("data")
    keys = data.get("keys") if isinstance(data, Mapping) else None
    if not isinstance(keys, list):
        return StrList()
    return StrList(sorted(str(k) for k in keys if isinstance(k, str)))


def _pki_cert(state: State, *args: str) -> Any:
    if not args:
        return None
    kv = _kv_args(args[1:])
    resp = _environment(state).fetch("pkiCert", args[0], kv)
    return None if resp is None else make_pem(resp)


def _env(state: State, name: str) -> str:
    allowed = state.extra.get("env_allow", frozenset())
    if name not in allowed:
        raise FuncError("environment variable not allowed for this template")
    return _environment(state).env.get(name, "")


def _must_env(state: State, name: str) -> str:
    value = _env(state, name)
    if value == "":
        raise FuncError(f"required environment variable {name} is empty")
    return value


def _env_or_default(state: State, name: str, default: str) -> str:
    allowed = state.extra.get("env_allow", frozenset())
    if name not in allowed:
        raise FuncError("environment variable not allowed for this template")
    env = _environment(state).env
    return env.get(name, default)


def _timestamp(state: State, *args: str) -> str:
    now = _environment(state).now.astimezone(timezone.utc)
    if not args:
        return go_time_format(now, "2006-01-02T15:04:05Z07:00")
    if len(args) == 1:
        if args[0] == "unix":
            return str(int(now.timestamp()))
        return go_time_format(now, args[0])
    raise FuncError(f"timestamp: wrong number of arguments, expected 0 or 1, but got {len(args)}")


def _loop(*args: Any) -> GoChan:
    def to64(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise FuncError(f"loop: bad argument type: {go_type(v)}")
        return int(_parse_int(v)) if isinstance(v, str) else int(v)

    if len(args) == 1:
        return GoChan(0, to64(args[0]))
    if len(args) == 2:
        return GoChan(to64(args[0]), to64(args[1]))
    raise FuncError(f"loop: wrong number of arguments, expected 1 or 2, but got {len(args)}")


def _execute_template(state: State, name: str, *data: Any) -> str:
    if len(data) > 1:
        raise FuncError("executeTemplate: wrong number of arguments, expected 1 or 2, but got "
                        f"{len(data) + 1}")
    dot = data[0] if data else NO_VALUE
    if dot is None:
        dot = NO_VALUE
    if name not in state.trees:
        raise FuncError(f"template: no template {json.dumps(name)} associated with template")
    if state.depth >= 100:
        raise FuncError("exceeded maximum template depth (100)")
    state.depth += 1
    try:
        return state.execute(name, dot)
    finally:
        state.depth -= 1


def _scratch(state: State) -> GoStruct:
    scratch = state.extra.get("scratch")
    if scratch is None:
        scratch = state.extra["scratch"] = new_scratch()
    assert isinstance(scratch, GoStruct)
    return scratch


def _hmac_sha256_hex(message: str, key: str) -> str:
    return hmac.new(key.encode(), message.encode(), hashlib.sha256).hexdigest()


def _s(fn: Callable[..., Any], *params: str, variadic: str | None = None) -> Func:
    return Func(tuple(params), fn, variadic)


CONSUL_TEMPLATE: dict[str, Func] = {
    "secret": Func((), _secret, variadic="string", state=True),
    "secrets": Func(("string",), _secrets, state=True),
    "pkiCert": Func((), _pki_cert, variadic="string", state=True),
    "env": Func(("string",), _env, state=True),
    "mustEnv": Func(("string",), _must_env, state=True),
    "envOrDefault": Func(("string", "string"), _env_or_default, state=True),
    "timestamp": Func((), _timestamp, variadic="string", state=True),
    "executeTemplate": Func(("string",), _execute_template, variadic="any", state=True),
    "scratch": Func((), _scratch, state=True),
    "loop": Func((), _loop, variadic="any"),
    "base64Decode": _s(lambda s: _b64decode("base64Decode", s, False), "string"),
    "base64Encode": _s(lambda s: base64.b64encode(s.encode("utf-8", "surrogateescape"))
                       .decode(), "string"),
    "base64URLDecode": _s(lambda s: _b64decode("base64URLDecode", s, True), "string"),
    "base64URLEncode": _s(lambda s: base64.urlsafe_b64encode(
        s.encode("utf-8", "surrogateescape")).decode(), "string"),
    "contains": _s(lambda v, seq: _in(seq, v), "any", "any"),
    "containsAll": _s(_contains_some(True, True), "anylist", "any"),
    "containsAny": _s(_contains_some(False, False), "anylist", "any"),
    "containsNone": _s(_contains_some(True, False), "anylist", "any"),
    "containsNotAll": _s(_contains_some(False, True), "anylist", "any"),
    "in": _s(_in, "any", "any"),
    "indent": _s(_indent, "int", "string"),
    "join": _s(join, "string", "strlist"),
    "trim": _s(lambda cutset, s: s.strip(cutset), "string", "string"),
    "trimPrefix": _s(lambda pre, s: s[len(pre):] if pre and s.startswith(pre) else s,
                     "string", "string"),
    "trimSuffix": _s(lambda suf, s: s[:-len(suf)] if suf and s.endswith(suf) else s,
                     "string", "string"),
    "trimSpace": _s(lambda s: s.strip(" \t\n\r\v\f\x85\xa0\u1680\u2000\u2001\u2002\u2003"
                                      "\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028"
                                      "\u2029\u202f\u205f\u3000"), "string"),
    "parseBool": _s(_parse_bool, "string"),
    "parseFloat": _s(_parse_float, "string"),
    "parseInt": _s(_parse_int, "string"),
    "parseUint": _s(_parse_uint, "string"),
    "parseJSON": _s(_parse_json, "string"),
    "replaceAll": _s(replace_all, "string", "string", "string"),
    "sha256Hex": _s(lambda s: hashlib.sha256(s.encode("utf-8", "surrogateescape")).hexdigest(),
                    "string"),
    "md5sum": _s(lambda s: hashlib.md5(s.encode("utf-8", "surrogateescape"),
                                       usedforsecurity=False).hexdigest(), "string"),
    "hmacSHA256Hex": _s(_hmac_sha256_hex, "string", "string"),
    "split": _s(_split, "string", "string"),
    "toLower": _s(lambda s: s.lower(), "string"),
    "toUpper": _s(lambda s: s.upper(), "string"),
    "toTitle": _s(_to_title, "string"),
    "toJSON": _s(_to_json, "any"),
    "toJSONPretty": _s(_to_json_pretty, "any"),
    "toUnescapedJSON": _s(_to_unescaped_json, "any"),
    "toUnescapedJSONPretty": _s(_to_unescaped_json_pretty, "any"),
    "add": _s(_arith("add", lambda a, b: a + b), "any", "any"),
    "subtract": _s(_arith("subtract", lambda a, b: a - b), "any", "any"),
    "multiply": _s(_arith("multiply", lambda a, b: a * b), "any", "any"),
    "divide": _s(_arith("divide", _go_div), "any", "any"),
    "modulo": _s(_arith("modulo", _go_mod, allow_float=False), "any", "any"),
    "minimum": _s(_min_max("minimum", True), "any", "any"),
    "maximum": _s(_min_max("maximum", False), "any", "any"),
}


def _replace_empty(s: str, t: str) -> str:
    # strings.ReplaceAll with an empty old string inserts t around every rune
    return t + "".join(ch + t for ch in s)


# Functions consul-template has that this engine refuses or does not implement: a template
# using one fails to load with 'function "NAME" not supported'.
UNSUPPORTED = frozenset({
    "plugin", "writeToFile", "file", "sockaddr", "datacenters", "exportedServices",
    "importedServices", "key", "keyExists", "keyOrDefault", "ls", "safeLs", "node", "nodes",
    "partitions", "peerings", "service", "connect", "services", "tree", "safeTree", "caRoots",
    "caLeaf", "nomadServices", "nomadService", "nomadVarList", "nomadVarListSafe", "nomadVar",
    "nomadVarExists", "byKey", "byPort", "byTag", "byMeta", "explode", "explodeMap", "mergeMap",
    "mergeMapWithOverride", "parseYAML", "toYAML", "toTOML", "splitToMap",
    "regexReplaceAll", "regexMatch", "spew_dump", "spew_printf", "spew_sdump", "spew_sprintf",
})

# Paths of these functions must be string literals: the config maps them to declared secrets.
SECRET_FUNCS = frozenset({"secret", "secrets", "pkiCert"})


__all__ = ["BUILTINS", "CONSUL_TEMPLATE", "SECRET_FUNCS", "UNSUPPORTED", "Environment",
           "go_time_format", "make_pem", "make_secret", "new_scratch",
           "sprintf"]
