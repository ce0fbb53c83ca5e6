"""The Renderer over a real Cache (no upstream): change detection, fail closed, commands."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from agentd import config as config_mod
from agentd.cache import Cache
from agentd.config import Config
from agentd.crypto import Sealer
from agentd.render import Renderer
from tests.support import until

COUNT = "import sys\nopen(sys.argv[1], 'a').write('run\\n')\nprint('reloaded app')\n"


def make_config(tmp_path: Path, templates: str) -> Config:
    text = f"""
[agent]
socket = "{tmp_path / 'agentd.sock'}"
state_dir = "{tmp_path / 'state'}"

[upstream]
addresses = ["http://127.0.0.1:1"]
[upstream.auth]
method = "token_file"
token_file = "{tmp_path / 'token'}"

[secrets.a]
kind = "kv2"
path = "secret/data/a"

[secrets.b]
kind = "kv2"
path = "secret/data/b"

[[policy]]
name = "root"
uids = [0]
allow = ["*"]
{templates}
"""
    path = tmp_path / "agentd.toml"
    path.write_text(text)
    return config_mod.load(path, check_permissions=False)


@asynccontextmanager
async def running(config: Config, cache: Cache) -> AsyncIterator[Renderer]:
    renderer = Renderer(config, cache, backoff=(0.05, 0.2))
    async with trio.open_nursery() as nursery:
        await nursery.start(renderer.run)
        try:
            yield renderer
        finally:
            nursery.cancel_scope.cancel()


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def test_only_templates_of_the_changed_secret_rerender(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    config = make_config(tmp_path, f"""
[[template]]
destination = "{out / 'a.conf'}"
contents = "a={{{{ secret('a').v }}}}\\n"
[[template]]
destination = "{out / 'b.conf'}"
contents = "b={{{{ secret('b').v }}}}\\n"
[[template]]
destination = "{out / 'ab.conf'}"
contents = "{{{{ secret('a').v }}}}{{{{ secret('b').v }}}}"
""")
    cache = Cache(Sealer.generate())
    cache.put("a", {"v": "1"}, version=1)
    cache.put("b", {"v": "1"}, version=1)
    leftover = out / ".a.conf.agentd-tmp-0123456789abcdef"     # from a crash
    leftover.write_text("half")
    with trio.fail_after(20):
        async with running(config, cache) as renderer:
            await renderer.wait_first_pass()
            assert not leftover.exists()                      # cleaned at start
            inode_b = (out / "b.conf").stat().st_ino
            renders = {k: t.status.renders for k, t in renderer.targets.items()}
            cache.put("a", {"v": "2"}, version=2)
            await until(lambda: (out / "a.conf").read_text() == "a=2\n", "a re-rendered")
            await until(lambda: (out / "ab.conf").read_text() == "21", "ab re-rendered")
            await trio.sleep(0.2)
            assert renderer.targets[str(out / "b.conf")].status.renders == renders[
                str(out / "b.conf")]
            assert (out / "b.conf").stat().st_ino == inode_b
            # same data again under a new version: rendered, identical, not rewritten
            inode_a = (out / "a.conf").stat().st_ino
            cache.put("a", {"v": "2", "unused": "x"}, version=3)
            target = renderer.targets[str(out / "a.conf")]
            await until(lambda: target.attempted == {"a": 3}, "rendered again")
            assert (out / "a.conf").stat().st_ino == inode_a
            assert target.status.writes == 2


async def test_missing_key_keeps_last_good_file_and_recovers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    config = make_config(tmp_path, f"""
[[template]]
destination = "{out / 'a.conf'}"
contents = "pw={{{{ secret('a').password }}}}\\n"
[[template]]
destination = "{out / 'b.conf'}"
contents = "b={{{{ secret('b').v }}}}\\n"
""")
    cache = Cache(Sealer.generate())
    cache.put("a", {"password": "p1"}, version=1)
    cache.put("b", {"v": "1"}, version=1)
    with trio.fail_after(20):
        async with running(config, cache) as renderer:
            await renderer.wait_first_pass()
            target = renderer.targets[str(out / "a.conf")]
            cache.put("a", {"user": "only"}, version=2)        # the key went missing
            await until(lambda: target.status.failures >= 2, "failing, retried")
            assert "has no attribute 'password'" in (target.status.last_error or "")
            assert (out / "a.conf").read_text() == "pw=p1\n"
            cache.put("b", {"v": "2"}, version=2)              # others go on
            await until(lambda: (out / "b.conf").read_text() == "b=2\n", "b rendered")
            cache.put("a", {"password": "p3"}, version=3)      # the key is back
            await until(lambda: (out / "a.conf").read_text() == "pw=p3\n", "recovered")
            assert target.status.last_error is None


async def test_command_debounce_timeout_and_retry(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    runs = tmp_path / "runs"
    fails = tmp_path / "fails"
    pidfile = tmp_path / "pid"
    count, slow, fail = tmp_path / "count.py", tmp_path / "slow.py", tmp_path / "fail.py"
    count.write_text(COUNT)
    slow.write_text(f"import os, time\nopen({str(pidfile)!r} + '.tmp', 'w').write(str(os.getpid()))"
                    f"\nos.replace({str(pidfile)!r} + '.tmp', {str(pidfile)!r})\ntime.sleep(60)\n")
    fail.write_text(f"import sys\nopen({str(fails)!r}, 'a').write('x\\n')\nsys.exit(3)\n")
    config = make_config(tmp_path, f"""
[[template]]
destination = "{out / 'debounced'}"
contents = "{{{{ secret('a').v }}}}"
command = ["{sys.executable}", "{count}", "{runs}"]
wait = {{ min = "2s", max = "20s" }}
[[template]]
destination = "{out / 'slow'}"
contents = "{{{{ secret('b').v }}}}"
command = ["{sys.executable}", "{slow}"]
command_timeout = "0.5s"
[[template]]
destination = "{out / 'failing'}"
contents = "{{{{ secret('b').v }}}}!"
command = ["{sys.executable}", "{fail}"]
""")
    cache = Cache(Sealer.generate())
    cache.put("a", {"v": "0"}, version=1)
    cache.put("b", {"v": "0"}, version=1)
    with trio.fail_after(30):
        async with running(config, cache) as renderer:
            await renderer.wait_first_pass()
            debounced = renderer.targets[str(out / "debounced")]
            await until(lambda: lines(runs) == 1, "first run")
            for i in range(1, 6):                   # five quick changes
                cache.put("a", {"v": str(i)}, version=i + 1)
                await until(lambda i=i: (out / "debounced").read_text() == str(i), "rendered")
            await until(lambda: lines(runs) == 2, "one debounced run")
            await trio.sleep(1.5)
            assert lines(runs) == 2
            assert debounced.status.command_runs == 2, debounced.status
            # the slow command is killed after its timeout; the failing one is retried
            slow_t = renderer.targets[str(out / "slow")]
            await until(lambda: slow_t.status.command_failures >= 1, "slow command killed")
            assert "timed out after 0.5s" in (slow_t.status.last_command_error or "")
            pid = int(pidfile.read_text())
            await until(lambda: not os.path.exists(f"/proc/{pid}"), "process gone")
            await until(lambda: lines(fails) >= 3, "failing command retried")
            failing = renderer.targets[str(out / "failing")]
            assert failing.status.last_command_error == "exit status 3"
            # neither blocks the others
            cache.put("a", {"v": "last"}, version=20)
            await until(lambda: lines(runs) == 3, "debounced template still runs")


async def test_full_disk_keeps_old_file_retries_and_recovers(tmp_path: Path) -> None:
    import subprocess

    out = tmp_path / "small"
    out.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs",
                             str(out)], capture_output=True, text=True)
    if result.returncode != 0:
        import pytest
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        config = make_config(tmp_path, f"""
[[template]]
destination = "{out / 'big.conf'}"
contents = "{{{{ secret('a').v }}}}"
""")
        cache = Cache(Sealer.generate())
        cache.put("a", {"v": "small"}, version=1)
        with trio.fail_after(20):
            async with running(config, cache) as renderer:
                await renderer.wait_first_pass()
                target = renderer.targets[str(out / "big.conf")]
                filler = out / "filler"
                filler.write_bytes(b"\0" * 40_000)
                cache.put("a", {"v": "y" * 30_000}, version=2)
                await until(lambda: target.status.failures >= 2, "failing and retried")
                assert "No space left on device" in (target.status.last_error or "")
                assert (out / "big.conf").read_text() == "small"
                assert [n for n in os.listdir(out) if "agentd-tmp" in n] == []
                filler.unlink()
                await until(lambda: (out / "big.conf").read_text() == "y" * 30_000,
                            "recovered")
                assert target.status.last_error is None
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


async def test_a_failing_write_batch_fails_its_templates_and_they_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error in the batched write (here one OSError from the thread job) fails
    every template of that batch with an error, none is left waiting, and the retry writes."""
    out = tmp_path / "out"
    out.mkdir()
    config = make_config(tmp_path, "".join(f"""
[[template]]
destination = "{out / f't{i}.conf'}"
contents = "{{{{ secret('a').v }}}}-{i}"
""" for i in range(20)))
    cache = Cache(Sealer.generate())
    cache.put("a", {"v": "1"}, version=1)
    real = Renderer._write_batch
    calls = {"n": 0}

    def flaky(self: Renderer, batch: list) -> None:      # type: ignore[type-arg]
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("simulated")
        real(self, batch)

    monkeypatch.setattr(Renderer, "_write_batch", flaky)
    with trio.fail_after(30):
        async with running(config, cache) as renderer:
            await renderer.wait_first_pass()
            await until(lambda: all((out / f"t{i}.conf").exists() for i in range(20)),
                        "all written on retry")
            failed = [t for t in renderer.targets.values() if t.status.failures]
            assert failed, "the first batch failed its templates"
    logged = [r for r in caplog.records if "write failed: OSError" in str(getattr(r, "error", ""))]
    assert len(logged) == len(failed)
    assert [(out / f"t{i}.conf").read_text() for i in range(20)] == [f"1-{i}"
                                                                    for i in range(20)]
