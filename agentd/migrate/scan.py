"""The calls of interest in a Go template, found by a small scan of our own: the functions that
read the upstream (``secret``, ``pkiCert``, ``secrets``), ``env``, and the functions agentd
refuses on purpose, each with the reason, named before the engine's own parse would refuse them.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

# consul-template functions a migrated template may not use: agentd renders in a sandbox with no
# file, process or network access, and talks to OpenBao only (no Consul, no Nomad).
REFUSED_FUNCTIONS: dict[str, str] = {
    "plugin": "runs a program from a template; agentd's renderer runs no program",
    "writeToFile": "writes a file from a template; agentd's renderer has no file access",
    "file": "reads a local file from a template; agentd's renderer has no file access",
    "sockaddr": "probes the host's network; agentd's renderer has no network access",
}
for _consul in ("key", "keyExists", "keyOrDefault", "ls", "safeLs", "tree", "safeTree", "node",
                "nodes", "service", "services", "connect", "datacenters", "caRoots", "caLeaf",
                "partitions", "peerings", "exportedServices", "importedServices"):
    REFUSED_FUNCTIONS[_consul] = "reads Consul; agentd talks to OpenBao/Vault only"
for _nomad in ("nomadServices", "nomadService", "nomadVarList", "nomadVarListSafe", "nomadVar",
               "nomadVarExists"):
    REFUSED_FUNCTIONS[_nomad] = "reads Nomad; agentd talks to OpenBao/Vault only"

SECRET_FUNCTIONS = ("secret", "secrets", "pkiCert")
ENV_FUNCTIONS = ("env", "mustEnv", "envOrDefault")


@dataclass(frozen=True)
class Call:
    """One call in a template: the function, its literal string arguments, its line."""

    function: str
    args: tuple[str, ...]
    line: int
    literal: bool = True                      # the first argument is a string literal


_TOKEN = re.compile(r"""
    (?P<comment>/\*.*?\*/)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<char>'(?:[^'\\\n]|\\.)+')
  | (?P<field>\.[A-Za-z_][A-Za-z0-9_]*)
  | (?P<var>\$[A-Za-z0-9_]*)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<space>\s+)
  | (?P<other>.)
""", re.S | re.X)


def _go_string(token: str) -> str:
    if token.startswith("`"):
        return token[1:-1]
    try:
        value = ast.literal_eval(token)
    except (ValueError, SyntaxError):
        return token[1:-1]
    return value if isinstance(value, str) else token[1:-1]


def scan_template(text: str, left: str = "{{", right: str = "}}") -> list[Call]:
    """The calls of interest in a Go template: secret functions, env, refused functions."""
    calls: list[Call] = []
    pos = 0
    while True:
        start = text.find(left, pos)
        if start < 0:
            return calls
        i = start + len(left)
        tokens: list[tuple[str, str, int]] = []
        while i < len(text):
            if text.startswith(right, i) or text.startswith(" -" + right, i):
                break
            match = _TOKEN.match(text, i)
            if match is None:                  # pragma: no cover - "other" matches anything
                break
            kind = match.lastgroup or "other"
            if kind not in ("space", "comment"):
                tokens.append((kind, match.group(), i))
            i = match.end()
        pos = i + len(right)
        for index, (kind, value, at) in enumerate(tokens):
            if kind != "ident":
                continue
            if index > 0 and tokens[index - 1][1] in ("define", "template", "block"):
                continue
            line = text.count("\n", 0, at) + 1
            if value in SECRET_FUNCTIONS or value in ENV_FUNCTIONS:
                args: list[str] = []
                rest = tokens[index + 1:]
                while rest and rest[0][0] in ("string", "raw"):
                    args.append(_go_string(rest[0][1]))
                    rest = rest[1:]
                # anything but the end of the call after the strings is a computed argument
                computed = bool(rest) and (rest[0][0] in ("field", "var", "ident", "char")
                                           or rest[0][1] == "(")
                calls.append(Call(value, tuple(args), line, literal=bool(args) and not computed))
            elif value in REFUSED_FUNCTIONS:
                calls.append(Call(value, (), line))


def env_names(calls: list[Call]) -> list[str]:
    """The environment variables a template reads with a literal name, once each."""
    return list(dict.fromkeys(c.args[0] for c in calls if c.function in ENV_FUNCTIONS and c.args))
