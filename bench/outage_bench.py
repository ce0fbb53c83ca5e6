"""Outage figures for agentd (issue 4), against a real OpenBao dev server.

Runs ``python -m agentd run`` as a child process (as a user would) and measures:

1. **kill -> first stale reply**: the upstream is SIGKILLed (port closed) and, separately,
   SIGSTOPped (hung); a client polls ``get`` every ``--poll`` seconds until ``stale`` is true;
2. **upstream requests during an outage**: the agent reaches OpenBao through a counting TCP proxy
   (``tests/faultproxy.py``); for ``--outage`` seconds (60) every connection is reset after its
   request arrives, and the proxy counts the connections (one per request: the reset kills
   keep-alive). Beside it: what polling at ``refresh`` without backoff would have sent;
3. **``agentd run`` -> first value served from the snapshot, upstream down**: the agent is stopped
   cleanly (it writes its snapshot), OpenBao is killed, and a new ``agentd run`` is started; the
   time from spawning it to the first successful ``get`` (stale) is measured, ``--rounds`` times.

Every wait is bounded; everything started is stopped in a ``finally``. Prints a markdown table.
Run: ``.venv/bin/python bench/outage_bench.py`` (about 90 s; ``--outage 10`` for a quick run).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentd.client import Client  # noqa: E402
from agentd.demo import AgentProcess  # noqa: E402
from agentd.errors import AgentdError  # noqa: E402
from tests.conftest import READ_ALL_SECRETS  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402
from tests.openbao import DevServer  # noqa: E402

T = TypeVar("T")
NAMES = ("db", "api", "cfg")


def write_config(work: Path, address: str, role: tuple[str, str], prefix: str,
                 refresh: str, timeout: str) -> Path:
    role_file, secret_file = work / "role_id", work / "secret_id"
    for path, value in ((role_file, role[0]), (secret_file, role[1])):
        path.write_text(value + "\n")
        path.chmod(0o600)
    secrets = "\n".join(
        f'[secrets.{n}]\nkind = "kv2"\npath = "secret/data/{prefix}/{n}"\nrefresh = "{refresh}"\n'
        for n in NAMES
    )
    config = work / "agentd.toml"
    config.write_text(f"""
[agent]
socket = "{work / 'agentd.sock'}"
state_dir = "{work / 'state'}"
ready_timeout = "30s"
requests_per_second_per_uid = 1000000

[upstream]
addresses = ["{address}"]
timeout = "{timeout}"

[upstream.auth]
method = "approle"
role_id_file = "{role_file}"
secret_id_file = "{secret_file}"

[audit]
path = "{work / 'audit.jsonl'}"

{secrets}
[[policy]]
name = "bench"
uids = [{os.getuid()}]
allow = ["*"]
admin = true
""")
    config.chmod(0o600)
    return config


def try_get(sock: Path, name: str) -> dict[str, Any] | None:
    try:
        with Client.connect(sock, timeout=2) as c:
            return c.get(name)
    except (AgentdError, OSError):
        return None


def wait_until(what: str, check: Callable[[], T | None], timeout: float, poll: float) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(poll)


def seed(server: DevServer, role: tuple[str, str], prefix: str) -> None:
    server.put_policy("agentd-read", READ_ALL_SECRETS)
    server.enable_approle()
    server.api("POST", "auth/approle/role/agentd",
               {"token_policies": ["agentd-read"], "token_ttl": "1h", "role_id": role[0]})
    server.api("POST", "auth/approle/role/agentd/custom-secret-id", {"secret_id": role[1]})
    for n in NAMES:
        server.kv_put(f"{prefix}/{n}", {"password": f"bench-{n}-{uuid.uuid4().hex}"})


def time_to_stale(work: Path, args: argparse.Namespace, how: str) -> float:
    """Start bao + agent, then kill or stop bao; seconds until the first stale reply."""
    role = (str(uuid.uuid4()), str(uuid.uuid4()))
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    bao = DevServer.start(work / "bao")
    agent: AgentProcess | None = None
    try:
        seed(bao, role, prefix)
        config = write_config(work, bao.address, role, prefix, args.refresh, args.timeout)
        agent = AgentProcess(config, work / "agent.log")
        sock = work / "agentd.sock"
        wait_until("the agent", lambda: try_get(sock, "db"), 30, 0.05)
        time.sleep(args.refresh_seconds * 1.5)   # land anywhere in the refresh cycle
        started = time.monotonic()
        if how == "kill":
            bao.stop()
        else:
            bao.pause()

        def stale() -> bool | None:
            reply = try_get(sock, "db")
            return True if reply is not None and reply["stale"] else None

        wait_until("a stale reply", stale, 120, args.poll)
        return time.monotonic() - started
    finally:
        if agent is not None:
            agent.stop()
        bao.stop()


async def count_outage_requests(work: Path, args: argparse.Namespace) -> tuple[int, int, float]:
    """(requests through the proxy during the outage, requests before it per second, seconds)."""
    role = (str(uuid.uuid4()), str(uuid.uuid4()))
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    bao = DevServer.start(work / "bao")
    agent: AgentProcess | None = None
    proxy = FaultProxy(bao.port)
    try:
        seed(bao, role, prefix)
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            config = write_config(work, proxy.address, role, prefix, args.refresh, args.timeout)
            agent = AgentProcess(config, work / "agent.log")
            sock = work / "agentd.sock"
            with trio.fail_after(30):
                while await trio.to_thread.run_sync(try_get, sock, "db") is None:
                    await trio.sleep(0.05)
            proxy.mode = "reset"
            before = proxy.connections
            await trio.sleep(args.outage)
            during = proxy.connections - before
            # every get during the outage was served (stale)
            reply = await trio.to_thread.run_sync(try_get, sock, "db")
            if reply is None or not reply["stale"]:
                raise RuntimeError("the agent did not serve stale during the outage")
            nursery.cancel_scope.cancel()
        no_backoff = int(len(NAMES) * args.outage / args.refresh_seconds)
        return during, no_backoff, args.outage
    finally:
        if agent is not None:
            agent.stop()
        bao.stop()


def snapshot_start(work: Path, args: argparse.Namespace) -> list[float]:
    """Seconds from spawning ``agentd run`` to the first served value, upstream down."""
    role = (str(uuid.uuid4()), str(uuid.uuid4()))
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    bao = DevServer.start(work / "bao")
    sock = work / "agentd.sock"
    try:
        seed(bao, role, prefix)
        config = write_config(work, bao.address, role, prefix, args.refresh, args.timeout)
        agent = AgentProcess(config, work / "agent.log")
        try:
            wait_until("the agent", lambda: try_get(sock, "db"), 30, 0.05)
        finally:
            agent.stop()     # clean stop: the snapshot is written
    finally:
        bao.stop()
    times: list[float] = []
    for _ in range(args.rounds):
        started = time.monotonic()
        agent = AgentProcess(config, work / "agent.log")
        try:
            reply = wait_until("a value from the snapshot", lambda: try_get(sock, "db"), 60,
                               0.005)
            times.append(time.monotonic() - started)
            if not reply["stale"]:
                raise RuntimeError("a value with the upstream down must be stale")
        finally:
            agent.stop()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refresh", default="5s", help="each secret's refresh (default 5s)")
    parser.add_argument("--timeout", default="2s", help="upstream request timeout (default 2s)")
    parser.add_argument("--outage", type=float, default=60.0, help="outage seconds (60)")
    parser.add_argument("--rounds", type=int, default=5, help="restarts from the snapshot (5)")
    parser.add_argument("--poll", type=float, default=0.01, help="client poll interval (10 ms)")
    args = parser.parse_args(argv)
    args.refresh_seconds = float(args.refresh.rstrip("s"))
    work = Path(tempfile.mkdtemp(prefix="agentd-outage-"))
    try:
        kill = time_to_stale(work / "kill", args, "kill")
        hang = time_to_stale(work / "stop", args, "stop")
        during, no_backoff, seconds = trio.run(count_outage_requests, work / "count", args)
        starts = snapshot_start(work / "snap", args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"agentd outage figures ({platform.node()}, Python {platform.python_version()}; "
          f"{len(NAMES)} KV v2 secrets, refresh {args.refresh}, request timeout {args.timeout})\n")
    print("| figure | value |")
    print("|---|---|")
    print(f"| upstream SIGKILLed -> first stale reply | {kill:.2f} s |")
    print(f"| upstream SIGSTOPped -> first stale reply | {hang:.2f} s |")
    print(f"| upstream requests during a {seconds:.0f} s outage (connections reset) | "
          f"{during} (polling without backoff: {no_backoff}) |")
    print(f"| `agentd run` -> first value from the snapshot, upstream down "
          f"(median of {len(starts)}) | {statistics.median(starts) * 1000:.0f} ms "
          f"(min {min(starts) * 1000:.0f}, max {max(starts) * 1000:.0f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
