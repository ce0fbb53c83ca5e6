"""The one rule for which secrets a template names.

A template reads a secret with ``secret('name')`` (Jinja2) and a literal name; that literal is
what the config indexes (which templates re-render when a secret changes), what ``check-config``
checks against the declared catalog, and what ``agentd catalog`` lists as a consumer. All three
use this module, so they cannot drift apart. An empty name (``secret('')``) is matched too, so
the config can reject it rather than silently ignore it.

Pure and dependency-free: the sandboxed render worker may import it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

SECRET_REF = re.compile(r"""secret\(\s*(?P<q>['"])(?P<name>[^'"]*)(?P=q)\s*\)""")


def secret_refs(text: str) -> list[str]:
    """The names `text` reads with a literal ``secret('NAME')``, first use first, once each."""
    return list(dict.fromkeys(m.group("name") for m in SECRET_REF.finditer(text)))


def allowed(name: str, patterns: Iterable[str]) -> bool:
    """Whether a template's ``allow`` list (secret name globs) lets it name ``name``."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
