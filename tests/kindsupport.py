"""Helpers for the pki / leased / catalog / pin / anomaly tests: a minimal agent config with the
secrets a test declares, an approle with a test's own policy, and socket calls."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from tests.agentfixture import call as call  # re-exported: the kinds tests import it from here
from tests.agentfixture import socket_dir
from tests.openbao import DevServer


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def approle_with_policy(bao: DevServer, tmp_path: Path, hcl: str) -> tuple[Path, Path]:
    """A fresh approle whose tokens carry exactly the policy ``hcl``; its credential files."""
    name = unique("kinds")
    bao.put_policy(name, hcl)
    role_id, secret_id = bao.approle(name, policies=[name], token_ttl="1h")
    role_file = tmp_path / f"{name}.role_id"
    secret_file = tmp_path / f"{name}.secret_id"
    for path, value in ((role_file, role_id), (secret_file, secret_id)):
        path.write_text(value + "\n")
        path.chmod(0o600)
    return role_file, secret_file


def write_config(
    tmp_path: Path,
    bao: DevServer,
    approle: tuple[Path, Path],
    secrets: str,
    *,
    extra: str = "",
    upstream_extra: str = "",
    address: str | None = None,
) -> Path:
    role_file, secret_file = approle
    sock = socket_dir() / "agentd.sock"
    text = f"""
[agent]
socket = "{sock}"
state_dir = "{tmp_path / 'state'}"
ready_timeout = "10s"
log_level = "debug"

[upstream]
addresses = ["{address or bao.address}"]
timeout = "2s"
backoff_min = "200ms"
backoff_max = "1s"
{upstream_extra}

[upstream.auth]
method = "approle"
role_id_file = "{role_file}"
secret_id_file = "{secret_file}"

[audit]
path = "{tmp_path / 'audit.jsonl'}"

{secrets}

[[policy]]
name = "root-admin"
uids = [0]
allow = ["*"]
admin = true
{extra}
"""
    path = tmp_path / "agentd.toml"
    path.write_text(text)
    return path


def write_config_with_catalog_policy(
    tmp_path: Path, bao: DevServer, secrets: str, **kwargs: Any
) -> tuple[Path, str]:
    """A config whose approle holds exactly ``agentd catalog --upstream-policy``'s output for it.

    Returns the config path and the policy text.
    """
    from agentd import catalog
    from agentd import config as config_mod

    name = unique("catalog")
    role_file = tmp_path / f"{name}.role_id"
    secret_file = tmp_path / f"{name}.secret_id"
    path = write_config(tmp_path, bao, (role_file, secret_file), secrets, **kwargs)
    policy = catalog.upstream_policy(config_mod.load(path, check_permissions=False))
    bao.put_policy(name, policy)
    role_id, secret_id = bao.approle(name, policies=[name], token_ttl="1h",
                                     token_no_default_policy=True)
    for file, value in ((role_file, role_id), (secret_file, secret_id)):
        file.write_text(value + "\n")
        file.chmod(0o600)
    return path, policy
