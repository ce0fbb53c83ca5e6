"""One config file being read: its parsed tables, where its keys stand, the problems found in it.

``parse`` reads and parses a file (the only use of tomllib). ``SourceFile`` is what the builder
reports through: ``problem`` formats ``file:line: key.path: message`` with the line found by the
locator, and ``get``, ``get_all``, ``convert`` and ``each`` run converters and record each
``Invalid`` as a problem instead of stopping, so that every problem is reported at once.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agentd.config.convert import Converters, Invalid
from agentd.config.locate import KeyPath, Locator, format_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

T = TypeVar("T")
V = TypeVar("V")
_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")


@dataclass
class Problem:
    order: int                               # the file's position in reading order
    line: int
    text: str                                # "file:line: key.path: message"

    @classmethod
    def at(cls, path: Path, order: int, line: int, message: str) -> Problem:
        return cls(order, line, f"{path}:{line}: {message}")


def sorted_texts(problems: list[Problem]) -> list[str]:
    """The problems' texts by file (in reading order), then line; stable within a line."""
    return [p.text for p in sorted(problems, key=lambda p: (p.order, p.line))]


def parse(
    file: Path, order: int, problems: list[Problem]
) -> tuple[SourceFile, dict[str, object]] | None:
    """Read and parse ``file``; None (and a problem) if it cannot be read or is not TOML."""
    try:
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        problems.append(Problem.at(file, order, 0, "(file): no such file"))
        return None
    except OSError as exc:
        problems.append(Problem.at(file, order, 0, f"(file): cannot read: {exc.strerror}"))
        return None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        problems.append(Problem.at(file, order, line, "(file): not valid UTF-8"))
        return None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_LINE.search(message)
        line = int(match.group(1)) if match else 0
        problems.append(Problem.at(file, order, line, f"TOML syntax error: {message}"))
        return None
    return SourceFile(file, order, text, problems), data


class SourceFile:
    """One config file being validated: where its problems go and how lines are found."""

    def __init__(self, path: Path, order: int, text: str, sink: list[Problem]) -> None:
        self.path = path
        self.order = order
        self._locator = Locator(text)
        self._sink = sink

    def line(self, key: KeyPath) -> int:
        return self._locator.line(key)

    def where(self, key: KeyPath) -> str:
        return f"{self.path}:{self.line(key)}"

    def problem(
        self, key: KeyPath, message: str, *, line: int | None = None, label: str | None = None
    ) -> None:
        line = self.line(key) if line is None else line
        label = label or (format_key(key) if key else "(file)")
        self._sink.append(Problem.at(self.path, self.order, line, f"{label}: {message}"))

    def table(self, value: object, key: KeyPath, allowed: tuple[str, ...]) -> dict[str, object]:
        """``value`` as a table whose keys are all in ``allowed`` (unknown ones are reported)."""
        if not isinstance(value, dict):
            self.problem(key, "expected a table")
            return {}
        for name in value:
            if name not in allowed:
                self.problem((*key, name), "unknown key")
        return value

    def get(
        self,
        table: Mapping[str, object],
        key: KeyPath,
        name: str,
        convert: Callable[[object], T],
        default: T,
        *,
        required: bool = False,
    ) -> T:
        """Convert ``table[name]``, or report why it cannot be and return ``default``."""
        if name not in table:
            if required:
                self.problem((*key, name), "required")
            return default
        return self.convert((*key, name), table[name], convert, default)

    def get_all(
        self,
        table: Mapping[str, object],
        key: KeyPath,
        converters: Converters,
        defaults: object,
        *,
        required: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """``get`` for each name in ``converters``, in order; defaults are ``defaults``' attributes.

        ``defaults`` is an instance, or the class itself when the fields read have plain
        defaults (not ``default_factory``) and it has required fields.
        """
        return {
            name: self.get(
                table, key, name, convert, getattr(defaults, name), required=name in required
            )
            for name, convert in converters.items()
        }

    def convert(self, key: KeyPath, value: V, convert: Callable[[V], T], default: T) -> T:
        """``convert(value)``, or report its ``Invalid`` at ``key`` and return ``default``."""
        try:
            return convert(value)
        except Invalid as exc:
            self.problem(key, str(exc))
            return default

    def each(self, key: KeyPath, values: Iterable[V], convert: Callable[[V], T]) -> list[T]:
        """``convert`` each of ``values``; each one that is ``Invalid`` is reported at ``key``."""
        converted: list[T] = []
        for value in values:
            try:
                converted.append(convert(value))
            except Invalid as exc:
                self.problem(key, str(exc))
        return converted
