"""Leases across a restart: the login token and the lease state are sealed into the snapshot, and
a new agent takes both over (issue 4), against a real OpenBao and a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from agentd.errors import NotFound, Unavailable
from agentd.snapshot import FILE_NAME
from tests.agentfixture import running_agent
from tests.kindsupport import approle_with_policy, call, write_config
from tests.openbao import DevServer
from tests.postgres import Postgres
from tests.test_leased import enable_database, leased_policy, login, role_exists, secrets_toml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    server = Postgres.start()
    try:
        yield server
    finally:
        server.stop()


async def test_restart_keeps_the_leased_credential_and_renews_its_lease(
    bao: DevServer, pg: Postgres, tmp_path: Path
) -> None:
    mount = enable_database(bao, pg, ttl="15s", max_ttl="1h")
    approle = approle_with_policy(bao, tmp_path, leased_policy(mount))
    # the restored lease is renewed at its own renewal point (2/3 of 15 s, issue 16)
    path = write_config(tmp_path, bao, approle, secrets_toml(mount, 'refresh = "2s"'))
    async with running_agent(path) as first:
        with trio.fail_after(20):
            data = (await call(first.socket, "get", name="pg"))["data"]
            assert await login(pg, data)
        token = first.agent.auth.current()
        assert token is not None and token.from_login
        lease_id = first.agent.refresher.kinds.state("pg").lease_id
        assert lease_id
    assert token.value not in first.log_text()
    raw = (tmp_path / "state" / FILE_NAME).read_bytes()
    for plain in (token.value, data["password"], data["username"], lease_id):
        assert plain.encode() not in raw
    # The clean stop kept both the lease (revoke_on_shutdown false) and its token.
    with trio.fail_after(20):
        assert await login(pg, data)

    async with running_agent(path) as second:
        session = second.agent.snapshot.restored_session
        assert session is not None and session.token is not None
        assert session.token.value == token.value and session.leases["pg"].lease_id == lease_id
        with trio.fail_after(30):
            while (await call(second.socket, "status"))["secrets"]["pg"]["renewals"] < 1:
                await trio.sleep(0.2)
            reply = await call(second.socket, "get", name="pg")
            assert reply["data"]["username"] == data["username"]
            assert reply["stale"] is False
            assert await login(pg, reply["data"])
        status = await call(second.socket, "status")
        assert status["secrets"]["pg"]["reissues"] == 0      # renewed, never re-read
        assert status["auth"]["logins"] == 0                 # the restored token, no new login
        assert second.agent.auth.current() is not None
        assert second.agent.auth.current().value == token.value  # type: ignore[union-attr]
        assert second.agent.refresher.kinds.state("pg").lease_id == lease_id
    assert token.value not in second.log_text()
    assert data["password"] not in second.log_text()
    with trio.fail_after(20):
        assert await role_exists(pg, data["username"])


async def test_a_refused_restored_token_logs_in_and_moves_the_lease(
    bao: DevServer, pg: Postgres, tmp_path: Path
) -> None:
    mount = enable_database(bao, pg, ttl="1m", max_ttl="1h")
    approle = approle_with_policy(bao, tmp_path, leased_policy(mount))
    path = write_config(tmp_path, bao, approle, secrets_toml(mount, 'refresh = "2s"'))
    async with running_agent(path) as first:
        with trio.fail_after(20):
            data = (await call(first.socket, "get", name="pg"))["data"]
        token = first.agent.auth.current()
        assert token is not None
    # The token is revoked upstream meanwhile (and its lease with it).
    await trio.to_thread.run_sync(
        lambda: bao.api("POST", "auth/token/revoke", {"token": token.value})
    )
    async with running_agent(path) as second:
        with trio.fail_after(30):
            while True:
                try:
                    reply = await call(second.socket, "get", name="pg")
                except (NotFound, Unavailable):     # between the drop and the new read
                    await trio.sleep(0.2)
                    continue
                if reply["data"]["username"] != data["username"] and not reply["stale"]:
                    break
                await trio.sleep(0.2)
            assert await login(pg, reply["data"])
        status = await call(second.socket, "status")
        assert status["auth"]["logins"] == 1
        assert "restored token refused" in second.log_text()
    assert token.value not in second.log_text()


async def test_a_restart_without_leases_keeps_its_login_token(
    bao: DevServer, tmp_path: Path
) -> None:
    """Decision 12: a host with only KV (or PKI) secrets does not log in again at each start;
    its token comes back sealed from the snapshot (and is not revoked at a clean stop)."""
    approle = approle_with_policy(bao, tmp_path, 'path "secret/*" { capabilities = ["read"] }')
    bao.kv_put("restart-token/db", {"password": "kv-only-MARKER"})
    path = write_config(tmp_path, bao, approle, """
[secrets.db]
kind = "kv2"
path = "secret/data/restart-token/db"
""")
    async with running_agent(path) as first:
        with trio.fail_after(20):
            assert (await call(first.socket, "get", name="db"))["data"]["password"] == \
                "kv-only-MARKER"
        token = first.agent.auth.current()
        assert token is not None and token.from_login
        assert first.agent.auth.statistics().logins == 1
    raw = (tmp_path / "state" / FILE_NAME).read_bytes()
    assert token.value.encode() not in raw                      # sealed, not in the clear
    for _ in range(3):
        async with running_agent(path) as again:
            with trio.fail_after(20):
                assert (await call(again.socket, "get", name="db"))["data"]["password"] == \
                    "kv-only-MARKER"
            assert again.agent.auth.statistics().logins == 0    # no login at this start
            current = again.agent.auth.current()
            assert current is not None and current.value == token.value
