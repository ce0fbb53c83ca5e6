"""watch.py: inotify driven from trio, and the debounced config reload, on real files."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pyinotify
import trio

from agentd import config as config_mod
from agentd import watch
from agentd.daemon import Agent


async def test_watcher_reports_changes_in_watched_directories(tmp_path: Path) -> None:
    seen, unseen = tmp_path / "seen", tmp_path / "unseen"
    seen.mkdir()
    unseen.mkdir()
    watcher = watch.Watcher()
    try:
        watcher.set_dirs([seen, tmp_path / "missing"])
        assert watcher.dirs == [seen]
        with trio.fail_after(10):
            (unseen / "x").write_text("1")
            (seen / "f").write_text("1")
            paths = {path for path, _ in await watcher.next_events()}
            assert paths == {seen / "f"}
            (seen / "f").chmod(0o600)                   # attribute changes count (drift)
            assert (seen / "f") in {path for path, _ in await watcher.next_events()}
        watcher.set_dirs([])
        assert watcher.dirs == []
    finally:
        watcher.close()


async def test_a_burst_of_renames_reports_every_destination(tmp_path: Path) -> None:
    """What the renderer does 1,000 times at a cold start: temp file, rename over the target."""
    watcher = watch.Watcher()
    try:
        watcher.set_dirs([tmp_path])
        wanted = {tmp_path / f"t{i:04d}.txt" for i in range(1000)}
        for path in sorted(wanted):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("x")
            os.rename(tmp, path)
        seen: set[Path] = set()
        with trio.fail_after(20):
            while not wanted <= seen:
                seen |= {path for path, mask in await watcher.next_events()
                         if mask & pyinotify.IN_MOVED_TO}
        assert seen == wanted
    finally:
        watcher.close()


def test_parse_events_names_paths_skips_unknown_watches_and_flags_overflow() -> None:
    def record(wd: int, mask: int, name: bytes = b"") -> bytes:
        padded = name + b"\0" * (-len(name) % 16 or (16 if name else 0))
        return struct.pack("iIII", wd, mask, 0, len(padded)) + padded

    base = Path("/etc/agentd")
    data = (record(1, pyinotify.IN_CLOSE_WRITE, b"agentd.toml")
            + record(7, pyinotify.IN_CREATE, b"x") + record(1, pyinotify.IN_DELETE_SELF)
            + record(-1, pyinotify.IN_Q_OVERFLOW))
    events, overflow = watch.parse_events(data, {1: base})
    assert events == [(base / "agentd.toml", pyinotify.IN_CLOSE_WRITE),
                      (base, pyinotify.IN_DELETE_SELF)]
    assert overflow
    assert watch.parse_events(data[:20], {1: base}) == ([], False)   # a torn record is not read
    own = record(1, pyinotify.IN_CREATE, b".x.agentd-tmp-0123") + record(1, 0x80, b"..data_tmp")
    assert watch.parse_events(own, {1: base}) == ([], False)     # the renderer's own temp files


def _config(tmp_path: Path, extra: str = "") -> str:
    token = tmp_path / "token"
    token.write_text("t\n")
    token.chmod(0o600)
    return f"""
[agent]
socket = "{tmp_path / 'agentd.sock'}"
state_dir = "{tmp_path / 'state'}"

[upstream]
addresses = ["http://127.0.0.1:1"]
[upstream.auth]
method = "token_file"
token_file = "{token}"

[secrets.a]
kind = "kv2"
path = "secret/data/a"
{extra}
"""


async def test_a_burst_of_conf_d_changes_gives_one_reload(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "conf.d").mkdir(parents=True)
    etc.chmod(0o755)
    main = etc / "agentd.toml"
    main.write_text(_config(tmp_path))
    agent = Agent(config_mod.load(main), config_path=main)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run, agent, agent.renderer)
        with trio.fail_after(20):
            for i in range(10):                         # config management, file after file
                (etc / "conf.d" / f"{i}.toml").write_text(
                    f'[secrets.s{i}]\nkind = "kv2"\npath = "secret/data/s{i}"\n')
                await trio.sleep(0.05)
            while agent.reloads == 0:
                await trio.sleep(0.05)
            await trio.sleep(watch.RELOAD_QUIET * 3)
            assert agent.reloads == 1
            assert set(agent.config.secrets) == {"a", *(f"s{i}" for i in range(10))}
            # a broken file: refused, the running config stays
            (etc / "conf.d" / "bad.toml").write_text("[secrets.x\n")
            while agent.reload_failures == 0:
                await trio.sleep(0.05)
            assert agent.reloads == 1
            assert "s9" in agent.config.secrets
            # a file that is not *.toml is not config
            (etc / "conf.d" / "notes.txt").write_text("hello")
            (etc / "conf.d" / "bad.toml").unlink()
            while agent.reloads == 1:
                await trio.sleep(0.05)
            await trio.sleep(watch.RELOAD_QUIET * 3)
            assert agent.reloads == 2
        nursery.cancel_scope.cancel()
