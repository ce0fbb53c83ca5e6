"""`agentd catalog`: secrets with their schedule and consumers; --upstream-policy is enough for the
agent and nothing more (checked against a real OpenBao)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from agentd import catalog
from agentd import config as config_mod
from agentd.errors import AuthError
from tests.agentfixture import running_agent
from tests.kindsupport import call, unique, write_config_with_catalog_policy
from tests.openbao import DevServer
from tests.test_pki import enable_pki

CONFIG = """
[upstream]
addresses = ["https://127.0.0.1:8200"]
[upstream.auth]
method = "approle"
role_id_file = "/etc/agentd/role_id"
secret_id_file = "/etc/agentd/secret_id"

[secrets.db]
kind = "kv2"
path = "secret/data/app/db"
refresh = "1m"
version = 3

[secrets.api]
kind = "kv1"
path = "kv1/app/api"

[secrets.pg]
kind = "leased"
path = "database/creds/app"
grace = "45s"

[secrets.web-tls]
kind = "pki"
path = "pki_int/issue/web"
params = { common_name = "web.internal", ttl = "24h" }
revoke_previous = true

[[policy]]
name = "webapp"
uids = [1000]
allow = ["db", "web-*"]

[[policy]]
name = "units"
units = ["webapp.service", "worker.service"]
allow = ["pg"]

[[policy]]
name = "admins"
uids = [0]
allow = ["*"]
admin = true

[[template]]
contents = "password = {{ secret('db').password }}\\n"
destination = "/etc/webapp/db.conf"

[[template]]
source = "SOURCE"
destination = "/etc/worker/pg.conf"

[[bundle]]
directory = "/etc/webapp/tls"
files.\"cert.pem\" = "{{ secret('web-tls').certificate }}"
files.\"key.pem\" = "{{ secret('web-tls').private_key }}"
"""


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    source = tmp_path / "pg.conf.j2"
    source.write_text("user={{ secret('pg').username }}\npass={{ secret('pg').password }}\n")
    path = tmp_path / "agentd.toml"
    path.write_text(CONFIG.replace("SOURCE", str(source)))
    return path


def agentd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentd", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_catalog_lists_every_consumer(config_path: Path, tmp_path: Path) -> None:
    result = agentd("catalog", "-c", str(config_path), "--socket", str(tmp_path / "none"),
                    "--json")
    assert result.returncode == 0, result.stderr
    items = {item["name"]: item for item in json.loads(result.stdout)}
    assert sorted(items) == ["api", "db", "pg", "web-tls"]
    assert items["db"]["consumers"] == {
        "policies": ["webapp", "admins"], "units": [], "templates": ["/etc/webapp/db.conf"],
        "bundles": [],
    }
    assert items["pg"]["consumers"] == {
        "policies": ["units", "admins"], "units": ["webapp.service", "worker.service"],
        "templates": ["/etc/worker/pg.conf"], "bundles": [],
    }
    assert items["web-tls"]["consumers"] == {
        "policies": ["webapp", "admins"], "units": [], "templates": [],
        "bundles": ["/etc/webapp/tls"],
    }
    assert items["api"]["consumers"]["policies"] == ["admins"]
    assert (items["db"]["kind"], items["db"]["path"], items["db"]["pinned"]) == (
        "kv2", "secret/data/app/db", 3)
    assert items["db"]["schedule"] == "poll every 1m (+-10%)"
    assert "renew at 67% of the lease" in items["pg"]["schedule"]
    assert "old lease revoked after 45s" in items["pg"]["schedule"]
    assert "re-issue at 67%" in items["web-tls"]["schedule"]
    text = agentd("catalog", "-c", str(config_path), "--socket", str(tmp_path / "none"))
    assert text.returncode == 0, text.stderr
    assert "db  (kv2)  secret/data/app/db  PINNED to version 3" in text.stdout
    assert "  units: webapp.service, worker.service" in text.stdout


def test_upstream_policy_grants_exactly_the_catalog(config_path: Path) -> None:
    result = agentd("catalog", "-c", str(config_path), "--upstream-policy")
    assert result.returncode == 0, result.stderr
    hcl = result.stdout
    assert hcl == catalog.upstream_policy(config_mod.load(config_path, check_permissions=False))
    blocks = {
        line.split('"')[1]: json.loads(nxt.split("=", 1)[1])
        for line, nxt in zip(hcl.splitlines(), hcl.splitlines()[1:], strict=False)
        if line.startswith("path ")
    }
    assert blocks == {
        "secret/data/app/db": ["read"],
        "kv1/app/api": ["read"],
        "database/creds/app": ["read"],
        "sys/leases/renew/database/creds/app/*": ["update"],
        "sys/leases/revoke/database/creds/app/*": ["update"],
        "pki_int/issue/web": ["create", "update"],
        "pki_int/revoke": ["update"],
        "auth/token/renew-self": ["update"],
        "auth/token/lookup-self": ["read"],
        "auth/token/revoke-self": ["update"],
    }


async def test_printed_policy_is_enough_for_the_agent_and_nothing_more(
    bao: DevServer, tmp_path: Path
) -> None:
    prefix = unique("cat")
    bao.kv_put(f"{prefix}/db", {"password": "v1"})
    bao.kv_put(f"{prefix}/outside", {"password": "not for this host"})
    bao.api("POST", f"kv1/{prefix}/api", {"token": "t"})
    mount = enable_pki(bao)
    secrets = f"""
[secrets.db]
kind = "kv2"
path = "secret/data/{prefix}/db"
[secrets.api]
kind = "kv1"
path = "kv1/{prefix}/api"
[secrets.web-tls]
kind = "pki"
path = "{mount}/issue/web"
params = {{ common_name = "a.example.test", ttl = "1h" }}
revoke_previous = true
grace = "100ms"
"""
    path, _ = write_config_with_catalog_policy(tmp_path, bao, secrets)
    async with running_agent(path) as running:
        with trio.fail_after(20):
            for name in ("db", "api", "web-tls"):
                reply = await call(running.socket, "get", name=name)
                assert reply["stale"] is False
            await call(running.socket, "refresh", name="web-tls")    # issue + revoke previous
            with pytest.raises(AuthError):
                await running.agent.upstream.request("GET", f"secret/data/{prefix}/outside")
            with pytest.raises(AuthError):
                await running.agent.upstream.request("GET", "sys/policies/acl")
            while "previous certificate revoked" not in running.log_text():
                assert "revoking the previous certificate failed" not in running.log_text()
                await trio.sleep(0.05)
            status = (await call(running.socket, "status"))["secrets"]
            assert all(s["failures"] == 0 for s in status.values())
            assert status["db"]["next_rotation"] is not None
