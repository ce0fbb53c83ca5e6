"""Another uid's reads while one uid floods agentd's socket (issue 13, items 2 and 3).

Starts ``bao server -dev`` and ``python -m agentd run`` (default limits, audit on, to a file) in a
private temp directory, then, for each phase, root reads ``db`` at ``--rate`` reads per second
(under its own per-uid budget), taking turns between a kept connection and a fresh connection
per read with ``agentd.client.Client`` (which connects through root's private socket,
``<socket>.d/uid-0``, and would wait in the kernel for a place in a full listen queue, decision
13), and a fresh connection made the way Go's ``net.Dial`` and curl make it (one non-blocking
``connect``, no retry: ``EAGAIN`` is a failure), once to the main socket and once to root's
private socket (where such a client is pointed to be out of other uids' reach), and records
each read's latency or failure:

1. ``baseline``: nothing else runs;
2. ``request flood``: nobody (uid 65534, no grants) holds 64 connections and keeps sending pings
   on them without reading an answer, reconnecting whenever the agent closes one;
3. ``CPU burn``: ``--storm-procs`` processes of nobody spin without touching the socket: the
   floor the next phase cannot go below, because on a host with as many busy processes as
   cores every process waits for a CPU, whatever the agent does;
4. ``connect storm``: ``--storm-procs`` processes of nobody connect and close in a loop (with
   the connect guard, decision 13, the kernel refuses them after their first thousand);
5. ``storm-relative`` (not run unless asked for): the same, by the socket's name from inside
   its directory: the guard's ACL on the directory refuses those too.

Each phase lasts ``--duration`` seconds (bounded; attackers are killed at its end). Prints a
markdown table: per phase and connection kind, reads, failures, p50 and p99 in ms. Target (issue
13): p99 under 10 ms and no failure during the floods. ``--phases storm,burn`` runs some
phases only; ``--no-private`` runs the agent with ``private_sockets = false`` (root's clients
then share the main socket's queue with the storm); ``--no-guard`` with ``connect_guard =
"off"``; ``--cgroups`` puts the agent, the reader and the attackers in sibling CPU cgroups of
equal weight, as systemd places agentd.service, a client's service and a local user's session:
without it all three share one cgroup, the worst case for CPU, where two attackers get two
thirds of the machine.

Run it as root: ``.venv/bin/python bench/flood_bench.py``. To measure another tree (say, the code
before the fix), put its ``agentd`` first: ``cd /tmp && PYTHONPATH=/path/to/old .venv/bin/python
/path/to/bench/flood_bench.py`` (the agent child inherits ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchagent import SECRET, bench_agent

import agentd
from agentd.client import Client

NOBODY = 65534
FLOOD_CONNECTIONS = 64
MAX_READS = 100_000          # per phase, whatever --duration and --rate say


def _frame(message: dict[str, object]) -> bytes:
    body: bytes = msgpack.packb(message)
    return struct.pack(">I", len(body)) + body


PINGS = _frame({"v": 1, "id": 1, "op": "ping"}) * 200


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    index = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


# --- attackers: forked children as nobody, each bounded by a deadline -----------------------


class CpuGroups:
    """Sibling CPU cgroups of equal weight for the agent, the reader and the attackers
    (``--cgroups``): where systemd puts them on a real host (agentd.service, the client's own
    service, and a local user's session in user.slice), each a cgroup whose share of a busy
    CPU does not grow with its number of processes. Uses cgroup v2's ``cpu`` controller at
    /sys/fs/cgroup, else v1's /sys/fs/cgroup/cpu."""

    def __init__(self) -> None:
        unified = Path("/sys/fs/cgroup")
        controllers = unified / "cgroup.controllers"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            self.root = unified
            (unified / "cgroup.subtree_control").write_text("+cpu")
        elif Path("/sys/fs/cgroup/cpu/cpu.shares").exists():
            self.root = Path("/sys/fs/cgroup/cpu")
        else:
            raise RuntimeError("--cgroups: no CPU cgroup controller on this machine")
        self.base = self.root / f"agentd-bench-{os.getpid()}"
        self.base.mkdir()
        if self.root == unified:
            (self.base / "cgroup.subtree_control").write_text("+cpu")
        for name in ("agent", "client", "attack"):
            (self.base / name).mkdir()

    def place(self, name: str, pid: int) -> None:
        (self.base / name / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        """Move this process back and remove the groups (call once the others have exited)."""
        with contextlib.suppress(OSError):
            (self.root / "cgroup.procs").write_text(str(os.getpid()))
        for name in ("agent", "client", "attack", ""):
            with contextlib.suppress(OSError):
                (self.base / name).rmdir()


def _as_nobody(body: Callable[[float], None], deadline: float,
               groups: CpuGroups | None = None, cwd: str = "/") -> int:
    """Fork ``body(deadline)`` as nobody, working in ``cwd`` (entered as root, before a
    connect guard's block could keep nobody out of it)."""
    pid = os.fork()
    if pid == 0:
        try:
            if groups is not None:
                groups.place("attack", os.getpid())
            os.chdir(cwd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            body(deadline)
        finally:
            os._exit(0)
    return pid


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def request_flood(path: str) -> Callable[[float], None]:
    def run(deadline: float) -> None:
        socks: list[socket.socket | None] = [None] * FLOOD_CONNECTIONS
        while time.monotonic() < deadline:
            for i, sock in enumerate(socks):
                if sock is None:
                    socks[i] = sock = _connect(path)
                    if sock is None:
                        continue
                try:
                    sock.send(PINGS)
                except BlockingIOError:
                    pass                    # the agent is not reading: good
                except OSError:
                    sock.close()            # closed by the agent: come back
                    socks[i] = None
            time.sleep(0.001)
    return run


def burn_cpu(deadline: float) -> None:
    while time.monotonic() < deadline:
        pass


def connect_storm(path: str, *, relative: bool = False) -> Callable[[float], None]:
    """Connect and close in a loop; ``relative``: by the socket's name from inside its
    directory (what a path-matching guard would miss; decision 13's does not)."""
    def run(deadline: float) -> None:
        where = os.path.basename(path) if relative else path    # the attackers' cwd: its dir
        while time.monotonic() < deadline:
            sock = _connect(where)
            if sock is not None:
                sock.close()
    return run


# --- the measured reader (root) -------------------------------------------------------------

FRESH_MAIN = "fresh, main socket"
NO_WAIT = "fresh, no wait (Go, curl), main socket"
NO_WAIT_PRIVATE = "fresh, no wait (Go, curl), private socket"
KINDS = ("kept", "fresh", FRESH_MAIN, NO_WAIT, NO_WAIT_PRIVATE)
PHASES = ("baseline", "flood", "burn", "storm", "storm-relative")
DEFAULT_PHASES = PHASES[:4]
GET = _frame({"v": 1, "id": 1, "op": "get", "name": SECRET})


def _get_without_waiting(path: str) -> None:
    """One ``get`` on a connection made as Go and curl make it: a non-blocking ``connect()``,
    where a full queue (``EAGAIN``) is an error; then the request and its reply, blocking."""
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.setblocking(False)
        sock.connect(path)
        sock.settimeout(10.0)
        sock.sendall(GET)
        head = b""
        while len(head) < 4:
            chunk = sock.recv(4 - len(head))
            if not chunk:
                raise ConnectionError("closed before the reply")
            head += chunk
        (size,) = struct.unpack(">I", head)
        body = b""
        while len(body) < size:
            chunk = sock.recv(size - len(body))
            if not chunk:
                raise ConnectionError("closed in the reply")
            body += chunk
        if not msgpack.unpackb(body).get("ok"):
            raise ConnectionError("the reply is an error")
    finally:
        sock.close()


def measure(path: str, duration: float, rate: float, kinds: Sequence[str] = KINDS
            ) -> dict[str, tuple[list[float], int]]:
    """Reads by root for ``duration`` s at ``rate``/s: kind -> (latencies in ms, failures)."""
    out: dict[str, tuple[list[float], int]] = {kind: ([], 0) for kind in kinds}
    kept: Client | None = None
    start = time.monotonic()
    for n in range(MAX_READS):
        due = start + n / rate
        now = time.monotonic()
        if due - start >= duration:
            break
        if due > now:
            time.sleep(due - now)
        kind = kinds[n % len(kinds)]
        latencies, failures = out[kind]
        t0 = time.perf_counter()
        try:
            if kind in ("fresh", FRESH_MAIN):
                with Client.connect(path, timeout=10.0, private=kind == "fresh") as client:
                    client.get(SECRET)
            elif kind == NO_WAIT:
                _get_without_waiting(path)
            elif kind == NO_WAIT_PRIVATE:
                _get_without_waiting(f"{path}.d/uid-0")
            else:
                if kept is None:
                    kept = Client.connect(path, timeout=10.0)
                kept.get(SECRET)
            latencies.append((time.perf_counter() - t0) * 1000)
        except Exception:
            out[kind] = (latencies, failures + 1)
            if kind == "kept" and kept is not None:
                kept.close()
                kept = None
    if kept is not None:
        kept.close()
    return out


def phase(path: str, name: str, attackers: list[Callable[[float], None]], duration: float,
          rate: float, *, private: bool = True, groups: CpuGroups | None = None
          ) -> list[list[str]]:
    pids = [_as_nobody(body, time.monotonic() + duration + 1.0, groups,
                       cwd=os.path.dirname(path)) for body in attackers]
    try:
        if pids:
            time.sleep(0.5)                  # let the flood get going
        results = measure(path, duration, rate,
                          KINDS if private else ("kept", FRESH_MAIN, NO_WAIT))
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    rows = []
    for kind, (latencies, failures) in results.items():
        lat = sorted(latencies)
        rows.append([name, kind, str(len(lat) + failures), str(failures),
                     f"{percentile(lat, 50):.2f}" if lat else "-",
                     f"{percentile(lat, 99):.2f}" if lat else "-",
                     f"{lat[-1]:.2f}" if lat else "-"])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase (10)")
    parser.add_argument("--rate", type=float, default=50.0, help="root's reads per second (50)")
    parser.add_argument("--storm-procs", type=int, default=2, help="connect storm processes (2)")
    parser.add_argument("--phases", default=",".join(DEFAULT_PHASES),
                        help=f"which phases, in order ({','.join(PHASES)})")
    parser.add_argument("--no-private", action="store_true",
                        help="run the agent with private_sockets = false (decision 13)")
    parser.add_argument("--no-guard", action="store_true",
                        help='run the agent with connect_guard = "off" (decision 13)')
    parser.add_argument("--cgroups", action="store_true",
                        help="agent, reader and attackers in sibling CPU cgroups, as systemd "
                             "places a service and a user session")
    args = parser.parse_args(argv)
    phases = args.phases.split(",")
    if not phases or set(phases) - set(PHASES):
        parser.error(f"--phases takes some of {','.join(PHASES)}")
    if os.geteuid() != 0:
        print("run as root: the attackers run as nobody", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="agentd-flood-"))
    sock_dir = work / "sock"
    sock_dir.mkdir()
    for d in (work, sock_dir):
        d.chmod(0o755)                   # nobody must reach the socket
    groups: CpuGroups | None = None
    guarded = False
    try:
        lines = ("private_sockets = false\n" if args.no_private else "") + (
            'connect_guard = "off"\n' if args.no_guard else "")
        with bench_agent(work, socket=sock_dir / "agentd.sock", agent_lines=lines) as ba:
            path = ba.socket
            if args.cgroups:
                groups = CpuGroups()
                groups.place("agent", ba.agent.pid)
                groups.place("client", os.getpid())
            with Client.connect(path, timeout=2.0) as probe:
                through = probe._sock.getpeername()
                guarded = bool(probe.status()["server"]["connect_guard"])
            expected = path if args.no_private else f"{path}.d/uid-0"
            if through != expected:
                raise RuntimeError(f"root's client connected through {through}, not {expected}")
            attackers: dict[str, tuple[str, list[Callable[[float], None]]]] = {
                "baseline": ("baseline", []),
                "flood": (f"request flood ({FLOOD_CONNECTIONS} connections)",
                          [request_flood(path)]),
                "burn": (f"CPU burn ({args.storm_procs} processes, no socket)",
                         [burn_cpu] * args.storm_procs),
                "storm": (f"connect storm ({args.storm_procs} processes)",
                          [connect_storm(path)] * args.storm_procs),
                "storm-relative": (f"connect storm by a relative path ({args.storm_procs} "
                                   "processes)",
                                   [connect_storm(path, relative=True)] * args.storm_procs),
            }
            rows: list[list[str]] = []
            for n, name in enumerate(phases):
                if n:
                    time.sleep(1.0)              # root's bucket refills between phases
                title, bodies = attackers[name]
                rows += phase(path, title, bodies, args.duration, args.rate,
                              private=not args.no_private, groups=groups)
            ba.agent.check_alive()
    except Exception as exc:
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if groups is not None:
            groups.close()               # the agent has exited: its group is empty
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nagentd flood benchmark: agentd from {Path(agentd.__file__).parent}, "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"Linux {platform.release()}; root reads at {args.rate:g}/s, "
          f"{args.duration:g} s per phase"
          f"{'; private_sockets = false' if args.no_private else ''}"
          f"; connect guard {'ready' if guarded else 'off'}"
          f"{'; agent, reader and attackers in sibling CPU cgroups' if args.cgroups else ''}\n")
    header = ["phase", "root's connection", "reads", "failures", "p50 ms", "p99 ms", "max ms"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
