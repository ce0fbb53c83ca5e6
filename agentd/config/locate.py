"""Where a key stands in a TOML text, and how a key path is written in a message.

tomllib does not keep line numbers, so problems are placed by ``Locator``, a small scan of the raw
text that follows table headers, ``[[array]]`` occurrences and ``key =`` lines. ``format_key``
writes a key path the way messages show it: ``policy[0].uids``, ``secrets."odd.name"``.
"""

from __future__ import annotations

import contextlib
import json
import re

KeyPath = tuple[str | int, ...]   # ("policy", 0, "uids"): table names, array indexes, key names

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED_KEY = re.compile(rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*")


def _split_key(raw: str) -> list[str]:
    """``a."b.c".d`` -> ``["a", "b.c", "d"]`` (TOML dotted key syntax)."""
    parts: list[str] = []
    pos = 0
    raw = raw.strip()
    while pos < len(raw):
        while pos < len(raw) and raw[pos] in " \t.":
            pos += 1
        if pos >= len(raw):
            break
        quote = raw[pos]
        if quote in "\"'":
            end = pos + 1
            while end < len(raw) and raw[end] != quote:
                end += 2 if quote == '"' and raw[end] == "\\" else 1
            body = raw[pos + 1 : end]
            if quote == '"':
                with contextlib.suppress(ValueError):
                    body = json.loads(f'"{body}"')
            parts.append(body)
            pos = end + 1
        else:
            match = _BARE_KEY.match(raw, pos)
            if match is None:
                break
            parts.append(match.group(0))
            pos = match.end()
    return parts


class Locator:
    """Where each key (or table header) first appears in a TOML text, by key path.

    Not a parser: it follows table headers, ``[[array]]`` occurrences and ``key =`` lines, and
    skips the inside of multi-line strings. Good enough to point a human at the right line.
    """

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        counts: dict[KeyPath, int] = {}
        table: KeyPath = ()
        in_string: str | None = None
        for lineno, raw in enumerate(text.splitlines(), start=1):
            if in_string is not None:
                if in_string in raw:
                    in_string = None
                continue
            line = raw.strip()
            if line.startswith("[["):
                end = line.find("]]")
                parent: KeyPath = tuple(_split_key(line[2:end]))
                index = counts.get(parent, 0)
                counts[parent] = index + 1
                table = (*parent, index)
                self._add(table, lineno)
            elif line.startswith("["):
                end = line.find("]")
                table = tuple(_split_key(line[1:end]))
                self._add(table, lineno)
            else:
                match = _DOTTED_KEY.match(line)
                if match is None or not line[match.end() :].lstrip().startswith("="):
                    continue
                self._add((*table, *_split_key(match.group(0))), lineno)
                rest = line[match.end() :]
                for quote in ('"""', "'''"):
                    if rest.count(quote) == 1:
                        in_string = quote

    def _add(self, path: KeyPath, lineno: int) -> None:
        for i in range(1, len(path) + 1):
            self._lines.setdefault(path[:i], lineno)

    def line(self, path: KeyPath) -> int:
        """The line of ``path``, else of its nearest located parent, else 0."""
        for i in range(len(path), 0, -1):
            if path[:i] in self._lines:
                return self._lines[path[:i]]
        return 0


def format_key(path: KeyPath) -> str:
    """``("policy", 0, "uids")`` -> ``policy[0].uids``; odd names are quoted."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
            out += f".{text}" if out else text
    return out
