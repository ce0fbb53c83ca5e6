"""Address choice on a real three-node raft cluster (issue 18): each request goes to its own
preferred node, fails over while that node is unreachable, and returns to it once a health
probe finds it answering again. One FaultProxy in front of each node makes the faults and
counts the requests each node receives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from agentd.config import UpstreamConfig
from agentd.upstream import HEALTH_PATH, Upstream, spread_addresses
from tests.cluster import RaftCluster
from tests.faultproxy import FaultProxy
from tests.support import wait_until
from tests.test_upstream import read_kv

pytestmark = pytest.mark.slow

HOST = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RaftCluster]:
    raft = RaftCluster.start(tmp_path / "raft")
    try:
        yield raft
    finally:
        raft.stop()


def reads(proxy: FaultProxy, path: str) -> int:
    return sum(1 for _, _, line in proxy.requests if line == f"GET /v1/{path}")


async def test_a_request_returns_to_its_preferred_node_after_a_failover(
    cluster: RaftCluster,
) -> None:
    active = cluster.wait_active()
    active.api("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
    proxies = [FaultProxy(node.port) for node in cluster.nodes]
    async with trio.open_nursery() as nursery:
        for proxy in proxies:
            await nursery.start(proxy.run)
        addresses = tuple(proxy.address for proxy in proxies)
        # a secret whose preferred node, for this host, is the first one
        path = next(p for p in (f"secret/data/spread/s{i}" for i in range(100))
                    if spread_addresses(addresses, HOST, p)[0] == addresses[0])
        active.kv_put(path.removeprefix("secret/data/"), {"k": "v"})

        def readable_everywhere() -> bool:      # the standbys have set up the new mount
            try:
                return all(node.api("GET", path) for node in cluster.nodes)
            except OSError:
                return False

        await trio.to_thread.run_sync(wait_until, readable_everywhere, "KV on every node")
        cfg = UpstreamConfig(addresses=addresses, timeout=4.0, backoff_min=0.1,
                             backoff_max=0.5)
        up = Upstream(cfg, order_seed=HOST, outage_gate=True)
        up.token_source = lambda: active.token
        await nursery.start(up.run)
        preferred, others = proxies[0], proxies[1:]
        try:
            with trio.fail_after(60):
                await read_kv(up, "kv2", path)
                assert reads(preferred, path) == 1
                assert sum(reads(p, path) for p in others) == 0

                preferred.mode = "reset"          # the node is unreachable: fail over
                await read_kv(up, "kv2", path)
                assert up.statistics().down == (preferred.address,)
                tried = reads(preferred, path)
                await read_kv(up, "kv2", path)
                assert sum(reads(p, path) for p in others) == 2
                # the second read went straight to another node
                assert reads(preferred, path) == tried

                preferred.mode = "pass"           # back: a health probe finds it
                while up.statistics().down:
                    await trio.sleep(0.05)
                probes = [line for _, _, line in preferred.requests
                          if line == f"GET /v1/{HEALTH_PATH}"]
                assert probes and up.statistics().health_probes >= len(probes)
                await read_kv(up, "kv2", path)
                assert reads(preferred, path) == tried + 1    # back at its preferred node
                assert sum(reads(p, path) for p in others) == 2
                assert up.statistics().address in addresses
        finally:
            await up.aclose()
            nursery.cancel_scope.cancel()
