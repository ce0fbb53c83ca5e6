"""The one rule for which secrets a template names, in either engine.

A Jinja2 template reads a secret with ``secret('name')`` and a literal name; a Go template
(``engine = "go"``, consul-template's dialect) with ``secret "path"``, ``secrets "path"`` or
``pkiCert "path"`` and a literal upstream path, which resolves to the declared secret with that
path (decision 3: the config is the catalog; a path no declared secret has is refused, never
fetched). What a template names is what the config indexes (which templates re-render when a
secret changes), what ``check-config`` checks against the catalog and the template's ``allow``
list, and what ``agentd catalog`` lists as a consumer; all of them use this module, so they
cannot drift apart. An empty Jinja name (``secret('')``) is matched too, so the config can
reject it rather than silently ignore it.

Pure (the Go parser is the standard library only): the sandboxed render worker may import it.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agentd.errors import RenderError

SECRET_REF = re.compile(r"""secret\(\s*(?P<q>['"])(?P<name>[^'"]*)(?P=q)\s*\)""")
ENGINES = ("jinja", "go")


def secret_refs(text: str) -> list[str]:
    """The names `text` reads with a literal ``secret('NAME')``, first use first, once each."""
    return list(dict.fromkeys(m.group("name") for m in SECRET_REF.finditer(text)))


def allowed(name: str, patterns: Iterable[str]) -> bool:
    """Whether a template's ``allow`` list (secret name globs) lets it name ``name``."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


@dataclass(frozen=True)
class Engine:
    """How a template's text is read: the engine and, for Go, its options."""

    name: str = "jinja"
    left_delimiter: str = "{{"
    right_delimiter: str = "}}"
    error_on_missing_key: bool = True       # Go: a missing key fails the render (agentd's way)
    env: tuple[str, ...] = ()               # Go: the environment variables ``env`` may read

    @property
    def missing_key(self) -> str:
        """Go's missingkey option: "error" (agentd's default) or consul-template's "zero"."""
        return "error" if self.error_on_missing_key else "zero"

    def options(self, template: str) -> dict[str, object]:
        """The worker request's options for this engine (plain data: msgpack)."""
        return {"name": template, "left": self.left_delimiter, "right": self.right_delimiter,
                "missing_key": self.missing_key, "env_allow": list(self.env)}


JINJA = Engine()


def paths_of(secrets: Mapping[str, Any]) -> dict[str, str]:
    """Upstream path -> declared name, for Go templates, from ``Config.secrets``.

    A kv2 secret answers to its API path (``secret/data/app/db``) and to the path without
    ``data/`` (``secret/app/db``), which consul-template rewrites the same way."""
    out: dict[str, str] = {}
    for name, secret in secrets.items():
        out[secret.path] = name
        if secret.kind == "kv2":
            mount, sep, rest = secret.path.partition("/data/")
            if sep:
                out.setdefault(f"{mount}/{rest}", name)
    return out


def template_refs(
    text: str, engine: Engine, by_path: Mapping[str, str], *, template: str
) -> list[str]:
    """The declared secret names ``text`` reads, first use first, once each.

    Args:
        text: the template's text.
        engine: Jinja2 (names) or Go (paths, looked up in ``by_path``: upstream path -> name).
        template: the template's name for messages (its destination or source).

    Raises:
        RenderError: (Go only) a syntax error, an unsupported function, or a path no declared
            secret has, naming the template and the line; never a value.
    """
    if engine.name != "go":
        return secret_refs(text)
    names: list[str] = []
    for function, ref_path, line in _go_paths(text, engine, template):
        # secret "secret/data/db?version=2": the catalog pins versions (a secret's `version`)
        name = by_path.get(ref_path.partition("?")[0])
        if name is None:
            raise RenderError(f"{template}:{line}: {function} {ref_path!r}: no declared "
                              "secret has this path (declare it under [secrets.NAME])")
        names.append(name)
    return list(dict.fromkeys(names))


@functools.lru_cache(maxsize=4096)
def _go_paths(text: str, engine: Engine, template: str) -> tuple[tuple[str, str, int], ...]:
    """(function, path, line) of each literal secret path of a Go template; parsed once per
    text (the renderer asks at every render). Raises RenderError (GoTemplateError)."""
    from agentd import gotemplate  # deferred: the Jinja2 path never loads it

    parsed = gotemplate.parse(text, name=template, left_delim=engine.left_delimiter,
                              right_delim=engine.right_delimiter, env_allow=engine.env,
                              missing_key=engine.missing_key)
    return tuple((ref.function, ref.path, ref.line) for ref in parsed.secret_paths())


def upstream_reply(kind: str, data: Mapping[str, object], *, version: int,
                   expires_in: float | None = None) -> dict[str, object]:
    """A cached value in the shape OpenBao's API returns it, as Go templates read it
    (``.Data.data.password`` for kv2, ``.Data.password`` otherwise)."""
    if kind == "kv2":
        return {"data": {"data": dict(data), "metadata": {"version": version}}}
    reply: dict[str, object] = {"data": dict(data)}
    if kind == "leased":
        reply.update(lease_id="", renewable=False,
                     lease_duration=int(expires_in) if expires_in is not None else 0)
    return reply
