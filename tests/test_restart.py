"""A restart asks the upstream for nothing new (issue 16, decision 12), against a real OpenBao
(with a file audit device, so writes are counted at the server) and a real PostgreSQL.

Each window below is a span of time in which something must *not* happen, chosen longer than
the restored-refresh spread (the secrets' ``refresh`` is 1 s, so a restored secret that is due
takes its first step within 1 s); no test asserts how long anything took.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from agentd.errors import NotFound, Unavailable
from tests.agentfixture import RunningAgent, running_agent
from tests.faultproxy import FaultProxy
from tests.kindsupport import approle_with_policy, call, write_config
from tests.openbao import ROOT_TOKEN, DevServer, bao_binary, free_port
from tests.postgres import Postgres
from tests.test_leased import enable_database, leased_policy, login
from tests.test_pki import assert_pair, enable_pki, pki_policy, root_pem

pytestmark = pytest.mark.slow

WINDOW = 3.0            # > the restored-refresh spread (refresh = 1 s)
WRITES = ("create", "update", "delete")


KV_RESTART_POLICY = 'path "secret/data/restart/*" { capabilities = ["read"] }\n'


@asynccontextmanager
async def restarted_cut_off(
    bao: DevServer, config: Callable[..., Path]
) -> AsyncIterator[tuple[RunningAgent, FaultProxy]]:
    """The agent started again, from its snapshot, with its upstream cut off: its config is
    ``config(address=...)`` with a FaultProxy in front of ``bao`` that resets every connection
    until the test sets ``proxy.mode = "pass"``."""
    proxy = FaultProxy(bao.port)
    proxy.mode = "reset"
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        async with running_agent(config(address=proxy.address)) as agent:
            yield agent, proxy
        nursery.cancel_scope.cancel()


async def until_not_found(sock: Path, name: str) -> None:
    """Read ``name`` until the agent answers ``not_found`` (bounded by the caller)."""
    while True:
        try:
            await call(sock, "get", name=name)
        except NotFound:
            return
        await trio.sleep(0.1)


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevServer, Path]]:
    """An OpenBao dev server of this module's own with a file audit device (OpenBao enables
    audit devices only from its config file), and that device's log."""
    work = tmp_path_factory.mktemp("bao-audited")
    log = work / "audit.log"
    hcl = work / "audit.hcl"
    hcl.write_text(f'audit "file" "count" {{\n  options {{\n    file_path = "{log}"\n  }}\n}}\n')
    port = free_port()
    server_log = work / f"bao-{port}.log"
    with open(server_log, "wb") as out:
        proc = subprocess.Popen(
            [bao_binary(), "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}",
             f"-dev-listen-address=127.0.0.1:{port}", f"-config={hcl}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ, HOME=str(work), BAO_LOG_LEVEL="warn"), start_new_session=True)
    server = DevServer(port=port, proc=proc, log_path=server_log)
    try:
        deadline = time.monotonic() + 30
        while True:     # fixture setup, outside trio: a plain wait for the server to answer
            try:
                if server.api("GET", "sys/health").get("initialized"):
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, server_log.read_text()
            time.sleep(0.05)
        yield server, log
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    server = Postgres.start()
    try:
        yield server
    finally:
        server.stop()


def audit_lines(log: Path) -> int:
    return len(log.read_bytes().splitlines()) if log.exists() else 0


def agent_writes(log: Path, since: int) -> list[str]:
    """``OPERATION path`` of every write request since line ``since`` not made by the test's
    root token (the agent's logins, issues, renewals, revocations, ...)."""
    out = []
    for line in log.read_bytes().splitlines()[since:]:
        entry = json.loads(line)
        request = entry.get("request") or {}
        if entry.get("type") != "request" or request.get("operation") not in WRITES:
            continue
        if (entry.get("auth") or {}).get("display_name") == "root":
            continue
        out.append(f"{request['operation']} {request.get('path')}")
    return out


def certificates(bao: DevServer, mount: str) -> int:
    """How many certificates the PKI mount has issued (its CA included)."""
    return len(bao.api("LIST", f"{mount}/certs")["data"]["keys"])


def roles(pg: Postgres) -> set[str]:
    return set(pg.admin_sql("SELECT rolname FROM pg_roles").splitlines())


def files_of(tls: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of the bundle's live files and of its ``..data`` link."""
    out = {name: (os.stat(tls / name).st_ino, os.stat(tls / name).st_mtime_ns)
           for name in ("cert.pem", "key.pem")}
    link = os.lstat(tls / "..data")
    out["..data"] = (link.st_ino, link.st_mtime_ns)
    return out


def pki_toml(mount: str, name: str, *, ttl: str, extra: str = "") -> str:
    return f"""
[secrets.{name}]
kind = "pki"
path = "{mount}/issue/web"
params = {{ common_name = "{name}.example.test", ttl = "{ttl}" }}
refresh = "1s"
{extra}
"""


def bundle_toml(tls: Path, ran: Path) -> str:
    return f"""
[[bundle]]
directory = "{tls}"
files."cert.pem" = "{{{{ secret('web').certificate }}}}"
files."key.pem" = "{{{{ secret('web').private_key }}}}"
command = ["/bin/sh", "-c", "echo ran >> {ran}"]
"""


async def wait_for(condition: Any, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not await condition():
            await trio.sleep(0.1)


async def serial(sock: Path, name: str) -> str:
    return str((await call(sock, "get", name=name))["data"]["serial_number"])


async def test_restart_with_a_valid_certificate_issues_nothing_rewrites_nothing_runs_nothing(
    audited: tuple[DevServer, Path], tmp_path: Path
) -> None:
    bao, _ = audited
    mount = enable_pki(bao)
    approle = approle_with_policy(bao, tmp_path, pki_policy(mount))
    tls, ran = tmp_path / "tls", tmp_path / "ran.log"
    path = write_config(tmp_path, bao, approle, pki_toml(mount, "web", ttl="1h"),
                        extra=bundle_toml(tls, ran))
    async with running_agent(path) as first:
        issued = await serial(first.socket, "web")

        async def command_ran() -> bool:
            return ran.exists() and ran.read_text() == "ran\n"

        await wait_for(command_ran)
    before = certificates(bao, mount)
    files = files_of(tls)

    async with running_agent(path) as second:
        status = (await call(second.socket, "status"))["secrets"]["web"]
        assert status["from_snapshot"] is True
        assert status["next_step"] == "re-issue"
        # due at the certificate's own re-issue point (2/3 of an hour), not now
        assert status["next_step_at"] > time.time() + 600
        with trio.move_on_after(WINDOW):
            while True:
                reply = await call(second.socket, "get", name="web")
                assert reply["data"]["serial_number"] == issued
                assert reply["stale"] is False          # valid and not due: current
                await trio.sleep(0.2)
        status = (await call(second.socket, "status"))["secrets"]["web"]
        assert status["from_snapshot"] is True and status["serial"] == issued
    assert certificates(bao, mount) == before
    assert files_of(tls) == files                       # not rewritten
    assert ran.read_text() == "ran\n"                  # the command did not run again


async def test_restart_past_the_reissue_point_issues_one_certificate_and_down_serves_it_stale(
    audited: tuple[DevServer, Path], tmp_path: Path
) -> None:
    bao, _ = audited
    mount = enable_pki(bao)
    approle = approle_with_policy(bao, tmp_path, pki_policy(mount))
    root = root_pem(bao, mount)
    short_ttl = 20.0

    def config(renew_at: float, address: str | None = None) -> Path:
        secrets = pki_toml(mount, "long", ttl="1h") + pki_toml(
            mount, "short", ttl=f"{short_ttl:g}s", extra=f"renew_at = {renew_at}")
        return write_config(tmp_path, bao, approle, secrets, address=address)

    async def past_reissue_point(sock: Path) -> float:
        """When ``short`` is past its re-issue point at renew_at 0.5 (+-5% jitter)."""
        expires = float((await call(sock, "get", name="short"))["expires_at"])
        return expires - short_ttl + short_ttl * 0.6

    # A: both issued; "short" with a late re-issue point, so this run re-issues nothing.
    async with running_agent(config(0.9)) as a:
        long_serial = await serial(a.socket, "long")
        short_serial = await serial(a.socket, "short")
        due = await past_reissue_point(a.socket)
    await trio.sleep(max(0.0, due - time.time()))       # "short" is now past 0.5 of its life

    # B: exactly one new certificate ("short"); "long" is kept.
    before = certificates(bao, mount)
    async with running_agent(config(0.5)) as b:

        async def short_reissued() -> bool:
            return await serial(b.socket, "short") != short_serial

        await wait_for(short_reissued)
        with trio.move_on_after(WINDOW):
            while True:
                assert await serial(b.socket, "long") == long_serial
                await trio.sleep(0.2)
        assert certificates(bao, mount) == before + 1
        reply = await call(b.socket, "get", name="short")
        assert_pair(reply["data"], root)
        short_serial = reply["data"]["serial_number"]
        status = (await call(b.socket, "status"))["secrets"]
        assert status["long"]["from_snapshot"] is True
        assert status["short"]["from_snapshot"] is False
        due = await past_reissue_point(b.socket)
    await trio.sleep(max(0.0, due - time.time()))

    # C: past its re-issue point again, and the upstream is down: served stale until it
    # expires, then unavailable; "long" is served as current all along.
    async with restarted_cut_off(bao, partial(config, 0.5)) as (c, _):
        with trio.fail_after(short_ttl + 10):
            while True:
                try:
                    reply = await call(c.socket, "get", name="short")
                except Unavailable:
                    break
                assert reply["data"]["serial_number"] == short_serial
                assert reply["stale"] is True
                assert time.time() < reply["expires_at"] + 1
                long_reply = await call(c.socket, "get", name="long")
                assert long_reply["data"]["serial_number"] == long_serial
                assert long_reply["stale"] is False
                await trio.sleep(0.3)
        assert time.time() >= reply["expires_at"] - 1    # unavailable only at its expiry
    assert certificates(bao, mount) == before + 1


async def test_restart_with_a_lease_renews_it_at_its_renewal_point_and_reads_no_new_user(
    audited: tuple[DevServer, Path], pg: Postgres, tmp_path: Path
) -> None:
    bao, _ = audited
    mount = enable_database(bao, pg, ttl="30s", max_ttl="1h")
    approle = approle_with_policy(bao, tmp_path, leased_policy(mount))
    path = write_config(tmp_path, bao, approle, f"""
[secrets.pg]
kind = "leased"
path = "{mount}/creds/app"
refresh = "1s"
""")
    async with running_agent(path) as first:
        data = (await call(first.socket, "get", name="pg"))["data"]
        lease_id = first.agent.refresher.kinds.state("pg").lease_id
        assert lease_id
    users = roles(pg)

    async with running_agent(path) as second:
        with trio.move_on_after(WINDOW):      # its renewal point (2/3 of 30 s) is ahead
            while True:
                status = (await call(second.socket, "status"))["secrets"]["pg"]
                assert status["renewals"] == 0 and status["reissues"] == 0
                assert status["from_snapshot"] is True and status["next_step"] == "renew"
                await trio.sleep(0.2)

        async def renewed() -> bool:
            status = (await call(second.socket, "status"))["secrets"]["pg"]
            return int(status["renewals"]) >= 1

        await wait_for(renewed, timeout=40)
        status = (await call(second.socket, "status"))["secrets"]["pg"]
        assert status["reissues"] == 0                    # renewed, never re-read
        reply = await call(second.socket, "get", name="pg")
        assert reply["data"]["username"] == data["username"] and reply["stale"] is False
        assert second.agent.refresher.kinds.state("pg").lease_id == lease_id
        assert await login(pg, reply["data"])
    assert roles(pg) - users == set()                     # the database saw no new user


async def test_twenty_restarts_make_no_upstream_write(
    audited: tuple[DevServer, Path], pg: Postgres, tmp_path: Path
) -> None:
    bao, log = audited
    pki = enable_pki(bao)
    db = enable_database(bao, pg, ttl="1h", max_ttl="2h")
    bao.kv_put("restart/kv", {"value": "v"})
    approle = approle_with_policy(bao, tmp_path, pki_policy(pki) + leased_policy(db)
                                  + 'path "secret/data/restart/*" { capabilities = ["read"] }\n')
    tls, ran = tmp_path / "tls", tmp_path / "ran.log"
    secrets = pki_toml(pki, "web", ttl="1h") + f"""
[secrets.pg]
kind = "leased"
path = "{db}/creds/app"
refresh = "1s"

[secrets.kv]
kind = "kv2"
path = "secret/data/restart/kv"
refresh = "1s"
"""
    path = write_config(tmp_path, bao, approle, secrets, extra=bundle_toml(tls, ran))
    async with running_agent(path) as first:
        issued = await serial(first.socket, "web")
        user = (await call(first.socket, "get", name="pg"))["data"]["username"]
        lease_id = first.agent.refresher.kinds.state("pg").lease_id

        async def command_ran() -> bool:
            return ran.exists() and ran.read_text() == "ran\n"

        await wait_for(command_ran)
    mark, certs, users = audit_lines(log), certificates(bao, pki), roles(pg)

    for _ in range(20):
        async with running_agent(path) as running:
            with trio.move_on_after(WINDOW / 2):     # > the spread: a due step would be taken
                while True:
                    assert await serial(running.socket, "web") == issued
                    reply = await call(running.socket, "get", name="pg")
                    assert reply["data"]["username"] == user
                    await trio.sleep(0.2)
            assert running.agent.refresher.kinds.state("pg").lease_id == lease_id
            assert running.agent.auth.statistics().logins == 0      # the sealed token
    assert agent_writes(log, mark) == []
    assert certificates(bao, pki) == certs
    assert roles(pg) - users == set()
    assert ran.read_text() == "ran\n"


async def test_a_lease_revoked_while_down_is_served_stale_until_the_upstream_says_so(
    audited: tuple[DevServer, Path], pg: Postgres, tmp_path: Path
) -> None:
    bao, _ = audited
    mount = enable_database(bao, pg, ttl="1m", max_ttl="1h")
    approle = approle_with_policy(bao, tmp_path, leased_policy(mount))
    secrets = f"""
[secrets.pg]
kind = "leased"
path = "{mount}/creds/app"
refresh = "1s"
renew_at = 0.1
"""
    async with running_agent(write_config(tmp_path, bao, approle, secrets)) as first:
        user = (await call(first.socket, "get", name="pg"))["data"]["username"]
        lease_id = first.agent.refresher.kinds.state("pg").lease_id
    # While the agent is down: the lease is revoked (the user dropped) and the role is gone,
    # so no new credential can be read either.
    bao.api("PUT", f"sys/leases/revoke/{lease_id}", {})
    bao.api("DELETE", f"{mount}/roles/app")

    async with restarted_cut_off(bao, partial(write_config, tmp_path, bao, approle, secrets)
                                 ) as (second, proxy):
        with trio.move_on_after(WINDOW):     # the upstream cannot say: served stale
            while True:
                reply = await call(second.socket, "get", name="pg")
                assert reply["data"]["username"] == user and reply["stale"] is True
                await trio.sleep(0.2)
        proxy.mode = "pass"                  # the upstream says the lease is revoked
        with trio.fail_after(30):
            await until_not_found(second.socket, "pg")
        status = (await call(second.socket, "status"))["secrets"]["pg"]
        assert status["revoked"] is True and status["from_snapshot"] is False
        with trio.move_on_after(WINDOW):     # and stays so while no new one can be read
            while True:
                with pytest.raises(NotFound):
                    await call(second.socket, "get", name="pg")
                await trio.sleep(0.2)


def reads_of(log: Path, since: int, path: str) -> int:
    """How many times the agent asked for ``path`` since line ``since`` of the audit log."""
    count = 0
    for line in log.read_bytes().splitlines()[since:]:
        entry = json.loads(line)
        request = entry.get("request") or {}
        if entry.get("type") == "request" and request.get("path") == path \
                and (entry.get("auth") or {}).get("display_name") != "root":
            count += 1
    return count


async def test_kv_secrets_deleted_while_down_answer_not_found_once_the_upstream_says_so(
    audited: tuple[DevServer, Path], tmp_path: Path
) -> None:
    bao, log = audited
    bao.kv_put("restart/deleted", {"value": "a"})
    bao.kv_put("restart/gone", {"value": "b"})
    approle = approle_with_policy(bao, tmp_path, KV_RESTART_POLICY)
    secrets = """
[secrets.deleted]
kind = "kv2"
path = "secret/data/restart/deleted"
refresh = "1s"

[secrets.gone]
kind = "kv2"
path = "secret/data/restart/gone"
refresh = "1s"
"""
    async with running_agent(write_config(tmp_path, bao, approle, secrets)) as first:
        for name in ("deleted", "gone"):
            await call(first.socket, "get", name=name)
    # While the agent is down: one secret's version is deleted (KV v2 says so in its metadata),
    # the other's metadata is deleted with every version (a plain 404).
    bao.api("DELETE", "secret/data/restart/deleted")
    bao.api("DELETE", "secret/metadata/restart/gone")

    async with restarted_cut_off(bao, partial(write_config, tmp_path, bao, approle, secrets)
                                 ) as (second, proxy):
        # restored current (younger than its refresh) until its first poll fails
        with trio.fail_after(10):
            for name in ("deleted", "gone"):
                while not (await call(second.socket, "get", name=name))["stale"]:
                    await trio.sleep(0.1)
        with trio.move_on_after(WINDOW):     # the upstream cannot say: served stale
            while True:
                for name in ("deleted", "gone"):
                    assert (await call(second.socket, "get", name=name))["stale"] is True
                await trio.sleep(0.2)
        mark = audit_lines(log)
        proxy.mode = "pass"
        with trio.fail_after(30):
            answered: dict[str, int] = {}
            while len(answered) < 2:
                for name in ("deleted", "gone"):
                    if name in answered:
                        continue
                    try:
                        await call(second.socket, "get", name=name)
                    except NotFound:
                        answered[name] = reads_of(log, mark, f"secret/data/restart/{name}")
                await trio.sleep(0.1)
        # a deletion marker is evidence at once; a plain 404 once a second request says so
        assert answered["deleted"] >= 1
        assert answered["gone"] >= 2
        status = (await call(second.socket, "status"))["secrets"]
        assert status["deleted"]["revoked"] and status["gone"]["revoked"]


async def test_a_secret_revoked_before_a_restart_answers_not_found_while_the_upstream_is_down(
    audited: tuple[DevServer, Path], tmp_path: Path
) -> None:
    bao, _ = audited
    bao.kv_put("restart/revoked", {"value": "a"})
    approle = approle_with_policy(bao, tmp_path, KV_RESTART_POLICY)
    secrets = """
[secrets.revoked]
kind = "kv2"
path = "secret/data/restart/revoked"
refresh = "1s"
"""
    async with running_agent(write_config(tmp_path, bao, approle, secrets)) as first:
        await call(first.socket, "get", name="revoked")
        bao.api("DELETE", "secret/data/restart/revoked")
        with trio.fail_after(20):
            await until_not_found(first.socket, "revoked")
    async with restarted_cut_off(bao, partial(write_config, tmp_path, bao, approle, secrets)
                                 ) as (second, proxy):
        with trio.move_on_after(WINDOW):     # the evidence survived the restart
            while True:
                with pytest.raises(NotFound):
                    await call(second.socket, "get", name="revoked")
                await trio.sleep(0.2)
        bao.kv_put("restart/revoked", {"value": "back"})
        proxy.mode = "pass"
        with trio.fail_after(20):               # and a value coming back is served again
            while True:
                try:
                    reply = await call(second.socket, "get", name="revoked")
                except NotFound:
                    await trio.sleep(0.1)
                    continue
                assert reply["data"]["value"] == "back"
                break


async def test_a_restored_kv_value_younger_than_its_refresh_is_served_current(
    audited: tuple[DevServer, Path], tmp_path: Path
) -> None:
    """A fleet restart is not a staleness alarm: a KV value restored from the snapshot is as
    current as it would have been without the restart until its first poll, even with the
    upstream unreachable meanwhile (its first poll is an hour away)."""
    bao, _ = audited
    bao.kv_put("restart/young", {"value": "y"})
    approle = approle_with_policy(bao, tmp_path, KV_RESTART_POLICY)
    secrets = """
[secrets.young]
kind = "kv2"
path = "secret/data/restart/young"
refresh = "1h"
"""
    async with running_agent(write_config(tmp_path, bao, approle, secrets)) as first:
        await call(first.socket, "get", name="young")
    async with restarted_cut_off(bao, partial(write_config, tmp_path, bao, approle, secrets)
                                 ) as (second, _):
        with trio.move_on_after(WINDOW):
            while True:
                reply = await call(second.socket, "get", name="young")
                assert reply["data"] == {"value": "y"}
                assert reply["stale"] is False
                status = (await call(second.socket, "status"))["secrets"]["young"]
                assert status["stale"] is False and status["from_snapshot"] is True
                await trio.sleep(0.2)
