"""TOML written by hand (agentd has no TOML writer): values, keys, template texts, comments.

The caller reads what it wrote back with tomllib (``migrate``'s round trip check)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping
from typing import Any


def toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_text(text: str) -> str:
    """A template's text: a multi-line literal string when that keeps it exactly, else basic."""
    if "\n" in text and "'''" not in text and not text.endswith("'") and \
            not any((ord(c) < 0x20 and c not in "\n\t") or ord(c) == 0x7F for c in text):
        return "'''\n" + text + "'''"
    return toml_string(text)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) \
            + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def comment(text: str, width: int = 98) -> list[str]:
    """``text`` as ``#`` comment lines of at most ``width`` characters."""
    return ["# " + line for line in textwrap.wrap(text, width - 2, break_long_words=False,
                                                  break_on_hyphens=False)] or ["#"]
