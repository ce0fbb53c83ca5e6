"""HA failover on a real three-node raft cluster (issue 4): kill the active node, keep serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from agentd.client import AsyncClient
from agentd.errors import RequestError
from tests.agentfixture import running_agent, socket_dir, write_config
from tests.cluster import RaftCluster
from tests.conftest import READ_ALL_SECRETS
from tests.test_resilience import FIELDS, assert_value, new_seeded

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RaftCluster]:
    raft = RaftCluster.start(tmp_path / "raft")
    try:
        yield raft
    finally:
        raft.stop()


async def test_active_node_killed_refreshes_resume_without_restart(
    cluster: RaftCluster, tmp_path: Path
) -> None:
    active = cluster.wait_active()
    active.api("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
    active.enable_kv1()
    active.put_policy("agentd-read", READ_ALL_SECRETS)
    role = active.approle("agentd", policies=["agentd-read"], token_ttl="1h")
    seeded = new_seeded()
    p = seeded.prefix
    active.kv_put(f"{p}/db", {"username": "app", "password": seeded.markers["db"]})
    active.api("POST", f"kv1/{p}/api", {"token": seeded.markers["api"]})
    active.kv_put(f"{p}/other", {"value": seeded.markers["other"]})
    files = (tmp_path / "role_id", tmp_path / "secret_id")
    for path, value in zip(files, role, strict=True):
        path.write_text(value + "\n")
        path.chmod(0o600)
    # requests to a node being promoted can hang ~2 s (OPENBAO.md): a timeout above that
    config = write_config(tmp_path, active, files, seeded, sock=socket_dir() / "agentd.sock",
                          addresses=cluster.addresses,
                          agent_extra="requests_per_second_per_uid = 100000")
    config.write_text(config.read_text().replace('timeout = "2s"', 'timeout = "4s"'))

    served = 0
    allowed = {name: {seeded.markers[name]} for name in FIELDS}
    errors: list[str] = []

    async def read_throughout(c: AsyncClient, stop: trio.Event) -> None:
        nonlocal served
        while not stop.is_set():
            for name in FIELDS:
                try:
                    reply = await c.get(name)
                except RequestError as exc:
                    errors.append(f"{name}: {exc}")
                    continue
                assert reply["data"][FIELDS[name]] in allowed[name]
                served += 1
            await trio.sleep(0.02)

    async with running_agent(config) as running, AsyncClient.connect(running.socket) as c:
        for name in FIELDS:
            assert (await c.get(name))["stale"] is False
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_throughout, c, stop)
            await trio.to_thread.run_sync(cluster.kill, active)
            with trio.fail_after(60):
                leader = await trio.to_thread.run_sync(cluster.wait_active)
            assert leader is not active
            # a write the agent can only see by refreshing through the surviving nodes
            new_value = seeded.marker("db")
            allowed["db"].add(new_value)
            new_version = await trio.to_thread.run_sync(
                lambda: leader.kv_put(f"{p}/db", {"password": new_value}))
            with trio.fail_after(60):
                while True:
                    reply = await c.get("db")
                    if reply["version"] == new_version and not reply["stale"]:
                        assert_value(reply, seeded, "db")
                        break
                    await trio.sleep(0.1)
                for name in ("api", "other"):
                    while (await c.get(name))["stale"]:
                        await trio.sleep(0.1)
            stop.set()
        assert errors == []
        assert served > 0
        assert running.agent.upstream.statistics().address != active.address
