"""The host's catalog (decision 3): every declared secret, its schedule and its consumers, and the
least-privilege OpenBao policy the agent's own login needs for exactly this catalog.

Pure functions over a loaded ``Config`` (plus, optionally, a running agent's ``status`` for the
next rotation and the pinned version it serves); ``agentd catalog`` prints them.

Consumers of a secret: the ``[[policy]]`` rules whose ``allow`` globs match it (with the
systemd units among their selectors: those can load it through ``LoadCredential=``), the
templates and bundles whose text names it with ``secret('NAME')``.

The upstream policy grants what each secret's kind asks for (``Kind.grants``: ``read`` on a
kv2/kv1/leased path; ``update`` on the lease renew and revoke endpoints under the leased path
(``sys/leases/renew/PATH/*``: only this secret's leases); ``create``/``update`` on a pki issue
path and, with ``revoke_previous``, ``update`` on its mount's ``revoke``). The token's own
renew/lookup/revoke-self come last.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agentd import refs
from agentd.config import BundleConfig, Config, SecretConfig, TemplateConfig
from agentd.errors import RenderError
from agentd.kinds import KINDS


def _template_text(contents: str | None, source: Path | None) -> str:
    if contents is not None:
        return contents
    if source is None:
        return ""
    try:
        return source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def schedule(secret: SecretConfig) -> str:
    """A human description of when ``secret`` is fetched again (its kind's ``schedule``)."""
    return KINDS[secret.kind].schedule(secret)


def entries(config: Config, status: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One dict per declared secret, sorted by name (see the module docstring)."""
    live = (status or {}).get("secrets", {})
    by_path = refs.paths_of(config.secrets)

    def names(text: str, output: TemplateConfig | BundleConfig) -> set[str]:
        try:
            return set(refs.template_refs(text, output.reader, by_path, template="catalog"))
        except RenderError:
            return set()        # check-config reports it; the catalog lists what it can

    template_refs = [
        (str(t.destination), names(_template_text(t.contents, t.source), t))
        for t in config.templates
    ]
    bundle_refs = [
        (str(b.directory), set().union(*(names(text, b) for text in b.files.values())))
        for b in config.bundles
    ]
    out: list[dict[str, Any]] = []
    for name, secret in sorted(config.secrets.items()):
        policies = [p for p in config.policies
                    if any(fnmatch.fnmatchcase(name, g) for g in p.allow)]
        state = live.get(name, {}) if isinstance(live, Mapping) else {}
        out.append({
            "name": name,
            "kind": secret.kind,
            "path": secret.path,
            "schedule": schedule(secret),
            "pinned": secret.version,
            "next_rotation": state.get("next_rotation"),
            "expires_at": state.get("expires_at") or state.get("lease_expires_at"),
            "consumers": {
                "policies": [p.name for p in policies],
                "units": sorted({u for p in policies for u in p.units}),
                "templates": [dest for dest, refs in template_refs if name in refs],
                "bundles": [d for d, refs in bundle_refs if name in refs],
            },
        })
    return out


def render(items: list[dict[str, Any]]) -> str:
    """The catalog as text, one block per secret."""
    lines: list[str] = []
    for item in items:
        head = f"{item['name']}  ({item['kind']})  {item['path']}"
        if item["pinned"] is not None:
            head += f"  PINNED to version {item['pinned']}"
        lines.append(head)
        lines.append(f"  schedule: {item['schedule']}")
        if item["next_rotation"] is not None:
            lines.append(f"  next rotation: {item['next_rotation']:.0f} (unix time)")
        consumers = item["consumers"]
        for label in ("policies", "units", "templates", "bundles"):
            lines.append(f"  {label}: {', '.join(consumers[label]) or '-'}")
        lines.append("")
    return "\n".join(lines)


def upstream_policy(config: Config) -> str:
    """The OpenBao/Vault ACL policy (HCL) the agent's login needs for exactly this catalog."""
    grants: dict[str, set[str]] = {}
    comments: dict[str, list[str]] = {}

    def grant(path: str, caps: tuple[str, ...], why: str) -> None:
        grants.setdefault(path, set()).update(caps)
        comments.setdefault(path, []).append(why)

    for name in sorted(config.secrets):
        secret = config.secrets[name]
        for path, caps, why in KINDS[secret.kind].grants(secret):
            grant(path, caps, why)
    grant("auth/token/renew-self", ("update",), "the agent renews its own token")
    grant("auth/token/lookup-self", ("read",), "the agent checks its own token after a 403")
    grant("auth/token/revoke-self", ("update",), "the agent revokes its token at shutdown")
    order = ("create", "read", "update", "delete", "list")
    blocks = [
        f"# {'; '.join(comments[path])}\n"
        f"path {json.dumps(path)} {{\n"
        f"  capabilities = {json.dumps([c for c in order if c in caps])}\n}}\n"
        for path, caps in grants.items()
    ]
    header = "# Least-privilege policy for this agentd catalog (agentd catalog --upstream-policy)\n"
    return header + "\n".join(blocks)
