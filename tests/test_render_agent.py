"""Rendering inside a real agent against the real OpenBao: files, bundles, reload, drift repair."""

from __future__ import annotations

import grp
import os
import stat
import sys
from pathlib import Path

import trio

from agentd import render
from agentd.client import open_client
from agentd.daemon import Agent
from agentd.render import outputs as render_outputs
from tests.agentfixture import running_agent, seed, socket_dir, write_config
from tests.openbao import DevServer
from tests.support import until

NOGROUP = grp.getgrnam("nogroup").gr_gid
NOBODY = 65534


def fast(agent: Agent) -> None:
    agent.renderer.backoff = (0.05, 0.3)


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def template(dest: Path, contents: str, extra: str = "") -> str:
    return f"""
[[template]]
destination = "{dest}"
contents = {contents!r}
mode = "0640"
owner = "nobody"
group = "nogroup"
{extra}
"""


async def test_file_exact_mode_owner_update_by_rename_and_drift_repair(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    seeded = seed(bao)
    out = tmp_path / "out"
    out.mkdir()
    db, other = out / "db.conf", out / "other.conf"
    extra = template(db, "user={{ secret('db').username }}\npw={{ secret('db').password }}\n")
    extra += template(other, "v={{ secret('other').value }}\n")
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=socket_dir() / "a.sock",
                       extra=extra)
    with trio.fail_after(40):
        async with running_agent(cfg, configure=fast) as ra:
            # READY waits for the first render
            assert db.read_text() == f"user=app\npw={seeded.markers['db']}\n"
            st = db.stat()
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, NOBODY, NOGROUP)
            other_st = other.stat()
            bao.kv_put(f"{seeded.prefix}/db", {"username": "app", "password": "second-MARKER"})
            await until(lambda: read(db) == "user=app\npw=second-MARKER\n")
            st2 = db.stat()
            assert st2.st_ino != st.st_ino
            assert (stat.S_IMODE(st2.st_mode), st2.st_uid, st2.st_gid) == (0o640, NOBODY,
                                                                         NOGROUP)
            assert [n for n in os.listdir(out) if render.TMP_MARK in n] == []
            # the other template's input did not change: not even rendered again
            status = ra.agent.status()["templates"]
            assert status[str(other)]["renders"] == 1
            assert other.stat().st_ino == other_st.st_ino
            # drift: deleted -> restored; chmod/chown by someone else -> written back
            db.unlink()
            await until(lambda: db.exists())
            assert db.read_text() == "user=app\npw=second-MARKER\n"
            os.chmod(db, 0o666)
            os.chown(db, 0, 0)
            await until(lambda: stat.S_IMODE(db.stat().st_mode) == 0o640
                        and db.stat().st_uid == NOBODY)
            db.write_text("tampered\n")
            await until(lambda: read(db) == "user=app\npw=second-MARKER\n")
            assert "writing it back" in ra.log_text()
            log = ra.log_text()
    for marker in seeded.markers.values():
        assert marker not in log


async def test_bundle_in_agent_and_source_edit_rerenders(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    seeded = seed(bao)
    out = tmp_path / "out"
    out.mkdir()
    tls = out / "tls"
    src = tmp_path / "tpl"
    src.mkdir()
    (src / "app.j2").write_text("one={{ secret('other').value }}\n")
    extra = f"""
[[bundle]]
directory = "{tls}"
files.'cert.pem' = "C {{{{ secret('db').password }}}}\\n"
files.'key.pem' = "K {{{{ secret('db').password }}}}\\n"
mode = "0640"
modes = {{ "cert.pem" = "0644" }}
group = "nogroup"
grace = "0.2s"

[[template]]
source = "{src / 'app.j2'}"
destination = "{out / 'app.conf'}"
"""
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=socket_dir() / "a.sock",
                       extra=extra)
    with trio.fail_after(40):
        async with running_agent(cfg, configure=fast):
            marker = seeded.markers["db"]
            assert (tls / "cert.pem").read_text() == f"C {marker}\n"
            assert (tls / "key.pem").read_text() == f"K {marker}\n"
            assert os.readlink(tls / "key.pem") == "..data/key.pem"
            assert (tls / "key.pem").stat().st_gid == NOGROUP
            assert stat.S_IMODE((tls / "key.pem").stat().st_mode) == 0o640
            assert stat.S_IMODE((tls / "cert.pem").stat().st_mode) == 0o644
            first = os.readlink(tls / "..data")
            bao.kv_put(f"{seeded.prefix}/db", {"password": "rotated"})
            await until(lambda: read(tls / "key.pem") == "K rotated\n")
            assert (tls / "cert.pem").read_text() == "C rotated\n"
            await until(lambda: not (tls / first).exists())     # removed after its grace
            # a template source edit re-renders at once
            assert (out / "app.conf").read_text() == f"one={seeded.markers['other']}\n"
            (src / "app.j2").write_text("two={{ secret('other').value }}\n")
            await until(lambda: read(out / "app.conf") == f"two={seeded.markers['other']}\n")


async def test_reload_broken_config_keeps_serving_good_config_adds_template(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    seeded = seed(bao)
    out = tmp_path / "out"
    out.mkdir()
    first, second, third = out / "first.conf", out / "second.conf", out / "third.conf"
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=socket_dir() / "a.sock",
                       extra=template(first, "{{ secret('db').username }}"))
    good = cfg.read_text()
    with trio.fail_after(40):
        async with running_agent(cfg, configure=fast) as ra:
            assert first.read_text() == "app"
            ra.agent.config_path = cfg
            cfg.write_text(good + "\n[[template]]\nnot valid = = toml\n")
            assert ra.agent.reload() is False                # what SIGHUP runs
            client = await open_client(ra.socket)
            try:
                assert (await client.get("db", "username"))["data"] == "app"
            finally:
                await client.aclose()
            bao.kv_put(f"{seeded.prefix}/db", {"username": "app2", "password": "x"})
            await until(lambda: read(first) == "app2")      # the old config keeps rendering
            cfg.write_text(good + template(second, "{{ secret('other').value }}"))
            assert ra.agent.reload() is True
            await until(lambda: read(second) == seeded.markers["other"])
            assert first.read_text() == "app2"
            # a conf.d file dropped in by config management: the watcher reloads by itself
            reloads = ra.agent.reloads
            confd = tmp_path / "conf.d"
            confd.mkdir()
            (confd / "extra.toml").write_text(template(third, "{{ secret('db').username }}"))
            await until(lambda: read(third) == "app2")
            assert ra.agent.reloads > reloads                # the watcher's own reload


async def test_destination_errors_fail_closed_and_recover(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """A symlinked destination is refused, a missing directory retried; others go on."""
    seeded = seed(bao)
    out = tmp_path / "out"
    out.mkdir()
    (out / "real").write_text("keep")
    (out / "link.conf").symlink_to(out / "real")
    later = tmp_path / "later"
    extra = template(out / "link.conf", "{{ secret('db').password }}")
    extra += template(later / "late.conf", "{{ secret('db').username }}")
    extra += template(out / "ok.conf", "{{ secret('other').value }}")
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=socket_dir() / "a.sock",
                       extra=extra)
    with trio.fail_after(40):
        async with running_agent(cfg, configure=fast) as ra:
            assert (out / "ok.conf").read_text() == seeded.markers["other"]
            assert (out / "real").read_text() == "keep"
            status = ra.agent.status()["templates"]
            assert "is a symlink" in status[str(out / "link.conf")]["last_error"]
            assert "cannot open the directory" in status[str(later / "late.conf")]["last_error"]
            later.mkdir()
            await until(lambda: read(later / "late.conf") == "app")
            log = ra.log_text()
            assert "render failed; the last good file stays" in log
    assert seeded.markers["db"] not in log


async def test_render_dry_run_cli_masks_values(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    seeded = seed(bao)
    out = tmp_path / "out"
    out.mkdir()
    a, b = out / "a.conf", out / "b.conf"
    sock = socket_dir() / "a.sock"
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=sock,
                       extra=template(a, "{{ secret('db').password }}")
                       + template(b, "{{ secret('other').value }}"))
    # the dry run reads another config file (the agent would reload its own on a change)
    dry = tmp_path / "dry"
    dry.mkdir()
    dry_cfg = dry / "agentd.toml"
    dry_cfg.write_text(cfg.read_text().replace('mode = "0640"', 'mode = "0600"', 1)
                       + template(out / "d.conf", "{{ secret('db').username }}")
                       + template(out / "c.conf", "{{ secret('db').nope }}"))
    with trio.fail_after(60):
        async with running_agent(cfg, configure=fast):
            done = await trio.run_process(
                [sys.executable, "-m", "agentd", "render", "--dry-run", "-c", str(dry_cfg),
                 "--socket", str(sock)], capture_stdout=True, capture_stderr=True, check=False)
    text = done.stdout.decode()
    assert done.returncode == 1, done.stderr.decode()
    assert f"update    {a}" in text and "mode 0640 -> 0600" in text
    assert f"unchanged {b}" in text
    assert f"create    {out / 'd.conf'}" in text
    assert f"error     {out / 'c.conf'}" in text and "no attribute 'nope'" in text
    assert "2 file(s) would change, 1 error(s), 1 unchanged" in text
    assert not (out / "d.conf").exists()
    for marker in seeded.markers.values():
        assert marker not in text


def test_bundle_modes_config(tmp_path: Path) -> None:
    from agentd import config as config_mod
    from agentd.errors import ConfigError

    base = f"""
[agent]
socket = "{tmp_path / 's.sock'}"
state_dir = "{tmp_path}"
[upstream]
addresses = ["http://127.0.0.1:1"]
[upstream.auth]
method = "token_file"
token_file = "{tmp_path / 'token'}"
[secrets.tls]
kind = "kv2"
path = "secret/data/tls"
[[bundle]]
directory = "{tmp_path / 'tls'}"
files = {{ "cert.pem" = "{{{{ secret('tls').cert }}}}", "key.pem" = "{{{{ secret('tls').key }}}}" }}
mode = "0640"
owner = "4242"
group = "nogroup"
"""
    path = tmp_path / "agentd.toml"
    path.write_text(base + 'modes = { "cert.pem" = "0644" }\n')
    bundle = config_mod.load(path, check_permissions=False).bundles[0]
    assert dict(bundle.modes) == {"cert.pem": 0o644}
    assert (bundle.owner, bundle.group) == (4242, NOGROUP)    # a number as a string
    assert render_outputs._modes(bundle) == {"cert.pem": 0o644, "key.pem": 0o640}
    path.write_text(base + 'modes = { "chain.pem" = "0644", "key.pem" = "rw" }\n')
    try:
        config_mod.load(path, check_permissions=False)
    except ConfigError as exc:
        text = "\n".join(exc.problems)
    else:
        raise AssertionError("accepted")
    assert "bundle[0].modes.\"chain.pem\": 'chain.pem' is not one of this bundle's files" in text
    assert "invalid mode 'rw'" in text


async def test_revoked_input_keeps_the_file_or_removes_it_with_on_revoke_remove(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    seeded = seed(bao)
    out = tmp_path / "out"
    out.mkdir()
    kept, removed, other = out / "kept.conf", out / "removed.conf", out / "other.conf"
    extra = template(kept, "pw={{ secret('db').password }}\n")
    extra += template(removed, "pw={{ secret('db').password }}\n", 'on_revoke = "remove"')
    extra += template(other, "v={{ secret('other').value }}\n")
    path = write_config(tmp_path, bao, approle_files, seeded, sock=socket_dir() / "s.sock",
                        extra=extra)
    async with running_agent(path, configure=fast) as running:
        with trio.fail_after(20):
            await until(lambda: read(kept) is not None and read(removed) is not None
                        and read(other) is not None)
            # Evidence of revocation: the secret's metadata is deleted upstream.
            bao.api("DELETE", f"secret/metadata/{seeded.prefix}/db")
            await until(lambda: not removed.exists())
            await until(lambda: "an input of this template was revoked" in running.log_text())
        assert read(kept) == f"pw={seeded.markers['db']}\n"      # the last good file stays
        assert read(other) == f"v={seeded.markers['other']}\n"   # others are untouched
        status = running.agent.renderer.statistics()
        assert status[str(kept)].failures == 1
        assert "revoked" in (status[str(kept)].last_error or "")
        log_text = running.log_text()
    assert seeded.markers["db"] not in log_text
