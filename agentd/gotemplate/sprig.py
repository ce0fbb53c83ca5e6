"""The cheap part of sprig's hermetic functions, as consul-template exposes them (``sprig_*``).

Semantics from Masterminds/sprig ``strings.go``, ``defaults.go``, ``list.go``, ``dict.go``,
``crypto.go`` (argument order included: ``{{ "foo" | sprig_repeat 3 }}``). Sprig functions not
listed here are refused at parse time like every unsupported function.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

from agentd.gotemplate.exec import Func, FuncError, truth
from agentd.gotemplate.funcs import check_growth, join, replace_all
from agentd.gotemplate.gofmt import sprintf
from agentd.gotemplate.values import NO_VALUE, StrList


def strval(v: Any) -> str:
    if isinstance(v, str):
        return str(v)
    return sprintf("%v", [None if v is NO_VALUE else v])


def strslice(v: Any) -> StrList:
    if isinstance(v, list):
        return StrList(strval(x) for x in v if x is not None and x is not NO_VALUE)
    if v is None or v is NO_VALUE:
        return StrList()
    return StrList([strval(v)])


def _quote(*args: Any) -> str:
    return " ".join(sprintf("%q", [strval(a)]) for a in args if a is not None and
                    a is not NO_VALUE)


def _squote(*args: Any) -> str:
    return " ".join(sprintf("'%v'", [a]) for a in args if a is not None and a is not NO_VALUE)


def _cat(*args: Any) -> str:
    vals = [a for a in args if a is not None and a is not NO_VALUE]
    return sprintf(" ".join(["%v"] * len(vals)), vals)


def _indent(spaces: int, s: str) -> str:
    check_growth(len(s) + max(spaces, 0) * (s.count("\n") + 1))
    pad = " " * spaces
    return pad + s.replace("\n", "\n" + pad)


def _trunc(c: int, s: str) -> str:
    data = s.encode("utf-8", "surrogateescape")
    if c < 0 and len(data) + c > 0:
        return data[len(data) + c:].decode("utf-8", "surrogateescape")
    if c >= 0 and len(data) > c:
        return data[:c].decode("utf-8", "surrogateescape")
    return s


def _default(d: Any, *given: Any) -> Any:
    if not given or not truth(given[0]):
        return d
    return given[0]


def _coalesce(*args: Any) -> Any:
    for v in args:
        if truth(v):
            return v
    return None


def _b64dec(s: str) -> str:
    try:
        return base64.b64decode(s.encode(), validate=True).decode("utf-8", "surrogateescape")
    except (binascii.Error, ValueError, UnicodeEncodeError):
        # Go's base64.CorruptInputError: the offset of the first byte it could not use
        alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
        offset = next((i for i, ch in enumerate(s) if ch not in alphabet and ch != "="),
                      len(s) - len(s) % 4)
        return f"illegal base64 data at input byte {offset}"


def _atoi(s: str) -> int:
    t = s[1:] if s[:1] in "+-" else s
    if not t.isdigit() or not t.isascii():
        return 0
    v = int(s)
    return v if -(1 << 63) <= v < (1 << 63) else 0


def _dict(*args: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    items = list(args)
    if len(items) % 2:
        items.append("")
    for i in range(0, len(items), 2):
        out[strval(items[i])] = items[i + 1]
    return out


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, list) and v else None


def _last(v: Any) -> Any:
    return v[-1] if isinstance(v, list) and v else None


def _sort_alpha(v: Any) -> StrList:
    if isinstance(v, list):
        return StrList(sorted(strslice(v)))
    return StrList([strval(v)])


def _repeat(n: int, s: str) -> str:
    if n < 0:
        raise FuncError("strings: negative Repeat count")
    check_growth(len(s) * n)
    return s * n


def _nospace(s: str) -> str:
    return "".join(ch for ch in s if not ch.isspace())


def _s(fn: Any, *params: str, variadic: str | None = None) -> Func:
    return Func(tuple(params), fn, variadic)


SPRIG: dict[str, Func] = {
    "sprig_upper": _s(str.upper, "string"),
    "sprig_lower": _s(str.lower, "string"),
    "sprig_trim": _s(lambda s: s.strip(" \t\n\r\v\f\x85\xa0"), "string"),
    "sprig_trimAll": _s(lambda a, b: b.strip(a), "string", "string"),
    "sprig_trimPrefix": _s(lambda a, b: b[len(a):] if a and b.startswith(a) else b,
                           "string", "string"),
    "sprig_trimSuffix": _s(lambda a, b: b[:-len(a)] if a and b.endswith(a) else b,
                           "string", "string"),
    "sprig_contains": _s(lambda sub, s: sub in s, "string", "string"),
    "sprig_hasPrefix": _s(lambda sub, s: s.startswith(sub), "string", "string"),
    "sprig_hasSuffix": _s(lambda sub, s: s.endswith(sub), "string", "string"),
    "sprig_repeat": _s(_repeat, "int", "string"),
    "sprig_replace": _s(lambda old, new, s: replace_all(old, new, s), "string", "string",
                        "string"),
    "sprig_quote": _s(_quote, variadic="any"),
    "sprig_squote": _s(_squote, variadic="any"),
    "sprig_cat": _s(_cat, variadic="any"),
    "sprig_indent": _s(_indent, "int", "string"),
    "sprig_nindent": _s(lambda n, s: "\n" + _indent(n, s), "int", "string"),
    "sprig_nospace": _s(_nospace, "string"),
    "sprig_trunc": _s(_trunc, "int", "string"),
    "sprig_join": _s(lambda sep, v: join(sep, strslice(v)), "string", "any"),
    "sprig_splitList": _s(lambda sep, s: StrList(s.split(sep)) if sep else StrList(list(s)),
                          "string", "string"),
    "sprig_toString": _s(strval, "any"),
    "sprig_default": _s(_default, "any", variadic="any"),
    "sprig_empty": _s(lambda v: not truth(v), "any"),
    "sprig_coalesce": _s(_coalesce, variadic="any"),
    "sprig_ternary": _s(lambda t, f, c: t if c else f, "any", "any", "bool"),
    "sprig_b64enc": _s(lambda s: base64.b64encode(s.encode("utf-8", "surrogateescape"))
                       .decode(), "string"),
    "sprig_b64dec": _s(_b64dec, "string"),
    "sprig_sha256sum": _s(lambda s: hashlib.sha256(s.encode("utf-8", "surrogateescape"))
                          .hexdigest(), "string"),
    "sprig_sha1sum": _s(lambda s: hashlib.sha1(s.encode("utf-8", "surrogateescape"),
                                               usedforsecurity=False).hexdigest(), "string"),
    "sprig_atoi": _s(_atoi, "string"),
    "sprig_list": _s(lambda *a: [None if x is NO_VALUE else x for x in a], variadic="any"),
    "sprig_dict": _s(_dict, variadic="any"),
    "sprig_hasKey": _s(lambda d, k: k in d, "map", "string"),
    "sprig_first": _s(_first, "any"),
    "sprig_last": _s(_last, "any"),
    "sprig_sortAlpha": _s(_sort_alpha, "any"),
}
