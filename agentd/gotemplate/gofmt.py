"""Go's ``fmt`` printing (Sprint, Sprintln, Sprintf) for template values.

Follows ``fmt/print.go`` and ``fmt/format.go``: ``%v`` of maps prints ``map[k:v ...]`` with
sorted keys, slices ``[a b]``, nil ``<nil>``, floats in strconv's shortest ``%g`` form; a verb
that does not fit its operand prints ``%!d(string=x)``, a missing operand ``%!d(MISSING)``,
extra operands ``%!(EXTRA type=value)``. Flags ``+ - # 0`` and space, width, precision, ``*``
and ``[n]`` argument indexes are supported; ``%p`` and complex verbs are not (they print as a
bad verb).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from agentd.gotemplate.values import (
    NO_VALUE,
    GoChan,
    GoNil,
    GoStruct,
    Uint64,
    _shortest_digits,
    format_float_shortest,
    go_type,
)


@dataclass
class _Flags:
    plus: bool = False
    minus: bool = False
    sharp: bool = False
    space: bool = False
    zero: bool = False
    plus_v: bool = False  # %+v: field names in structs, no sign on numbers
    width: int | None = None
    prec: int | None = None


_PLAIN = _Flags()


def sprint(args: list[Any]) -> str:
    out: list[str] = []
    prev_string = False
    for i, arg in enumerate(args):
        is_string = isinstance(arg, str)
        if i > 0 and not is_string and not prev_string:
            out.append(" ")
        out.append(format_value(arg, "v", _PLAIN, 0))
        prev_string = is_string
    return "".join(out)


def sprintln(args: list[Any]) -> str:
    return " ".join(format_value(a, "v", _PLAIN, 0) for a in args) + "\n"


def _pad(s: str, f: _Flags, zero_ok: bool = False) -> str:
    if f.width is None or len(s) >= f.width:
        return s
    fill = f.width - len(s)
    if f.minus:
        return s + " " * fill
    if f.zero and zero_ok:
        sign = s[:1] if s[:1] in "+- " else ""
        return sign + "0" * fill + s[len(sign):]
    if f.zero:
        return "0" * fill + s
    return " " * fill + s


def _bad_verb(v: Any, verb: str, f: _Flags) -> str:
    if v is None or v is NO_VALUE:
        return f"%!{verb}(<nil>)"
    return f"%!{verb}({go_type(v)}={format_value(v, 'v', f, 0)})"


def go_syntax(v: Any, depth: int = 0) -> str:
    """%#v: a Go-syntax representation."""
    if v is None or v is NO_VALUE:
        return "interface {}(nil)" if depth > 0 else "<nil>"
    if isinstance(v, GoNil):
        return f"({v.type_name})(nil)"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Uint64):
        return f"0x{int(v):x}"
    if isinstance(v, int):
        return str(int(v))
    if isinstance(v, float):
        return format_float_shortest(v, "g")
    if isinstance(v, str):
        return go_quote_string(v)
    if isinstance(v, list):
        return go_type(v) + "{" + ", ".join(go_syntax(x, depth + 1) for x in v) + "}"
    if isinstance(v, dict):
        return go_type(v) + "{" + ", ".join(
            go_quote_string(k) + ":" + go_syntax(v[k], depth + 1) for k in sorted(v)) + "}"
    if isinstance(v, GoStruct):
        name = v.type_name.lstrip("*")
        body = name + "{" + ", ".join(
            f"{k}:{go_syntax(x, depth + 1)}" for k, x in v.fields.items()) + "}"
        if v.pointer:
            return ("&" + body) if depth == 0 else f"(*{name})(0xc000000000)"
        return body
    return format_value(v, "v", _PLAIN, depth)


def format_value(v: Any, verb: str, f: _Flags, depth: int) -> str:
    if verb == "T":
        return _pad(go_type(v), f)
    if verb == "v" and f.sharp:
        return _pad(go_syntax(v, depth), f)
    if v is None or v is NO_VALUE or isinstance(v, GoNil):
        if verb == "v" or depth > 0 or isinstance(v, GoNil):
            return _pad("<nil>", f)
        return _bad_verb(v, verb, f)
    if isinstance(v, bool):
        if verb in "tv":
            return _pad("true" if v else "false", f)
        return _bad_verb(v, verb, f)
    if isinstance(v, int):
        return _fmt_int(v, verb, f)
    if isinstance(v, float):
        return _fmt_float(v, verb, f)
    if isinstance(v, str):
        return _fmt_str(v, verb, f)
    if isinstance(v, list):
        return "[" + " ".join(format_value(x, verb, f, depth + 1) for x in v) + "]"
    if isinstance(v, dict):
        parts = [
            format_value(k, verb, f, depth + 1) + ":" + format_value(v[k], verb, f, depth + 1)
            for k in sorted(v)
        ]
        return "map[" + " ".join(parts) + "]"
    if isinstance(v, GoStruct):
        parts = []
        for name, fv in v.fields.items():
            text = format_value(fv, verb, f, depth + 1)
            parts.append(f"{name}:{text}" if f.plus_v and verb == "v" else text)
        body = "{" + " ".join(parts) + "}"
        return ("&" + body) if v.pointer and depth == 0 else body
    if isinstance(v, complex):
        return _bad_verb(v, verb, f) if verb != "v" else f"({v.real:g}{v.imag:+g}i)"
    if isinstance(v, GoChan):  # Go prints the channel's address: any will do
        return _pad("0xc000100000", f) if verb in "vp" else _bad_verb(v, verb, f)
    return _bad_verb(v, verb, f)


def _fmt_int(v: int, verb: str, f: _Flags) -> str:
    if verb == "c":
        return _pad(_chr(v), f)
    if verb == "q":
        return _pad("'" + _quote_rune_body(_chr(v), ascii_only=f.plus) + "'", f)
    if verb == "U":
        s = f"U+{v:04X}"
        if f.sharp and 0 <= v <= 0x10FFFF and chr(v).isprintable():
            s += " '" + chr(v) + "'"
        return _pad(s, f)
    bases = {"d": 10, "v": 10, "b": 2, "o": 8, "O": 8, "x": 16, "X": 16}
    if verb not in bases:
        return _bad_verb(v, verb, f)
    base = bases[verb]
    digits = format(abs(v), {10: "d", 2: "b", 8: "o", 16: "x" if verb != "X" else "X"}[base])
    if f.prec is not None:
        if f.prec == 0 and v == 0:
            digits = ""
        digits = digits.rjust(f.prec, "0")
    prefix = ""
    if verb == "O":
        prefix = "0o"
    elif f.sharp:
        prefix = {2: "0b", 8: "0", 16: "0x" if verb == "x" else "0X"}.get(base, "")
        if base == 8 and digits.startswith("0"):
            prefix = ""
    sign = "-" if v < 0 else ("+" if f.plus else (" " if f.space else ""))
    body = prefix + digits
    if f.zero and not f.minus and f.prec is None and f.width is not None:
        fill = f.width - len(sign) - len(body)
        if fill > 0:
            body = prefix + "0" * fill + digits
    return _pad(sign + body, f)


def _chr(v: int) -> str:
    if 0 <= v <= 0x10FFFF and not 0xD800 <= v < 0xE000:
        return chr(v)
    return "\ufffd"


def _fmt_float(v: float, verb: str, f: _Flags) -> str:
    if verb not in "vbeEfFgGxX":
        return _bad_verb(v, verb, f)
    if math.isinf(v) or math.isnan(v):
        # fmt always signs infinities; a NaN only with '+' or ' '; never zero padding
        if math.isnan(v):
            s = "+NaN" if f.plus else (" NaN" if f.space else "NaN")
        else:
            s = "-Inf" if v < 0 else (" Inf" if f.space and not f.plus else "+Inf")
        return _pad(s, replace(f, zero=False))
    if verb == "b":
        m, e = math.frexp(abs(v))
        mant = int(m * (1 << 53))
        s = ("-" if v < 0 else "") + f"{mant}p{e - 53:+d}"
    elif verb in "xX":
        s = _hex_float(v, f.prec)
        if verb == "X":
            s = s.upper()
    elif verb == "v" or (verb in "gG" and f.prec is None):
        s = format_float_shortest(v, "g") if f.prec is None else _py_g(v, f.prec, f.sharp)
        if verb == "G":
            s = s.upper()
    elif verb in "gG":
        s = _py_g(v, f.prec or 0, f.sharp)
        if verb == "G":
            s = s.upper()
    else:
        prec = 6 if f.prec is None else f.prec
        py = {"e": "e", "E": "E", "f": "f", "F": "f"}[verb]
        s = format(v, f"{'#' if f.sharp else ''}.{prec}{py}")
    if not s.startswith("-"):
        if f.plus:
            s = "+" + s
        elif f.space:
            s = " " + s
    if f.zero and not f.minus:
        return _pad(s, f, zero_ok=True)
    return _pad(s, f)


def _py_g(v: float, prec: int, sharp: bool) -> str:
    if prec == 0:
        prec = 1
    s = format(v, f"{'#' if sharp else ''}.{prec}g")
    return s


def _hex_float(v: float, prec: int | None) -> str:
    if v == 0:
        return ("-" if math.copysign(1, v) < 0 else "") + "0x0p+00"
    h = float.hex(v)  # [-]0x1.hhhhp+e
    sign = "-" if h.startswith("-") else ""
    h = h.lstrip("-")[2:]
    mant, _, exp = h.partition("p")
    ip, _, fp = mant.partition(".")
    fp = fp.rstrip("0")
    if prec is not None:
        fp = (fp + "0" * prec)[:prec]
    e = int(exp)
    return f"{sign}0x{ip}{'.' + fp if fp else ''}p{'+' if e >= 0 else '-'}{abs(e):02d}"


def _fmt_str(v: str, verb: str, f: _Flags) -> str:
    if verb in "vs":
        s = v if f.prec is None else v[:f.prec]
        return _pad(s, f)
    if verb in "xX":
        data = v.encode("utf-8", "surrogatepass")
        if f.prec is not None:
            data = data[:f.prec]
        prefix = "0x" if verb == "x" else "0X"
        parts = [f"{b:02x}" if verb == "x" else f"{b:02X}" for b in data]
        if f.space and f.sharp:
            parts = [prefix + h for h in parts]
        s = " ".join(parts) if f.space else "".join(parts)
        if f.sharp and not f.space and data:
            s = prefix + s
        return _pad(s, f)
    if verb == "q":
        s = v if f.prec is None else v[:f.prec]
        if f.sharp and "`" not in s and all(c == "\t" or (c.isprintable() and c != "\ufeff")
                                             for c in s):
            return _pad("`" + s + "`", f)
        return _pad(go_quote_string(s, ascii_only=f.plus), f)
    return _bad_verb(v, verb, f)


def go_quote_string(s: str, *, ascii_only: bool = False) -> str:
    """strconv.Quote / QuoteToASCII."""
    return '"' + "".join(_quote_char(c, '"', ascii_only) for c in s) + '"'


def _quote_rune_body(c: str, *, ascii_only: bool) -> str:
    return _quote_char(c, "'", ascii_only)


_SIMPLE_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                   "\t": "\\t", "\v": "\\v", "\\": "\\\\"}


def _quote_char(c: str, quote: str, ascii_only: bool) -> str:
    if c == quote:
        return "\\" + c
    if c in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[c]
    o = ord(c)
    if 0xD800 <= o < 0xE000:
        return "\\ufffd"
    if o < 0x80:
        if c.isprintable():
            return c
        return f"\\x{o:02x}"
    if not ascii_only and _go_printable(c):
        return c
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def _go_printable(c: str) -> bool:
    # Go's unicode.IsPrint: letters, marks, numbers, punctuation, symbols and U+0020; Python's
    # isprintable() also excludes other spaces (Zs), which Go excludes too.
    return c.isprintable()


def _parse_num(fmt: str, i: int) -> tuple[int | None, int]:
    start = i
    while i < len(fmt) and fmt[i].isdigit():
        i += 1
        if i - start > 6:
            break
    if i == start:
        return None, i
    return int(fmt[start:i]), i


def _arg_index(fmt: str, i: int, argn: int, nargs: int) -> tuple[int, int, bool]:
    """Parse "[n]" at fmt[i]; return (argument number, position after, ok) like fmt's argNumber."""
    close = fmt.find("]", i)
    if close < 0:
        return argn, len(fmt), False
    idx = fmt[i + 1:close]
    if not idx.isdigit() or not 1 <= int(idx) <= nargs:
        return argn, close + 1, False
    return int(idx) - 1, close + 1, True


def sprintf(fmt: str, args: list[Any]) -> str:
    out: list[str] = []
    argn = 0
    reordered = False
    i = 0
    n = len(fmt)
    while i < n:
        j = fmt.find("%", i)
        if j < 0:
            out.append(fmt[i:])
            break
        out.append(fmt[i:j])
        i = j + 1
        f = _Flags()
        while i < n and fmt[i] in "+-# 0":
            c = fmt[i]
            if c == "+":
                f.plus = True
            elif c == "-":
                f.minus = True
                f.zero = False
            elif c == "#":
                f.sharp = True
            elif c == " ":
                f.space = True
            elif c == "0":
                f.zero = not f.minus
            i += 1
        bad_index = False
        # argument index
        if i < n and fmt[i] == "[":
            argn, i, ok = _arg_index(fmt, i, argn, len(args))
            reordered = True
            bad_index = not ok
        if i < n and fmt[i] == "*":
            i += 1
            if argn < len(args) and isinstance(args[argn], int) and \
                    not isinstance(args[argn], bool):
                w = int(args[argn])
                if w < 0:
                    f.minus = True
                    f.zero = False
                    w = -w
                f.width = w if w <= 10**6 else None
                if w > 10**6:
                    out.append("%!(BADWIDTH)")
            else:
                out.append("%!(BADWIDTH)")
            argn += 1
        else:
            f.width, i = _parse_num(fmt, i)
            if f.width is not None and f.width > 10**6:
                f.width = None
        if i < n and fmt[i] == ".":
            i += 1
            if i < n and fmt[i] == "*":
                i += 1
                if argn < len(args) and isinstance(args[argn], int) and \
                        not isinstance(args[argn], bool) and 0 <= args[argn] <= 10**6:
                    f.prec = int(args[argn])
                else:
                    out.append("%!(BADPREC)")
                argn += 1
            else:
                f.prec, i = _parse_num(fmt, i)
                if f.prec is None:
                    f.prec = 0
        if i < n and fmt[i] == "[":
            argn, i, ok = _arg_index(fmt, i, argn, len(args))
            reordered = True
            bad_index = bad_index or not ok
        if i >= n:
            out.append("%!(NOVERB)")
            break
        verb = fmt[i]
        i += 1
        if verb == "%":
            out.append("%")
            continue
        if bad_index:
            out.append(f"%!{verb}(BADINDEX)")
            continue
        if argn >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        arg = args[argn]
        argn += 1
        if verb == "w":
            out.append(_bad_verb(arg, verb, f))
            continue
        if verb == "v" and f.plus:
            f.plus, f.plus_v = False, True
        out.append(format_value(arg, verb, f, 0))
    if not reordered and argn < len(args):
        extra = []
        for arg in args[argn:]:
            if arg is None or arg is NO_VALUE:
                extra.append("<nil>")
            else:
                extra.append(go_type(arg) + "=" + format_value(arg, "v", _PLAIN, 0))
        out.append("%!(EXTRA " + ", ".join(extra) + ")")
    return "".join(out)


__all__ = ["_shortest_digits", "format_value", "go_quote_string", "sprint", "sprintf", "sprintln"]
