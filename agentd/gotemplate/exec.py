"""Execution of a parsed Go template (Go's ``text/template/exec.go``).

Theory of operation: :class:`State` walks the tree, evaluating pipelines the way ``exec.go``
does: a command's value is passed as the final argument of the next command; after each
command a nil ``interface{}`` becomes the invalid value (``<no value>`` when printed);
arguments are checked against each function's parameter types (``validateType``), so
``toLower .Data.data.port`` fails as in Go when the port is a JSON number. ``range`` visits
maps in sorted key order and runs ``n`` times over an int. Variables live on one stack with
marks; ``{{template}}`` starts a fresh stack holding only ``$``.

Bounds: every walked node and every command costs one step from ``max_steps``; output and every
string value produced by a function are capped at ``max_output`` characters; ``template``
nesting is capped at :data:`MAX_TEMPLATE_DEPTH`. Exceeding any of them is an :class:`ExecError`.
Error messages name the template, line and the template text at fault, never a data value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agentd.gotemplate import parse as p
from agentd.gotemplate.gofmt import sprint
from agentd.gotemplate.values import (
    NO_VALUE,
    GoChan,
    GoNil,
    GoStruct,
    Int64,
    JsonNumber,
    StrList,
    go_type,
)

MAX_TEMPLATE_DEPTH = 100


class ExecError(Exception):
    """Execution failed; the message is complete ("name:line: executing ...")."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class FuncError(Exception):
    """Raised by a function implementation; becomes "error calling NAME: message"."""


class _Missing:
    pass


MISSING: Any = _Missing()  # no final value from a previous command (Go's missingVal)


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


@dataclass
class Func:
    """A template function: parameter types, optional variadic element type, implementation.

    Types: ``any`` (interface{}), ``value`` (reflect.Value: the invalid value passes as is),
    ``string``, ``int``, ``bool``, ``float``, ``strlist`` ([]string), ``anylist``
    ([]interface{}), ``map``. With ``state`` set, the implementation gets the State first.
    """

    params: tuple[str, ...]
    impl: Callable[..., Any]
    variadic: str | None = None
    state: bool = False


TYPE_NAMES = {
    "string": "string", "int": "int", "bool": "bool", "float": "float64",
    "strlist": "[]string", "anylist": "[]interface {}", "map": "map[string]interface {}",
    "any": "interface {}", "value": "reflect.Value",
}
NILABLE = {"any", "value", "strlist", "anylist", "map"}


def truth(v: Any) -> bool:
    if v is None or v is NO_VALUE or isinstance(v, GoNil):
        return False
    if isinstance(v, (bool, int, float, complex)):
        return bool(v)
    if isinstance(v, (str, list, dict)):
        return len(v) > 0
    return True


def _zero(typ: str) -> Any:
    return {"any": None, "value": NO_VALUE, "strlist": StrList(), "anylist": [],
            "map": {}}[typ]


class State:
    """One execution of a template set. Not reusable; not thread-safe."""

    def __init__(
        self,
        trees: dict[str, p.Tree],
        funcs: Mapping[str, Func],
        *,
        max_output: int,
        max_steps: int,
        missing_key: str,
    ) -> None:
        self.trees = trees
        self.funcs = funcs
        self.max_output = max_output
        self.steps_left = max_steps
        self.missing_key = missing_key
        self.out: list[str] = []
        self.size = 0
        self.depth = 0
        self.tree_name = ""
        self.display_name = ""  # the template's file name, for messages
        self.vars: list[list[Any]] = []
        self.node: Any = None
        self.extra: dict[str, Any] = {}

    # --- errors and bounds ---------------------------------------------------------------

    def error(self, message: str, node: Any = None) -> ExecError:
        node = node if node is not None else self.node
        line = getattr(node, "line", 1) if node is not None else 1
        if node is None:
            return ExecError(f"{self.display_name}:{line}: {message}", line)
        context = _context(node)
        where = "" if self.tree_name == p.MAIN else f" in {p.go_quote(self.tree_name)}"
        return ExecError(
            f"{self.display_name}:{line}: executing at <{context}>{where}: {message}", line)

    def step(self, cost: int = 1) -> None:
        self.steps_left -= cost
        if self.steps_left < 0:
            raise self.error("template exceeded its step budget (a loop or recursion too long)")

    def check_size(self, value: Any) -> Any:
        if isinstance(value, str) and len(value) > self.max_output:
            raise self.error(f"a value exceeds the output limit of {self.max_output} characters")
        if isinstance(value, list) and len(value) > self.max_output:
            raise self.error(f"a list exceeds the output limit of {self.max_output} items")
        return value

    def write(self, text: str) -> None:
        self.size += len(text)
        if self.size > self.max_output:
            raise self.error(f"output exceeds the limit of {self.max_output} characters")
        self.out.append(text)

    # --- entry points --------------------------------------------------------------------

    def execute(self, name: str, dot: Any) -> str:
        tree = self.trees.get(name)
        if tree is None:
            raise ExecError(f"{self.display_name}: no template {p.go_quote(name)} associated")
        saved = self.vars, self.tree_name, self.out, self.size
        self.vars = [["$", dot]]
        self.tree_name = name
        self.out = []
        try:
            self.walk(dot, tree.root)
            return "".join(self.out)
        finally:
            size = self.size
            self.vars, self.tree_name, self.out, _ = saved
            self.size = size

    # --- walk ----------------------------------------------------------------------------

    def walk(self, dot: Any, node: Any) -> None:
        self.step()
        self.node = node
        _WALKERS[type(node)](self, dot, node)

    def walk_list(self, dot: Any, node: p.ListNode) -> None:
        for child in node.nodes:
            self.walk(dot, child)

    def walk_text(self, dot: Any, node: p.TextNode) -> None:
        self.write(node.text)

    def walk_action(self, dot: Any, node: p.ActionNode) -> None:
        val = self.eval_pipeline(dot, node.pipe)
        if not node.pipe.decl:  # a declaration prints nothing
            self.print_value(node, val)

    def walk_comment(self, dot: Any, node: p.CommentNode) -> None:
        pass

    def walk_break(self, dot: Any, node: p.BreakNode) -> None:
        raise _Break

    def walk_continue(self, dot: Any, node: p.ContinueNode) -> None:
        raise _Continue

    def print_value(self, node: Any, v: Any) -> None:
        self.node = node
        if v is NO_VALUE or v is None:
            self.write("<no value>")
            return
        if isinstance(v, GoStruct) and v.pointer:
            v = GoStruct(v.type_name, v.fields, v.methods, pointer=False)
        self.write(sprint([v]))

    def walk_if(self, dot: Any, node: p.IfNode) -> None:
        mark = len(self.vars)
        try:
            val = self.eval_pipeline(dot, node.pipe)
            if truth(val):
                self.walk(val if node.kind == "with" else dot, node.body)
            elif node.else_body is not None:
                self.walk(dot, node.else_body)
        finally:
            del self.vars[mark:]

    def walk_range(self, dot: Any, node: p.RangeNode) -> None:
        self.node = node
        mark_outer = len(self.vars)
        try:
            val = self.eval_pipeline(dot, node.pipe)
            mark = len(self.vars)
            decl = node.pipe.decl

            def one(index: Any, elem: Any) -> None:
                self.step()
                if decl:
                    if node.pipe.is_assign:
                        if len(decl) > 1:
                            self.set_var(decl[0].idents[0], index)
                        else:
                            self.set_var(decl[0].idents[0], elem)
                    else:
                        self.vars[-1][1] = elem
                if len(decl) > 1:
                    if node.pipe.is_assign:
                        self.set_var(decl[1].idents[0], elem)
                    else:
                        self.vars[-2][1] = index
                try:
                    self.walk(elem, node.body)
                except _Continue:
                    pass
                finally:
                    del self.vars[mark:]

            ran = False
            try:
                if isinstance(val, list):
                    for i, elem in enumerate(val):
                        ran = True
                        one(i, elem)
                elif isinstance(val, dict):
                    for key in sorted(val):
                        ran = True
                        one(key, val[key])
                elif isinstance(val, GoChan):
                    if val.stop - val.start > self.steps_left:
                        raise self.error("template exceeded its step budget (range too long)")
                    for i, elem in enumerate(range(val.start, val.stop)):
                        ran = True
                        one(i, Int64(elem))
                elif isinstance(val, int) and not isinstance(val, bool):
                    if len(decl) > 1:
                        raise self.error(
                            "can't use a number to iterate over more than one variable", node)
                    if val > self.steps_left:
                        raise self.error("template exceeded its step budget (range too long)")
                    for i in range(val):
                        ran = True
                        one(NO_VALUE, i)
                elif val is NO_VALUE or val is None:
                    pass
                else:
                    raise self.error(f"range can't iterate over a value of type {go_type(val)}",
                                     node)
            except _Break:
                return
            if not ran and node.else_body is not None:
                self.walk(dot, node.else_body)
        finally:
            del self.vars[mark_outer:]

    def walk_template(self, dot: Any, node: p.TemplateNode) -> None:
        self.node = node
        tree = self.trees.get(node.name)
        if tree is None:
            raise self.error(f"template {p.go_quote(node.name)} not defined")
        if self.depth >= MAX_TEMPLATE_DEPTH:
            raise self.error(f"exceeded maximum template depth ({MAX_TEMPLATE_DEPTH})")
        new_dot = self.eval_pipeline(dot, node.pipe) if node.pipe is not None else NO_VALUE
        saved_vars, saved_name = self.vars, self.tree_name
        self.vars = [["$", new_dot]]
        self.tree_name = node.name
        self.depth += 1
        try:
            self.walk(new_dot, tree.root)
        finally:
            self.depth -= 1
            self.vars, self.tree_name = saved_vars, saved_name

    # --- variables -----------------------------------------------------------------------

    def set_var(self, name: str, value: Any) -> None:
        for entry in reversed(self.vars):
            if entry[0] == name:
                entry[1] = value
                return
        raise self.error(f"undefined variable: {name}")

    def var_value(self, name: str) -> Any:
        for entry in reversed(self.vars):
            if entry[0] == name:
                return entry[1]
        raise self.error(f"undefined variable: {name}")

    # --- evaluation ----------------------------------------------------------------------

    def eval_pipeline(self, dot: Any, pipe: p.PipeNode | None) -> Any:
        if pipe is None:
            return NO_VALUE
        self.node = pipe
        value: Any = MISSING
        for cmd in pipe.cmds:
            value = self.eval_command(dot, cmd, value)
            if value is None:
                value = NO_VALUE
        for var in pipe.decl:
            if pipe.is_assign:
                self.set_var(var.idents[0], value)
            else:
                self.vars.append([var.idents[0], value])
        return value

    def not_a_function(self, args: list[Any] | None, final: Any) -> None:
        if (args is not None and len(args) > 1) or final is not MISSING:
            first = args[0] if args else self.node
            raise self.error(f"can't give argument to non-function {first}")

    def eval_command(self, dot: Any, cmd: p.CommandNode, final: Any) -> Any:
        self.step()
        first = cmd.args[0]
        if isinstance(first, p.FieldNode):
            self.node = first
            return self.eval_field_chain(dot, dot, first, first.idents, cmd.args, final)
        if isinstance(first, p.ChainNode):
            return self.eval_chain(dot, first, cmd.args, final)
        if isinstance(first, p.IdentifierNode):
            return self.eval_function(dot, first, cmd.args, final)
        if isinstance(first, p.PipeNode):
            self.not_a_function(cmd.args, final)
            return self.eval_pipeline(dot, first)
        if isinstance(first, p.VariableNode):
            return self.eval_variable(dot, first, cmd.args, final)
        self.node = first
        self.not_a_function(cmd.args, final)
        if isinstance(first, p.BoolNode):
            return first.value
        if isinstance(first, p.DotNode):
            return dot
        if isinstance(first, p.NilNode):
            raise self.error("nil is not a command")
        if isinstance(first, p.NumberNode):
            return self.ideal_constant(first)
        if isinstance(first, p.StringNode):
            return first.text
        raise self.error(f"can't evaluate command {first}")  # pragma: no cover

    def ideal_constant(self, node: p.NumberNode) -> Any:
        self.node = node
        text = node.text
        if node.is_complex:
            return node.complex_val
        is_hex_int = len(text) > 2 and text[0] == "0" and text[1] in "xX" and \
            not any(c in text for c in "pP")
        if node.is_float and not is_hex_int and not text.startswith("'") and \
                any(c in text for c in ".eEpP"):
            return node.float_val
        if node.is_int:
            return node.int_val
        raise self.error(f"{text} overflows int")

    def eval_chain(self, dot: Any, chain: p.ChainNode, args: list[Any] | None, final: Any) -> Any:
        self.node = chain
        if isinstance(chain.node, p.NilNode):
            raise self.error(f"indirection through explicit nil in {chain}")
        receiver = self.eval_arg(dot, None, chain.node)
        return self.eval_field_chain(dot, receiver, chain, chain.fields, args, final)

    def eval_variable(self, dot: Any, var: p.VariableNode, args: list[Any] | None,
                      final: Any) -> Any:
        self.node = var
        value = self.var_value(var.idents[0])
        if len(var.idents) == 1:
            self.not_a_function(args, final)
            return value
        return self.eval_field_chain(dot, value, var, var.idents[1:], args, final)

    def eval_field_chain(self, dot: Any, receiver: Any, node: Any, idents: list[str],
                         args: list[Any] | None, final: Any) -> Any:
        for ident in idents[:-1]:
            receiver = self.eval_field(dot, ident, node, None, MISSING, receiver)
        return self.eval_field(dot, idents[-1], node, args, final, receiver)

    def eval_field(self, dot: Any, name: str, node: Any, args: list[Any] | None, final: Any,
                   receiver: Any) -> Any:
        self.node = node
        if receiver is NO_VALUE:
            if self.missing_key == "error":
                raise self.error(f"nil data; no entry for key {p.go_quote(name)}")
            return NO_VALUE
        if receiver is None:
            raise self.error(f"nil pointer evaluating interface {{}}.{name}")
        has_args = (args is not None and len(args) > 1) or final is not MISSING
        if isinstance(receiver, GoStruct):
            method = receiver.methods.get(name)
            if method is not None:
                fn = Func(method.params, method.impl, method.variadic)
                return self.eval_call(dot, fn, node, name, args, final)
            if name in receiver.fields:
                if has_args:
                    raise self.error(f"{name} has arguments but cannot be invoked as function")
                return receiver.fields[name]
        elif isinstance(receiver, GoNil):
            if name in receiver.field_names:
                raise self.error(f"nil pointer evaluating {receiver.type_name}.{name}")
        elif isinstance(receiver, dict):
            if has_args:
                raise self.error(f"{name} is not a method but has arguments")
            if name in receiver:
                return receiver[name]
            if self.missing_key == "error":
                raise self.error(f"map has no entry for key {p.go_quote(name)}")
            return None if self.missing_key == "zero" else NO_VALUE
        raise self.error(f"can't evaluate field {name} in type {go_type(receiver)}")

    def eval_function(self, dot: Any, node: p.IdentifierNode, args: list[Any] | None,
                      final: Any) -> Any:
        self.node = node
        fn = self.funcs.get(node.name)
        if fn is None:
            raise self.error(f"{p.go_quote(node.name)} is not a defined function")
        return self.eval_call(dot, fn, node, node.name, args, final)

    def eval_call(self, dot: Any, fn: Func, node: Any, name: str, args: list[Any] | None,
                  final: Any) -> Any:
        argn = list(args[1:]) if args else []
        num_in = len(argn) + (final is not MISSING)
        num_fixed = len(argn)
        if fn.variadic is not None:
            num_fixed = len(fn.params)
            if num_in < num_fixed:
                raise self.error(f"wrong number of args for {name}: want at least "
                                 f"{len(fn.params)} got {len(argn)}")
        elif num_in != len(fn.params):
            raise self.error(f"wrong number of args for {name}: want {len(fn.params)} got "
                             f"{num_in}")
        if name in ("and", "or") and fn.variadic == "value" and fn.params == ("value",):
            v: Any = NO_VALUE
            for arg in argn:
                v = self.eval_arg(dot, "value", arg)
                if truth(v) == (name == "or"):
                    return v
            if final is not MISSING:
                v = final
            return v
        argv: list[Any] = []
        i = 0
        while i < num_fixed and i < len(argn):
            argv.append(self.eval_arg(dot, fn.params[i], argn[i]))
            i += 1
        if fn.variadic is not None:
            while i < len(argn):
                argv.append(self.eval_arg(dot, fn.variadic, argn[i]))
                i += 1
        if final is not MISSING:
            if fn.variadic is not None and num_in - 1 >= num_fixed:
                t = fn.variadic
            else:
                t = fn.params[num_in - 1] if fn.variadic is not None else fn.params[-1]
            argv.append(self.validate(final, t))
        self.node = node
        try:
            result = fn.impl(self, *argv) if fn.state else fn.impl(*argv)
        except FuncError as exc:
            self.node = node
            raise self.error(f"error calling {name}: {exc}") from None
        return self.check_size(result)

    def validate(self, value: Any, typ: str | None) -> Any:
        if typ is None:
            return value
        if value is NO_VALUE:
            if typ in NILABLE:
                return _zero(typ)
            raise self.error(f"invalid value; expected {TYPE_NAMES[typ]}")
        if typ in ("value", "any"):
            return value
        ok = False
        if typ == "string":
            ok = isinstance(value, str) and not isinstance(value, JsonNumber)
        elif typ == "int":
            ok = type(value) is int
        elif typ == "bool":
            ok = isinstance(value, bool)
        elif typ == "float":
            ok = isinstance(value, float)
        elif typ == "strlist":
            ok = isinstance(value, StrList)
        elif typ == "anylist":
            ok = isinstance(value, list) and not isinstance(value, StrList)
        elif typ == "map":
            ok = isinstance(value, dict)
        if not ok:
            got = "interface {}" if value is None else go_type(value)
            raise self.error(f"wrong type for value; expected {TYPE_NAMES[typ]}; got {got}")
        return value

    def eval_arg(self, dot: Any, typ: str | None, n: Any) -> Any:
        self.node = n
        if isinstance(n, p.DotNode):
            return self.validate(dot, typ)
        if isinstance(n, p.NilNode):
            if typ is None or typ in NILABLE:
                return _zero(typ or "any")
            raise self.error(f"cannot assign nil to {TYPE_NAMES[typ]}")
        if isinstance(n, p.FieldNode):
            return self.validate(
                self.eval_field_chain(dot, dot, n, n.idents, [n], MISSING), typ)
        if isinstance(n, p.VariableNode):
            return self.validate(self.eval_variable(dot, n, None, MISSING), typ)
        if isinstance(n, p.PipeNode):
            return self.validate(self.eval_pipeline(dot, n), typ)
        if isinstance(n, p.IdentifierNode):
            return self.validate(self.eval_function(dot, n, None, MISSING), typ)
        if isinstance(n, p.ChainNode):
            return self.validate(self.eval_chain(dot, n, None, MISSING), typ)
        if typ == "bool":
            if isinstance(n, p.BoolNode):
                return n.value
            raise self.error(f"expected bool; found {n}")
        if typ == "string":
            if isinstance(n, p.StringNode):
                return n.text
            raise self.error(f"expected string; found {n}")
        if typ == "int":
            if isinstance(n, p.NumberNode) and n.is_int:
                return n.int_val
            raise self.error(f"expected integer; found {n}")
        if typ == "float":
            if isinstance(n, p.NumberNode) and n.is_float:
                return n.float_val
            raise self.error(f"expected float; found {n}")
        if typ in (None, "any", "value"):
            if isinstance(n, p.BoolNode):
                return n.value
            if isinstance(n, p.NumberNode):
                return self.ideal_constant(n)
            if isinstance(n, p.StringNode):
                return n.text
        raise self.error(f"can't handle {n} for arg of type {TYPE_NAMES.get(typ or 'any')}")


def _context(node: Any) -> str:
    try:
        text = str(node)
    except RecursionError:  # pragma: no cover
        text = "..."
    if len(text) > 20:
        text = text[:20] + "..."
    return text


_WALKERS: dict[type, Callable[[State, Any, Any], None]] = {
    p.ListNode: State.walk_list,
    p.TextNode: State.walk_text,
    p.ActionNode: State.walk_action,
    p.CommentNode: State.walk_comment,
    p.IfNode: State.walk_if,
    p.RangeNode: State.walk_range,
    p.TemplateNode: State.walk_template,
    p.BreakNode: State.walk_break,
    p.ContinueNode: State.walk_continue,
}
