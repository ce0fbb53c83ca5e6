"""Converters from a raw TOML value to a typed one, or ``Invalid`` saying what was expected.

Each converter is ``object -> value``; the ones that take bounds or options (``integer``,
``duration``, ``choice``) return a converter. Messages are part of the interface: tests and
operators read them as written. ``parse_duration`` is public (``agentd exec`` uses it too).
"""

from __future__ import annotations

import grp
import pwd
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agentd.config.schema import UNIT_SUFFIXES

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?")
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 10**3, "KiB": 2**10, "MB": 10**6, "MiB": 2**20, "GB": 10**9,
    "GiB": 2**30,
}
_MODE = re.compile(r"[0-7]{3,4}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


Converters = Mapping[str, Callable[[object], Any]]   # a table's key names -> their converters


class Invalid(Exception):
    """A value is wrong; the message says what was expected."""


def string(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid("expected a string")
    return value


def nonempty(value: object) -> str:
    text = string(value)
    if not text:
        raise Invalid("must not be empty")
    return text


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise Invalid("expected a boolean (true or false)")
    return value


def abs_path(value: object) -> Path:
    text = string(value)
    if not text.startswith("/"):
        raise Invalid(f"expected an absolute path, not {text!r}")
    return Path(text)


def integer(minimum: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid("expected an integer")
        if value < minimum:
            raise Invalid(f"must be at least {minimum}")
        return value

    return convert


def parse_duration(value: object) -> float:
    """``"90s"``, ``"5m"``, ``"1h30m"``, ``"500ms"``, ``"2d"`` -> seconds. Bare numbers are refused.

    Raises:
        ValueError: the value is not a duration string.
    """
    if isinstance(value, str):
        pos, total = 0, 0.0
        for match in _DURATION_PART.finditer(value):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        else:
            if value and pos == len(value):
                return total
        raise ValueError(f'invalid duration {value!r}: expected a duration like "30s"')
    raise ValueError('expected a duration like "30s"')


def duration(minimum: float = 0.0, *, strict: bool = False) -> Callable[[object], float]:
    def convert(value: object) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if seconds < minimum or (strict and seconds <= minimum):
            bound = "greater than" if strict else "at least"
            raise Invalid(f"must be {bound} {show_seconds(minimum)}")
        return seconds

    return convert


positive_duration = duration(0.0, strict=True)


def show_seconds(seconds: float) -> str:
    return f"{seconds:g}s"


def mode(value: object) -> int:
    if not isinstance(value, str):
        raise Invalid('expected a mode like "0640"')
    if not _MODE.fullmatch(value):
        raise Invalid(f'invalid mode {value!r}: expected a mode like "0640"')
    return int(value, 8)


def size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        count = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise Invalid('expected a size in bytes, or a string like "100MiB"')
    if count < 1:
        raise Invalid("must be at least 1 byte")
    return count


def _nonempty_list(value: object, item: Callable[[object], bool], items: str) -> tuple[Any, ...]:
    """``value`` as a tuple if it is a non-empty list whose every element passes ``item``."""
    if not isinstance(value, list) or not all(item(v) for v in value):
        raise Invalid(f"expected a list of {items}")
    if not value:
        raise Invalid("must not be empty")
    return tuple(value)


def string_list(value: object) -> tuple[str, ...]:
    return _nonempty_list(value, lambda v: isinstance(v, str), "strings")


def id_list(value: object) -> tuple[int, ...]:
    return _nonempty_list(
        value, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "non-negative integers",
    )


def existing_uid(name: str) -> int:
    """The uid of the user called ``name``."""
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise Invalid(f"no such user {name!r}") from None


def existing_gid(name: str) -> int:
    """The gid of the group called ``name``."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise Invalid(f"no such group {name!r}") from None


def _account_id(value: object, lookup: Callable[[str], int], kind: str, number: str) -> int:
    """A user or group name (resolved with ``lookup``) or a number, as chown(1) takes them."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value:
        try:
            return lookup(value)
        except Invalid:
            if value.isdigit():             # "1000": a number written as a string
                return int(value)
            raise
    raise Invalid(f"expected a {kind} name or a {number}")


def uid(value: object) -> int:
    return _account_id(value, existing_uid, "user", "uid")


def gid(value: object) -> int:
    return _account_id(value, existing_gid, "group", "gid")


def user_name(value: object) -> str:
    name = nonempty(value)
    existing_uid(name)
    return name


def choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        text = string(value)
        if text not in options:
            listed = ", ".join(repr(o) for o in options)
            raise Invalid(f"unknown value {text!r}: expected one of {listed}")
        return text

    return convert


def switch(options: tuple[str, ...]) -> Callable[[object], str]:
    """``choice(options)`` that also takes ``true`` (for "on") and ``false`` (for "off")."""
    named = choice(options)

    def convert(value: object) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return named(value)

    return convert


def url_list(value: object) -> tuple[str, ...]:
    urls = string_list(value)
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise Invalid(f"{url!r} is not an http:// or https:// URL")
    return urls


def argv(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        raise Invalid("expected an argv list, not a shell string")
    words = string_list(value)
    if not words[0]:
        raise Invalid("the program (first element) must not be empty")
    return words


def secret_path(value: object) -> str:
    text = nonempty(value)
    if text.startswith("/"):
        raise Invalid(f"{text!r} must not start with '/' (leave out /v1/ too)")
    if ".." in text.split("/"):
        raise Invalid(f"{text!r} must not contain '..'")
    return text


def listen(value: object) -> tuple[str, int]:
    text = string(value)
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Invalid('expected "HOST:PORT", e.g. "127.0.0.1:9464"')
    return host, int(port)


def host_id(value: object) -> str:
    """A host identity (``[agent] host_id``): printable ASCII without spaces, at most 128."""
    text = nonempty(value)
    if len(text) > 128 or not all("!" <= c <= "~" for c in text):
        raise Invalid("must be 1 to 128 printable ASCII characters without spaces")
    return text


def credential_name(value: object) -> str:
    text = nonempty(value)
    if "/" in text:
        raise Invalid(f"{text!r} must be a plain credential name (no '/')")
    return text


def audit_path(value: object) -> str | None:
    if value is False or value == "off":
        return None
    if value == "journal":
        return "journal"
    if isinstance(value, str) and value.startswith("/"):
        return value
    raise Invalid('expected an absolute path, "journal", or "off"')


def fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid("expected a number between 0 and 1, like 0.66")
    if not 0.0 < float(value) < 1.0:
        raise Invalid("must be greater than 0 and less than 1")
    return float(value)


def params(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise Invalid('expected a table like { common_name = "web.internal", ttl = "24h" }')
    return dict(value)


# -- one element of a list, already known to be a string -----------------------------------------


def exe_path(path: str) -> str:
    if not path.startswith("/"):
        raise Invalid(f"{path!r} is not an absolute path")
    return path


def sha256(digest: str) -> str:
    """A sha256 in hexadecimal, lowercased."""
    if not _SHA256.fullmatch(digest):
        raise Invalid(f"{digest[:80]!r} is not a sha256 (64 hexadecimal digits)")
    return digest.lower()


def unit_name(unit: str) -> str:
    if "/" in unit or not unit.endswith(UNIT_SUFFIXES) or unit in UNIT_SUFFIXES:
        raise Invalid(f"{unit!r} is not a systemd unit name (expected a suffix like .service)")
    return unit
