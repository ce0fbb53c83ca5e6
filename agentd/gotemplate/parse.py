"""Lexer and parser for Go's ``text/template`` syntax (Go's ``text/template/parse``).

Theory of operation: :func:`lex` turns the template text into items the way Go's ``lex.go`` does
(text, delimiters with their ``{{-``/``-}}`` trim markers, comments, and inside actions the
words, strings, numbers, punctuation); :class:`Parser` builds the same tree as Go's ``parse.go``
(list, text, action, if, with, range, template, break, continue; pipelines of commands of
operands) and checks what Go checks at parse time: functions must exist, variables must be
declared, ``break``/``continue`` only inside ``range``. Every error is a :class:`ParseError`
carrying the line; the message never holds template data beyond the offending token.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

MAX_DEPTH = 100  # nesting of parentheses and control blocks; deeper is an error, not a crash
SPACE_CHARS = " \t\r\n"


MAIN = ""  # the main template's name, as consul-template's template.New("")


class ParseError(Exception):
    """A syntax error at ``line`` (1-based)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


# --- lexer -----------------------------------------------------------------------------------

TEXT = "text"
LEFT = "left delim"
RIGHT = "right delim"
COMMENT = "comment"
SPACE = "space"
IDENT = "identifier"
FIELD = "field"
VARIABLE = "variable"
DOT = "."
STRING = "string"
RAWSTRING = "raw string"
CHARCONST = "character constant"
NUMBER = "number"
BOOL = "bool"
NIL = "nil"
PIPE = "|"
LPAREN = "("
RPAREN = ")"
DECLARE = ":="
ASSIGN = "="
CHAR = "char"
EOF = "EOF"
KEYWORDS = {"block", "break", "continue", "define", "else", "end", "if", "range", "template",
            "with"}


@dataclass(frozen=True)
class Item:
    typ: str
    val: str
    line: int

    def __str__(self) -> str:
        if self.typ == EOF:
            return "EOF"
        if self.typ == "keyword":
            return f"<{self.val}>"
        if len(self.val) > 10:
            return go_quote(self.val[:10]) + "..."
        return go_quote(self.val)


def go_quote(s: str) -> str:
    """strconv.Quote, enough for error messages."""
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


_NUMBER_RE = re.compile(
    r"[+-]?(?:0[xX][0-9a-fA-F_]*\.?[0-9a-fA-F_]*(?:[pP][+-]?[0-9_]+)?"
    r"|0[oObB][0-9a-fA-F_]*"
    r"|[0-9_]*\.?[0-9_]*(?:[eE][+-]?[0-9_]+)?)i?"
)


def _is_alnum(ch: str) -> bool:
    return ch == "_" or ch.isalnum()


def lex(text: str, left: str = "{{", right: str = "}}") -> list[Item]:
    """Split ``text`` into items; raise ParseError like Go's lexer does."""
    left = left or "{{"
    right = right or "}}"
    items: list[Item] = []
    pos = 0
    line = 1
    n = len(text)
    trim_next = False
    while True:
        start = text.find(left, pos)
        end = n if start < 0 else start
        chunk = text[pos:end]
        if trim_next:
            chunk = chunk.lstrip(SPACE_CHARS)
            trim_next = False
        after = start + len(left)
        left_trim = start >= 0 and text.startswith("-", after) and after + 1 < n and \
            text[after + 1] in SPACE_CHARS
        if left_trim:
            chunk = chunk.rstrip(SPACE_CHARS)
        if chunk:
            items.append(Item(TEXT, chunk, line))
        line += text.count("\n", pos, end)
        if start < 0:
            items.append(Item(EOF, "", line))
            return items
        pos = after + (2 if left_trim else 0)
        # comment?
        if text.startswith("/*", pos):
            close = text.find("*/", pos + 2)
            if close < 0:
                raise ParseError(line, "unclosed comment")
            body_end = close + 2
            comment_line = line
            line += text.count("\n", pos, body_end)
            rest = text[body_end:]
            if rest.startswith(" -" + right) or rest.startswith("\t-" + right) or \
                    rest.startswith("\r-" + right) or rest.startswith("\n-" + right):
                line += rest[0] == "\n"
                pos = body_end + 2 + len(right)
                trim_next = True
            elif rest.startswith(right):
                pos = body_end + len(right)
            else:
                raise ParseError(line, "comment ends before closing delimiter")
            items.append(Item(COMMENT, text[after:close + 2], comment_line))
            continue
        items.append(Item(LEFT, left, line))
        pos, line, trim_next = _lex_action(text, pos, line, right, items)


def _lex_action(text: str, pos: int, line: int, right: str,
                items: list[Item]) -> tuple[int, int, bool]:
    n = len(text)
    depth = 0
    while True:
        if text.startswith(right, pos) or (
            pos + 1 < n and text[pos] in SPACE_CHARS and text[pos + 1] == "-"
            and text.startswith(right, pos + 2)
        ):
            trim = not text.startswith(right, pos)
            if trim:
                line += text[pos] == "\n"
                pos += 2
            if depth:
                raise ParseError(line, "unclosed left paren")
            items.append(Item(RIGHT, right, line))
            return pos + len(right), line, trim
        if pos >= n:
            raise ParseError(line, "unclosed action")
        ch = text[pos]
        if ch in SPACE_CHARS:
            start = pos
            while pos < n and text[pos] in SPACE_CHARS:
                if text.startswith(right, pos) or (
                    pos + 1 < n and text[pos + 1] == "-" and text.startswith(right, pos + 2)
                ):
                    break
                pos += 1
            if pos > start:
                items.append(Item(SPACE, text[start:pos], line))
                line += text.count("\n", start, pos)
            continue
        if ch == "=":
            items.append(Item(ASSIGN, "=", line))
            pos += 1
        elif ch == ":":
            if not text.startswith(":=", pos):
                raise ParseError(line, "expected :=")
            items.append(Item(DECLARE, ":=", line))
            pos += 2
        elif ch == "|":
            items.append(Item(PIPE, "|", line))
            pos += 1
        elif ch == '"':
            end = pos + 1
            while True:
                if end >= n or text[end] == "\n":
                    raise ParseError(line, "unterminated quoted string")
                if text[end] == "\\":
                    end += 2
                    continue
                if text[end] == '"':
                    break
                end += 1
            items.append(Item(STRING, text[pos:end + 1], line))
            pos = end + 1
        elif ch == "`":
            end = text.find("`", pos + 1)
            if end < 0:
                raise ParseError(line, "unterminated raw quoted string")
            items.append(Item(RAWSTRING, text[pos:end + 1], line))
            line += text.count("\n", pos, end)
            pos = end + 1
        elif ch == "'":
            end = pos + 1
            while True:
                if end >= n or text[end] == "\n":
                    raise ParseError(line, "unterminated character constant")
                if text[end] == "\\":
                    end += 2
                    continue
                if text[end] == "'":
                    break
                end += 1
            items.append(Item(CHARCONST, text[pos:end + 1], line))
            pos = end + 1
        elif ch == "$":
            end = pos + 1
            while end < n and _is_alnum(text[end]):
                end += 1
            items.append(Item(VARIABLE, text[pos:end], line))
            pos = end
            _check_terminator(text, pos, right, line)
        elif ch == "." and not (pos + 1 < n and text[pos + 1].isdigit()):
            end = pos + 1
            while end < n and _is_alnum(text[end]):
                end += 1
            if end == pos + 1:
                items.append(Item(DOT, ".", line))
            else:
                items.append(Item(FIELD, text[pos:end], line))
                _check_terminator(text, end, right, line)
            pos = end
        elif ch in "+-." or ch.isdigit():
            m = _NUMBER_RE.match(text, pos)
            end = m.end() if m else pos
            if end == pos or (end < n and _is_alnum(text[end])):
                stop = end
                while stop < n and _is_alnum(text[stop]):
                    stop += 1
                bad = text[pos:max(stop, pos + 1)]
                raise ParseError(line, f"bad number syntax: {go_quote(bad)}")
            if end < n and text[end] in "+-":
                # complex: 1+2i, no spaces, must end in 'i'
                m2 = _NUMBER_RE.match(text, end + 1)
                end2 = m2.end() if m2 else end + 1
                if end2 == end + 1 or text[end2 - 1] != "i":
                    raise ParseError(line, f"bad number syntax: {go_quote(text[pos:end2])}")
                end = end2
            items.append(Item(NUMBER, text[pos:end], line))
            pos = end
        elif _is_alnum(ch):
            end = pos
            while end < n and _is_alnum(text[end]):
                end += 1
            word = text[pos:end]
            _check_terminator(text, end, right, line)
            if word in KEYWORDS:
                items.append(Item("keyword", word, line))
            elif word in ("true", "false"):
                items.append(Item(BOOL, word, line))
            elif word == "nil":
                items.append(Item(NIL, word, line))
            else:
                items.append(Item(IDENT, word, line))
            pos = end
        elif ch == "(":
            depth += 1
            items.append(Item(LPAREN, "(", line))
            pos += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ParseError(line, "unexpected right paren")
            items.append(Item(RPAREN, ")", line))
            pos += 1
        elif ord(ch) < 0x80 and ch.isprintable():
            items.append(Item(CHAR, ch, line))
            pos += 1
        else:
            raise ParseError(line, f"unrecognized character in action: {_go_rune(ch)}")


def _go_rune(ch: str) -> str:
    """fmt's %#U."""
    return f"U+{ord(ch):04X} '{ch}'" if ch.isprintable() else f"U+{ord(ch):04X}"


def _check_terminator(text: str, pos: int, right: str, line: int) -> None:
    if pos >= len(text):
        return
    ch = text[pos]
    if ch in SPACE_CHARS or ch in ".,|:)(=" or text.startswith(right, pos):
        return
    raise ParseError(line, f"bad character {_go_rune(ch)}")


# --- tree ------------------------------------------------------------------------------------


@dataclass
class TextNode:
    text: str
    line: int


@dataclass
class CommentNode:
    line: int


@dataclass
class DotNode:
    line: int

    def __str__(self) -> str:
        return "."


@dataclass
class NilNode:
    line: int

    def __str__(self) -> str:
        return "nil"


@dataclass
class BoolNode:
    value: bool
    line: int

    def __str__(self) -> str:
        return "true" if self.value else "false"


@dataclass
class StringNode:
    quoted: str
    text: str
    line: int

    def __str__(self) -> str:
        return self.quoted


@dataclass
class NumberNode:
    text: str
    line: int
    is_int: bool = False
    is_uint: bool = False
    is_float: bool = False
    is_complex: bool = False
    int_val: int = 0
    float_val: float = 0.0
    complex_val: complex = 0j

    def __str__(self) -> str:
        return self.text


@dataclass
class FieldNode:
    idents: list[str]
    line: int

    def __str__(self) -> str:
        return "".join("." + i for i in self.idents)


@dataclass
class VariableNode:
    idents: list[str]
    line: int

    def __str__(self) -> str:
        return ".".join(self.idents)


@dataclass
class IdentifierNode:
    name: str
    line: int

    def __str__(self) -> str:
        return self.name


@dataclass
class ChainNode:
    node: Node
    fields: list[str]
    line: int

    def __str__(self) -> str:
        inner = str(self.node)
        if isinstance(self.node, PipeNode):
            inner = "(" + inner + ")"
        return inner + "".join("." + f for f in self.fields)


@dataclass
class CommandNode:
    args: list[Node]
    line: int

    def __str__(self) -> str:
        parts = []
        for a in self.args:
            parts.append(f"({a})" if isinstance(a, PipeNode) else str(a))
        return " ".join(parts)


@dataclass
class PipeNode:
    line: int
    decl: list[VariableNode] = field(default_factory=list)
    is_assign: bool = False
    cmds: list[CommandNode] = field(default_factory=list)

    def __str__(self) -> str:
        s = ""
        if self.decl:
            s = ", ".join(str(d) for d in self.decl) + (" = " if self.is_assign else " := ")
        return s + " | ".join(str(c) for c in self.cmds)


@dataclass
class ActionNode:
    pipe: PipeNode
    line: int

    def __str__(self) -> str:
        return "{{" + str(self.pipe) + "}}"


@dataclass
class ListNode:
    nodes: list[Node] = field(default_factory=list)


@dataclass
class IfNode:
    kind: str  # "if" | "with"
    pipe: PipeNode
    body: ListNode
    else_body: ListNode | None
    line: int

    def __str__(self) -> str:
        return "{{" + self.kind + " " + str(self.pipe) + "}}"


@dataclass
class RangeNode:
    pipe: PipeNode
    body: ListNode
    else_body: ListNode | None
    line: int

    def __str__(self) -> str:
        return "{{range " + str(self.pipe) + "}}"


@dataclass
class TemplateNode:
    name: str
    pipe: PipeNode | None
    line: int

    def __str__(self) -> str:
        if self.pipe is None:
            return "{{template " + go_quote(self.name) + "}}"
        return "{{template " + go_quote(self.name) + " " + str(self.pipe) + "}}"


@dataclass
class BreakNode:
    line: int

    def __str__(self) -> str:
        return "{{break}}"


@dataclass
class ContinueNode:
    line: int

    def __str__(self) -> str:
        return "{{continue}}"


Node: TypeAlias = (
    TextNode | CommentNode | DotNode | NilNode | BoolNode | StringNode | NumberNode | FieldNode
    | VariableNode | IdentifierNode | ChainNode | CommandNode | PipeNode | ActionNode | ListNode
    | IfNode | RangeNode | TemplateNode | BreakNode | ContinueNode
)


def is_empty_tree(body: ListNode) -> bool:
    for node in body.nodes:
        if isinstance(node, TextNode):
            if node.text.strip(SPACE_CHARS):
                return False
        elif not isinstance(node, CommentNode):
            return False
    return True


# --- literals --------------------------------------------------------------------------------

_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
            "\\": "\\"}


def unquote(token: str, line: int) -> str:
    """strconv.Unquote for a "..." or `...` or '.' literal."""
    if token.startswith("`"):
        return token[1:-1].replace("\r", "")
    quote = token[0]
    body = token[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        i += 1
        if i >= len(body):
            raise ParseError(line, "invalid syntax")
        esc = body[i]
        i += 1
        if esc in _ESCAPES:
            out.append(_ESCAPES[esc])
        elif esc == quote:
            out.append(esc)
        elif esc in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[esc]
            digits = body[i:i + width]
            if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise ParseError(line, "invalid syntax")
            code = int(digits, 16)
            i += width
            if esc == "x":
                out.append(chr(code))  # a byte; only ASCII survives the round trip faithfully
            else:
                if code > 0x10FFFF or 0xD800 <= code < 0xE000:
                    raise ParseError(line, "invalid syntax")
                out.append(chr(code))
        elif esc in "01234567":
            digits = body[i - 1:i + 2]
            if len(digits) != 3 or not all(c in "01234567" for c in digits) or \
                    int(digits, 8) > 255:
                raise ParseError(line, "invalid syntax")
            out.append(chr(int(digits, 8)))
            i += 2
        else:
            raise ParseError(line, "invalid syntax")
    result = "".join(out)
    if quote == "'" and len(result) != 1:
        raise ParseError(line, f"malformed character constant: {token}")
    return result


def _parse_go_int(text: str) -> int | None:
    t = text
    sign = 1
    if t[:1] in "+-":
        sign = -1 if t[0] == "-" else 1
        t = t[1:]
    if not t:
        return None
    try:
        if t.startswith(("0x", "0X", "0o", "0O", "0b", "0B")):
            if t[2:3] == "_":
                t = t[:2] + t[3:]
            if not t[2:] or t.startswith("_") or t.endswith("_") or "__" in t:
                return None
            return sign * int(t, 0)
        if "_" in t and (t.startswith("_") or t.endswith("_") or "__" in t):
            return None
        t = t.replace("_", "")
        if not t.isdigit():
            return None
        if len(t) > 1 and t[0] == "0":
            return sign * int(t, 8)
        return sign * int(t, 10)
    except ValueError:
        return None


def _parse_go_float(text: str) -> float | None:
    t = text.replace("_", "")
    try:
        if t.lstrip("+-").lower().startswith("0x"):
            return float.fromhex(t)
        if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", t):
            return None
        return float(t)
    except (ValueError, OverflowError):
        return None


def parse_number(text: str, line: int) -> NumberNode:
    node = NumberNode(text=text, line=line)
    if text.startswith("'"):
        ch = unquote(text, line)
        node.is_int = node.is_uint = node.is_float = True
        node.int_val = ord(ch)
        node.float_val = float(ord(ch))
        return node
    if text.endswith("i") and any(c in text[1:] for c in "+-") and \
            not re.search(r"[eEpP][+-]", text):
        try:
            node.complex_val = complex(text.replace("_", "")[:-1] + "j")
        except ValueError:
            raise ParseError(line, f"illegal number syntax: {go_quote(text)}") from None
        node.is_complex = True
        return node
    if text.endswith("i"):
        f = _parse_go_float(text[:-1])
        if f is None:
            i = _parse_go_int(text[:-1])
            if i is None:
                raise ParseError(line, f"illegal number syntax: {go_quote(text)}")
            f = float(i)
        node.is_complex = True
        node.complex_val = complex(0, f)
        return node
    value = _parse_go_int(text)
    if value is not None:
        if 0 <= value < 1 << 64:
            node.is_uint = True
        if -(1 << 63) <= value < 1 << 63:
            node.is_int = True
        if node.is_int or node.is_uint:
            node.int_val = value
            node.is_float = True
            node.float_val = float(value)
        else:
            raise ParseError(line, f"integer overflow: {go_quote(text)}")  # pragma: no cover
        return node
    f = _parse_go_float(text)
    if f is None or f in (float("inf"), float("-inf")):
        raise ParseError(line, f"illegal number syntax: {go_quote(text)}")
    if not any(c in text for c in ".eEpP"):
        raise ParseError(line, f"integer overflow: {go_quote(text)}")
    node.is_float = True
    node.float_val = f
    if f == int(f) and abs(f) < 2**63:
        node.is_int = True
        node.int_val = int(f)
        if f >= 0:
            node.is_uint = True
    return node


# --- parser ----------------------------------------------------------------------------------


@dataclass
class Tree:
    """One parsed template: its name and body."""

    name: str
    root: ListNode


class _End:
    def __init__(self, line: int) -> None:
        self.line = line


class _Else:
    def __init__(self, line: int, chained: str | None) -> None:
        self.line = line
        self.chained = chained  # "if"/"with" for {{else if}} / {{else with}}


class Parser:
    """Parse one template text into a set of named trees (main plus ``define``/``block``).

    ``has_function(name)`` answers whether a function exists; ``on_function(name, node, args)``
    sees every function call (with its literal arguments) and may raise ParseError to refuse it.
    """

    def __init__(
        self,
        name: str,
        text: str,
        *,
        left: str,
        right: str,
        has_function: Callable[[str], bool],
        on_call: Callable[[IdentifierNode, list[Node]], None],
        on_ident: Callable[[IdentifierNode], None],
    ) -> None:
        self.name = name
        self.items = lex(text, left, right)
        self.pos = 0
        self.has_function = has_function
        self.on_call = on_call
        self.on_ident = on_ident
        self.trees: dict[str, Tree] = {}
        self.vars: list[str] = ["$"]
        self.range_depth = 0
        self.depth = 0

    # item helpers
    def next(self) -> Item:
        item = self.items[self.pos]
        if item.typ != EOF:
            self.pos += 1
        return item

    def backup(self) -> None:
        self.pos -= 1

    def peek(self) -> Item:
        return self.items[self.pos]

    def next_non_space(self) -> Item:
        item = self.next()
        while item.typ == SPACE:
            item = self.next()
        return item

    def peek_non_space(self) -> Item:
        save = self.pos
        item = self.next_non_space()
        self.pos = save
        return item

    def error(self, line: int, message: str) -> ParseError:
        return ParseError(line, message)

    def unexpected(self, item: Item, context: str) -> ParseError:
        if item.typ == EOF:
            return ParseError(item.line, f"unexpected EOF in {context}")
        return ParseError(item.line, f"unexpected {item} in {context}")

    def expect(self, typ: str, context: str) -> Item:
        item = self.next_non_space()
        if item.typ != typ:
            raise self.unexpected(item, context)
        return item

    # top level
    def parse(self) -> dict[str, Tree]:
        root = ListNode()
        while self.peek().typ != EOF:
            if self.peek().typ == LEFT:
                save = self.pos
                self.next()
                kw = self.next_non_space()
                if kw.typ == "keyword" and kw.val == "define":
                    self.parse_definition(kw.line)
                    continue
                self.pos = save
            node = self.text_or_action()
            if isinstance(node, _End):
                raise self.error(node.line, "unexpected {{end}}")
            if isinstance(node, _Else):
                raise self.error(node.line, "unexpected {{else}}")
            root.nodes.append(node)
        self.add(Tree(MAIN, root))
        return self.trees

    def add(self, tree: Tree) -> None:
        old = self.trees.get(tree.name)
        if old is None or is_empty_tree(old.root):
            self.trees[tree.name] = tree
            return
        if not is_empty_tree(tree.root):
            raise self.error(1, f"template: multiple definition of template {go_quote(tree.name)}")

    def parse_definition(self, line: int) -> None:
        item = self.next_non_space()
        if item.typ not in (STRING, RAWSTRING):
            raise self.unexpected(item, "define clause")
        name = unquote(item.val, item.line)
        self.expect(RIGHT, "define clause")
        saved_vars, self.vars = self.vars, ["$"]
        body, end = self.item_list()
        self.vars = saved_vars
        if not isinstance(end, _End):
            raise self.error(end.line, "unexpected {{else}}")  # pragma: no cover
        self.add(Tree(name, body))

    def item_list(self) -> tuple[ListNode, _End | _Else]:
        body = ListNode()
        while True:
            if self.peek_non_space().typ == EOF:
                raise self.error(self.peek().line, "unexpected EOF")
            node = self.text_or_action()
            if isinstance(node, (_End, _Else)):
                return body, node
            body.nodes.append(node)

    def text_or_action(self) -> Node | _End | _Else:
        item = self.next_non_space()
        if item.typ == TEXT:
            return TextNode(item.val, item.line)
        if item.typ == COMMENT:
            return CommentNode(item.line)
        if item.typ == LEFT:
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.error(item.line, "max nesting depth exceeded")
            try:
                return self.action()
            finally:
                self.depth -= 1
        raise self.unexpected(item, "input")

    def action(self) -> Node | _End | _Else:
        item = self.next_non_space()
        if item.typ == "keyword":
            kw = item.val
            if kw == "block":
                return self.block_control(item)
            if kw == "break":
                return self.break_control(item, "break")
            if kw == "continue":
                return self.break_control(item, "continue")
            if kw == "else":
                return self.else_control(item)
            if kw == "end":
                self.expect(RIGHT, "end")
                return _End(item.line)
            if kw in ("if", "with"):
                return self.if_control(item, kw)
            if kw == "range":
                return self.range_control(item)
            if kw == "template":
                return self.template_control(item)
        self.backup()
        line = self.peek().line
        return ActionNode(self.pipeline("command", RIGHT), line)

    def break_control(self, item: Item, kw: str) -> Node:
        token = self.next_non_space()
        if token.typ != RIGHT:
            raise self.unexpected(token, "{{" + kw + "}}")
        if self.range_depth == 0:
            raise self.error(item.line, "{{" + kw + "}} outside {{range}}")
        return BreakNode(item.line) if kw == "break" else ContinueNode(item.line)

    def else_control(self, item: Item) -> _Else:
        peek = self.peek_non_space()
        if peek.typ == "keyword" and peek.val in ("if", "with"):
            return _Else(item.line, peek.val)
        self.expect(RIGHT, "else")
        return _Else(item.line, None)

    def control(self, context: str) -> tuple[PipeNode, ListNode, ListNode | None]:
        mark = len(self.vars)
        try:
            pipe = self.pipeline(context, RIGHT)
            if context == "range":
                self.range_depth += 1
            try:
                body, nxt = self.item_list()
            finally:
                if context == "range":
                    self.range_depth -= 1
            else_body: ListNode | None = None
            if isinstance(nxt, _Else):
                if nxt.chained is not None and nxt.chained == context and context != "range":
                    # {{else if x}} is {{else}}{{if x}}...{{end}}{{end}}: the inner control
                    # consumes the shared {{end}}.
                    kw = self.next_non_space()
                    inner = self.if_control(kw, context)
                    else_body = ListNode([inner])
                    return pipe, body, else_body
                if nxt.chained is not None:
                    raise self.unexpected(self.next_non_space(), "else")
                else_body, end = self.item_list()
                if not isinstance(end, _End):
                    raise self.error(end.line, "expected end; found {{else}}")
            return pipe, body, else_body
        finally:
            del self.vars[mark:]

    def if_control(self, item: Item, kind: str) -> IfNode:
        pipe, body, else_body = self.control(kind)
        return IfNode(kind, pipe, body, else_body, item.line)

    def range_control(self, item: Item) -> RangeNode:
        pipe, body, else_body = self.control("range")
        return RangeNode(pipe, body, else_body, item.line)

    def template_name(self, context: str) -> str:
        token = self.next_non_space()
        if token.typ not in (STRING, RAWSTRING):
            raise self.unexpected(token, context)
        return unquote(token.val, token.line)

    def template_control(self, item: Item) -> TemplateNode:
        name = self.template_name("template clause")
        pipe: PipeNode | None = None
        token = self.next_non_space()
        if token.typ != RIGHT:
            self.backup()
            pipe = self.pipeline("template clause", RIGHT)
        return TemplateNode(name, pipe, item.line)

    def block_control(self, item: Item) -> TemplateNode:
        name = self.template_name("block clause")
        pipe = self.pipeline("block clause", RIGHT)
        saved_vars, saved_range = self.vars, self.range_depth
        self.vars, self.range_depth = ["$"], 0
        body, end = self.item_list()
        self.vars, self.range_depth = saved_vars, saved_range
        if not isinstance(end, _End):
            raise self.error(end.line, "unexpected {{else}}")
        self.add(Tree(name, body))
        return TemplateNode(name, pipe, item.line)

    def pipeline(self, context: str, end: str) -> PipeNode:
        token = self.peek_non_space()
        pipe = PipeNode(token.line)
        # declarations (Go's "decls:" label)
        while True:
            save = self.pos
            v = self.peek_non_space()
            if v.typ != VARIABLE:
                break
            self.next_non_space()
            nxt = self.peek_non_space()
            if nxt.typ in (ASSIGN, DECLARE):
                self.next_non_space()
                pipe.is_assign = nxt.typ == ASSIGN
                pipe.decl.append(VariableNode([v.val], v.line))
                self.vars.append(v.val)
                break
            if nxt.typ == CHAR and nxt.val == ",":
                self.next_non_space()
                pipe.decl.append(VariableNode([v.val], v.line))
                self.vars.append(v.val)
                if context == "range" and len(pipe.decl) < 2:
                    if self.peek_non_space().typ in (VARIABLE, RIGHT, RPAREN):
                        continue
                    raise self.error(nxt.line, "range can only initialize variables")
                raise self.error(nxt.line, f"too many declarations in {context}")
            self.pos = save
            break
        while True:
            token = self.next_non_space()
            if token.typ == end:
                if not pipe.cmds:
                    raise self.error(token.line, f"missing value for {context}")
                for i, cmd in enumerate(pipe.cmds[1:], start=2):
                    if isinstance(cmd.args[0], (BoolNode, DotNode, NilNode, NumberNode,
                                                StringNode)):
                        raise self.error(cmd.line, f"non executable command in pipeline stage {i}")
                return pipe
            if token.typ in (BOOL, CHAR, CHARCONST, DOT, FIELD, IDENT, NUMBER, NIL, RAWSTRING,
                             STRING, VARIABLE, LPAREN):
                if token.typ == CHAR:
                    raise self.unexpected(token, context)
                self.backup()
                pipe.cmds.append(self.command())
            else:
                raise self.unexpected(token, context)

    def command(self) -> CommandNode:
        cmd = CommandNode([], self.peek_non_space().line)
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                cmd.args.append(operand)
            token = self.next()
            if token.typ == SPACE:
                continue
            if token.typ in (RIGHT, RPAREN):
                self.backup()
            elif token.typ == PIPE:
                pass
            else:
                raise self.unexpected(token, "operand")
            break
        if not cmd.args:
            raise self.error(cmd.line, "empty command")
        first = cmd.args[0]
        if isinstance(first, IdentifierNode):
            self.on_call(first, cmd.args[1:])
        return cmd

    def operand(self) -> Node | None:
        node = self.term()
        if node is None:
            return None
        if self.peek().typ == FIELD:
            fields = []
            line = self.peek().line
            while self.peek().typ == FIELD:
                fields.append(self.next().val[1:])
            if isinstance(node, FieldNode):
                return FieldNode(node.idents + fields, node.line)
            if isinstance(node, VariableNode):
                return VariableNode(node.idents + fields, node.line)
            if isinstance(node, (BoolNode, StringNode, NumberNode, NilNode, DotNode)):
                raise self.error(line, f"unexpected . after term {go_quote(str(node))}")
            return ChainNode(node, fields, line)
        return node

    def term(self) -> Node | None:
        token = self.next_non_space()
        typ = token.typ
        if typ == IDENT:
            if not self.has_function(token.val):
                raise self.error(token.line, f"function {go_quote(token.val)} not defined")
            node = IdentifierNode(token.val, token.line)
            self.on_ident(node)
            return node
        if typ == DOT:
            return DotNode(token.line)
        if typ == NIL:
            return NilNode(token.line)
        if typ == VARIABLE:
            name = token.val
            if name not in self.vars:
                raise self.error(token.line, f"undefined variable {go_quote(name)}")
            return VariableNode([name], token.line)
        if typ == FIELD:
            return FieldNode([token.val[1:]], token.line)
        if typ == BOOL:
            return BoolNode(token.val == "true", token.line)
        if typ in (CHARCONST, NUMBER):
            return parse_number(token.val, token.line)
        if typ == LPAREN:
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.error(token.line, "max expression depth exceeded")
            try:
                pipe = self.pipeline("parenthesized pipeline", RPAREN)
            finally:
                self.depth -= 1
            return pipe
        if typ in (STRING, RAWSTRING):
            return StringNode(token.val, unquote(token.val, token.line), token.line)
        self.backup()
        return None
