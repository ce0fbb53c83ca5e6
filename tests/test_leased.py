"""kind = "leased": dynamic PostgreSQL users from OpenBao's database engine, against a real
PostgreSQL (started once per session) and a real OpenBao."""

from __future__ import annotations

import sys
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from agentd.errors import NotFound, Unavailable
from tests.agentfixture import running_agent
from tests.kindsupport import (
    approle_with_policy,
    call,
    unique,
    write_config,
    write_config_with_catalog_policy,
)
from tests.openbao import DevServer
from tests.postgres import Postgres, pg_bin

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = Postgres.start()
    try:
        yield server
    finally:
        server.stop()


def enable_database(bao: DevServer, pg: Postgres, *, ttl: str, max_ttl: str) -> str:
    """A fresh database mount (unique path) whose role "app" creates PostgreSQL login users."""
    mount = unique("db")
    bao.api("POST", f"sys/mounts/{mount}", {"type": "database"})
    bao.api("POST", f"{mount}/config/pg", {
        "plugin_name": "postgresql-database-plugin",
        "connection_url": pg.connection_url,
        "username": pg.admin_user,
        "password": pg.admin_password,
        "allowed_roles": ["app"],
        "verify_connection": True,
    })
    bao.api("POST", f"{mount}/roles/app", {
        "db_name": "pg",
        "creation_statements": [
            "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
            "VALID UNTIL '{{expiration}}';",
            "GRANT CONNECT ON DATABASE app TO \"{{name}}\";",
        ],
        "default_ttl": ttl,
        "max_ttl": max_ttl,
    })
    return mount


def leased_policy(mount: str) -> str:
    return (
        f'path "{mount}/creds/app" {{ capabilities = ["read"] }}\n'
        f'path "sys/leases/renew/{mount}/creds/app/*" {{ capabilities = ["update"] }}\n'
        f'path "sys/leases/revoke/{mount}/creds/app/*" {{ capabilities = ["update"] }}\n'
    )


def secrets_toml(mount: str, extra: str = "") -> str:
    return f"""
[secrets.pg]
kind = "leased"
path = "{mount}/creds/app"
grace = "1s"
{extra}
"""


async def login(pg: Postgres, data: dict[str, str]) -> bool:
    return await trio.to_thread.run_sync(pg.can_login, data["username"], data["password"])


async def role_exists(pg: Postgres, user: str) -> bool:
    return await trio.to_thread.run_sync(pg.role_exists, user)


async def test_credential_works_across_renewals_and_reissues_and_old_user_is_revoked(
    bao: DevServer, postgres: Postgres, tmp_path: Path
) -> None:
    mount = enable_database(bao, postgres, ttl="3s", max_ttl="8s")
    db_conf = tmp_path / "db.conf"
    template = f"""
[[template]]
destination = "{db_conf}"
contents = "username={{{{ secret('pg').username }}}}\\npassword={{{{ secret('pg').password }}}}\\n"
"""
    # The agent's login holds exactly what `agentd catalog --upstream-policy` prints.
    path, policy = write_config_with_catalog_policy(tmp_path, bao, secrets_toml(mount),
                                                    extra=template)
    assert f"sys/leases/renew/{mount}/creds/app/*" in policy
    users: list[str] = []
    conf_users: set[str] = set()
    async with running_agent(path) as running:
        with trio.fail_after(60):
            while True:
                reply = await call(running.socket, "get", name="pg")
                data = reply["data"]
                assert reply["expires_at"] > time.time() - 1
                if not users or users[-1] != data["username"]:
                    users.append(data["username"])
                assert await login(postgres, data), "the served credential must log in"
                if db_conf.exists():    # the rendered file works too (an app reading db.conf)
                    rendered = dict(line.split("=", 1)
                                    for line in db_conf.read_text().splitlines())
                    assert await login(postgres, rendered)
                    conf_users.add(rendered["username"])
                status = (await call(running.socket, "status"))["secrets"]["pg"]
                if len(users) >= 3 and status["renewals"] >= 2:
                    break
                await trio.sleep(0.3)
            # The replaced users are revoked (dropped) after the grace period; the live one works.
            for old in users[:-1]:
                while await role_exists(postgres, old):
                    await trio.sleep(0.2)
            current = (await call(running.socket, "get", name="pg"))["data"]
            assert await login(postgres, current)
    assert status["reissues"] >= 3
    assert len(conf_users) >= 2           # db.conf followed the re-issues
    assert current["password"] not in running.log_text()
    # Leases outlive a clean shutdown by default (a restart must not cut running apps off).
    assert await role_exists(postgres, current["username"])


async def test_revoke_on_shutdown_drops_the_user(
    bao: DevServer, postgres: Postgres, tmp_path: Path
) -> None:
    mount = enable_database(bao, postgres, ttl="1h", max_ttl="2h")
    approle = approle_with_policy(bao, tmp_path, leased_policy(mount))
    path = write_config(tmp_path, bao, approle,
                        secrets_toml(mount, "revoke_on_shutdown = true"))
    async with running_agent(path) as running:
        with trio.fail_after(20):
            data = (await call(running.socket, "get", name="pg"))["data"]
            assert await login(postgres, data)
    with trio.fail_after(20):
        assert not await role_exists(postgres, data["username"])
        assert not await login(postgres, data)


async def test_a_lease_revoked_upstream_is_dropped_and_replaced(
    bao: DevServer, postgres: Postgres, tmp_path: Path
) -> None:
    mount = enable_database(bao, postgres, ttl="3s", max_ttl="1h")
    approle = approle_with_policy(bao, tmp_path, leased_policy(mount))
    path = write_config(tmp_path, bao, approle, secrets_toml(mount))
    async with running_agent(path) as running:
        with trio.fail_after(30):
            first = (await call(running.socket, "get", name="pg"))["data"]
            await trio.to_thread.run_sync(
                lambda: bao.api("PUT", f"sys/leases/revoke-prefix/{mount}/creds/app", {})
            )
            assert not await login(postgres, first)
            while True:
                try:
                    data = (await call(running.socket, "get", name="pg"))["data"]
                except NotFound:        # between the drop and the new read (issue 16)
                    data = first
                if data["username"] != first["username"]:
                    break
                await trio.sleep(0.2)
            assert await login(postgres, data)
            assert "lease is gone upstream" in running.log_text()


async def test_outage_serves_the_last_credential_while_its_lease_lasts(
    postgres: Postgres, tmp_path: Path
) -> None:
    server = DevServer.start(tmp_path / "bao")          # our own: this test stops it
    try:
        mount = enable_database(server, postgres, ttl="6s", max_ttl="1h")
        approle = approle_with_policy(server, tmp_path, leased_policy(mount))
        # renew_at 0.4: the first renewal (which fails) is due well before the lease ends.
        path = write_config(tmp_path, server, approle, secrets_toml(mount, "renew_at = 0.4"))
        async with running_agent(path) as running:
            with trio.fail_after(40):
                before = await call(running.socket, "get", name="pg")
                server.pause()
                try:
                    expires = before["expires_at"]
                    served_stale = False
                    while time.time() < expires - 1.0:
                        reply = await call(running.socket, "get", name="pg")
                        assert reply["data"]["username"] == before["data"]["username"]
                        served_stale = served_stale or reply["stale"]
                        assert await login(postgres, reply["data"])
                        await trio.sleep(0.3)
                    while True:         # past the lease: no longer served
                        try:
                            reply = await call(running.socket, "get", name="pg")
                        except Unavailable:
                            break
                        expires = reply["expires_at"]
                        await trio.sleep(0.2)
                finally:
                    server.resume()
                assert served_stale
    finally:
        server.stop()


CHECK = """
import json, os, subprocess, sys
data = json.load(open(os.environ["AGENTD_SECRET_FILE"]))
if os.path.exists(sys.argv[1]):
    sys.exit(3)
env = dict(os.environ, PGPASSWORD=data["password"])
sys.exit(subprocess.run([sys.argv[2], "-h", "127.0.0.1", "-p", sys.argv[3], "-U",
                         data["username"], "-d", "app", "-w", "-c", "SELECT 1"],
                        env=env, capture_output=True).returncode)
"""


def lease_count(bao: DevServer, mount: str) -> int:
    try:
        reply = bao.api("LIST", f"sys/leases/lookup/{mount}/creds/app/")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return 0
        raise
    return len(reply["data"]["keys"])


async def test_check_logs_in_with_the_new_credential_and_a_refused_one_is_revoked(
    bao: DevServer, postgres: Postgres, tmp_path: Path
) -> None:
    mount = enable_database(bao, postgres, ttl="1h", max_ttl="2h")
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    fail_flag = tmp_path / "fail"
    check = f'check = ["{sys.executable}", "{script}", "{fail_flag}", "{pg_bin("psql")}", ' \
            f'"{postgres.port}"]'
    path, _ = write_config_with_catalog_policy(tmp_path, bao, secrets_toml(mount, check))
    async with running_agent(path) as running:
        with trio.fail_after(30):
            first = (await call(running.socket, "get", name="pg"))["data"]
            assert await login(postgres, first)
            # The lease disappears upstream while the check refuses every new credential.
            fail_flag.touch()
            await trio.to_thread.run_sync(
                lambda: bao.api("PUT", f"sys/leases/revoke-prefix/{mount}/creds/app", {})
            )
            with pytest.raises(Unavailable, match="check exited with status 3"):
                await call(running.socket, "refresh", name="pg")
            # The refused credential's lease was revoked at once: nothing leaks.
            assert await trio.to_thread.run_sync(lease_count, bao, mount) == 0
            fail_flag.unlink()
            await call(running.socket, "refresh", name="pg")
            data = (await call(running.socket, "get", name="pg"))["data"]
            assert data["username"] != first["username"]
            assert await login(postgres, data)
            status = (await call(running.socket, "status"))["secrets"]["pg"]
            assert status["check_failures"] == 1


async def test_lease_moves_to_the_new_token_before_the_old_token_dies(
    bao: DevServer, postgres: Postgres, tmp_path: Path
) -> None:
    mount = enable_database(bao, postgres, ttl="1h", max_ttl="2h")
    name = unique("short-token")
    bao.put_policy(name, leased_policy(mount))
    # Tokens live 6 s and cannot be renewed past that: the agent logs in again every ~4 s, and
    # OpenBao revokes every lease a token created when that token expires.
    role_id, secret_id = bao.approle(name, policies=[name], token_ttl="6s", token_max_ttl="6s")
    approle = (tmp_path / "role_id", tmp_path / "secret_id")
    for file, value in zip(approle, (role_id, secret_id), strict=True):
        file.write_text(value)
        file.chmod(0o600)
    path = write_config(tmp_path, bao, approle, secrets_toml(mount))
    async with running_agent(path) as running:
        with trio.fail_after(40):
            first = (await call(running.socket, "get", name="pg"))["data"]
            started = time.time()
            # Well past the first token's end, the credential being served still logs in.
            while time.time() < started + 14:
                data = (await call(running.socket, "get", name="pg"))["data"]
                assert await login(postgres, data), running.log_text()[-6000:]
                await trio.sleep(0.5)
            assert data["username"] != first["username"]
            assert running.agent.auth.statistics().logins >= 3
            assert "moving the lease to the new token" in running.log_text()
