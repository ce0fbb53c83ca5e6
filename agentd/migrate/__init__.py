"""``agentd migrate AGENT.hcl``: an OpenBao/Vault Agent configuration -> an agentd TOML.

Theory of operation: the HCL is parsed with python-hcl2 (a maintained HCL parser on lark) into
blocks and attributes that keep their line; nothing of it is evaluated. Each stanza the agent knows
is translated, or turned into a comment where agentd does the job differently (a listener, the
cache, ``exec``), or refused where agentd cannot do what the agent did (another auth method, a
token sink, a template ``plugin``, a stanza we do not know). Every template's text (``contents``,
or the file ``source`` names) is parsed by agentd's own Go engine, as ``check-config`` will parse
it, for the consul-template functions that read the upstream (``secret``, ``pkiCert``,
``secrets``; a small scan of our own names the functions agentd refuses on purpose, with the
reason, first): each distinct upstream path becomes one ``[secrets.NAME]``
(decision 3: the config is the catalog), its kind asked of the upstream's
``sys/internal/ui/mounts/<path>`` when ``--upstream`` is given, else inferred from the path and
flagged so in a comment.

Either the whole translation succeeds (``Result.toml``, plus ``notes`` for stderr) or ``problems``
lists everything that cannot be carried over, each ``FILE:LINE: what: why``, and there is no TOML.
The TOML is written by hand (agentd has no TOML writer) and read back with tomllib before it is
returned: a template's text must come back byte for byte.

One module per step::

    hcl.py        HCL -> ``Block``s that keep their lines (python-hcl2)
    scan.py       the calls of interest in a Go template
    mounts.py     ``--upstream``: which mount holds a path
    translate.py  ``Migration``: the stanzas, the secrets, the TOML's sections
    tomlwrite.py  writing TOML values by hand
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from agentd.migrate.hcl import Block, HclError, parse_hcl
from agentd.migrate.mounts import MountLookup, UpstreamLookupError
from agentd.migrate.scan import scan_template
from agentd.migrate.translate import Migration, Problem, secret_name

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]


@dataclass
class Result:
    toml: str | None                          # None when there are problems
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def migrate(path: Path, *, upstream: str | None = None, token: str | None = None,
            ca_file: str | None = None) -> Result:
    """Translate the agent config at ``path``. ``upstream`` and ``token``: ask the server for
    each mount's type and version. Raises UpstreamLookupError if the upstream cannot be asked."""
    file = str(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return Result(None, [Problem(file, 0, "file", str(getattr(exc, "strerror", exc)))])
    try:
        root = parse_hcl(text)
    except HclError as exc:
        return Result(None, [Problem(file, exc.line, "HCL syntax error", exc.message)])
    lookup = None
    if upstream is not None:
        vault = (root.children("vault") or [Block("vault", (), 0)])[0]
        namespace = vault.get("namespace")
        lookup = MountLookup(upstream, token or "", ca_file=ca_file or vault.get("ca_cert"),
                             namespace=namespace if isinstance(namespace, str) else None)
    migration = Migration(path, text, root, lookup=lookup, fallback_address=upstream)
    output = migration.run()
    problems = sorted(migration.problems, key=lambda p: (p.file != file, p.file, p.line))
    if output is None:
        return Result(None, problems, migration.notes)
    _check_round_trip(output, migration)
    notes = [*migration.notes,
             f"{file}: no [[policy]] generated (agentd is deny-by-default): the output has a "
             "commented example; grant each reading process its secrets"]
    if any(s.inferred for s in migration.secrets.values()):
        count = sum(1 for s in migration.secrets.values() if s.inferred)
        notes.append(f"{file}: the kind of {count} secret(s) is inferred from the path, marked "
                     "INFERRED: check them, or run with --upstream ADDR to ask the server")
    return Result(output, [], notes)


def _check_round_trip(output: str, migration: Migration) -> None:
    """The TOML must parse, and every template's contents come back byte for byte."""
    data = tomllib.loads(output)
    expected = [b.get("contents") for b in migration.root.children("template")]
    got = [t.get("contents") for t in data.get("template", [])]
    if expected != got:                        # pragma: no cover - a bug in the writer
        raise AssertionError("migrate: a template's contents did not survive TOML writing")


__all__ = ["Problem", "Result", "UpstreamLookupError", "migrate", "parse_hcl", "scan_template",
           "secret_name"]
