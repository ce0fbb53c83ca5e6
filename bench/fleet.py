"""A fleet of agentd processes against one real 3-node raft OpenBao cluster (issue 18).

What runs (all on loopback, all children stopped in a ``finally``):

- the test suite's raft cluster (``tests.cluster.RaftCluster``: three ``bao server`` nodes, not
  dev mode), seeded with KV v2 at ``secret/``, a read policy, one approle and ``--secrets`` (20)
  KV secrets ``secret/fleet/s00..``;
- one counting TCP proxy per node, in this process (trio). Agents are given the three proxy
  addresses, so every request a node receives from the fleet passes its proxy, which parses the
  HTTP/1.1 request heads (request line and Content-Length; bodies skipped) and counts them per
  node, per kind (``login``, ``kv_read``, ``token``, ...) and per second. Why a proxy rather than
  an audit device per node: on one machine the three nodes would share an audit ``file_path``
  (the audit table is cluster-wide), an audit device costs each node an HMAC and a JSON line per
  request and response on the very CPU being measured, and the counts would have to be parsed back
  out of files. The proxy costs one hop on loopback; it keeps the failure modes (a SIGSTOPped node
  still accepts and never answers; a killed node's proxy closes the connection at once, which the
  agent sees as a connection failure and fails over). It counts where requests *arrive*: a login
  arriving at a standby is forwarded by that standby to the active node (a storage write there);
  reads are served by the standby itself (``disable_standby_reads`` is false by default).
  Admin traffic of the bench (health checks, ``kv put``) goes to the nodes directly, uncounted;
- ``--agents`` (100) ``python -m agentd run`` processes, each with its own directory, state dir
  (snapshot and key), socket, audit file, and host id: ``[agent] host_id`` in its config (random
  32 hex digits, as a machine id would be), the seed of its address order and schedule phases.
  ``--shared-machine-id`` leaves the key out, so every agent takes this machine's
  ``/etc/machine-id`` (what happens when a golden image ships one ``/etc/machine-id``);
- per agent, a reader on its socket (``agentd.client.AsyncClient``): one ``get`` every
  ``--read-interval`` s (the secrets in turn) and one ``status`` every ``--sample`` s. A ``get``
  that fails once the agent has served once is a *local read error* (a stale value is not an
  error). Freshness comes from ``status`` (every secret cached and not stale).

Scenarios, in this order, each printing a table (per node: requests/s mean and peak 1 s bin,
KV reads, logins) and its own figures:

1a. cold start, no snapshots: all agents spawned at once (refresh ``--cold-refresh``, default the
    product default 300s, so no poll falls in the window);
1b. cold start with snapshots: all agents stopped cleanly (each writes its snapshot) and spawned
    again at once; secret reads in the first ``--snapshot-window`` (30) s are compared with what
    was due in that window (secrets whose ``fetched_at`` + refresh - 10% falls in it);
2.  steady state at ``--refresh`` (5s): the configs are rewritten with that refresh and every agent
    reloaded (SIGHUP); after one interval, ``--steady`` s of per-node rates and their spread;
5.  ``--writes`` KV writes of ``s00`` at the active node: per agent a ``watch`` on ``s00``; time
    from the write to 50%, 90% and 100% of the fleet holding the new version;
3.  all three nodes SIGSTOPped for ``--outage`` s, then SIGCONT: requests sent during the outage,
    the recovery peak (1 s bins) against the steady mean, and the time until every agent is fresh;
4.  the active node SIGKILLed: local read errors, refresh errors (agents' upstream error counts),
    the time to a new leader, and until every agent has refreshed every secret since the kill.

Output: markdown tables on stdout (progress on stderr); ``--json FILE`` also writes every figure
and the per-second counts. Exit status 0 when every scenario ran, 1 otherwise.

Bounds: every wait has a deadline; ``--agents`` is capped at 400. Run:
``make bench-fleet`` (N=100, about 7 minutes on 2 idle cores) or, for a quick look,
``.venv/bin/python bench/fleet.py --agents 5 --outage 15 --steady 10 --snapshot-window 10``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentd.client import AsyncClient, open_client  # noqa: E402
from agentd.demo import AgentFiles, AgentProcess, write_agent_files  # noqa: E402
from agentd.devserver import clean_env  # noqa: E402
from agentd.errors import AgentdError  # noqa: E402
from tests.cluster import RaftCluster, health  # noqa: E402

KV_PREFIX = "fleet"
POLICY = """
path "secret/data/fleet/*" { capabilities = ["read"] }
path "secret/metadata/fleet/*" { capabilities = ["read", "list"] }
"""
SCENARIOS = ("cold", "snapshot", "steady", "write", "outage", "kill")
KINDS = ("kv_read", "kv_meta", "login", "token", "sys", "other")
MAX_AGENTS = 400
IDLE_SAMPLE = 3.0      # seconds of the idle cluster's CPU, measured before any agent starts


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def classify(method: bytes, target: bytes) -> str:
    path = target.split(b"?", 1)[0]
    if path.startswith(b"/v1/auth/") and path.endswith(b"/login"):
        return "login"
    if path.startswith(b"/v1/auth/token/"):
        return "token"
    if path.startswith(b"/v1/secret/data/"):
        return "kv_read" if method == b"GET" else "other"
    if path.startswith(b"/v1/secret/metadata/"):
        return "kv_meta"
    if path.startswith(b"/v1/sys/"):
        return "sys"
    return "other"


# --- per-node request counting ---------------------------------------------------------------


class Counts:
    """Every request head seen, per node: its time (time.monotonic()) and kind. Windows are
    binned from their own start, so a window's mean is its count over its exact length and
    its 1 s bins are not cut by a global grid."""

    def __init__(self, nodes: int, t0: float) -> None:
        self.t0 = t0
        self.times: list[list[float]] = [[] for _ in range(nodes)]
        self.kinds: list[list[str]] = [[] for _ in range(nodes)]
        self.refused = [0] * nodes       # connections the proxy could not pass on (node down)

    def add(self, node: int, kind: str) -> None:
        self.times[node].append(time.monotonic())
        self.kinds[node].append(kind)

    def count(self, node: int, start: float, end: float,
              kinds: Iterable[str] | None = None) -> int:
        return sum(self.series(node, start, end, kinds))

    def series(self, node: int, start: float, end: float,
               kinds: Iterable[str] | None = None) -> list[int]:
        """Counts per second from ``start`` ([start + i, start + i + 1)) up to ``end``; the
        last bin may be shorter than a second."""
        wanted = set(kinds) if kinds is not None else None
        out = [0] * max(1, math.ceil(end - start))
        times, kinds_ = self.times[node], self.kinds[node]
        for i in range(bisect.bisect_left(times, start), bisect.bisect_left(times, end)):
            if wanted is None or kinds_[i] in wanted:
                out[min(len(out) - 1, int(times[i] - start))] += 1
        return out

    def total(self, start: float, end: float, kinds: Iterable[str] | None = None) -> list[int]:
        per_node = [self.series(n, start, end, kinds) for n in range(len(self.times))]
        return [sum(col) for col in zip(*per_node, strict=True)]

    def dump(self) -> list[dict[str, dict[str, int]]]:
        """Per node: second since t0 -> kind -> count."""
        out: list[dict[str, dict[str, int]]] = []
        for times, kinds in zip(self.times, self.kinds, strict=True):
            bins: defaultdict[int, Counter[str]] = defaultdict(Counter)
            for t, k in zip(times, kinds, strict=True):
                bins[int(t - self.t0)][k] += 1
            out.append({str(sec): dict(c) for sec, c in sorted(bins.items())})
        return out


class HeadScanner:
    """Finds HTTP/1.1 request heads in one connection's client-to-server bytes."""

    CONTENT_LENGTH = re.compile(rb"(?im)^content-length:[ \t]*(\d+)")

    def __init__(self, on_request: Callable[[bytes, bytes], None]) -> None:
        self.on_request = on_request
        self.buf = b""
        self.body_left = 0

    def feed(self, data: bytes) -> None:
        while data:
            if self.body_left:
                n = min(self.body_left, len(data))
                self.body_left -= n
                data = data[n:]
                continue
            self.buf += data
            data = b""
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:      # not HTTP as we know it: stop looking
                    self.buf = b""
                return
            head, data = self.buf[:end], self.buf[end + 4:]
            self.buf = b""
            line, _, headers = head.partition(b"\r\n")
            parts = line.split(b" ")
            if len(parts) >= 2:
                self.on_request(parts[0], parts[1])
            m = self.CONTENT_LENGTH.search(headers)
            self.body_left = int(m.group(1)) if m else 0


class CountingProxy:
    """127.0.0.1:<free port> -> one node; counts request heads into ``counts``."""

    def __init__(self, node: int, target_port: int, counts: Counts) -> None:
        self.node = node
        self.target_port = target_port
        self.counts = counts
        self.port = 0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            self.counts.refused[self.node] += 1
            with contextlib.suppress(trio.BrokenResourceError, OSError):
                await client.aclose()
            return
        scanner = HeadScanner(lambda m, t: self.counts.add(self.node, classify(m, t)))

        async def pump(src: trio.SocketStream, dst: trio.SocketStream, count: bool,
                       scope: trio.CancelScope) -> None:
            try:
                while True:
                    data = await src.receive_some(65536)
                    if not data:
                        break
                    if count:
                        scanner.feed(data)
                    await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            scope.cancel()

        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream, True, nursery.cancel_scope)
            nursery.start_soon(pump, upstream, client, False, nursery.cancel_scope)


# --- the fleet -------------------------------------------------------------------------------


@dataclass
class FleetAgent:
    index: int
    files: AgentFiles
    socket: Path
    proc: AgentProcess | None = None
    spawned_at: float = 0.0          # monotonic
    served_at: float | None = None   # first successful get after the last spawn
    reads: int = 0
    read_errors: list[str] = field(default_factory=list)
    status: dict[str, Any] | None = None
    status_at: float = 0.0
    status_failures: int = 0
    read_errors_counted: bool = True  # False while the bench stops the agent on purpose


def fresh(status: dict[str, Any] | None, since: float | None = None) -> bool:
    """Every secret cached and not stale (and fetched at or after ``since``, unix time)."""
    if not status:
        return False
    for s in status.get("secrets", {}).values():
        if s.get("version") is None or s.get("stale"):
            return False
        if since is not None and (s.get("fetched_at") or 0) < since:
            return False
    return True


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, sockets: Path) -> None:
        self.args = args
        self.work = work
        self.sockets = sockets
        self.cluster: RaftCluster | None = None
        self.counts = Counts(3, time.monotonic())
        self.proxies: list[CountingProxy] = []
        self.agents: list[FleetAgent] = []
        self.names = [f"s{i:02d}" for i in range(args.secrets)]
        self.results: dict[str, Any] = {}
        self.failed: list[str] = []
        self.watch_hits: dict[int, float] = {}
        self.watch_target: int | None = None
        self.kill_sent: float | None = None

    # -- setup --------------------------------------------------------------------------------

    def start_cluster(self) -> None:
        log("starting a 3-node raft cluster")
        self.cluster = RaftCluster.start(self.work / "raft")
        active = self.cluster.wait_active()
        active.api("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
        active.put_policy("fleet-read", POLICY)
        self.role = active.approle("fleet", policies=["fleet-read"], token_ttl="1h")
        for name in self.names:
            active.kv_put(f"{KV_PREFIX}/{name}", {"password": secrets.token_hex(12)})
        versions = active.api("GET", f"secret/metadata/{KV_PREFIX}/s00")
        assert versions["data"]["current_version"] == 1
        # the nodes' own CPU with no agent (raft heartbeats, autopilot): subtracted later
        pids = [n.proc.pid for n in self.cluster.nodes]
        before = [cpu_seconds(p) for p in pids]
        time.sleep(IDLE_SAMPLE)
        self.node_idle = [(cpu_seconds(p) - b) / IDLE_SAMPLE for p, b in zip(pids, before,
                                                                              strict=True)]

    def write_configs(self, refresh: str) -> None:
        addresses = ", ".join(json.dumps(p.address) for p in self.proxies)
        for agent in self.agents:      # a rewrite: only the refresh changes
            text = agent.files.config.read_text()
            text = re.sub(r'refresh = "[^"]*"', f'refresh = {json.dumps(refresh)}', text)
            agent.files.config.write_text(text)
        if not self.agents:
            for i in range(self.args.agents):
                root = self.work / f"a{i:03d}"
                root.mkdir(mode=0o700)
                (root / "state").mkdir(mode=0o700)
                files = write_agent_files(
                    root, address=self.proxies[0].address, role_id=self.role[0],
                    secret_id=self.role[1],
                    secrets_={n: f"secret/data/{KV_PREFIX}/{n}" for n in self.names},
                    refresh=refresh)
                sock = self.sockets / f"a{i:03d}.sock"
                text = files.config.read_text()
                text = text.replace(f"addresses = [{json.dumps(self.proxies[0].address)}]",
                                    f"addresses = [{addresses}]")
                text = text.replace(f"socket = {json.dumps(str(files.socket))}",
                                    f"socket = {json.dumps(str(sock))}")
                host = "" if self.args.shared_machine_id else (
                    f"\nhost_id = {json.dumps(secrets.token_hex(16))}")
                text = text.replace('ready_timeout = "10s"', 'ready_timeout = "60s"' + host)
                files.config.write_text(text)
                self.agents.append(FleetAgent(i, files, sock))

    def spawn_all(self) -> float:
        started = time.monotonic()
        for agent in self.agents:
            agent.served_at = None
            agent.status = None
            agent.read_errors_counted = True
            agent.spawned_at = time.monotonic()
            agent.proc = AgentProcess(agent.files.config, agent.files.log)
        return started

    def stop_all(self) -> None:
        for agent in self.agents:
            agent.read_errors_counted = False
            if agent.proc is not None and agent.proc.proc.poll() is None:
                agent.proc.proc.terminate()
        deadline = time.monotonic() + 30
        for agent in self.agents:
            if agent.proc is None:
                continue
            try:
                agent.proc.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                agent.proc.proc.kill()
                agent.proc.proc.wait(timeout=10)

    def check_alive(self) -> None:
        dead = [a.index for a in self.agents
                if a.proc is not None and a.proc.proc.poll() is not None]
        if dead:
            tail = self.agents[dead[0]].proc.log_tail(5)  # type: ignore[union-attr]
            raise RuntimeError(f"agents exited: {dead[:10]}; a{dead[0]:03d} log:\n{tail}")

    # -- per-agent monitor --------------------------------------------------------------------

    async def monitor(self, agent: FleetAgent) -> None:
        """Reader and status sampler of one agent, until cancelled."""
        i = agent.index % len(self.names)
        next_status = 0.0
        while True:
            try:
                client = await open_client(agent.socket)
            except AgentdError:
                await trio.sleep(0.2)
                continue
            async with client:
                try:
                    while True:
                        name = self.names[i % len(self.names)]
                        i += 1
                        with trio.fail_after(2):
                            await client.get(name)
                        agent.reads += 1
                        if agent.served_at is None:
                            agent.served_at = time.monotonic()
                        now = time.monotonic()
                        if now >= next_status:
                            next_status = now + self.args.sample
                            with trio.fail_after(5):
                                agent.status = await client.status()
                            agent.status_at = time.monotonic()
                        await trio.sleep(self.args.read_interval)
                except (AgentdError, trio.TooSlowError) as exc:
                    if agent.served_at is not None and agent.read_errors_counted:
                        agent.read_errors.append(f"{time.monotonic():.1f} {exc}")
                    await trio.sleep(0.1)

    async def watch_one(self, agent: FleetAgent, target: int, written: trio.Event) -> None:
        async with AsyncClient.connect(agent.socket) as client:
            events = await client.watch(["s00"])
            async for event in events:
                if event.event == "changed" and int(event.fields.get("version", 0)) >= target:
                    await written.wait()
                    self.watch_hits[agent.index] = time.monotonic()
                    return

    # -- helpers ------------------------------------------------------------------------------

    async def wait_fleet(self, what: str, cond: Callable[[FleetAgent], bool],
                         timeout: float) -> float | None:
        """Monotonic time at which ``cond`` held for every agent; None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if all(cond(a) for a in self.agents):
                return time.monotonic()
            await trio.sleep(0.2)
        missing = sum(1 for a in self.agents if not cond(a))
        log(f"gave up waiting for {what} after {timeout:g} s ({missing} agents short)")
        return None

    def sum_status(self, key: Callable[[dict[str, Any]], int]) -> int:
        return sum(key(a.status) for a in self.agents if a.status)

    def read_errors(self) -> int:
        return sum(len(a.read_errors) for a in self.agents)

    def roles(self) -> list[str]:
        assert self.cluster is not None
        out = []
        for node in self.cluster.nodes:
            if node.proc.poll() is not None:
                out.append("killed")
                continue
            code = health(node.address)
            out.append({200: "active", 429: "standby"}.get(code or 0, f"health {code}"))
        return out

    def node_table(self, start: float, end: float, roles: list[str]
                   ) -> tuple[str, list[dict[str, Any]]]:
        rows: list[list[str]] = []
        data: list[dict[str, Any]] = []
        seconds = max(1e-3, end - start)
        for n in range(3):
            series = self.counts.series(n, start, end)
            kv = sum(self.counts.series(n, start, end, ["kv_read"]))
            logins = sum(self.counts.series(n, start, end, ["login"]))
            d: dict[str, Any] = {"node": f"n{n + 1}", "role": roles[n], "requests": sum(series),
                 "mean_rps": sum(series) / seconds, "peak_rps": max(series, default=0),
                 "kv_reads": kv, "logins": logins}
            data.append(d)
            rows.append([d["node"], d["role"], fmt(d["mean_rps"]), str(d["peak_rps"]),
                         str(kv), str(logins), str(sum(series) - kv - logins)])
        tot = self.counts.total(start, end)
        kv_all = sum(d["kv_reads"] for d in data)
        logins_all = sum(d["logins"] for d in data)
        rows.append(["all", "", fmt(sum(tot) / seconds), str(max(tot, default=0)),
                     str(kv_all), str(logins_all), str(sum(tot) - kv_all - logins_all)])
        header = ["node", "role", "req/s mean", "req/s peak (1 s)", "KV reads", "logins",
                  "other"]
        return table(header, rows), data

    def report(self, title: str, start: float, end: float, roles: list[str],
               figures: list[tuple[str, str]]) -> dict[str, Any]:
        text, data = self.node_table(start, end, roles)
        print(f"\n### {title}\n\nwindow {end - start:.1f} s, N={len(self.agents)}\n")
        print(text)
        print()
        print(table(["figure", "value"], [[k, v] for k, v in figures]))
        sys.stdout.flush()
        return {"window_s": end - start, "nodes": data, "figures": dict(figures)}

    # -- scenarios ----------------------------------------------------------------------------

    async def cold_start(self, mon: trio.Nursery, label: str, snapshots: bool) -> None:
        roles = self.roles()
        errors0 = self.read_errors()
        start = await trio.to_thread.run_sync(self.spawn_all)
        for agent in self.agents:
            mon.start_soon(self.monitor, agent)
        timeout = 60 + 1.5 * len(self.agents)
        served = await self.wait_fleet("every agent serving", lambda a: a.served_at is not None,
                                       timeout)
        window_end = start + self.args.snapshot_window
        # Restored values may stay marked stale until their own refresh point (up to one
        # refresh interval): with snapshots, freshness is looked for within the window only.
        fresh_limit = (max(1.0, window_end - time.monotonic()) if snapshots
                       else timeout + self.args.snapshot_window + 30)
        freshed = await self.wait_fleet("a fully fresh fleet", lambda a: fresh(a.status),
                                        fresh_limit)
        await sleep_until_mono(window_end)
        end = max(time.monotonic(), freshed or 0.0)
        stale = sum(1 for a in self.agents for sec in (a.status or {}).get("secrets", {}).values()
                    if sec.get("stale"))
        kv_window = sum(self.counts.total(start, start + self.args.snapshot_window, ["kv_read"]))
        logins = self.counts.total(start, end, ["login"])
        figures = [
            ("spawn -> every agent serving (s)", fmt(served - start if served else None)),
            ("spawn -> fully fresh fleet (s)", fmt(freshed - start if freshed else None)
             if freshed or not snapshots else f"not within {self.args.snapshot_window:g} s"),
            ("values marked stale at the end (all agents)",
             f"{stale} of {len(self.agents) * len(self.names)}"),
            (f"KV reads in the first {self.args.snapshot_window:g} s", str(kv_window)),
            ("  of which due (snapshot age + refresh)", str(self.due_reads) if snapshots
             else f"{len(self.agents) * len(self.names)} (nothing cached)"),
            ("logins (total; peak per s)", f"{sum(logins)}; {max(logins, default=0)}"),
            ("agents whose current node is n1/n2/n3", "/".join(str(c) for c in
                                                              self.first_nodes())),
            ("local read errors", str(self.read_errors() - errors0)),
        ]
        self.results[label] = self.report(label, start, end, roles, figures)
        self.results[label]["kv_reads_window"] = kv_window
        self.results[label]["served_s"] = served - start if served else None
        self.results[label]["fresh_s"] = freshed - start if freshed else None

    def due_in_window(self, window: float, refresh: float) -> int:
        """Secrets whose earliest scheduled refresh (fetched_at + refresh - 10%) falls within
        ``window`` s from now: what a restart now may read without reading early."""
        now = time.time()
        due = 0
        for agent in self.agents:
            for s in (agent.status or {}).get("secrets", {}).values():
                if (s.get("fetched_at") or 0) + 0.9 * refresh <= now + window:
                    due += 1
        return due

    async def steady(self) -> None:
        assert self.cluster is not None
        roles = self.roles()
        pids = [n.proc.pid for n in self.cluster.nodes]
        agent_pids = [a.proc.pid for a in self.agents if a.proc is not None]
        node_cpu0 = [cpu_seconds(p) for p in pids]
        agent_cpu0 = sum(cpu_seconds(p) for p in agent_pids)
        start = time.monotonic()
        errors0 = self.read_errors()
        await trio.sleep(self.args.steady)
        end = time.monotonic()
        node_cpu = [cpu_seconds(p) - c for p, c in zip(pids, node_cpu0, strict=True)]
        agent_cpu = sum(cpu_seconds(p) for p in agent_pids) - agent_cpu0
        self.check_alive()
        _, nodes = self.node_table(start, end, roles)
        means = [d["mean_rps"] for d in nodes]
        avg = statistics.mean(means)
        spread = [100 * (m - avg) / avg if avg else math.nan for m in means]
        tot = self.counts.total(start, end)[:max(1, int(end - start))]   # whole seconds
        per_agent = sum(tot) / len(tot) / len(self.agents)
        expected = len(self.names) / self.refresh_s
        n = len(self.agents)
        # agentd orders the addresses per host and path (rendezvous): the units spread over
        # the three nodes are the agents' secrets, not the agents
        units = n * len(self.names)
        binom = 100 * math.sqrt((2 / 3) / (units / 3)) if units else math.nan
        figures = [
            ("per-node deviation from even (%)", ", ".join(f"{s:+.0f}" for s in spread)),
            ("largest deviation (%)", fmt(max(abs(s) for s in spread), 0)),
            ("expected spread from the per-host-and-secret order: 1 sd (%)", fmt(binom, 1)),
            ("agents whose current node is n1/n2/n3", "/".join(str(c) for c in self.first_nodes())),
            ("requests/s per agent (measured)", fmt(per_agent, 2)),
            ("requests/s per agent (secrets / refresh)", fmt(expected, 2)),
            ("steady 1 s bins: mean / sd / max", f"{fmt(statistics.mean(tot))} / "
             f"{fmt(statistics.pstdev(tot))} / {max(tot)}"),
            ("node CPU, % of a core (n1/n2/n3)",
             "/".join(fmt(100 * c / (end - start), 0) for c in node_cpu)),
            ("idle cluster's CPU, % of a core (n1/n2/n3)",
             "/".join(fmt(100 * c, 0) for c in self.node_idle)),
            ("node CPU above idle per request counted there (us, n1/n2/n3)",
             "/".join(fmt(1e6 * (c - i * (end - start)) / d["requests"], 0)
                      if d["requests"] else "-"
                      for c, i, d in zip(node_cpu, self.node_idle, nodes, strict=True))),
            ("cluster CPU above idle per request (us, all nodes)",
             fmt(1e6 * (sum(node_cpu) - sum(self.node_idle) * (end - start))
                 / max(1, sum(d["requests"] for d in nodes)), 0)),
            ("agent CPU, % of a core per agent (incl. its reader's gets and status)",
             fmt(100 * agent_cpu / (end - start) / len(agent_pids), 2)),
            ("local read errors", str(self.read_errors() - errors0)),
        ]
        res = self.report("2. steady state", start, end, roles, figures)
        res["spread_pct"] = spread
        res["per_agent_rps"] = per_agent
        res["total_mean_rps"] = sum(tot) / len(tot)
        res["total_sd_rps"] = statistics.pstdev(tot)
        res["node_cpu_s"] = node_cpu
        res["agent_cpu_s"] = agent_cpu
        self.results["2. steady state"] = res

    def first_nodes(self) -> list[int]:
        """How many agents' status names each node's proxy as their current address (the first
        address up in the agent's own order; its requests for each path have their own order)."""
        by_addr = Counter((a.status or {}).get("upstream", {}).get("address") for a in self.agents)
        return [by_addr.get(p.address, 0) for p in self.proxies]

    async def writes(self) -> None:
        assert self.cluster is not None
        roles = self.roles()
        start = time.monotonic()
        errors0 = self.read_errors()
        rows, runs = [], []
        for w in range(self.args.writes):
            active = await trio.to_thread.run_sync(self.cluster.wait_active)
            meta = await trio.to_thread.run_sync(
                functools.partial(active.api, "GET", f"secret/metadata/{KV_PREFIX}/s00"))
            target = int(meta["data"]["current_version"]) + 1
            self.watch_hits = {}
            written = trio.Event()
            async with trio.open_nursery() as nursery:
                for agent in self.agents:
                    nursery.start_soon(self.watch_one, agent, target, written)
                await trio.sleep(1.0)       # the watches are set up
                t_write = time.monotonic()
                version = await trio.to_thread.run_sync(functools.partial(
                    active.kv_put, f"{KV_PREFIX}/s00", {"password": secrets.token_hex(12)}))
                assert version == target, (version, target)
                written.set()
                with trio.move_on_after(self.refresh_s * 1.1 + 10):
                    while len(self.watch_hits) < len(self.agents):
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            delays = [t - t_write for t in self.watch_hits.values()]
            n = len(self.agents)
            q = {}
            for p in (50, 90, 100):
                need = math.ceil(n * p / 100)
                q[p] = sorted(delays)[need - 1] if len(delays) >= need else None
            runs.append({"served": len(delays), "p50": q[50], "p90": q[90], "p100": q[100]})
            rows.append([str(w + 1), f"{len(delays)}/{n}", fmt(q[50], 2), fmt(q[90], 2),
                         fmt(q[100], 2)])
            await trio.sleep(1.0)
        end = time.monotonic()
        res = self.report("5. a KV write: time until the fleet serves it", start, end, roles,
                          [("local read errors", str(self.read_errors() - errors0)),
                           ("refresh interval (s)", fmt(self.refresh_s, 1))])
        print()
        print(table(["write", "agents served", "50% (s)", "90% (s)", "100% (s)"], rows))
        res["writes"] = runs
        self.results["5. KV write"] = res

    async def outage(self) -> None:
        assert self.cluster is not None
        roles = self.roles()
        errors0 = self.read_errors()
        up_errors0 = self.sum_status(lambda s: s["upstream"]["errors"])
        log(f"outage: SIGSTOP all three nodes for {self.args.outage:g} s")
        stopped = time.monotonic()
        first_error = None
        try:
            for node in self.cluster.nodes:
                node.pause()
            # the first refresh error: a request has failed on every address, the gate closes
            while time.monotonic() < stopped + self.args.outage:
                if first_error is None and (
                        self.sum_status(lambda s: s["upstream"]["errors"]) > up_errors0):
                    first_error = time.monotonic()
                await trio.sleep(min(0.5, max(0.0, stopped + self.args.outage
                                              - time.monotonic())))
        finally:
            for node in self.cluster.nodes:
                node.resume()
        resumed = time.monotonic()
        resumed_wall = time.time()
        log("outage over: SIGCONT")
        # fresh: nothing stale any more, and the status sample was taken after the resume
        freshed = await self.wait_fleet(
            "every agent fresh after the outage",
            lambda a: a.status_at > resumed and fresh(a.status),
            self.refresh_s * 1.1 + self.gate_max + 30)
        tail_end = max(time.monotonic(), resumed + self.refresh_s * 1.1 + self.gate_max)
        if freshed is not None:
            tail_end = max(freshed + self.refresh_s, resumed + 3 * self.refresh_s)
        await sleep_until_mono(tail_end)
        end = time.monotonic()
        during = sum(self.counts.total(stopped, resumed))
        rec = self.counts.total(resumed, end)
        steady = self.results.get("2. steady state", {})
        steady_mean = steady.get("total_mean_rps") or math.nan
        peak = max(rec, default=0)
        # the peak over one refresh interval (a moving mean): what a refresh-sized window sees
        w = max(1, round(self.refresh_s))
        moving = max((sum(rec[i:i + w]) / w for i in range(max(1, len(rec) - w + 1))),
                     default=0.0)
        logins = self.counts.total(resumed, end, ["login"])
        figures = [
            ("outage (s)", fmt(self.args.outage, 0)),
            ("requests sent during the outage (all agents)", str(during)),
            ("  per agent per minute", fmt(during / len(self.agents) / (self.args.outage / 60))),
            ("outage -> first refresh error seen, any agent (s)",
             fmt(first_error - stopped if first_error else None)),
            ("steady mean req/s (scenario 2)", fmt(steady_mean)),
            ("recovery peak req/s (1 s bin)", str(peak)),
            ("recovery peak / steady mean", fmt(peak / steady_mean, 2)),
            (f"recovery peak req/s ({w} s moving mean) / steady mean", fmt(moving / steady_mean,
                                                                            2)),
            ("steady 1 s peak / steady mean (noise floor)",
             fmt(max(self.counts.total(*self.steady_window), default=0) / steady_mean, 2)
             if hasattr(self, "steady_window") else "-"),
            ("SIGCONT -> every agent fresh (s)", fmt(freshed - resumed if freshed else None)),
            ("target: refresh + outage gate cap (s)",
             fmt(self.refresh_s * 1.1 + self.gate_max, 0)),
            ("recovery 1 s bins, first 10 s", " ".join(str(x) for x in rec[:10])),
            ("agents whose current node is n1/n2/n3 afterwards",
             "/".join(str(c) for c in self.first_nodes())),
            ("agents with an address still marked down at the end",
             str(sum(1 for a in self.agents
                     if (a.status or {}).get("upstream", {}).get("down")))),
            ("logins after the outage (total; peak per s)", f"{sum(logins)}; "
             f"{max(logins, default=0)}"),
            ("refresh errors (agents' upstream errors)",
             str(self.sum_status(lambda s: s["upstream"]["errors"]) - up_errors0)),
            ("local read errors", str(self.read_errors() - errors0)),
        ]
        res = self.report("3. whole cluster unreachable, then back", resumed, end, roles, figures)
        res["recovery_series"] = rec
        res["peak_ratio"] = peak / steady_mean
        res["moving_ratio"] = moving / steady_mean
        res["fresh_s"] = freshed - resumed if freshed else None
        res["during"] = during
        res["first_error_s"] = first_error - stopped if first_error else None
        res["resumed_wall"] = resumed_wall
        self.results["3. outage"] = res

    async def leader_kill(self) -> None:
        assert self.cluster is not None
        roles = self.roles()
        errors0 = self.read_errors()
        up_errors0 = self.sum_status(lambda s: s["upstream"]["errors"])
        active = await trio.to_thread.run_sync(self.cluster.wait_active)
        log(f"killing the active node {active.address}")
        killed = time.monotonic()
        killed_wall = time.time()
        await trio.to_thread.run_sync(self.cluster.kill, active)
        leader_at = None
        with trio.move_on_after(60):
            await trio.to_thread.run_sync(lambda: self.cluster.wait_active(60))  # type: ignore
            leader_at = time.monotonic()
        recovered = await self.wait_fleet(
            "every agent refreshed every secret since the kill",
            lambda a: fresh(a.status, since=killed_wall),
            self.refresh_s * 1.1 + self.gate_max + 60)
        end = max(time.monotonic(), killed + 3 * self.refresh_s)
        await sleep_until_mono(end)
        figures = [
            ("kill -> a node answers active (s)", fmt(leader_at - killed if leader_at else None)),
            ("kill -> every agent refreshed every secret (s)",
             fmt(recovered - killed if recovered else None)),
            ("refresh errors (agents' upstream errors)",
             str(self.sum_status(lambda s: s["upstream"]["errors"]) - up_errors0)),
            ("connections refused at the killed node's proxy",
             str(self.counts.refused[self.cluster.nodes.index(active)])),
            ("agents on n1/n2/n3 afterwards", "/".join(str(c) for c in self.first_nodes())),
            ("local read errors", str(self.read_errors() - errors0)),
        ]
        roles = [f"{r} (killed)" if node is active else r
                 for r, node in zip(roles, self.cluster.nodes, strict=True)]
        res = self.report("4. active node killed", killed, end, roles, figures)
        res["recovered_s"] = recovered - killed if recovered else None
        res["read_errors"] = self.read_errors() - errors0
        self.results["4. leader kill"] = res

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> None:
        args = self.args
        await trio.to_thread.run_sync(self.start_cluster)
        self.refresh_s = parse_seconds(args.refresh)
        self.gate_max = 60.0             # [upstream] backoff_max, the product default
        async with trio.open_nursery() as outer:
            for n in range(3):
                assert self.cluster is not None
                proxy = CountingProxy(n, self.cluster.nodes[n].port, self.counts)
                await outer.start(proxy.run)
                self.proxies.append(proxy)
            self.write_configs(args.cold_refresh)
            try:
                await self.scenarios()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.stop_all)
                outer.cancel_scope.cancel()

    # -- the same fleet of `bao agent`s (scenarios 1a, 2, 3) ----------------------------------

    def bao_spawn(self, refresh: str) -> list[tuple[subprocess.Popen[bytes], Path]]:
        """N ``bao agent``s: approle auto_auth, one template per secret, re-rendered every
        ``refresh`` (``static_secret_render_interval``); agent i talks to node i mod 3 (it
        takes one address: a fleet puts a load balancer or DNS name there)."""
        from agentd.devserver import bao_binary
        out = []
        for i in range(self.args.agents):
            root = self.work / f"b{i:03d}"
            root.mkdir(mode=0o700)
            (root / "out").mkdir(mode=0o700)
            for name, value in (("role_id", self.role[0]), ("secret_id", self.role[1])):
                (root / name).write_text(value + "\n")
                (root / name).chmod(0o600)
            hcl = [
                f"vault {{\n  address = {json.dumps(self.proxies[i % 3].address)}\n}}",
                "auto_auth {\n  method \"approle\" {\n    config = {\n"
                f"      role_id_file_path = {json.dumps(str(root / 'role_id'))}\n"
                f"      secret_id_file_path = {json.dumps(str(root / 'secret_id'))}\n"
                "      remove_secret_id_file_after_reading = false\n    }\n  }\n}",
                'log_level = "warn"',
                f"template_config {{\n  static_secret_render_interval = {json.dumps(refresh)}"
                "\n}",
            ]
            for name in self.names:
                contents = (f'{{{{ with secret "secret/data/{KV_PREFIX}/{name}" }}}}'
                            "{{ .Data.data.password }}{{ end }}")
                hcl.append(f"template {{\n  contents = {json.dumps(contents)}\n"
                           f"  destination = {json.dumps(str(root / 'out' / name))}\n}}")
            (root / "agent.hcl").write_text("\n\n".join(hcl) + "\n")
            with open(root / "bao-agent.log", "wb") as log_file:
                proc = subprocess.Popen(
                    [bao_binary(), "agent", f"-config={root / 'agent.hcl'}"],
                    stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=clean_env(), start_new_session=True)
            out.append((proc, root))
        return out

    async def bao_fleet(self) -> None:
        args = self.args
        label = "bao agent"
        log(f"{label}: cold start of {args.agents} bao agents")
        roles = self.roles()
        start = time.monotonic()
        fleet = await trio.to_thread.run_sync(self.bao_spawn, args.refresh)
        try:
            def rendered(root: Path) -> bool:
                return all((root / "out" / n).exists() for n in self.names)

            deadline = start + 60 + 1.5 * args.agents
            done_at = None
            while time.monotonic() < deadline:
                if all(rendered(r) for _, r in fleet):
                    done_at = time.monotonic()
                    break
                dead = [r.name for p, r in fleet if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"bao agents exited: {dead[:5]}")
                await trio.sleep(0.2)
            end = max(time.monotonic(), start + 5)
            await sleep_until_mono(end)
            logins = self.counts.total(start, end, ["login"])
            self.results[f"{label} 1a"] = self.report(
                f"{label}: 1a. cold start", start, end, roles,
                [("spawn -> every template rendered (s)",
                  fmt(done_at - start if done_at else None)),
                 ("logins (total; peak per s)", f"{sum(logins)}; {max(logins, default=0)}")])
            await trio.sleep(self.refresh_s * 1.2 + 1)
            # steady
            start = time.monotonic()
            await trio.sleep(args.steady)
            end = time.monotonic()
            tot = self.counts.total(start, end)[:max(1, int(end - start))]
            _, nodes = self.node_table(start, end, roles)
            means = [d["mean_rps"] for d in nodes]
            kinds: Counter[str] = Counter()
            for k in KINDS:
                kinds[k] = sum(self.counts.total(start, end, [k]))
            steady_mean = sum(tot) / len(tot)
            res = self.report(f"{label}: 2. steady state", start, end, roles, [
                ("requests/s per agent", fmt(steady_mean / args.agents, 2)),
                ("per-node deviation from even (%)", ", ".join(
                    f"{100 * (m - statistics.mean(means)) / statistics.mean(means):+.0f}"
                    for m in means)),
                ("of which KV reads / mount lookups (sys) / other",
                 f"{kinds['kv_read']} / {kinds['sys']} / "
                 f"{sum(kinds.values()) - kinds['kv_read'] - kinds['sys']}"),
                ("steady 1 s bins: mean / sd / max", f"{fmt(steady_mean)} / "
                 f"{fmt(statistics.pstdev(tot))} / {max(tot)}")])
            res["total_mean_rps"] = steady_mean
            res["peak_1s"] = max(tot)
            self.results[f"{label} 2"] = res
            if "outage" not in args.scenarios.split(","):
                return
            # outage
            assert self.cluster is not None
            log(f"{label}: SIGSTOP all three nodes for {args.outage:g} s")
            stopped = time.monotonic()
            try:
                for node in self.cluster.nodes:
                    node.pause()
                await trio.sleep(args.outage)
            finally:
                for node in self.cluster.nodes:
                    node.resume()
            resumed = time.monotonic()
            end = resumed + max(3 * self.refresh_s, 20.0)
            await sleep_until_mono(end)
            during = sum(self.counts.total(stopped, resumed))
            rec = self.counts.total(resumed, end)
            w = max(1, round(self.refresh_s))
            moving = max(sum(rec[i:i + w]) / w for i in range(max(1, len(rec) - w + 1)))
            logins = self.counts.total(resumed, end, ["login"])
            res = self.report(f"{label}: 3. whole cluster unreachable, then back", resumed, end,
                              roles, [
                ("outage (s)", fmt(args.outage, 0)),
                ("requests sent during the outage (all agents)", str(during)),
                ("  per agent per minute", fmt(during / args.agents / (args.outage / 60))),
                ("recovery peak / steady mean (1 s bins)", fmt(max(rec) / steady_mean, 2)),
                (f"recovery peak ({w} s moving mean) / steady mean",
                 fmt(moving / steady_mean, 2)),
                ("recovery 1 s bins, first 10 s", " ".join(str(x) for x in rec[:10])),
                ("logins after the outage (total; peak per s)",
                 f"{sum(logins)}; {max(logins, default=0)}")])
            res["peak_ratio"] = max(rec) / steady_mean
            res["moving_ratio"] = moving / steady_mean
            self.results[f"{label} 3"] = res
        finally:
            for proc, _ in fleet:
                if proc.poll() is None:
                    proc.terminate()
            for proc, _ in fleet:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)

    async def scenarios(self) -> None:
        args = self.args
        selected = set(args.scenarios.split(","))
        if args.bao:
            await self.bao_fleet()
        log(f"1a. cold start of {len(self.agents)} agents, no snapshots")
        async with trio.open_nursery() as mon:
            await self.cold_start(mon, "1a. cold start, no snapshots", snapshots=False)
            await trio.sleep(2.5)                  # snapshots are written within 1 s
            self.due_reads = self.due_in_window(args.snapshot_window,
                                                parse_seconds(args.cold_refresh))
            if "snapshot" not in selected:
                await self.later(selected)
            mon.cancel_scope.cancel()
        if "snapshot" not in selected:
            return
        await trio.to_thread.run_sync(self.stop_all)
        log("1b. cold start with snapshots")
        async with trio.open_nursery() as mon:
            await self.cold_start(mon, "1b. cold start with snapshots", snapshots=True)
            await self.later(selected)
            mon.cancel_scope.cancel()

    async def later(self, selected: set[str]) -> None:
        """Scenarios 2, 5, 3, 4 (those selected) on the running fleet, reloaded at --refresh."""
        args = self.args
        if not selected & {"steady", "write", "outage", "kill"}:
            return
        log(f"reloading every agent with refresh {args.refresh}")
        self.write_configs(args.refresh)
        for agent in self.agents:
            assert agent.proc is not None
            os.kill(agent.proc.pid, signal.SIGHUP)
        await trio.sleep(self.refresh_s * 1.2 + 1)
        if "steady" in selected:
            log(f"2. steady state for {args.steady:g} s")
            self.steady_window = (time.monotonic(), time.monotonic() + args.steady)
            await self.steady()
        if "write" in selected:
            log("5. KV writes")
            await self.writes()
        if "outage" in selected:
            log("3. outage")
            await self.outage()
        if "kill" in selected:
            log("4. leader kill")
            await self.leader_kill()


async def sleep_until_mono(when: float) -> None:
    """Sleep until ``when`` on time.monotonic() (trio's clock has an offset of its own)."""
    await trio.sleep(max(0.0, when - time.monotonic()))


def parse_seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def summary(bench: Bench) -> list[list[str]]:
    r = bench.results
    rows = []

    def row(target: str, measured: str, ok: bool | None) -> None:
        rows.append([target, measured, "-" if ok is None else ("met" if ok else "MISSED")])

    out = r.get("3. outage")
    if out:
        row("outage recovery: peak <= 1.5x steady rate (1 s bins)",
            f"{out['peak_ratio']:.2f}x (moving mean over one refresh: "
            f"{out['moving_ratio']:.2f}x)", out["peak_ratio"] <= 1.5)
        limit = bench.refresh_s * 1.1 + bench.gate_max
        row(f"outage recovery: every agent fresh within refresh + gate ({limit:.0f} s)",
            fmt(out["fresh_s"]) + " s", out["fresh_s"] is not None and out["fresh_s"] <= limit)
    steady = r.get("2. steady state")
    if steady:
        worst = max(abs(s) for s in steady["spread_pct"])
        row("steady reads within +-20% of even on all three nodes",
            ", ".join(f"{s:+.0f}%" for s in steady["spread_pct"]), worst <= 20)
    snap = r.get("1b. cold start with snapshots")
    if snap:
        extra = snap["kv_reads_window"] - bench.due_reads
        row(f"cold start with snapshots: no reads beyond due in the first "
            f"{bench.args.snapshot_window:g} s",
            f"{snap['kv_reads_window']} reads, {bench.due_reads} due -> {extra} beyond",
            extra <= 0)
    kill = r.get("4. leader kill")
    if kill:
        row("leader kill: zero local read errors", str(kill["read_errors"]),
            kill["read_errors"] == 0)
        row("leader kill: refreshes resume without a restart",
            fmt(kill["recovered_s"]) + " s to refresh everything",
            kill["recovered_s"] is not None)
    errors = bench.read_errors()
    row("zero local read errors throughout", str(errors), errors == 0)
    bao_steady, bao_out = r.get("bao agent 2"), r.get("bao agent 3")
    if bao_steady:
        row("(comparison) bao agent, same fleet: steady 1 s peak / steady mean",
            fmt(bao_steady["peak_1s"] / bao_steady["total_mean_rps"], 2), None)
    if bao_out:
        row("(comparison) bao agent, same fleet: recovery peak / steady mean",
            f"{bao_out['peak_ratio']:.2f}x (moving mean over one refresh: "
            f"{bao_out['moving_ratio']:.2f}x)", None)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=100, help="agentd processes (100)")
    parser.add_argument("--secrets", type=int, default=20, help="KV secrets per agent (20)")
    parser.add_argument("--refresh", default="5s", help="refresh for scenarios 2-5 (5s)")
    parser.add_argument("--cold-refresh", default="300s",
                        help="refresh during the cold starts (300s, the default)")
    parser.add_argument("--steady", type=float, default=30.0, help="steady window, s (30)")
    parser.add_argument("--outage", type=float, default=60.0, help="cluster stopped, s (60)")
    parser.add_argument("--writes", type=int, default=2, help="KV writes in scenario 5 (2)")
    parser.add_argument("--snapshot-window", type=float, default=30.0,
                        help="window after a cold start in which reads are counted, s (30)")
    parser.add_argument("--read-interval", type=float, default=0.5,
                        help="each reader's pause between gets, s (0.5)")
    parser.add_argument("--sample", type=float, default=1.0,
                        help="each agent's status sampled every this many s (1)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="which to run, in the fixed order (all); 'cold' always runs: "
                        "it starts the fleet")
    parser.add_argument("--bao", action="store_true",
                        help="first run the same fleet of `bao agent`s (1a, 2, 3)")
    parser.add_argument("--shared-machine-id", action="store_true",
                        help="run every agent with this machine's /etc/machine-id")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}: choose from {','.join(SCENARIOS)}")
    if not 1 <= args.agents <= MAX_AGENTS:
        parser.error(f"--agents must be 1..{MAX_AGENTS}")
    work = Path(tempfile.mkdtemp(prefix="agentd-fleet-"))
    sockets = Path(tempfile.mkdtemp(prefix="afl-", dir="/tmp"))
    bench = Bench(args, work, sockets)
    started = time.monotonic()
    status = 0
    print(f"# agentd fleet bench: N={args.agents} agents, {args.secrets} KV secrets each, "
          f"refresh {args.refresh} (cold starts at {args.cold_refresh}), outage "
          f"{args.outage:g} s, steady {args.steady:g} s\n")
    print(f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{subprocess.run([sys.executable, '-c', 'import agentd.devserver as d; print(d.bao_binary())'], capture_output=True, text=True, check=False).stdout.strip()}, "  # noqa: E501
          f"{'one shared machine id' if args.shared_machine_id else 'a machine id per agent'}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    try:
        trio.run(bench.run)
    except Exception as exc:
        log(f"FAILED: {type(exc).__name__}: {exc}")
        status = 1
    finally:
        if bench.cluster is not None:
            bench.cluster.stop()
    if bench.results:
        print("\n### Summary against the targets of issue 18\n")
        print(table(["target", "measured", ""], summary(bench)))
    print(f"\nwall time {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": bench.results,
                                         "read_errors_total": bench.read_errors(),
                                         "read_error_samples": [e for a in bench.agents
                                                                for e in a.read_errors][:20],
                                         "counts": bench.counts.dump()}, indent=1,
                                        default=str))
    if args.keep:
        print(f"work directory kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
