"""Serving through outages and restarts, revoking on evidence only (issue 4; decisions 5, 6, 9).

Real OpenBao everywhere. Destructive tests (SIGSTOP, SIGKILL, a new server on the same port) use
their own dev server, never the session's ``bao``; others put the fault proxy in front of the
session's server. Nothing here asserts a duration (bench/outage_bench.py measures them).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agentd.auth import Authenticator
from agentd.cache import Cache
from agentd.client import AsyncClient
from agentd.config import (
    AgentConfig,
    AuditConfig,
    AuthConfig,
    CacheConfig,
    Config,
    SecretConfig,
    UpstreamConfig,
)
from agentd.errors import NotFound, TransientError, Unavailable
from agentd.refresh import Refresher
from agentd.snapshot import FILE_NAME
from agentd.upstream import Upstream, spread_addresses
from tests.agentfixture import RunningAgent, Seeded, running_agent, socket_dir, write_config
from tests.conftest import READ_ALL_SECRETS
from tests.faultproxy import FaultProxy
from tests.openbao import DevServer, free_port
from tests.support import until
from tests.test_upstream import read_kv

# --- helpers ----------------------------------------------------------------------------------


def prepare(server: DevServer, role: tuple[str, str], seeded: Seeded) -> None:
    """Give ``server`` the approle (fixed role_id/secret_id) and the seeded values, so a new
    server on the same port can hold "the same data" and the agent logs in again unchanged."""
    role_id, secret_id = role
    server.enable_kv1()
    server.put_policy("agentd-read", READ_ALL_SECRETS)
    server.enable_approle()
    server.api("POST", "auth/approle/role/agentd",
               {"token_policies": ["agentd-read"], "token_ttl": "1h", "role_id": role_id})
    server.api("POST", "auth/approle/role/agentd/custom-secret-id", {"secret_id": secret_id})
    p = seeded.prefix
    server.kv_put(f"{p}/db", {"username": "app", "password": seeded.markers["db"]})
    server.api("POST", f"kv1/{p}/api", {"token": seeded.markers["api"]})
    server.kv_put(f"{p}/other", {"value": seeded.markers["other"]})


def new_seeded() -> Seeded:
    seeded = Seeded(prefix=f"t-{uuid.uuid4().hex[:12]}")
    for label in ("db", "api", "other"):
        seeded.marker(label)
    return seeded


def role_files(tmp_path: Path, role: tuple[str, str]) -> tuple[Path, Path]:
    files = (tmp_path / "role_id", tmp_path / "secret_id")
    for path, value in zip(files, role, strict=True):
        path.write_text(value + "\n")
        path.chmod(0o600)
    return files


FIELDS = {"db": "password", "api": "token", "other": "value"}


def assert_value(reply: dict[str, Any], seeded: Seeded, name: str) -> None:
    assert reply["data"][FIELDS[name]] == seeded.markers[name]


@pytest.fixture
def own_bao(tmp_path: Path) -> Iterator[DevServer]:
    server = DevServer.start(tmp_path / "own-bao")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def role() -> tuple[str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4())


@asynccontextmanager
async def client(running: RunningAgent) -> AsyncIterator[AsyncClient]:
    async with AsyncClient.connect(running.socket) as c:
        yield c


async def wait_stale(c: AsyncClient, name: str, stale: bool) -> dict[str, Any]:
    """Poll ``get`` until its stale flag is ``stale`` (the caller bounds it with fail_after)."""
    while True:
        reply = await c.get(name)
        if reply["stale"] is stale:
            return reply
        await trio.sleep(0.1)


def agent_config(tmp_path: Path, bao: DevServer, files: tuple[Path, Path], seeded: Seeded,
                 **kwargs: Any) -> Path:
    """write_config with a socket rate limit high enough for 1,000 back-to-back gets."""
    return write_config(tmp_path, bao, files, seeded, sock=socket_dir() / "agentd.sock",
                        agent_extra="requests_per_second_per_uid = 100000", **kwargs)


def assert_no_marker(running: RunningAgent, seeded: Seeded) -> None:
    text = running.log_text() + running.audit_text()
    for value in seeded.markers.values():
        assert value not in text


# --- outages ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_hung_upstream_serves_stale_then_recovers(
    own_bao: DevServer, role: tuple[str, str], tmp_path: Path
) -> None:
    seeded = new_seeded()
    prepare(own_bao, role, seeded)
    path = agent_config(tmp_path, own_bao, role_files(tmp_path, role), seeded)
    try:
        with trio.fail_after(150):   # includes shutdown with the upstream still hung
            await _hung_upstream_scenario(path, own_bao, seeded)
    finally:
        own_bao.resume()


async def _hung_upstream_scenario(path: Path, own_bao: DevServer, seeded: Seeded) -> None:
    async with running_agent(path) as running, client(running) as c:
        for name in FIELDS:
            reply = await c.get(name)
            assert reply["stale"] is False
        own_bao.pause()
        with trio.fail_after(30):
            for name in FIELDS:
                assert_value(await wait_stale(c, name, True), seeded, name)
        with trio.fail_after(60):
            for i in range(1000):
                name = ("db", "api", "other")[i % 3]
                reply = await c.get(name)
                assert reply["stale"] is True
                assert_value(reply, seeded, name)
        status = await c.status()
        assert status["counts"]["stale"] == 3
        own_bao.resume()
        with trio.fail_after(30):
            for name in FIELDS:
                assert_value(await wait_stale(c, name, False), seeded, name)
        audit = running.audit_text()
        assert '"stale": true' in audit or '"stale":true' in audit
        # a hung upstream must not stall shutdown either
        own_bao.pause()
        with trio.fail_after(30):
            await wait_stale(c, "db", True)
    assert_no_marker(running, seeded)


async def test_killed_upstream_then_new_server_on_the_same_port(
    own_bao: DevServer, role: tuple[str, str], tmp_path: Path
) -> None:
    seeded = new_seeded()
    prepare(own_bao, role, seeded)
    path = agent_config(tmp_path, own_bao, role_files(tmp_path, role), seeded)
    replacement: DevServer | None = None
    try:
        async with running_agent(path) as running, client(running) as c:
            logins = running.agent.auth.statistics().logins
            own_bao.stop()     # SIGKILL: the port is closed
            with trio.fail_after(30):
                for name in FIELDS:
                    assert_value(await wait_stale(c, name, True), seeded, name)
            with trio.fail_after(30):
                for _ in range(1000):
                    reply = await c.get("db")
                    assert reply["stale"] is True
            replacement = await trio.to_thread.run_sync(
                lambda: DevServer.start(tmp_path / "bao-2", port=own_bao.port))
            prepare(replacement, role, seeded)
            with trio.fail_after(60):
                for name in FIELDS:
                    assert_value(await wait_stale(c, name, False), seeded, name)
            # the old token died with the old server: the agent logged in again by itself
            assert running.agent.auth.statistics().logins > logins
            new_version = replacement.kv_put(f"{seeded.prefix}/db",
                                             {"password": seeded.marker("db")})
            with trio.fail_after(30):
                while (reply := await c.get("db"))["version"] != new_version:
                    await trio.sleep(0.1)
            assert_value(reply, seeded, "db")
        assert_no_marker(running, seeded)
    finally:
        if replacement is not None:
            replacement.stop()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["blackhole", "delay", "reset"])
async def test_fault_proxy_never_errors_for_cached_names(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path, mode: str
) -> None:
    seeded = new_seeded()
    p = seeded.prefix
    bao.kv_put(f"{p}/db", {"username": "app", "password": seeded.markers["db"]})
    bao.api("POST", f"kv1/{p}/api", {"token": seeded.markers["api"]})
    bao.kv_put(f"{p}/other", {"value": seeded.markers["other"]})
    proxy = FaultProxy(bao.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        path = agent_config(tmp_path, bao, approle_files, seeded, addresses=[proxy.address])
        async with running_agent(path) as running, client(running) as c:
            proxy.mode = mode
            proxy.delay = 3.0    # longer than the agent's 2 s request timeout
            with trio.fail_after(60):
                seen_stale = False
                # through several refresh rounds: every reply is a value, stale or fresh
                for _ in range(60):
                    for name in FIELDS:
                        reply = await c.get(name)
                        assert_value(reply, seeded, name)
                        seen_stale = seen_stale or reply["stale"]
                    await trio.sleep(0.1)
                while not seen_stale:
                    seen_stale = (await c.get("db"))["stale"]
                    await trio.sleep(0.1)
            proxy.delay = 0.2    # added latency under the timeout: fresh again
            proxy.mode = "delay" if mode == "delay" else "pass"
            with trio.fail_after(30):
                for name in FIELDS:
                    assert_value(await wait_stale(c, name, False), seeded, name)
        nursery.cancel_scope.cancel()
    assert_no_marker(running, seeded)


async def test_restart_during_outage_serves_every_secret_from_the_snapshot(
    own_bao: DevServer, role: tuple[str, str], tmp_path: Path
) -> None:
    seeded = new_seeded()
    prepare(own_bao, role, seeded)
    # a long ready_timeout: becoming ready must not depend on it
    path = agent_config(tmp_path, own_bao, role_files(tmp_path, role), seeded, refresh="1h")
    path.write_text(path.read_text().replace('ready_timeout = "10s"', 'ready_timeout = "1h"'))
    async with running_agent(path) as running, client(running) as c:
        fetched = {name: await c.get(name) for name in FIELDS}
    own_bao.stop()
    snapshot = tmp_path / "state" / FILE_NAME
    raw = snapshot.read_bytes()
    for value in seeded.markers.values():
        assert value.encode() not in raw
    with trio.fail_after(20):   # far less than ready_timeout: ready at once from the snapshot
        async with running_agent(path) as running, client(running) as c:
            assert running.agent.snapshot.statistics().loaded == 3
            for name in FIELDS:
                reply = await c.get(name)
                # younger than its refresh (1 h): as current as without the restart
                assert reply["stale"] is False
                assert_value(reply, seeded, name)
                # fetched_at survives the restart
                assert reply["fetched_at"] == fetched[name]["fetched_at"]
                assert reply["version"] == fetched[name]["version"]
            status = await c.status()
            assert status["ready"] is True and status["snapshot"]["loaded"] == 3
    assert_no_marker(running, seeded)


async def test_tampered_snapshot_is_never_served(
    own_bao: DevServer, role: tuple[str, str], tmp_path: Path
) -> None:
    seeded = new_seeded()
    prepare(own_bao, role, seeded)
    path = agent_config(tmp_path, own_bao, role_files(tmp_path, role), seeded)
    async with running_agent(path) as running, client(running) as c:
        await c.get("db")
    own_bao.stop()
    snapshot = tmp_path / "state" / FILE_NAME
    raw = bytearray(snapshot.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    snapshot.write_bytes(bytes(raw))
    # nothing to serve: ready after ready_timeout, answering unavailable
    path.write_text(path.read_text().replace('ready_timeout = "10s"', 'ready_timeout = "1s"'))
    async with running_agent(path) as running, client(running) as c:
        assert running.agent.snapshot.statistics().rejected == 1
        for name in FIELDS:
            with pytest.raises(Unavailable):
                await c.get(name)
        assert list((tmp_path / "state").glob(f"{FILE_NAME}.bad-*"))
        assert "snapshot rejected" in running.log_text()


async def test_past_max_stale_answers_unavailable(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    seeded = new_seeded()
    p = seeded.prefix
    bao.kv_put(f"{p}/db", {"username": "app", "password": seeded.markers["db"]})
    bao.api("POST", f"kv1/{p}/api", {"token": seeded.markers["api"]})
    bao.kv_put(f"{p}/other", {"value": seeded.markers["other"]})
    proxy = FaultProxy(bao.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        path = agent_config(tmp_path, bao, approle_files, seeded, addresses=[proxy.address])
        path.write_text(path.read_text().replace(
            'path = "secret/data/' + p + '/db"',
            'path = "secret/data/' + p + '/db"\nmax_stale = "2s"'))
        async with running_agent(path) as running, client(running) as c:
            proxy.mode = "reset"
            with trio.fail_after(30):
                await wait_stale(c, "db", True)
                while True:
                    try:
                        await c.get("db")
                    except Unavailable:
                        break
                    await trio.sleep(0.1)
            # the others keep the default max_stale (24h) and are still served
            assert_value(await c.get("other"), seeded, "other")
            proxy.mode = "pass"
            with trio.fail_after(30):
                while True:
                    try:
                        reply = await c.get("db")
                    except Unavailable:
                        await trio.sleep(0.1)
                        continue
                    if not reply["stale"]:
                        break
        nursery.cancel_scope.cancel()


async def test_rate_limited_upstream_serves_stale_and_honours_retry_after(
    own_bao: DevServer, role: tuple[str, str], tmp_path: Path
) -> None:
    seeded = new_seeded()
    prepare(own_bao, role, seeded)
    path = agent_config(tmp_path, own_bao, role_files(tmp_path, role), seeded)
    async with running_agent(path) as running, client(running) as c:
        assert (await c.get("db"))["stale"] is False
        # a real OpenBao rate-limit quota on the KV v2 mount, answering 429 with Retry-After
        own_bao.api("POST", "sys/quotas/config", {"enable_rate_limit_response_headers": True})
        own_bao.api("POST", "sys/quotas/rate-limit/agentd-test",
                    {"path": "secret/", "rate": 1, "interval": "60s"})
        state = running.agent.refresher.states["db"]
        with trio.fail_after(30):
            reply = await wait_stale(c, "db", True)
            while state.last_error is None or "429" not in state.last_error:
                await trio.sleep(0.05)
        assert_value(reply, seeded, "db")
        # refresh is 1 s and the first backoff at most 1 s: only Retry-After puts the next
        # attempt this far out
        assert state.next_attempt is not None
        assert state.next_attempt - trio.current_time() > 10
        assert (await c.get("api"))["stale"] is False      # kv1 is outside the quota
        own_bao.api("DELETE", "sys/quotas/rate-limit/agentd-test")


# --- revocation on evidence only --------------------------------------------------------------


async def test_deleted_metadata_is_not_found_and_leaves_the_snapshot(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    seeded = new_seeded()
    p = seeded.prefix
    bao.kv_put(f"{p}/db", {"username": "app", "password": seeded.markers["db"]})
    bao.api("POST", f"kv1/{p}/api", {"token": seeded.markers["api"]})
    bao.kv_put(f"{p}/other", {"value": seeded.markers["other"]})
    path = agent_config(tmp_path, bao, approle_files, seeded)
    async with running_agent(path) as running, client(running) as c:
        assert_value(await c.get("db"), seeded, "db")
        bao.api("DELETE", f"secret/metadata/{p}/db")
        with trio.fail_after(20):
            while True:
                try:
                    await c.get("db")
                except NotFound:
                    break
                await trio.sleep(0.05)
        for name in ("api", "other"):
            reply = await c.get(name)
            assert reply["stale"] is False
            assert_value(reply, seeded, name)
        await running.agent.snapshot.flush(running.agent.cache)
        restored = Cache()
        assert sorted(running.agent.snapshot.load_into(restored)) == ["api", "other"]


async def test_deleted_latest_version_is_not_found(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    seeded = new_seeded()
    p = seeded.prefix
    bao.kv_put(f"{p}/db", {"username": "app", "password": seeded.markers["db"]})
    bao.api("POST", f"kv1/{p}/api", {"token": seeded.markers["api"]})
    bao.kv_put(f"{p}/other", {"value": seeded.markers["other"]})
    path = agent_config(tmp_path, bao, approle_files, seeded)
    async with running_agent(path) as running, client(running) as c:
        assert_value(await c.get("other"), seeded, "other")
        bao.api("DELETE", f"secret/data/{p}/other")     # soft delete: a deletion marker
        with trio.fail_after(20):
            while True:
                try:
                    await c.get("other")
                except NotFound:
                    break
                await trio.sleep(0.05)
        assert_value(await c.get("db"), seeded, "db")
        assert running.agent.refresher.is_revoked("other")


async def test_policy_refusal_keeps_the_value_stale_and_alerts(
    bao: DevServer, tmp_path: Path
) -> None:
    seeded = new_seeded()
    p = seeded.prefix
    bao.kv_put(f"{p}/db", {"username": "app", "password": seeded.markers["db"]})
    bao.api("POST", f"kv1/{p}/api", {"token": seeded.markers["api"]})
    bao.kv_put(f"{p}/other", {"value": seeded.markers["other"]})
    policy = f"pol-{p}"
    everything = f'''
path "secret/data/{p}/*" {{ capabilities = ["read"] }}
path "kv1/{p}/*" {{ capabilities = ["read"] }}
'''
    bao.put_policy(policy, everything)
    role = bao.approle(f"role-{p}", policies=[policy], token_ttl="1h")
    path = agent_config(tmp_path, bao, role_files(tmp_path, role), seeded)
    async with running_agent(path) as running, client(running) as c:
        assert_value(await c.get("db"), seeded, "db")
        # a policy mistake upstream: db is no longer readable by a perfectly valid token
        bao.put_policy(policy, f'path "kv1/{p}/*" {{ capabilities = ["read"] }}\n'
                               f'path "secret/data/{p}/other" {{ capabilities = ["read"] }}\n')
        with trio.fail_after(30):
            while "db" not in running.agent.refresher.policy_denied:
                await trio.sleep(0.1)
        reply = await c.get("db")
        assert reply["stale"] is True
        assert_value(reply, seeded, "db")
        assert not running.agent.refresher.is_revoked("db")
        status = await c.status()
        assert status["alerts"]["policy_denied"] == ["db"]
        assert status["secrets"]["db"]["policy_denied"] is True
        assert "policy denies this secret" in running.log_text()
        bao.put_policy(policy, everything)
        with trio.fail_after(30):
            await wait_stale(c, "db", False)
        assert running.agent.refresher.policy_denied == []
    assert_no_marker(running, seeded)


# --- HA: several addresses --------------------------------------------------------------------


async def test_first_address_closed_port_second_real(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    seeded = new_seeded()
    bao.kv_put(f"{seeded.prefix}/db", {"password": seeded.markers["db"]})
    closed = f"http://127.0.0.1:{free_port()}"
    up = Upstream(UpstreamConfig(addresses=(closed, bao.address), timeout=2.0))
    up.token_source = lambda: bao.token
    try:
        with trio.fail_after(20):
            value = await read_kv(up, "kv2", f"secret/data/{seeded.prefix}/db")
            assert value.data["password"] == seeded.markers["db"]
            assert up.statistics().address == bao.address
            # sticky: the next request starts at the address that answered
            await read_kv(up, "kv2", f"secret/data/{seeded.prefix}/db")
            assert up.statistics().errors == 0
    finally:
        await up.aclose()


async def test_upstream_fails_over_from_a_black_hole_in_config_order(bao: DevServer) -> None:
    seeded = new_seeded()
    bao.kv_put(f"{seeded.prefix}/db", {"password": seeded.markers["db"]})
    hole = FaultProxy(bao.port)
    hole.mode = "blackhole"
    async with trio.open_nursery() as nursery:
        await nursery.start(hole.run)
        up = Upstream(UpstreamConfig(addresses=(hole.address, bao.address), timeout=1.0))
        up.token_source = lambda: bao.token
        try:
            with trio.fail_after(20):
                value = await read_kv(up, "kv2", f"secret/data/{seeded.prefix}/db")
            assert value.data["password"] == seeded.markers["db"]
            assert hole.connections == 1
            assert up.statistics().address == bao.address
        finally:
            await up.aclose()
        nursery.cancel_scope.cancel()


async def test_first_address_black_hole_second_real(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    seeded = new_seeded()
    p = seeded.prefix
    bao.kv_put(f"{p}/db", {"username": "app", "password": seeded.markers["db"]})
    bao.api("POST", f"kv1/{p}/api", {"token": seeded.markers["api"]})
    bao.kv_put(f"{p}/other", {"value": seeded.markers["other"]})
    hole = FaultProxy(bao.port)
    hole.mode = "blackhole"
    async with trio.open_nursery() as nursery:
        await nursery.start(hole.run)
        # the daemon spreads the order per host: either way round it must work
        path = agent_config(tmp_path, bao, approle_files, seeded,
                            addresses=[hole.address, bao.address])
        with trio.fail_after(40):
            async with running_agent(path) as running, client(running) as c:
                for name in FIELDS:
                    reply = await c.get(name)
                    assert reply["stale"] is False
                    assert_value(reply, seeded, name)
                # each secret goes to its own node first (host id and path): the black hole
                # is tried only by those that prefer it, then marked down and tried last
                stats = running.agent.upstream.statistics()
                assert stats.address not in stats.down
        nursery.cancel_scope.cancel()


# --- backoff ----------------------------------------------------------------------------------


@pytest.fixture
def idle_jump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 50 ms of real idleness, so loopback I/O to a real
    OpenBao finishes before a timeout can fire in virtual time."""
    return trio.testing.MockClock(autojump_threshold=0.05)


@pytest.mark.slow
async def test_backoff_bounds_upstream_requests_during_a_minute_outage(
    bao: DevServer, approle_files: tuple[Path, Path], idle_jump_clock: trio.testing.MockClock
) -> None:
    names = [f"s{i}" for i in range(5)]
    proxy = FaultProxy(bao.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        rig = _kv_refresher(bao, approle_files, names, refresh=1.0, timeout=2.0, seed=7,
                            addresses=(proxy.address,), outage_gate=True)
        up, auth, refresher, cache = rig.up, rig.auth, rig.refresher, rig.cache
        await nursery.start(auth.run)
        await nursery.start(refresher.run)
        with trio.fail_after(30):
            await refresher.wait_all_fetched()
        proxy.mode = "reset"
        before = proxy.connections
        start = trio.current_time()
        delays: list[float] = []
        while trio.current_time() - start < 60:
            await trio.sleep(1)
            state = refresher.states["s0"]
            if state.next_attempt is not None:
                delays.append(state.next_attempt)
        during = proxy.connections - before
        # without backoff: 5 secrets x 60 polls; with the host's outage gate about one probe
        # per growing window (1 s .. 60 s), whatever the number of secrets
        assert 0 < during <= 15, during
        assert up.statistics().gated > 0
        for name in names:
            entry = cache.get(name)
            assert entry is not None and entry.stale
            assert entry.data["value"] == rig.seeded.markers[name]
        # the gaps between attempts grew towards the cap
        attempts = sorted(set(delays))
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert max(gaps) > 8 * min(gaps)
        proxy.mode = "pass"
        with trio.fail_after(200):
            while any(cache.info(n).stale for n in names):   # type: ignore[union-attr]
                await trio.sleep(1)
        nursery.cancel_scope.cancel()
    await up.aclose()


async def test_outage_gate_fails_fast_then_sends_one_probe(
    bao: DevServer, idle_jump_clock: trio.testing.MockClock
) -> None:
    proxy = FaultProxy(bao.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        up = Upstream(UpstreamConfig(addresses=(proxy.address,), timeout=2.0), outage_gate=True)
        up.token_source = lambda: bao.token
        try:
            with trio.fail_after(120):
                await up.request("GET", "sys/mounts")
                proxy.mode = "reset"
                with pytest.raises(TransientError):
                    await up.request("GET", "sys/mounts")
                sent = proxy.connections
                # inside the window: refused at once, nothing reaches the network
                for _ in range(20):
                    with pytest.raises(TransientError) as caught:
                        await up.request("GET", "sys/mounts")
                    assert caught.value.retry_after is not None
                assert proxy.connections == sent
                assert up.statistics().gated == 20
                # after the window a single probe goes out, concurrent callers still fail fast
                await trio.sleep(caught.value.retry_after + 0.01)
                proxy.mode = "pass"
                results: list[str] = []

                async def call() -> None:
                    try:
                        await up.request("GET", "sys/mounts")
                        results.append("ok")
                    except TransientError:
                        results.append("gated")

                async with trio.open_nursery() as callers:
                    for _ in range(5):
                        callers.start_soon(call)
                assert sorted(results) == ["gated"] * 4 + ["ok"]
                # the probe was answered: the gate is open again
                await up.request("GET", "sys/mounts")
        finally:
            await up.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_restored_secrets_refresh_at_spread_phases(
    bao: DevServer, approle_files: tuple[Path, Path], idle_jump_clock: trio.testing.MockClock
) -> None:
    names = [f"r{i}" for i in range(8)]
    cache = Cache()
    for name in names:      # as if restored from the snapshot: stale old values
        cache.put(name, {"value": "old"}, version=1, fetched_at=1.0)
        cache.mark_stale(name)
    rig = _kv_refresher(bao, approle_files, names, cache, refresh=300.0, timeout=2.0, seed=11)
    up, auth, refresher = rig.up, rig.auth, rig.refresher
    refreshed_at: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(auth.run)
        start = trio.current_time()
        await nursery.start(refresher.run)
        with trio.fail_after(120):
            while len(refreshed_at) < len(names):
                for name in names:
                    info = cache.info(name)
                    assert info is not None
                    if not info.stale and name not in refreshed_at:
                        refreshed_at[name] = trio.current_time() - start
                await trio.sleep(0.25)
        nursery.cancel_scope.cancel()
    await up.aclose()
    times = sorted(refreshed_at.values())
    # not all at once: spread over the restored window
    assert times[-1] - times[0] > 5.0
    assert len({round(t) for t in times}) >= 4


@dataclasses.dataclass
class KvRig:
    """An Upstream, Authenticator and Refresher over approle for the KV v2 secrets in
    ``seeded`` (``_kv_refresher``); the caller starts ``auth.run`` and ``refresher.run``."""

    up: Upstream
    auth: Authenticator
    refresher: Refresher
    cache: Cache
    seeded: Seeded


def _kv_refresher(bao: DevServer, approle_files: tuple[Path, Path], names: list[str],
                  cache: Cache | None = None, *, refresh: float, timeout: float, seed: int,
                  addresses: tuple[str, ...] | None = None, max_concurrency: int | None = None,
                  **upstream_options: Any) -> KvRig:
    """``names`` seeded as KV v2 secrets in ``bao``, and a Refresher for them over approle,
    through ``addresses`` (default: ``bao`` itself; a FaultProxy's to make outages);
    ``upstream_options`` go to ``Upstream`` (``outage_gate``, ``order_seed``) as the daemon
    passes them."""
    seeded = new_seeded()
    for name in names:
        bao.kv_put(f"{seeded.prefix}/{name}", {"value": seeded.marker(name)})
    cfg = UpstreamConfig(addresses=addresses or (bao.address,), timeout=timeout)
    if max_concurrency is not None:
        cfg = dataclasses.replace(cfg, max_concurrency=max_concurrency)
    cfg = _with_approle(cfg, approle_files)
    up = Upstream(cfg, **upstream_options)
    auth = Authenticator(cfg, up)
    cache = Cache() if cache is None else cache
    config = _config(cfg, {n: SecretConfig(name=n, kind="kv2",
                                           path=f"secret/data/{seeded.prefix}/{n}",
                                           refresh=refresh) for n in names})
    refresher = Refresher(config, up, auth, cache, rng=random.Random(seed))
    return KvRig(up, auth, refresher, cache, seeded)


def _with_approle(cfg: UpstreamConfig, files: tuple[Path, Path]) -> UpstreamConfig:
    return dataclasses.replace(cfg, auth=AuthConfig(method="approle", role_id_file=files[0],
                                                    secret_id_file=files[1]))


def _config(upstream: UpstreamConfig, secrets: dict[str, SecretConfig]) -> Config:
    return Config(agent=AgentConfig(), upstream=upstream, cache=CacheConfig(),
                  audit=AuditConfig(path=None), secrets=secrets, policies=())



@pytest.mark.slow
async def test_polls_into_a_hung_cluster_stop_at_the_gate_and_are_spread_after_it_answers(
    own_bao: DevServer, tmp_path: Path, idle_jump_clock: trio.testing.MockClock
) -> None:
    """The outage gate and the recovery ramp (decision 9) on a hung three-node cluster (three
    proxies in front of one SIGSTOPped server): every secret comes due during the outage. The
    first polls hang on their first addresses until they time out; once every address has
    failed so, whichever requests' attempts those were, the gate closes, and neither their
    failovers nor the polls queued behind them go into the hung cluster. After SIGCONT the
    secrets are polled at random phases within their refresh, not all in the instant the
    cluster answers. Counted at the proxies, in the test's (virtual) time."""
    own_bao.put_policy("agentd-read", READ_ALL_SECRETS)
    files = role_files(tmp_path, own_bao.approle("agentd", policies=["agentd-read"],
                                                 token_ttl="1h"))
    names = [f"s{i:02d}" for i in range(24)]
    refresh, timeout, slots = 4.0, 3.0, 4
    proxies = [FaultProxy(own_bao.port) for _ in range(3)]

    def polls() -> list[float]:
        return sorted(t for p in proxies for t, _, line in p.requests
                      if line.startswith("GET /v1/secret/data/"))

    async with trio.open_nursery() as nursery:
        for proxy in proxies:
            await nursery.start(proxy.run)
        rig = _kv_refresher(own_bao, files, names, refresh=refresh, timeout=timeout, seed=5,
                            addresses=tuple(p.address for p in proxies), max_concurrency=slots,
                            outage_gate=True, order_seed="host-1")
        up, auth, refresher = rig.up, rig.auth, rig.refresher
        await nursery.start(auth.run)
        await nursery.start(refresher.run)
        try:
            with trio.fail_after(120):
                await refresher.wait_all_fetched()
                before = len(polls())
                own_bao.pause()
                await trio.sleep(4 * refresh)
                into_the_outage = len(polls()) - before
                own_bao.resume()
                resumed = trio.current_time()
                await trio.sleep(2 * refresh)
        finally:
            own_bao.resume()
        nursery.cancel_scope.cancel()
    await up.aclose()
    stats = up.statistics()
    assert stats.recoveries == 1
    # the gate closed during the outage: before, a request had to fail on all three addresses
    # (three timeouts in turn) to close it, which never happened here while 20 polls went in;
    # now every address has failed after a timeout or two, and about 10 go in
    assert stats.gated > 0
    assert into_the_outage > 0
    reads = [t - resumed for t in polls() if resumed <= t < resumed + refresh]
    # spread over the refresh after the recovery, not all in its first instant
    early = sum(1 for t in reads if t < refresh / 16)
    assert early <= len(reads) // 4, sorted(reads)
    assert len({int(t) for t in reads}) >= 3     # several distinct seconds
    # and about once per secret: a poll that completed with the recovery takes a new phase
    # within its refresh instead of following its held-over neighbours a refresh later
    assert len(reads) <= len(names) + 4, sorted(reads)


async def test_the_gate_closes_once_every_address_has_failed_whichever_requests_tried_them(
    idle_jump_clock: trio.testing.MockClock
) -> None:
    """Proposal 2 of docs/scaling.md: on a hung cluster (three black holes) the first attempts
    of three requests, one per address, time out together. That every address has now failed
    closes the outage gate: their failovers and the six requests queued for a slot are not
    sent, where before each request went on to the next address (another whole timeout
    each) until one of them had failed on all three."""
    proxies = [FaultProxy(free_port()) for _ in range(3)]
    async with trio.open_nursery() as nursery:
        for proxy in proxies:
            await nursery.start(proxy.run)
            proxy.mode = "blackhole"
        addresses = tuple(p.address for p in proxies)
        up = Upstream(UpstreamConfig(addresses=addresses, timeout=2.0, max_concurrency=3),
                      outage_gate=True, order_seed="host-1")
        # one path whose first address is each proxy: the three slots cover the cluster
        paths: dict[str, str] = {}
        for i in range(200):
            path = f"secret/data/p{i}"
            paths.setdefault(spread_addresses(addresses, "host-1", path)[0], path)
        assert len(paths) == 3
        queued = [f"secret/data/q{i}" for i in range(6)]
        outcomes: list[str] = []

        async def read(path: str) -> None:
            try:
                await up.request("GET", path)
                outcomes.append("answered")
            except TransientError as exc:
                outcomes.append("gated" if "next attempt in" in str(exc) else "timed out")

        try:
            with trio.fail_after(60):
                async with trio.open_nursery() as readers:
                    for path in [*paths.values(), *queued]:
                        readers.start_soon(read, path)
                        await trio.sleep(0)
        finally:
            await up.aclose()
        nursery.cancel_scope.cancel()
    sent = sorted(line for p in proxies for _, _, line in p.requests)
    assert sent == sorted(f"GET /v1/{path}" for path in paths.values())
    assert sorted(outcomes) == ["gated"] * 9
    assert up.statistics().gated == 9


@pytest.mark.slow
async def test_secrets_in_backoff_are_polled_at_their_phases_after_a_recovery(
    bao: DevServer, approle_files: tuple[Path, Path], idle_jump_clock: trio.testing.MockClock
) -> None:
    """After two minutes of refused connections every secret sleeps in a backoff grown towards
    60 s; when the upstream answers again (the gate's probe), each is woken and polled at its
    own phase within its refresh: every secret once in the refresh after the recovery, and
    not all in its first instant. Counted at the proxy, in virtual time."""
    names = [f"b{i:02d}" for i in range(12)]
    refresh = 4.0
    proxy = FaultProxy(bao.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        rig = _kv_refresher(bao, approle_files, names, refresh=refresh, timeout=2.0, seed=3,
                            addresses=(proxy.address,), outage_gate=True)
        up, auth, refresher = rig.up, rig.auth, rig.refresher
        await nursery.start(auth.run)
        await nursery.start(refresher.run)
        with trio.fail_after(600):
            await refresher.wait_all_fetched()
            proxy.mode = "reset"
            await trio.sleep(120)
            assert all(refresher.states[n].failures >= 3 for n in names)
            proxy.mode = "pass"
            while up.recoveries == 0:
                await trio.sleep(0.5)
            recovered_at = up.recovered.value
            await trio.sleep(2 * refresh)
        nursery.cancel_scope.cancel()
    await up.aclose()
    reads = [(t - recovered_at, line) for t, mode, line in proxy.requests
             if mode == "pass" and line.startswith("GET /v1/secret/data/")
             and recovered_at <= t < recovered_at + refresh]
    # every secret once within one refresh of the recovery (the probe that made it included),
    # not at the end of its own backoff (up to 60 s)
    assert {line.rsplit("/", 1)[1] for _, line in reads} == set(names)
    early = sum(1 for t, _ in reads if t < refresh / 16)
    assert early <= len(reads) // 3, sorted(reads)


@pytest.mark.slow
async def test_a_poll_answered_after_a_failover_takes_a_new_phase(
    bao: DevServer, approle_files: tuple[Path, Path], idle_jump_clock: trio.testing.MockClock
) -> None:
    """A node that hangs ends every host's attempt on it at its timeout, all at once; the
    answers from the next node then come together too. A poll answered after a failover takes
    a new phase in [0, refresh) for its next poll instead of ``refresh`` (+-10%) after that
    shared instant, so the fleet does not keep the hung node's rhythm (the periodic spikes of
    bench/fleet.py's recovery). Counted at the real node's proxy, in virtual time."""
    names = [f"f{i:02d}" for i in range(24)]
    refresh = 8.0
    hung, real = FaultProxy(bao.port), FaultProxy(bao.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(hung.run)
        await nursery.start(real.run)
        rig = _kv_refresher(bao, approle_files, names, refresh=refresh, timeout=1.0, seed=7,
                            addresses=(hung.address, real.address), order_seed="host-a")
        up, auth, refresher = rig.up, rig.auth, rig.refresher
        await nursery.start(auth.run)
        await nursery.start(refresher.run)
        with trio.fail_after(300):
            await refresher.wait_all_fetched()
            hung.mode = "blackhole"
            started = trio.current_time()
            await trio.sleep(3 * refresh)
        nursery.cancel_scope.cancel()
    await up.aclose()
    # the secrets whose order put the hung node first: their first poll after it hung failed
    # over to the real node, and the poll after that came ...
    both = (hung.address, real.address)
    first = {n for n in names
             if spread_addresses(both, "host-a", f"secret/data/{rig.seeded.prefix}/{n}")[0]
             == hung.address}
    assert len(first) >= 4
    gaps = []
    for name in first:
        times = sorted(t for t, _, line in real.requests
                       if line.endswith(f"/{name}") and t >= started)
        assert len(times) >= 2, name
        gaps.append(times[1] - times[0])
    # ... at a new phase: without it every gap is within refresh +-10% (0.9 .. 1.1 refresh)
    assert sum(1 for gap in gaps if gap < 0.85 * refresh) >= len(gaps) // 3, sorted(gaps)


def test_recovery_spread_is_one_refresh_unless_the_value_is_near_its_bounds() -> None:
    """How far a poll may be spread after a recovery: its refresh; half of what is left before
    max_stale or expiry; nothing for a value past its bounds or no value (fetched first)."""
    now = 10_000.0
    cache = Cache(clock=lambda: now)
    cfg = UpstreamConfig(addresses=("http://127.0.0.1:1",))
    secrets = {n: SecretConfig(name=n, kind="kv2", path=f"secret/data/{n}", refresh=60.0,
                               max_stale=600.0)
               for n in ("fresh", "near", "past", "lease", "none")}
    config = _config(cfg, secrets)
    cache.put("fresh", {"k": "v"}, version=1, fetched_at=now - 10)
    cache.put("near", {"k": "v"}, version=1, fetched_at=now - 560)      # 40 s of max_stale
    cache.put("past", {"k": "v"}, version=1, fetched_at=now - 700)
    cache.put("lease", {"k": "v"}, version=1, fetched_at=now - 10, expires_at=now + 30)
    refresher = Refresher(config, Upstream(cfg), None, cache,  # type: ignore[arg-type]
                          clock=lambda: now)
    spread = {n: refresher._recovery_spread(secrets[n]) for n in secrets}
    assert spread == {"fresh": 60.0, "near": 20.0, "past": 0.0, "lease": 15.0, "none": 0.0}


# --- templates through outages and restarts ---------------------------------------------------


def template_toml(dest: Path) -> str:
    contents = "password={{ secret('db').password }}\\ntoken={{ secret('api').token }}\\n"
    return f'\n[[template]]\ndestination = "{dest}"\ncontents = "{contents}"\n'


def rendered(seeded: Seeded) -> str:
    return f"password={seeded.markers['db']}\ntoken={seeded.markers['api']}\n"


@pytest.mark.slow
async def test_hung_upstream_leaves_rendered_files_intact(
    own_bao: DevServer, role: tuple[str, str], tmp_path: Path
) -> None:
    seeded = new_seeded()
    prepare(own_bao, role, seeded)
    dest = tmp_path / "out" / "app.conf"
    dest.parent.mkdir()
    path = agent_config(tmp_path, own_bao, role_files(tmp_path, role), seeded,
                        extra=template_toml(dest))
    try:
        with trio.fail_after(120):      # includes shutdown with the upstream still hung
            async with running_agent(path) as running, client(running) as c:
                await until(lambda: dest.exists() and dest.read_text() == rendered(seeded),
                            "the rendered file", interval=0.1)
                inode = dest.stat().st_ino
                own_bao.pause()
                for name in FIELDS:
                    assert_value(await wait_stale(c, name, True), seeded, name)
                # several failed refresh rounds (refresh 1s, backoff): the file stays as it was
                failures = 0
                while failures < 3:
                    assert dest.read_text() == rendered(seeded)
                    assert dest.stat().st_ino == inode
                    assert_value(await c.get("db"), seeded, "db")
                    status = await c.status()
                    failures = min(s["failures"] for s in status["secrets"].values())
                    await trio.sleep(0.2)
            # stopped with the upstream still hung: the file is still there, whole
            assert dest.read_text() == rendered(seeded)
            assert dest.stat().st_ino == inode
    finally:
        own_bao.resume()
    assert_no_marker(running, seeded)


@pytest.mark.slow
async def test_restart_during_outage_renders_templates_from_the_snapshot(
    own_bao: DevServer, role: tuple[str, str], tmp_path: Path
) -> None:
    seeded = new_seeded()
    prepare(own_bao, role, seeded)
    files = role_files(tmp_path, role)
    path = agent_config(tmp_path, own_bao, files, seeded)
    async with running_agent(path) as running, client(running) as c:
        for name in FIELDS:
            assert_value(await c.get(name), seeded, name)
    own_bao.stop()
    # a template the first agent never rendered: its file can only come from the snapshot
    dest = tmp_path / "fresh" / "app.conf"
    dest.parent.mkdir()
    path = agent_config(tmp_path, own_bao, files, seeded, extra=template_toml(dest))
    assert not dest.exists()
    with trio.fail_after(30):
        async with running_agent(path) as running, client(running) as c:
            await until(lambda: dest.exists() and dest.read_text() == rendered(seeded),
                        "the rendered file", interval=0.1)
            # current while younger than its refresh (1 s); stale once its poll is due and
            # cannot be made (no token: the upstream is down)
            await wait_stale(c, "db", True)
            status = await c.status()
            assert status["auth"]["logins"] == 0          # the upstream is down
    assert_no_marker(running, seeded)


async def test_refreshes_share_wake_up_slots(
    bao: DevServer, approle_files: tuple[Path, Path]
) -> None:
    """Twenty secrets on a 1 s refresh, each jittered, wake the loop on 20 ms slots."""
    from agentd.refresh import WAKE_SLOT

    names = [f"s{i}" for i in range(20)]
    rig = _kv_refresher(bao, approle_files, names, refresh=1.0, timeout=5.0, seed=3)
    up, auth, refresher = rig.up, rig.auth, rig.refresher
    seen: set[float] = set()
    async with trio.open_nursery() as nursery:
        await nursery.start(auth.run)
        await nursery.start(refresher.run)
        with trio.fail_after(30):
            await refresher.wait_all_fetched()
            for _ in range(6):                  # three seconds: each secret polled again
                await trio.sleep(0.5)
                for name in names:
                    when = refresher.states[name].next_attempt
                    assert when is not None
                    seen.add(when)
        nursery.cancel_scope.cancel()
    await up.aclose()
    # every wake-up is on a slot boundary (how many share one depends on the machine's load)
    assert len(seen) >= 20
    assert all(abs(w / WAKE_SLOT - round(w / WAKE_SLOT)) < 1e-6 for w in seen)


async def test_first_values_log_at_debug_and_changes_at_info(
    bao: DevServer, approle_files: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="agentd.refresh")
    names = ["a", "b", "c"]
    rig = _kv_refresher(bao, approle_files, names, refresh=300.0, timeout=5.0, seed=5)
    up, auth, refresher = rig.up, rig.auth, rig.refresher
    async with trio.open_nursery() as nursery:
        await nursery.start(auth.run)
        await nursery.start(refresher.run)
        with trio.fail_after(30):
            await refresher.wait_all_fetched()
            path = refresher._config.secrets["b"].path.removeprefix("secret/data/")
            bao.kv_put(path, {"value": "rotated"})
            await refresher.refresh("b")
        nursery.cancel_scope.cancel()
    await up.aclose()
    logged = [(r.levelname, r.getMessage(), getattr(r, "secret", None))
              for r in caplog.records if r.name == "agentd.refresh"]
    assert sorted(x for x in logged if x[1] == "secret fetched") == [
        ("DEBUG", "secret fetched", n) for n in names]
    assert [x for x in logged if x[1] == "secret updated"] == [("INFO", "secret updated", "b")]
