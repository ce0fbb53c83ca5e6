"""render.py on its own: the sandboxed worker, atomic file writes and bundles, on real files."""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from agentd import render
from agentd.render import RenderError, RenderWorker

NOGROUP = grp.getgrnam("nogroup").gr_gid
NOBODY = 65534
SECRET = "MARKER-render-unit-5b1e0c"

READER = r"""
import os, re, stat, sys
path, stop = sys.argv[1], sys.argv[2]
pattern, mode = re.compile(sys.argv[3], re.S), int(sys.argv[4], 8)
reads = bad = 0
while not os.path.exists(stop):
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read().decode()
    except FileNotFoundError:
        bad += 1
        continue
    reads += 1
    if not pattern.fullmatch(data) or stat.S_IMODE(st.st_mode) != mode:
        bad += 1
print(reads, bad)
"""


def _temps(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if render.TMP_MARK in n]


@contextlib.contextmanager
def dirfd(path: Path) -> Iterator[int]:
    fd = render.open_dir(path)
    try:
        yield fd
    finally:
        os.close(fd)


# -- the worker ----------------------------------------------------------------------------------


async def test_worker_output_is_byte_exact_with_filters() -> None:
    worker = RenderWorker()
    try:
        with trio.fail_after(20):
            out = await worker.render(
                "u={{ secret('db').user }}\np={{ secret('db').password | b64encode }}\n"
                "j={{ secret('db') | tojson }}\nd={{ 'aGk=' | b64decode }}\n\n",
                {"db": {"user": "app", "password": SECRET}},
            )
    finally:
        await worker.aclose()
    import base64
    assert out == (
        f"u=app\np={base64.b64encode(SECRET.encode()).decode()}\n"
        f'j={{"password": "{SECRET}", "user": "app"}}\nd=hi\n\n'
    ).encode()


async def test_worker_errors_are_clear_and_never_hold_a_value() -> None:
    worker = RenderWorker()
    data = {"db": {"password": SECRET}}
    try:
        with trio.fail_after(20):
            with pytest.raises(RenderError, match="has no attribute 'nope'"):
                await worker.render("{{ secret('db').nope }}", data)
            with pytest.raises(RenderError, match="not available") as info:
                await worker.render("{{ secret('other') }}", data)
            with pytest.raises(RenderError) as info:
                await worker.render("{{ secret('db').password + 1 }}", data)
            assert SECRET not in str(info.value)
            with pytest.raises(RenderError) as info:
                await worker.render("{{ secret('db').password | b64decode }}", data)
            assert SECRET not in str(info.value)
            with pytest.raises(RenderError, match="unsafe"):
                await worker.render("{{ ''.__class__.__mro__ }}", data)
    finally:
        await worker.aclose()


async def test_worker_errors_hold_no_value_of_any_type_or_length() -> None:
    """Issue 13 item 11: numbers used as an index, and 1- and 2-character values."""
    worker = RenderWorker()
    data = {"db": {"idx": 987654321, "k": "zq", "c": "Q", "items": ["a"], "pin": 7}}
    try:
        with trio.fail_after(20):
            with pytest.raises(RenderError) as info:
                await worker.render("{{ secret('db')['items'][secret('db').idx] }}", data)
            assert "987654321" not in str(info.value)
            assert "no element ***" in str(info.value)
            with pytest.raises(RenderError) as info:
                await worker.render("{{ secret('db')[secret('db').k] }}", data)
            assert "zq" not in str(info.value) and "'***'" in str(info.value)
            with pytest.raises(RenderError) as info:
                await worker.render("{{ secret('db')[secret('db').c].x }}", data)
            assert "'Q'" not in str(info.value)
            with pytest.raises(RenderError) as info:
                await worker.render("{{ secret('db')['items'][secret('db').pin] }}", data)
            assert " 7" not in str(info.value)
    finally:
        await worker.aclose()


async def test_worker_bounds_output() -> None:
    worker = RenderWorker(timeout=20.0, max_bytes=4096)
    try:
        with trio.fail_after(30):
            with pytest.raises(RenderError, match="larger than 4096 bytes"):
                await worker.render("{{ 'x' * 10**8 }}", {})
            assert worker.killed == 0
            assert await worker.render("{{ 'x' * 4096 }}", {}) == b"x" * 4096
    finally:
        await worker.aclose()


async def test_worker_bounds_time_by_killing_it() -> None:
    worker = RenderWorker(timeout=1.0)
    try:
        with trio.fail_after(30):
            with pytest.raises(RenderError, match="longer than 1s: worker killed"):
                await worker.render("{% for i in range(100000) %}{% for j in range(100000) %}"
                                    "{% endfor %}{% endfor %}", {})
            assert worker.killed == 1
            worker.timeout = 20.0
            assert await worker.render("still {{ 'ok' }}", {}) == b"still ok"
            assert worker.started == 2
    finally:
        await worker.aclose()


async def test_worker_killed_while_idle_is_replaced_without_a_failed_render() -> None:
    worker = RenderWorker()
    try:
        with trio.fail_after(30):
            assert await worker.render("{{ 1 + 1 }}", {}) == b"2"
            proc = worker._proc
            assert proc is not None
            proc.kill()                         # e.g. the OOM killer, between two renders
            await proc.wait()
            assert await worker.render("{{ 2 + 2 }}", {}) == b"4"
            assert worker.started == 2 and worker.killed == 1
    finally:
        await worker.aclose()


SLOW = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


async def test_concurrent_renders_are_pipelined_in_batches_each_to_its_own_caller() -> None:
    worker = RenderWorker()
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        results[i] = await worker.render("{{ secret('s').v }}-" + str(i), {"s": {"v": f"x{i}"}})

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(300):
                    nursery.start_soon(one, i)
    finally:
        await worker.aclose()
    assert results == {i: f"x{i}-{i}".encode() for i in range(300)}
    assert worker.batches <= 20             # not one round trip per render
    assert worker.started == 1


async def test_a_timeout_or_error_in_a_batch_fails_only_its_own_request() -> None:
    worker = RenderWorker(timeout=2.0)
    outcomes: dict[str, object] = {}

    async def one(key: str, text: str) -> None:
        try:
            outcomes[key] = await worker.render(text, {})
        except RenderError as exc:
            outcomes[key] = str(exc)

    try:
        with trio.fail_after(60):
            await worker.render("warm", {})
            async with trio.open_nursery() as nursery:
                for key, text in (("a", "a"), ("bad", "{{ nope }}"), ("b", "b"), ("slow", SLOW),
                                  ("c", "c"), ("d", "d")):
                    nursery.start_soon(one, key, text)
    finally:
        await worker.aclose()
    assert outcomes["a"] == b"a" and outcomes["b"] == b"b"
    assert outcomes["c"] == b"c" and outcomes["d"] == b"d"   # behind the slow one: new worker
    assert "UndefinedError" in str(outcomes["bad"])
    assert "longer than 2s: worker killed" in str(outcomes["slow"])
    # trio may order the tasks either way: the slow one last in the batch needs no second
    # worker; otherwise one is started for those behind it (and killed by aclose())
    assert (worker.started, worker.killed) in ((1, 1), (2, 2))


async def test_a_cancelled_render_leaves_the_others_served() -> None:
    worker = RenderWorker(timeout=20.0)
    results: dict[str, bytes] = {}

    async def one(key: str, text: str) -> None:
        results[key] = await worker.render(text, {})

    try:
        with trio.fail_after(60):
            await worker.render("warm", {})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, "first", SLOW)  # holds the worker mid-batch...
                nursery.start_soon(one, "x", "x")       # ...or waits behind it
                await trio.sleep(0.5)
                nursery.cancel_scope.cancel()           # both cancelled
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, "y", "y")
                nursery.start_soon(one, "z", "z")
    finally:
        await worker.aclose()
    assert results in ({"y": b"y", "z": b"z"}, {"x": b"x", "y": b"y", "z": b"z"})
    # the half-used worker was killed and replaced (the second kill is aclose())
    assert worker.killed == 2 and worker.started == 2


def test_write_files_batch_each_file_succeeds_or_fails_on_its_own(tmp_path: Path) -> None:
    out, other = tmp_path / "out", tmp_path / "other"
    out.mkdir()
    other.mkdir()
    (out / "same").write_bytes(b"same")
    (out / "same").chmod(0o640)
    (out / "old").write_bytes(b"old")
    (out / "old").chmod(0o600)
    os.symlink("/etc/passwd", out / "link")
    fds = [render.open_dir(out), render.open_dir(other)]
    try:
        writes = [render.FileWrite(fds[0], f"f{i}", f"v{i}".encode(), mode=0o644)
                  for i in range(50)]
        writes += [
            render.FileWrite(fds[0], "same", b"same", mode=0o640),      # untouched
            render.FileWrite(fds[0], "old", b"new", mode=0o644, backup=True),
            render.FileWrite(fds[0], "link", b"x", where="out/link"),    # refused
            render.FileWrite(fds[1], "o", b"other dir", mode=0o600),
        ]
        same_inode = (out / "same").stat().st_ino
        results = render.write_files(writes)
    finally:
        for fd in fds:
            os.close(fd)
    assert results[:50] == [True] * 50
    assert [(out / f"f{i}").read_bytes() for i in range(50)] == [f"v{i}".encode()
                                                                for i in range(50)]
    assert {stat.S_IMODE((out / f"f{i}").stat().st_mode) for i in range(50)} == {0o644}
    assert results[50] is False and (out / "same").stat().st_ino == same_inode
    assert results[51] is True and (out / "old").read_bytes() == b"new"
    assert (out / "old.bak").read_bytes() == b"old"
    assert stat.S_IMODE((out / "old.bak").stat().st_mode) == 0o600
    assert isinstance(results[52], RenderError) and "symlink" in str(results[52])
    assert os.readlink(out / "link") == "/etc/passwd"
    assert results[53] is True and (other / "o").read_bytes() == b"other dir"
    assert not [p for p in [*out.iterdir(), *other.iterdir()] if render.TMP_MARK in p.name]


def test_secret_refs() -> None:
    assert render.secret_refs("{{ secret('a').x }}{{ secret(\"b\") }}{{ secret('a') }}") == [
        "a", "b"]


# -- atomic file writes --------------------------------------------------------------------------


def test_write_exact_content_mode_owner_and_replace_by_rename(tmp_path: Path) -> None:
    dest = tmp_path / "app.conf"
    with dirfd(tmp_path) as fd:
        assert render.write_file(fd, "app.conf", b"one\n", mode=0o640, uid=NOBODY, gid=NOGROUP)
        st1 = dest.stat()
        assert dest.read_bytes() == b"one\n"
        assert (stat.S_IMODE(st1.st_mode), st1.st_uid, st1.st_gid) == (0o640, NOBODY, NOGROUP)
        # identical output: nothing touched (same inode, same mtime)
        assert not render.write_file(fd, "app.conf", b"one\n", mode=0o640, uid=NOBODY,
                                     gid=NOGROUP)
        st_same = dest.stat()
        assert (st_same.st_ino, st_same.st_mtime_ns) == (st1.st_ino, st1.st_mtime_ns)
        assert render.write_file(fd, "app.conf", b"two\n", mode=0o640, uid=NOBODY, gid=NOGROUP)
    st2 = dest.stat()
    assert st2.st_ino != st1.st_ino
    assert (stat.S_IMODE(st2.st_mode), st2.st_uid, st2.st_gid) == (0o640, NOBODY, NOGROUP)
    assert dest.read_bytes() == b"two\n"
    assert _temps(tmp_path) == []


def test_no_backup_unless_asked_and_then_with_the_old_owner_and_mode(tmp_path: Path) -> None:
    with dirfd(tmp_path) as fd:
        render.write_file(fd, "a.conf", b"one\n", mode=0o640, uid=NOBODY, gid=NOGROUP)
        render.write_file(fd, "a.conf", b"two\n", mode=0o640, uid=NOBODY, gid=NOGROUP)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.conf"]
        # first write with backup: nothing to keep yet
        render.write_file(fd, "b.conf", b"one\n", mode=0o640, uid=NOBODY, gid=NOGROUP,
                          backup=True)
        assert not (tmp_path / "b.conf.bak").exists()
        old = (tmp_path / "b.conf").stat()
        render.write_file(fd, "b.conf", b"two\n", mode=0o640, uid=NOBODY, gid=NOGROUP,
                          backup=True)
    bak = (tmp_path / "b.conf.bak").stat()
    assert (tmp_path / "b.conf.bak").read_bytes() == b"one\n"
    assert (tmp_path / "b.conf").read_bytes() == b"two\n"
    assert bak.st_ino == old.st_ino     # the old file itself, never copied
    assert (stat.S_IMODE(bak.st_mode), bak.st_uid, bak.st_gid) == (0o640, NOBODY, NOGROUP)
    assert _temps(tmp_path) == []


def test_mode_or_owner_drift_is_rewritten(tmp_path: Path) -> None:
    with dirfd(tmp_path) as fd:
        render.write_file(fd, "f", b"x", mode=0o600)
        os.chmod(tmp_path / "f", 0o644)
        assert render.write_file(fd, "f", b"x", mode=0o600)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o600


def test_symlink_destination_and_unsafe_directory_are_refused(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with dirfd(tmp_path) as fd, pytest.raises(RenderError, match="is a symlink"):
        render.write_file(fd, "link", b"secret", where="link")
    assert (tmp_path / "real").read_text() == "keep"
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    # refused when opened (every directory from / is checked), and by check_dir on an fd
    with pytest.raises(RenderError, match="writable by others"), dirfd(shared):
        pass
    fd = os.open(shared, os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(RenderError, match="writable by others"):
        render.check_dir(fd, str(shared))
    os.close(fd)
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, NOBODY, NOGROUP)
    with pytest.raises(RenderError, match="owned by uid 65534"), dirfd(other):
        pass
    fd = os.open(other, os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(RenderError, match="owned by uid 65534"):
        render.check_dir(fd, str(other))
    os.close(fd)


def test_a_destination_directory_swapped_for_a_symlink_is_never_written() -> None:
    """Issue 13 item 6: under a world-writable parent, nobody swaps the destination's
    directory for a symlink into a root-owned directory; agentd must not write there."""
    base = Path(tempfile.mkdtemp(prefix="agentd-dest-", dir="/tmp"))   # nobody can reach it
    try:
        _swap_attack(base)
    finally:
        shutil.rmtree(base)


def _swap_attack(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)                         # not sticky: anyone may rename entries
    app = shared / "app"
    app.mkdir()
    target = tmp_path / "root-only"
    target.mkdir(mode=0o700)
    pid = os.fork()
    if pid == 0:                                # the attacker, as nobody
        try:
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            os.rename(app, shared / "app.old")
            os.symlink(target, app)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with pytest.raises(RenderError, match="refusing to write there"), dirfd(app) as fd:
        render.write_file(fd, "app.conf", b"secret", where="app.conf")
    assert os.listdir(target) == []
    # A sticky, root-owned parent (like /tmp) is fine on the way: others cannot rename our
    # directory there.
    shared.chmod(0o1777)
    os.unlink(app)
    os.rename(shared / "app.old", app)
    with dirfd(app) as fd:
        render.write_file(fd, "app.conf", b"ok", where="app.conf")
    assert (app / "app.conf").read_bytes() == b"ok"


def test_leftover_temps_are_cleaned(tmp_path: Path) -> None:
    (tmp_path / f".app.conf{render.TMP_MARK}0123").write_text("half")
    (tmp_path / "app.conf").write_text("good")
    with dirfd(tmp_path) as fd:
        assert render.clean_temps(fd) == [f".app.conf{render.TMP_MARK}0123"]
    assert os.listdir(tmp_path) == ["app.conf"]


def test_reader_sees_only_complete_old_or_new_with_final_mode(tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    out = tmp_path / "out"
    out.mkdir()
    lines = 2000
    with dirfd(out) as fd:
        render.write_file(fd, "f", b"v0\n" * lines, mode=0o640, gid=NOGROUP)
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, str(out / "f"), str(stop),
             rf"(?:v(\d+)\n)(?:v\1\n){{{lines - 1}}}", "0640"],
            stdout=subprocess.PIPE, text=True)
        try:
            for i in range(1, 201):
                render.write_file(fd, "f", f"v{i}\n".encode() * lines, mode=0o640, gid=NOGROUP)
        finally:
            stop.touch()
            output, _ = reader.communicate(timeout=30)
    reads, bad = map(int, output.split())
    assert reads > 0
    assert bad == 0
    assert _temps(out) == []


@pytest.mark.slow
def test_sigkill_during_writes_leaves_complete_file(tmp_path: Path) -> None:
    """SIGKILL a writer (forked, using render.write_file) at random moments, 120 times."""
    rng = random.Random(1234)
    lines = 5000
    with dirfd(tmp_path) as fd:
        render.write_file(fd, "f", b"start\n" * lines, mode=0o640)
    seen: set[str] = set()
    for trial in range(120):
        pid = os.fork()
        if pid == 0:   # the child: write versions as fast as it can until killed
            try:
                cfd = render.open_dir(tmp_path)
                for i in range(10**6):
                    render.write_file(cfd, "f", f"t{trial}-{i}\n".encode() * lines, mode=0o640)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, 0.02))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        data = (tmp_path / "f").read_bytes().decode()
        first = data.split("\n", 1)[0]
        seen.add(first)
        assert data == f"{first}\n" * lines, f"trial {trial}: partial file"
        assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
        with dirfd(tmp_path) as fd:
            render.clean_temps(fd)   # what the renderer does at start
        assert _temps(tmp_path) == []
    assert len(seen) > 10     # the kills did land in the middle of bursts of writes


# -- bundles -------------------------------------------------------------------------------------


def _pair(i: int) -> dict[str, bytes]:
    return {"cert.pem": f"CERT {i}\n".encode() * 50, "key.pem": f"KEY {i}\n".encode() * 50}


BUNDLE_READER = r"""
import os, sys
d, stop = sys.argv[1], sys.argv[2]
reads = bad = 0
while not os.path.exists(stop):
    try:
        # resolve the directory once, as an app loading cert and key would
        live = os.path.join(d, os.readlink(os.path.join(d, "..data")))
        cert = open(os.path.join(live, "cert.pem")).read()
        key = open(os.path.join(live, "key.pem")).read()
    except FileNotFoundError:
        continue   # the old set was removed after its grace: the next resolve finds the new one
    reads += 1
    ci = cert.split("\n")[0].split()[1]
    ki = key.split("\n")[0].split()[1]
    if ci != ki or cert != f"CERT {ci}\n" * 50 or key != f"KEY {ki}\n" * 50:
        bad += 1
    via = open(os.path.join(d, "cert.pem")).read()
    if not via.startswith("CERT "):
        bad += 1
print(reads, bad)
"""


def test_bundle_layout_and_50_rotations_with_reader(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    d.mkdir()
    stop = tmp_path / "stop"
    modes = {"cert.pem": 0o644, "key.pem": 0o640}
    with dirfd(d) as fd:
        assert render.write_bundle(fd, _pair(0), modes=modes, gid=NOGROUP) == ""
        assert os.readlink(d / "cert.pem") == "..data/cert.pem"
        assert os.readlink(d / "..data").startswith("..")
        assert stat.S_IMODE((d / "key.pem").stat().st_mode) == 0o640
        assert (d / "key.pem").stat().st_gid == NOGROUP
        assert render.write_bundle(fd, _pair(0), modes=modes, gid=NOGROUP) is None
        reader = subprocess.Popen([sys.executable, "-c", BUNDLE_READER, str(d), str(stop)],
                                  stdout=subprocess.PIPE, text=True)
        olds: list[str] = []
        try:
            for i in range(1, 51):
                old = render.write_bundle(fd, _pair(i), modes=modes, gid=NOGROUP)
                assert old
                olds.append(old)
                if len(olds) > 2:                   # a short grace: keep two old sets
                    render.remove_version(fd, olds.pop(0))
        finally:
            stop.touch()
            output, _ = reader.communicate(timeout=30)
        reads, bad = map(int, output.split())
        assert reads > 0 and bad == 0
        assert (d / "key.pem").read_text() == "KEY 50\n" * 50
        # start-up cleaning removes every set that ..data does not name
        render.clean_bundle(fd)
    versions = [n for n in os.listdir(d) if n.startswith("..") and n != "..data"]
    assert versions == [os.readlink(d / "..data")]
    assert sorted(n for n in os.listdir(d) if not n.startswith("..")) == ["cert.pem", "key.pem"]


# -- full disk, read-only file system ------------------------------------------------------------


@contextlib.contextmanager
def mounted(*args: str, target: Path) -> Iterator[None]:
    target.mkdir(exist_ok=True)
    result = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here: {result.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_enospc_keeps_old_file_with_a_clear_error(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    with mounted("-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", target=mnt), \
            dirfd(mnt) as fd:
        render.write_file(fd, "f", b"old\n", mode=0o640)
        with pytest.raises(RenderError, match="No space left on device") as info:
            render.write_file(fd, "f", b"x" * 200_000, mode=0o640, where=str(mnt / "f"))
        assert str(mnt / "f") in str(info.value)
        assert (mnt / "f").read_bytes() == b"old\n"
        assert _temps(mnt) == []


def test_erofs_error_mentions_readwritepaths(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("old\n")
    ro = tmp_path / "ro"
    with mounted("--bind", "-o", "ro", str(src), target=ro):
        if os.access(ro, os.W_OK) and not _is_readonly(ro):
            pytest.skip("read-only bind mount not effective here")
        with dirfd(ro) as fd, pytest.raises(RenderError, match="ReadWritePaths="):
            render.write_file(fd, "f", b"new\n", where=str(ro / "f"))
        assert (ro / "f").read_text() == "old\n"


def _is_readonly(path: Path) -> bool:
    try:
        fd = os.open(path / ".probe", os.O_CREAT | os.O_WRONLY, 0o600)
    except OSError as exc:
        return exc.errno == errno.EROFS
    os.close(fd)
    os.unlink(path / ".probe")
    return False
