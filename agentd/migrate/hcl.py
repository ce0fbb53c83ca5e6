"""HCL -> blocks and attributes that keep their line (python-hcl2; nothing is evaluated).

HCL dialect: the OpenBao and Vault agents read HCL 1, python-hcl2 parses HCL 2. The two agree on
what agent configs use (blocks, ``key = value``, ``config = { ... }``, lists, heredocs, ``#`` and
``//`` comments). Strings are taken as HCL 1 does: ``${...}`` stays literal text, and a heredoc
keeps the newline before its closing marker (decoded here from the raw heredoc, since python-hcl2
drops it). An octal ``perms = 0640`` written as a number is read as octal, as HCL 1 does
(``translate``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

_HEREDOC = re.compile(r"\A<<(-?)([A-Za-z_][A-Za-z0-9_.-]*)\r?\n(.*?)\Z", re.S)


@dataclass
class Block:
    """One HCL block (or the file's body, or an object assigned to an attribute)."""

    type: str
    labels: tuple[str, ...]
    line: int
    attrs: dict[str, tuple[Any, int]] = field(default_factory=dict)
    blocks: list[Block] = field(default_factory=list)

    def get(self, name: str, default: Any = None) -> Any:
        return self.attrs[name][0] if name in self.attrs else default

    def line_of(self, name: str) -> int:
        return self.attrs[name][1] if name in self.attrs else self.line

    def children(self, name: str) -> list[Block]:
        """Blocks ``name { }`` and objects ``name = { }`` (HCL 1 treats them alike)."""
        found = [b for b in self.blocks if b.type == name]
        if name in self.attrs and isinstance(self.attrs[name][0], dict):
            value, line = self.attrs[name]
            found.append(_object_block(name, (), value, line))
        return found

    def entries(self) -> Iterator[tuple[str, int]]:
        for name, (_, line) in self.attrs.items():
            yield name, line
        for block in self.blocks:
            yield block.type, block.line


def _object_block(name: str, labels: tuple[str, ...], value: dict[str, Any], line: int) -> Block:
    block = Block(name, labels, line)
    for key, item in value.items():
        block.attrs[str(key)] = (item, line)
    return block


def _decode_heredoc(text: str) -> str:
    """An HCL 1 heredoc's value: the lines between the markers, each with its newline."""
    match = _HEREDOC.match(text)
    if match is None:
        return text
    trim, marker, rest = match.group(1), match.group(2), match.group(3)
    if not rest.endswith(marker):
        return text
    body = rest[: -len(marker)]               # ends with the newline before the closing marker
    if not trim:
        return body
    # <<-: HCL 1 removes the closing marker's indentation from every line, if each has it.
    lines = body.split("\n")
    indent = lines[-1]
    if lines[-1].strip(" \t") or not all(line.startswith(indent) for line in lines[:-1]):
        return body[: len(body) - len(indent)] if not indent.strip(" \t") else body
    return "\n".join(line[len(indent):] for line in lines[:-1]) + "\n"


def _plain(value: Any) -> Any:
    if isinstance(value, str):
        return _unescape(_decode_heredoc(value) if value.startswith("<<") else value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k).strip('"'): _plain(v) for k, v in value.items()
                if not str(k).startswith("__")}
    return value


def _escape_templates(text: str) -> str:
    """Escape HCL 2's ``${`` and ``%{`` inside strings and heredocs (``$${``, ``%%{``).

    HCL 1 has no string templates: ``"${HOME:-/}"`` or ``%{`` are plain text to the OpenBao
    Agent, but python-hcl2 would parse them as HCL 2 interpolations or directives (and refuse
    many). python-hcl2 keeps ``$${`` and ``%%{`` as written; ``_unescape`` undoes this. Newlines
    are untouched, so lines stay where they were.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "#" or text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(text[i:end])
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(text[i:end])
            i = end
        elif ch == '"':
            j = i + 1
            while j < n and text[j] not in '"\n':
                j += 2 if text[j] == "\\" else 1
            out.append('"' + _escape_part(text[i + 1:j]))
            i = j
            if i < n and text[i] == '"':
                out.append('"')
                i += 1
        elif (match := re.compile(r"<<-?([A-Za-z_][A-Za-z0-9_.-]*)\r?\n").match(text, i)):
            marker = match.group(1)
            close = re.compile(rf"^[ \t]*{re.escape(marker)}[ \t]*$", re.M).search(
                text, match.end())
            stop = close.start() if close else n
            out.append(match.group() + _escape_part(text[match.end():stop]))
            i = stop
            if close is not None:
                out.append(close.group())
                i = close.end()
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _escape_part(text: str) -> str:
    return text.replace("${", "$${").replace("%{", "%%{")


def _unescape(text: str) -> str:
    return text.replace("$${", "${").replace("%%{", "%{")


def parse_hcl(text: str) -> Block:
    """Parse HCL text into Blocks. Raises ``HclError`` with the line of a syntax error."""
    import hcl2
    import lark
    from hcl2.rules.base import AttributeRule, BlockRule, BodyRule
    from hcl2.utils import SerializationOptions

    options = SerializationOptions(with_comments=False, strip_string_quotes=True,
                                   preserve_heredocs=True, explicit_blocks=False)
    try:
        start = hcl2.parses(_escape_templates(text.removeprefix("\ufeff")),
                            discard_comments=True)
    except lark.exceptions.UnexpectedInput as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HclError(max(int(getattr(exc, "line", 0) or 0), 0), first) from None
    except (lark.exceptions.LarkError, RuntimeError, ValueError) as exc:
        raise HclError(0, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None

    def line_of(rule: Any) -> int:
        meta = getattr(rule, "_meta", None)
        return int(getattr(meta, "line", 0) or 0)

    def body(rule: BodyRule, block: Block) -> Block:
        for child in rule.children:
            if isinstance(child, AttributeRule):
                name = str(child.identifier.serialize(options))
                try:
                    value = _plain(child.expression.serialize(options))
                except (RuntimeError, ValueError) as exc:
                    raise HclError(line_of(child), f"{name}: {exc}") from None
                block.attrs[name] = (value, line_of(child))
            elif isinstance(child, BlockRule):
                labels = [str(label.serialize(options)).strip('"') for label in child.labels]
                sub = Block(labels[0], tuple(labels[1:]), line_of(child))
                block.blocks.append(body(child.body, sub))
        return block

    return body(start.body, Block("", (), 1))


class HclError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message
