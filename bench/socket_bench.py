"""Socket throughput and latency of a running agentd, against a real OpenBao dev server.

Starts ``bao server -dev`` and ``python -m agentd run`` (audit on, to a file) in a private temp
directory, using the helpers from ``agentd.demo``, then measures ``get`` over the Unix socket with
``agentd.client.Client``:

1. one client, ``--requests`` sequential gets on one connection;
2. ``--clients`` processes, each with its own connection, for ``--duration`` seconds.

Every loop is bounded in count and in time. The agent's CPU time per request comes from
``/proc/<pid>/stat`` (utime + stime) before and after each phase. Results are printed as a
markdown table. Everything started here is stopped in a ``finally``.

Run it with ``make bench-socket`` (or ``.venv/bin/python bench/socket_bench.py --help``).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchagent import SECRET, bench_agent

from agentd.client import Client
from agentd.demo import DemoError

PHASE_TIME_LIMIT = 120.0          # hard cap on the sequential phase, whatever --requests says
MAX_REQUESTS_PER_WORKER = 2_000_000
UNLIMITED = ("requests_per_second_per_uid = 1000000000\nrequest_burst_per_uid = 1000000000\n"
             "max_connections_per_uid = 1024\n")


def agent_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds, from /proc/<pid>/stat (fields after the last ')')."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    index = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass
class Row:
    scenario: str
    clients: int
    requests: int
    seconds: float
    latencies_ms: list[float]
    cpu_seconds: float

    def cells(self) -> list[str]:
        lat = sorted(self.latencies_ms)
        per_req_us = self.cpu_seconds / self.requests * 1e6 if self.requests else float("nan")
        return [
            self.scenario, str(self.clients), str(self.requests),
            f"{self.requests / self.seconds:,.0f}" if self.seconds else "-",
            f"{percentile(lat, 50):.3f}" if lat else "-",
            f"{percentile(lat, 99):.3f}" if lat else "-",
            f"{per_req_us:.0f}",
        ]


def sequential(sock: str, requests: int, pid: int) -> Row:
    """One connection, ``requests`` gets one after another (bounded by PHASE_TIME_LIMIT)."""
    latencies: list[float] = []
    client = Client.connect(sock, timeout=10.0)
    try:
        client.get(SECRET)                              # warm up the connection
        cpu0 = agent_cpu_seconds(pid)
        start = time.perf_counter()
        deadline = start + PHASE_TIME_LIMIT
        for _ in range(requests):
            t0 = time.perf_counter()
            client.get(SECRET)
            t1 = time.perf_counter()
            latencies.append((t1 - t0) * 1000)
            if t1 > deadline:
                break
        elapsed = time.perf_counter() - start
        cpu = agent_cpu_seconds(pid) - cpu0
    finally:
        client.close()
    return Row("sequential, 1 connection", 1, len(latencies), elapsed, latencies, cpu)


def worker(sock: str, duration: float, barrier: Barrier, results: Any) -> None:
    """One benchmark process: connect, wait for the others, get until ``duration`` is up."""
    latencies: list[float] = []
    elapsed = 0.0
    error = ""
    try:
        client = Client.connect(sock, timeout=10.0)
        try:
            client.get(SECRET)
            barrier.wait(timeout=60)
            start = time.perf_counter()
            deadline = start + duration
            for _ in range(MAX_REQUESTS_PER_WORKER):
                t0 = time.perf_counter()
                client.get(SECRET)
                t1 = time.perf_counter()
                latencies.append((t1 - t0) * 1000)
                if t1 >= deadline:
                    break
            elapsed = time.perf_counter() - start
        finally:
            client.close()
    except Exception as exc:  # reported to the parent, which fails the run
        error = f"{type(exc).__name__}: {exc}"
        barrier.abort()
    results.put((latencies, elapsed, error))


def concurrent(sock: str, clients: int, duration: float, pid: int) -> Row:
    """``clients`` processes, one connection each, all hammering ``get`` for ``duration`` s."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(clients + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(sock, duration, barrier, results), daemon=True)
             for _ in range(clients)]
    try:
        for p in procs:
            p.start()
        # Every worker connected and warmed up; broken if one failed (its error follows).
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=60)
        cpu0 = agent_cpu_seconds(pid)
        try:
            collected = [results.get(timeout=duration + 60) for _ in procs]
        except queue.Empty:
            raise DemoError("a benchmark worker neither finished nor reported") from None
        cpu = agent_cpu_seconds(pid) - cpu0
        for p in procs:
            p.join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    errors = [e for _, _, e in collected if e]
    if errors:
        raise DemoError(f"{len(errors)} worker(s) failed, first: {errors[0]}")
    latencies = [x for lat, _, _ in collected for x in lat]
    elapsed = max(e for _, e, _ in collected)
    return Row(f"concurrent, {clients} processes, {duration:g} s", clients, len(latencies),
               elapsed, latencies, cpu)


def table(rows: Sequence[Row]) -> str:
    header = ["scenario", "clients", "requests", "req/s", "p50 ms", "p99 ms", "agent CPU µs/req"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="sequential gets (2000)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent processes (16)")
    parser.add_argument("--duration", type=float, default=5.0, help="concurrent phase, s (5)")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="agentd-bench-"))
    try:
        # Every bench client runs as one uid: lift the per-uid request rate limit and the
        # per-uid connection cap so that the figures are about serving, not about the limiter.
        with bench_agent(work, agent_lines=UNLIMITED) as ba:
            print(f"agentd pid {ba.agent.pid} serving after {ba.ready_after:.1f} s; audit to "
                  f"{ba.files.audit}", file=sys.stderr)
            rows = [sequential(ba.socket, args.requests, ba.agent.pid)]
            rows.append(concurrent(ba.socket, args.clients, args.duration, ba.agent.pid))
            ba.agent.check_alive()
        print(f"\nagentd socket benchmark: Python {platform.python_version()}, "
              f"{os.cpu_count()} CPUs, Linux {platform.release()}, audit on (file)\n")
        print(table(rows))
        return 0
    except Exception as exc:
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
