"""Upstream requests per secret for each kind (kv2, pki, leased), measured and scaled to defaults.

Runs a real agent (in-process) against a real ``bao server -dev`` (and, for ``leased``, a real
PostgreSQL behind the database engine) with one secret at a time on a compressed timeline (kv2
polled every 2 s; a 6 s certificate; a 3 s lease with a 9 s max TTL) for ``--window`` seconds,
counts the upstream requests that secret caused (login and token renewals excluded), and divides
by the number of lifetimes that passed. Requests per lifetime do not depend on the time scale,
so the last column scales them to an hour at default settings: kv2 refresh 5 m; a 24 h
certificate re-issued at 2/3; a lease of 1 h with a 24 h max TTL renewed at 2/3 (renewals are
scaled per lease duration, new credentials and revokes per max TTL).

Run: ``.venv/bin/python bench/kinds_requests.py [--window 30]``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentd.kinds import KindState, LeaseState  # noqa: E402
from tests.agentfixture import running_agent  # noqa: E402
from tests.kindsupport import unique, write_config_with_catalog_policy  # noqa: E402
from tests.openbao import DevServer  # noqa: E402
from tests.postgres import Postgres  # noqa: E402
from tests.test_leased import enable_database  # noqa: E402
from tests.test_pki import enable_pki  # noqa: E402


async def measure(path: Path, window: float) -> tuple[int, int, int]:
    """Requests caused by the secret, and (leased) lease renewals and new credentials."""
    async with running_agent(path) as running:
        up, auth = running.agent.upstream, running.agent.auth
        state = running.agent.refresher.kinds.state("s")
        start = up.statistics().requests - auth.statistics().logins - auth.statistics().renewals
        renewals, reissues = _lease_counts(state)
        await trio.sleep(window)
        end = up.statistics().requests - auth.statistics().logins - auth.statistics().renewals
        renewals_after, reissues_after = _lease_counts(state)
    return end - start, renewals_after - renewals, reissues_after - reissues


def _lease_counts(state: KindState) -> tuple[int, int]:
    """(renewals, new credentials) of a leased secret; (0, 0) for the other kinds."""
    if isinstance(state, LeaseState):
        return state.renewals, state.reissues
    return 0, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=float, default=30.0, help="seconds per kind (30)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="agentd-kinds-bench-"))
    bao = DevServer.start(work / "bao")
    pg = Postgres.start()
    rows = []
    try:
        prefix = unique("bench")
        bao.kv_put(f"{prefix}/db", {"password": "x"})
        mount = enable_pki(bao)
        db = enable_database(bao, pg, ttl="3s", max_ttl="9s")
        cases = [
            ("kv2", f'[secrets.s]\nkind = "kv2"\npath = "secret/data/{prefix}/db"\n'
                    'refresh = "2s"', 2.0, 3600 / 300),
            ("pki", f'[secrets.s]\nkind = "pki"\npath = "{mount}/issue/web"\n'
                    'params = { common_name = "a.example.test", ttl = "6s" }', 6 * 2 / 3,
             3600 / (86400 * 2 / 3)),
            ("leased", f'[secrets.s]\nkind = "leased"\npath = "{db}/creds/app"\n'
                       'grace = "1s"', 9.0, 1 / 24),
        ]
        for kind, secrets, lifetime, lifetimes_per_hour in cases:
            tmp = work / kind
            tmp.mkdir()
            path, _ = write_config_with_catalog_policy(tmp, bao, secrets)
            count, renewals, reissues = trio.run(measure, path, args.window)
            per_life = count / (args.window / lifetime)
            per_hour = per_life * lifetimes_per_hour
            if kind == "leased":
                # Renewals scale with the lease (3 s here, 1 h by default), new credentials
                # (a read plus the old lease's revoke) with the max TTL (9 s here, 24 h).
                per_lease = renewals / (args.window / 3.0)
                per_max = 2 * reissues / (args.window / 9.0)
                per_hour = per_lease * 1.0 + per_max / 24
            rows.append((kind, count, per_life, per_hour))
    finally:
        pg.stop()
        bao.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"| kind | requests in {args.window:g} s | per lifetime | per hour at defaults |")
    print("|---|---|---|---|")
    for kind, count, per_life, per_hour in rows:
        print(f"| {kind} | {count} | {per_life:.2f} | {per_hour:.2f} |")


if __name__ == "__main__":
    main()
