"""bench/compare.py keeps working: a tiny ``--quick`` run prints one table with both agents.

The figures themselves are never asserted (timings belong in bench/, not in tests); this only
checks that the harness starts OpenBao, agentd and ``bao agent``, drives the scenarios that do not
need agentd to render templates, and prints a row with a number for each agent.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
COMPARE = ROOT / "bench" / "compare.py"
NUMBER = re.compile(r"^\d[\d,]*(\.\d+)?%?( \[|$| \()")


def _cells(table_line: str) -> list[str]:
    return [c.strip() for c in table_line.strip().strip("|").split("|")]


def test_quick_compare_prints_a_table_with_both_agents(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
    env["TMPDIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, str(COMPARE), "--quick", "--scenarios", "read,upstream,outage"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    header = _cells(lines[0])
    assert header[:4] == ["scenario", "metric", "agentd", "bao agent"]
    rows = {(c[0], c[1]): c for c in map(_cells, lines[2:])}

    # Scenario 1 at one client: a number for each agent, and a ratio between them.
    read = rows[("1 read", "req/s, 1 clients")]
    assert NUMBER.match(read[2]), read
    assert NUMBER.match(read[3]), read
    assert read[4] != "-", read
    assert NUMBER.match(rows[("1 read", "echo ceiling req/s, 1 clients")][2])

    # Scenario 5 counted requests for both agents through the proxy.
    upstream = [c for key, c in rows.items() if key[0].startswith("5 upstream")
                and key[1] == "requests during start"]
    assert len(upstream) == 1
    assert NUMBER.match(upstream[0][2]) and NUMBER.match(upstream[0][3]), upstream

    # Scenario 6 ran with the server stopped and reported a served rate for both agents.
    outage = rows[("6 outage (OpenBao SIGSTOPped)", "reads served %")]
    assert NUMBER.match(outage[2]) and NUMBER.match(outage[3]), outage

    # The harness cleaned up after itself: no temp directory left behind.
    assert not list(tmp_path.glob("agentd-compare-*"))


def test_http_bench_prints_cpu_per_request_for_each_client(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
    env["TMPDIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "http_bench.py"), "--requests", "200",
         "--rounds", "1"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {c[0]: c for c in map(_cells, [line for line in done.stdout.splitlines()
                                          if line.startswith("|")][2:])}
    assert set(rows) == {"agentd", "httpx", "h11"}
    for cells in rows.values():
        assert NUMBER.match(cells[1]) and NUMBER.match(cells[2]), cells


def test_fleet_bench_two_agents_cold_start_and_steady(tmp_path: Path) -> None:
    """bench/fleet.py at N=2 (cold start and steady state only, about 25 s): the raft cluster,
    the counting proxies and the agents come up, the per-node table has a row per node, and
    nothing is left behind. The figures are not asserted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
    env["TMPDIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fleet.py"), "--agents", "2", "--scenarios",
         "cold,steady", "--refresh", "2s", "--steady", "2", "--snapshot-window", "2"],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "### 1a. cold start, no snapshots" in out and "### 2. steady state" in out
    rows = {c[0]: c for c in map(_cells, [line for line in out.splitlines()
                                          if line.startswith("|")])}
    for node in ("n1", "n2", "n3", "all"):
        assert NUMBER.match(rows[node][2]), rows[node]
    assert NUMBER.match(rows["requests/s per agent (measured)"][1])
    assert rows["zero local read errors throughout"][2] in ("met", "MISSED")
    assert not list(tmp_path.glob("agentd-fleet-*"))
