"""agentd.kinds as a package: the registry, the config keys it exposes, and snapshot leases
written before the package existed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from agentd import config
from agentd.cache import Cache
from agentd.config import SecretConfig
from agentd.crypto import KEY_BYTES, Sealer
from agentd.errors import ConfigError
from agentd.kinds import CONFIG_KEYS, KIND_ONLY_KEYS, KINDS, Kinds, LeaseRecord, LeaseState
from agentd.snapshot import FILE_NAME, Snapshot

ROOT = Path(__file__).resolve().parent.parent
OLD_SNAPSHOT = ROOT / "tests" / "fixtures" / "snapshot" / "format1-leases.snapshot"

VALUES = {   # a valid value for each kind-only key
    "params": '{ common_name = "x.example" }', "renew_at": "0.5", "revoke_previous": "true",
    "grace": '"30s"', "revoke_on_shutdown": "true", "version": "2",
}
# the [upstream] part of a config fixture, then one secret with one kind-only key
UPSTREAM = (ROOT / "tests" / "fixtures" / "config" / "bad-secret-option-for-kind.toml").read_text()
CONFIG = UPSTREAM.split("[secrets.")[0] + """
[secrets.s]
kind = "{kind}"
path = "a/b"
{key} = {value}

[[policy]]
users = ["root"]
allow = ["s"]
"""


def test_the_registry_holds_every_kind_the_config_accepts() -> None:
    assert tuple(KINDS) == config.SECRET_KINDS
    assert all(kind.name == name for name, kind in KINDS.items())
    secret_fields = [f.name for f in fields(SecretConfig)]
    assert list(KIND_ONLY_KEYS) == [k for k in secret_fields if k in KIND_ONLY_KEYS]
    assert set(VALUES) == set(KIND_ONLY_KEYS)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("key", sorted(VALUES))
def test_a_kind_accepts_exactly_its_config_keys(tmp_path: Path, kind: str, key: str) -> None:
    path = tmp_path / "agentd.toml"
    path.write_text(CONFIG.format(kind=kind, key=key, value=VALUES[key]))
    refused = f"secrets.s.{key}: not used by kind {kind!r}"
    try:
        config.load(path, check_permissions=False)
    except ConfigError as exc:
        assert (refused in str(exc)) == (key not in CONFIG_KEYS[kind]), str(exc)
    else:
        assert key in CONFIG_KEYS[kind]
    assert (kind in KIND_ONLY_KEYS[key]) == (key in CONFIG_KEYS[kind])


def test_config_does_not_import_the_kinds() -> None:
    """The kinds import agentd.config; config reads them with a function-level import."""
    code = ("import sys, agentd.config; "
            "sys.exit(any(m.startswith('agentd.kinds') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


async def test_leases_in_a_snapshot_from_before_the_kinds_package_are_taken_over(
    tmp_path: Path,
) -> None:
    # Written by the single-module agentd/kinds.py (KindState.lease_*), export_leases().
    shutil.copy(OLD_SNAPSHOT, tmp_path / FILE_NAME)
    reader = Snapshot(tmp_path / FILE_NAME, Sealer(b"k" * KEY_BYTES), host="fixture-host")
    cache = Cache()
    assert sorted(reader.load_into(cache, names={"pg", "db"})) == ["db", "pg"]
    session = reader.restored_session
    assert session is not None and session.token is not None
    record = LeaseRecord(lease_id="database/creds/app/fixture-lease-id", lease_duration=3600.0,
                         expires_at=4600.0, renewed_at=1000.0, renewable=True)
    assert dict(session.leases) == {"pg": record}
    secrets = {
        "pg": SecretConfig(name="pg", kind="leased", path="database/creds/app"),
        "db": SecretConfig(name="db", kind="kv2", path="secret/data/db"),
    }
    kinds = Kinds(None, cache, clock=lambda: 2000.0)  # type: ignore[arg-type]
    assert kinds.restore_leases({**session.leases, "db": record}, secrets,
                                token=session.token.value) == ["pg"]
    state = kinds.state("pg")
    assert isinstance(state, LeaseState)
    assert (state.lease_id, state.lease_expires_at, state.renewable) == (
        record.lease_id, 4600.0, True)
    assert not state.under_other_token(kinds.owner(session.token.value))
    assert kinds.holds_leases()
    assert kinds.export_leases() == {"pg": record}
    assert kinds.status(secrets["pg"])["lease_expires_at"] == 4600.0
