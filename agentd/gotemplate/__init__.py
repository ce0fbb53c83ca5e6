"""Go ``text/template`` with consul-template's functions, in pure Python (stdlib only).

Renders the templates OpenBao/Vault Agent and consul-template users already have, byte for byte
as the OpenBao Agent renders them::

    tmpl = gotemplate.parse(text, name="db.tmpl", env_allow={"HOSTNAME"})
    tmpl.secret_paths()          # (SecretRef("secret", "secret/data/db", 3), ...)
    out = tmpl.execute(lookup, max_output=1 << 20)

``lookup(path, kv_args)`` returns the upstream's JSON reply for ``secret``/``pkiCert`` (the
whole body: ``{"data": {...}}`` for KV v1, ``{"data": {"data": {...}, "metadata": {...}}}`` for
KV v2, the issued certificate for ``pki/issue``), the LIST reply (``{"data": {"keys": [...]}}``)
for ``secrets``, or None when there is nothing (the function then returns nil, as
consul-template does for a missing dependency). Decode replies with :func:`decode_json` so JSON
numbers keep their text (Go's json.Number); plain Python ints and floats are accepted and print
as ``str(int)`` / ``repr(float)``. The path handed to ``lookup`` is the template's literal, as
written: consul-template adds ``data/`` to a KV v2 path written without it
(``secret "secret/app"`` reads ``secret/data/app``) and passes ``?version=N`` through; the
caller's catalog does the same mapping. ``secret`` with ``k=v`` arguments (``pki/issue``) is a
write: ``kv_args`` holds them. ``pkiCert`` returns ``{Cert, Key, CA}`` (and ``.Data`` of it).

Read template files as bytes and decode them: Go keeps ``\r\n`` in text, so must we.
``missing_key`` is Go's option: ``"zero"`` is the OpenBao Agent's default (a missing map key
prints ``<no value>``), ``"error"`` (agentd's default: fail closed) is its
``error_on_missing_key = true``.

Not supported, refused at parse time: ``plugin``, ``writeToFile``, ``file``, ``sockaddr``, the
Consul and Nomad functions, ``regexMatch``/``regexReplaceAll`` (Python's backtracking ``re``
is not RE2: a hostile pattern could hang the worker), ``toYAML``/``parseYAML``/``toTOML``, and
``sprig_*`` beyond the hermetic string, default, list and hash helpers in ``sprig.py``.

Errors: :class:`GoTemplateError` (a RenderError) at parse time for syntax errors and for any
unknown, unsupported or refused function (``"t.tmpl:3: function "plugin" not supported"``), and
at execution for Go's runtime errors and the bounds (output size, step budget, template depth).
Messages name the template, the line and the template text at fault, never a data value.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from agentd.errors import RenderError
from agentd.gotemplate import parse as _p
from agentd.gotemplate.exec import ExecError, Func, State
from agentd.gotemplate.funcs import (
    BUILTINS,
    CONSUL_TEMPLATE,
    SECRET_FUNCS,
    UNSUPPORTED,
    Environment,
    SecretLookup,
)
from agentd.gotemplate.sprig import SPRIG
from agentd.gotemplate.values import NO_VALUE, JsonNumber, decode_json

DEFAULT_MAX_STEPS = 1_000_000
# Every function a template may call: Go's builtins, consul-template's, sprig's cheap part.
FUNCTIONS: Mapping[str, Func] = MappingProxyType({**BUILTINS, **CONSUL_TEMPLATE, **SPRIG})
MISSING_KEY_MODES = ("zero", "error", "default")


class GoTemplateError(RenderError):
    """A Go template failed to parse or execute. ``template`` and ``line`` say where."""

    def __init__(self, message: str, *, template: str, line: int | None = None) -> None:
        super().__init__(message)
        self.template = template
        self.line = line


@dataclass(frozen=True)
class SecretRef:
    """One literal use of ``secret``/``secrets``/``pkiCert``: the config maps ``path``."""

    function: str
    path: str
    line: int
    args: tuple[str, ...] = ()  # the literal k=v arguments (writes such as pki/issue)


def supported_functions() -> frozenset[str]:
    """Every function name the engine implements (builtins and consul-template's)."""
    return frozenset(FUNCTIONS)


class Template:
    """A parsed template set (the main template plus its ``define``/``block`` templates)."""

    def __init__(self, name: str, trees: dict[str, _p.Tree], refs: list[SecretRef],
                 env_allow: frozenset[str], missing_key: str) -> None:
        self.name = name
        self._trees = trees
        self._refs = tuple(refs)
        self._env_allow = env_allow
        self._missing_key = missing_key

    def secret_paths(self) -> tuple[SecretRef, ...]:
        return self._refs

    def defined_templates(self) -> tuple[str, ...]:
        return tuple(sorted(n for n in self._trees if n != _p.MAIN))

    def execute(
        self,
        secret_lookup: SecretLookup,
        *,
        max_output: int,
        max_steps: int = DEFAULT_MAX_STEPS,
        now: datetime | None = None,
        env: Mapping[str, str] | None = None,
        dot: Any = None,
    ) -> str:
        """Render once. Raises GoTemplateError; exceptions of ``secret_lookup`` pass through.

        ``env`` defaults to ``os.environ``; only names in the template's ``env_allow`` are read.
        ``dot`` is the data, as Go values (consul-template, hence the default, executes with
        nil data; ints are Go ints here, use decode_json for JSON numbers).
        """
        state = State(self._trees, FUNCTIONS, max_output=max_output, max_steps=max_steps,
                      missing_key=self._missing_key)
        environ = os.environ if env is None else env
        state.extra["environment"] = Environment(
            secret_lookup,
            {k: environ[k] for k in self._env_allow if k in environ},
            now or datetime.now(timezone.utc),
        )
        state.extra["env_allow"] = self._env_allow
        state.display_name = self.name
        try:
            return state.execute(_p.MAIN, NO_VALUE if dot is None else dot)
        except ExecError as exc:
            raise GoTemplateError(str(exc), template=self.name, line=exc.line) from None
        except RecursionError:
            raise GoTemplateError(f"{self.name}: template nested too deeply",
                                  template=self.name) from None


def parse(
    text: str,
    *,
    name: str,
    left_delim: str = "{{",
    right_delim: str = "}}",
    funcs: Iterable[str] | None = None,
    env_allow: Iterable[str] = (),
    missing_key: str = "error",
) -> Template:
    """Parse ``text``; raise GoTemplateError naming ``name`` and the line on any problem.

    ``funcs`` narrows the functions a template may use (default: all supported; Go's builtins
    are always allowed). ``missing_key`` is Go's option: ``"zero"`` is consul-template's default
    (a missing map key prints ``<no value>``), ``"error"`` fails the render (agentd's default,
    ``error_on_missing_key``), ``"default"`` is plain Go's.
    """
    if missing_key not in MISSING_KEY_MODES:
        raise ValueError(f"missing_key must be one of {MISSING_KEY_MODES}")
    allowed = frozenset(FUNCTIONS if funcs is None else funcs) | frozenset(BUILTINS)
    allowed_env = frozenset(env_allow)
    refs: list[SecretRef] = []

    known = frozenset(FUNCTIONS) | UNSUPPORTED

    def has_function(fn: str) -> bool:
        # consul-template's sprig_* all exist; those not implemented are "not supported"
        return fn in known or fn.startswith("sprig_")

    def on_ident(node: _p.IdentifierNode) -> None:
        if node.name in UNSUPPORTED or node.name not in allowed or node.name not in known:
            raise _p.ParseError(node.line, f"function {_p.go_quote(node.name)} not supported")

    def on_call(node: _p.IdentifierNode, args: list[_p.Node]) -> None:
        if node.name in SECRET_FUNCS:
            if not args or not isinstance(args[0], _p.StringNode):
                raise _p.ParseError(
                    node.line, f"{node.name}: the path must be a string literal (it names a "
                    "declared secret)")
            literal = tuple(a.text for a in args[1:] if isinstance(a, _p.StringNode))
            refs.append(SecretRef(node.name, args[0].text, node.line, literal))
        elif node.name in ("env", "mustEnv", "envOrDefault") and args and \
                isinstance(args[0], _p.StringNode) and args[0].text not in allowed_env:
            raise _p.ParseError(
                node.line, f"{node.name}: environment variable {_p.go_quote(args[0].text)} is "
                "not allowed for this template")

    try:
        parser = _p.Parser(name, text, left=left_delim, right=right_delim,
                           has_function=has_function, on_call=on_call, on_ident=on_ident)
        trees = parser.parse()
    except _p.ParseError as exc:
        raise GoTemplateError(f"{name}:{exc.line}: {exc.message}", template=name,
                              line=exc.line) from None
    except RecursionError:
        raise GoTemplateError(f"{name}: template nested too deeply", template=name) from None
    return Template(name, trees, refs, allowed_env, missing_key)


__all__ = ["GoTemplateError", "JsonNumber", "SecretRef", "Template", "decode_json", "parse",
           "supported_functions"]
