"""Metrics: /metrics, /live, /ready over real HTTP, and the node_exporter textfile.

A real agent (tests/agentfixture.py) against the session's OpenBao dev server; the client calls
go through the real socket, as root (admin, allowed everything) and as nobody (granted "db" only),
and the scraped series must count exactly those.
"""

from __future__ import annotations

import grp
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from agentd.client import Client
from agentd.config import MetricsConfig, load
from agentd.errors import Forbidden
from agentd.metrics import write_textfile
from tests.agentfixture import (
    NOBODY,
    RunningAgent,
    Seeded,
    call,
    running_agent,
    socket_dir,
    write_config,
)
from tests.openbao import DevServer, free_port
from tests.peers import run_as

ROOT = Path(__file__).resolve().parent.parent


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
async def agent(
    bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded, tmp_path: Path
) -> AsyncIterator[tuple[RunningAgent, str, Path]]:
    port = free_port()
    textfile = tmp_path / "prom" / "agentd.prom"
    textfile.parent.mkdir()
    path = write_config(
        tmp_path, bao, approle_files, seeded, sock=socket_dir() / "agentd.sock",
        refresh="1h",
        extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\ntextfile = "{textfile}"\n'
              f'textfile_interval = "1s"\ndetailed = true\n',
    )
    async with running_agent(path) as running:
        yield running, f"http://127.0.0.1:{port}", textfile


async def test_by_default_no_secret_or_policy_name_is_exposed(
    bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded, tmp_path: Path
) -> None:
    """Issue 13 item 14: anyone who can reach the endpoint or read the textfile learns counts,
    not the names, versions and ages of secrets or the policies' names."""
    port = free_port()
    textfile = tmp_path / "prom" / "agentd.prom"
    textfile.parent.mkdir()
    path = write_config(
        tmp_path, bao, approle_files, seeded, sock=socket_dir() / "agentd.sock", refresh="1h",
        extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\ntextfile = "{textfile}"\n'
              f'textfile_interval = "1s"\ntextfile_group = "nogroup"\n',
    )
    with trio.fail_after(30):
        async with running_agent(path) as running:
            await call(running.socket, "get", name="db")
            async with httpx.AsyncClient() as client:
                body = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            # the first textfile is written at start, maybe before any value: wait for one after
            while not textfile.exists() or samples(textfile.read_text()).get(
                    ("agentd_secrets_cached", ())) != 3:
                await trio.sleep(0.05)
            st = textfile.stat()
            assert (st.st_mode & 0o777, st.st_gid) == (0o640, grp.getgrnam("nogroup").gr_gid)
            for text in (body, textfile.read_text()):
                got = samples(text)
                assert got[("agentd_secrets", ())] == 3
                assert got[("agentd_secrets_cached", ())] == 3
                assert not [k for k in got if k[0].startswith("agentd_secret_")], sorted(got)
                for name in ("\"db\"", "\"api\"", "\"other\"", "nobody-db", "root-admin"):
                    assert name not in text


async def test_scrape_shows_per_secret_and_request_series(
    agent: tuple[RunningAgent, str, Path], bao: DevServer, seeded: Seeded,
) -> None:
    running, base, _ = agent
    sock = str(running.socket)
    with trio.fail_after(30):
        version = bao.kv_put(f"{seeded.prefix}/db", {"password": seeded.marker("db2")})
        assert (await call(running.socket, "refresh", name="db"))["version"] == version
        for _ in range(3):
            assert (await call(running.socket, "get", name="db"))["version"] == version
        await call(running.socket, "get", name="api")
        await call(running.socket, "list")

        def nobody_reads(name: str) -> Any:
            with Client.connect(sock, timeout=10) as c:
                return c.get(name)["version"]

        assert (await run_as(NOBODY, NOBODY, lambda: nobody_reads("db")))["ok"]
        denied = await run_as(NOBODY, NOBODY, lambda: nobody_reads("other"))
        assert denied["code"] == Forbidden.code

        async with httpx.AsyncClient() as http:
            reply = await http.get(f"{base}/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(reply.text)

    db = (("kind", "kv2"), ("name", "db"))
    api = (("kind", "kv1"), ("name", "api"))
    other = (("kind", "kv2"), ("name", "other"))
    assert got[("agentd_secret_version", db)] == version
    assert got[("agentd_secret_stale", db)] == 0
    assert got[("agentd_secret_cached", other)] == 1
    assert got[("agentd_secret_revoked", api)] == 0
    assert 0 <= got[("agentd_secret_age_seconds", db)] < 30
    fetched = running.agent.cache.info("db")
    assert fetched is not None
    assert got[("agentd_secret_fetched_timestamp_seconds", db)] == fetched.fetched_at
    assert got[("agentd_secret_stale_deadline_timestamp_seconds", db)] == \
        fetched.fetched_at + 86400
    # The next poll is about an hour out (refresh = "1h" +-10%).
    assert 3000 < got[("agentd_secret_next_refresh_timestamp_seconds", db)] - \
        fetched.fetched_at < 4400

    # Requests by op, decisions by op and decision: exactly what this test sent.
    assert got[("agentd_requests_total", (("op", "get"),))] == 6
    assert got[("agentd_requests_total", (("op", "refresh"),))] == 1
    assert got[("agentd_requests_total", (("op", "list"),))] == 1
    assert got[("agentd_decisions_total", (("decision", "allow"), ("op", "get")))] == 5
    assert got[("agentd_decisions_total", (("decision", "deny"), ("op", "get")))] == 1
    assert got[("agentd_decisions_total", (("decision", "allow"), ("op", "refresh")))] == 1

    assert got[("agentd_ready", ())] == 1
    assert got[("agentd_upstream_up", (("address", bao.address),))] == 1
    assert got[("agentd_upstream_requests_total", ())] >= 4
    assert got[("agentd_auth_state", (("method", "approle"), ("state", "ok")))] == 1
    assert got[("agentd_auth_state", (("method", "approle"), ("state", "failing")))] == 0
    assert 3000 < got[("agentd_auth_token_ttl_seconds", ())] <= 3600   # token_ttl = 1h
    assert got[("agentd_auth_logins_total", ())] == 1
    assert got[("agentd_audit_dropped_total", ())] == 0
    assert got[("agentd_snapshot_enabled", ())] == 1      # state_dir/cache.key was made
    assert got[("agentd_snapshot_write_failures_total", ())] == 0
    # Names and versions only: no value ever reaches the exposition.
    for label in ("db", "db2", "api", "other"):
        assert seeded.marker(label) not in reply.text


async def test_live_ready_and_other_paths(agent: tuple[RunningAgent, str, Path]) -> None:
    running, base, _ = agent
    with trio.fail_after(10):
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{base}/live")).text == "ok\n"
            assert (await http.get(f"{base}/ready")).status_code == 200
            running.agent.ready = trio.Event()     # as before READY=1
            assert (await http.get(f"{base}/ready")).status_code == 503
            assert (await http.get(f"{base}/nothing")).status_code == 404
            assert (await http.post(f"{base}/metrics")).status_code == 405
            head = await http.head(f"{base}/metrics")
            assert head.status_code == 200 and head.content == b""


async def test_textfile_is_valid_exposition_and_follows_changes(
    agent: tuple[RunningAgent, str, Path], bao: DevServer, seeded: Seeded,
) -> None:
    running, _, textfile = agent
    with trio.fail_after(20):
        # The first file is written at start (before READY, maybe before any value): it is
        # valid exposition all along, and shows the first version within a second.
        db = ("agentd_secret_version", (("kind", "kv2"), ("name", "db")))
        first = running.agent.cache.info("db")
        assert first is not None
        while samples(textfile.read_text()).get(db) != first.version:
            await trio.sleep(0.05)
        assert textfile.stat().st_mode & 0o777 == 0o640        # not world-readable
        version = bao.kv_put(f"{seeded.prefix}/db", {"password": "p"})
        await call(running.socket, "refresh", name="db")
        # Rewritten within textfile_interval (1 s); never a partial file in between.
        while True:
            text = textfile.read_text()
            assert text.endswith("\n")
            if samples(text)[db] == version:
                break
            await trio.sleep(0.05)
    assert [p.name for p in textfile.parent.iterdir()] == ["agentd.prom"]


def test_write_textfile_replaces_atomically_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "x.prom"
    target.write_text("old\n")
    inode = target.stat().st_ino
    write_textfile(target, b"new\n")
    assert target.read_bytes() == b"new\n"
    assert target.stat().st_ino != inode          # renamed over, not rewritten in place
    with pytest.raises(FileNotFoundError):
        write_textfile(tmp_path / "missing-dir" / "x.prom", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.prom"]


def test_metrics_config_keys_and_reference(tmp_path: Path) -> None:
    reference = load(ROOT / "config" / "agentd.reference.toml", check_permissions=False)
    assert reference.metrics == MetricsConfig()
    base = (ROOT / "config" / "agentd.reference.toml").read_text()
    good = tmp_path / "good.toml"
    good.write_text(base.replace('[metrics]\n', '[metrics]\nlisten = "[::1]:9464"\n'
                                 'textfile = "/run/x.prom"\n', 1))
    cfg = load(good, check_permissions=False).metrics
    assert (cfg.listen, cfg.textfile, cfg.textfile_interval) == (("::1", 9464),
                                                                Path("/run/x.prom"), 15.0)
    bad = tmp_path / "bad.toml"
    bad.write_text(base.replace('[metrics]\n', '[metrics]\nlisten = "9464"\n'
                                'textfile = "x.prom"\n', 1))
    with pytest.raises(Exception) as caught:
        load(bad, check_permissions=False)
    problems = "\n".join(caught.value.problems)   # type: ignore[attr-defined]
    assert 'metrics.listen: expected "HOST:PORT"' in problems
    assert "metrics.textfile: expected an absolute path" in problems


async def test_scrape_shows_upstream_errors_denials_by_policy_and_template_series(
    bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded, tmp_path: Path
) -> None:
    port = free_port()
    rendered = tmp_path / "out" / "db.conf"
    rendered.parent.mkdir()
    path = write_config(
        tmp_path, bao, approle_files, seeded, sock=socket_dir() / "agentd.sock",
        refresh="1h",
        extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\ndetailed = true\n\n'
              f'[secrets.ghost]\nkind = "kv2"\npath = "secret/data/{seeded.prefix}/ghost"\n\n'
              f'[[template]]\ncontents = "user={{{{ secret(\'db\').username }}}}\\n"\n'
              f'destination = "{rendered}"\n',
    )
    async with running_agent(path) as running:
        sock = str(running.socket)

        def read(name: str) -> Any:
            with Client.connect(sock, timeout=10) as c:
                return c.get(name)["version"]

        with trio.fail_after(30):
            assert (await run_as(NOBODY, NOBODY, lambda: read("other")))["code"] == "forbidden"
            assert (await run_as(1000, 1000, lambda: read("db")))["code"] == "forbidden"
            assert (await run_as(1000, 1000, lambda: read("api")))["code"] == "forbidden"
            async with httpx.AsyncClient() as http:
                reply = await http.get(f"http://127.0.0.1:{port}/metrics")
    got = samples(reply.text)
    assert rendered.read_text() == "user=app\n"
    # The ghost secret's 404 is counted as not_found; nothing else failed.
    assert got[("agentd_upstream_errors_total", (("kind", "not_found"),))] >= 1
    assert got[("agentd_upstream_errors_total", (("kind", "auth"),))] == 0
    # Denials by the policies that matched the peer: nobody matched "nobody-db", uid 1000 none.
    assert got[("agentd_denials_total", (("op", "get"), ("policy", "nobody-db")))] == 1
    assert got[("agentd_denials_total", (("op", "get"), ("policy", "none")))] == 2
    # One template: rendered once, written once, no failure, its last render ok.
    writes = {labels: v for (name, labels), v in got.items()
              if name == "agentd_template_writes_total"}
    assert list(writes.values()) == [1]
    (target,) = writes
    assert got[("agentd_template_failures_total", target)] == 0
    assert got[("agentd_template_ok", target)] == 1
    assert got[("agentd_template_render_seconds_total", target)] > 0
