"""Richer peer identity: exe (and its sha256), systemd unit, pid reuse (pidfd and start time).

Real processes, real sockets, a real cgroup where this machine lets us make one; a fake proc root
(tmp_path) for layouts this machine does not have.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

import agentd
from agentd.access import (
    ExeHasher,
    Peer,
    grants,
    pidfd_supported,
    process_start_time,
    read_exe,
    unit_from_cgroup_file,
    unit_from_cgroup_path,
)
from agentd.client import Client
from agentd.config import PolicyConfig
from agentd.errors import ClientError
from tests.agentfixture import NOBODY, running_agent, seed, socket_dir, write_config
from tests.openbao import DevServer

SYSTEM_PYTHON = Path("/usr/bin/python3.11")
needs_system_python = pytest.mark.skipif(
    not SYSTEM_PYTHON.is_file(), reason="needs Debian's /usr/bin/python3.11"
)
needs_pidfd = pytest.mark.skipif(not pidfd_supported(), reason="kernel has no SO_PEERPIDFD")


# --- cgroup parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "unit", "user_unit"),
    [
        ("/system.slice/nginx.service", "nginx.service", None),
        ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service", None),
        ("/system.slice/docker.service/some/delegated/group", "docker.service", None),
        ("/init.scope", "init.scope", None),
        ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope", None),
        # A user's own units live inside user@UID.service: they are that system unit's, and the
        # name inside only tells which user unit.
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service",
         "user@1000.service", "nginx.service"),
        ("/user.slice/user-1000.slice/user@1000.service/init.scope",
         "user@1000.service", "init.scope"),
        ("/", None, None),
        ("/system.slice", None, None),
        ("/machine/qemu", None, None),
        # systemd escapes cgroup names that clash with kernel files with a leading underscore.
        ("/system.slice/_cpu.service", "cpu.service", None),
    ],
)
def test_unit_from_cgroup_path(path: str, unit: str | None, user_unit: str | None) -> None:
    assert unit_from_cgroup_path(path) == (unit, user_unit)


V2_FILE = "0::/system.slice/acc.service\n"
V1_FILE = """\
12:pids:/system.slice/acc.service
11:cpu,cpuacct:/system.slice/acc.service
4:memory:/system.slice/acc.service
1:name=systemd:/system.slice/acc.service
"""
HYBRID_FILE = """\
9:name=systemd:/system.slice/acc.service
4:memory:/
0::/system.slice/acc.service
"""
# In a hybrid layout systemd tracks units in the name=systemd hierarchy: that one wins.
HYBRID_DIFFERENT = """\
1:name=systemd:/system.slice/real.service
0::/system.slice/other.service
"""


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        (V2_FILE, "acc.service"),
        (V1_FILE, "acc.service"),
        (HYBRID_FILE, "acc.service"),
        (HYBRID_DIFFERENT, "real.service"),
        ("4:memory:/system.slice/acc.service\n", None),     # no systemd hierarchy at all
        ("garbage\n\n::\n", None),
    ],
)
def test_unit_from_cgroup_file_v1_v2_hybrid(text: str, unit: str | None) -> None:
    assert unit_from_cgroup_file(text)[0] == unit


# --- a fake proc root --------------------------------------------------------------------------


def fake_process(
    proc: Path, pid: int, *, cgroup: str, start_time: int = 4242, exe: str = "/usr/bin/app",
    uid: int = 1000, gid: int = 1000, state: str = "S",
) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    fields = [state] + ["0"] * 18 + [str(start_time)] + ["0"] * 10
    (d / "stat").write_text(f"{pid} (my (odd) app) " + " ".join(fields) + "\n")
    (d / "status").write_text(f"Name:\tapp\nState:\t{state} (fake)\n"
                              f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
                              f"Gid:\t{gid}\t{gid}\t{gid}\t{gid}\nGroups:\t4 24 27\n")
    (d / "cgroup").write_text(cgroup)
    with contextlib.suppress(FileNotFoundError):
        (d / "exe").unlink()
    (d / "exe").symlink_to(exe)


@pytest.mark.parametrize("text", [V1_FILE, V2_FILE], ids=["cgroup-v1", "cgroup-v2"])
def test_fake_proc_root_resolves_the_unit(tmp_path: Path, text: str) -> None:
    fake_process(tmp_path, 123, cgroup=text)
    p = Peer.from_ids(123, 1000, 1000, proc=tmp_path)
    assert p.unit == "acc.service"
    assert p.user_unit is None
    assert p.exe == "/usr/bin/app"
    assert p.start_time == 4242
    assert p.groups == {4, 24, 27, 1000}
    rule = PolicyConfig(name="r", allow=("db",), units=("acc.service",))
    assert grants([rule], p).may_read("db")


def test_a_user_unit_never_matches_the_system_unit_of_that_name(tmp_path: Path) -> None:
    fake_process(tmp_path, 77, cgroup="0::/user.slice/user-1000.slice/user@1000.service/"
                                      "app.slice/acc.service\n")
    p = Peer.from_ids(77, 1000, 1000, proc=tmp_path)
    assert (p.unit, p.user_unit) == ("user@1000.service", "acc.service")
    rule = PolicyConfig(name="r", allow=("db",), units=("acc.service",))
    assert not grants([rule], p).may_read("db")
    whole_user = PolicyConfig(name="u", allow=("db",), units=("user@1000.service",))
    assert grants([whole_user], p).may_read("db")


def test_start_time_mismatch_in_a_fake_proc_root(tmp_path: Path) -> None:
    fake_process(tmp_path, 9, cgroup=V2_FILE, start_time=100, uid=0, gid=0)
    p = Peer.from_ids(9, 0, 0, proc=tmp_path)
    try:
        assert p.still_same_process()
        fake_process(tmp_path, 9, cgroup=V2_FILE, start_time=101, uid=0, gid=0)  # someone else
        assert not p.still_same_process()
        assert process_start_time(9, proc=tmp_path) == 101
    finally:
        p.close()


# --- a real transient cgroup -------------------------------------------------------------------


def _cgroup_roots() -> list[tuple[str, Path]]:
    roots = []
    if Path("/sys/fs/cgroup/cgroup.procs").exists() and not Path("/sys/fs/cgroup/systemd").exists():
        roots.append(("v2", Path("/sys/fs/cgroup")))
    if Path("/sys/fs/cgroup/systemd/cgroup.procs").exists():
        roots.append(("v1", Path("/sys/fs/cgroup/systemd")))
    if Path("/sys/fs/cgroup/unified/cgroup.procs").exists():
        roots.append(("v2", Path("/sys/fs/cgroup/unified")))
    return roots


@contextlib.contextmanager
def process_in_cgroup(root: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    group = root / name
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup under {root}: {exc}")
    child = subprocess.Popen(["sleep", "60"])
    try:
        try:
            (group / "cgroup.procs").write_text(str(child.pid))
        except OSError as exc:
            pytest.skip(f"cannot move a process into {group}: {exc}")
        yield child
    finally:
        child.kill()
        child.wait()
        for _ in range(100):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.01)   # the killed child leaves the cgroup asynchronously


@pytest.mark.parametrize("kind,root", _cgroup_roots() or [pytest.param(
    "none", Path("/nonexistent"), marks=pytest.mark.skip(reason="no writable cgroup hierarchy"))])
def test_a_process_in_a_real_transient_cgroup_resolves_to_its_unit(kind: str, root: Path) -> None:
    unit = f"test-{uuid.uuid4().hex[:8]}.service"
    with process_in_cgroup(root, unit) as child:
        text = Path(f"/proc/{child.pid}/cgroup").read_text()
        if kind == "v1":
            assert f"name=systemd:/{unit}" in text
            assert Peer.from_ids(child.pid, 0, 0).unit == unit
        else:
            line = next(line for line in text.splitlines() if line.startswith("0::"))
            assert line == f"0::/{unit}"
            # This is what a machine without the v1 systemd hierarchy sees.
            assert unit_from_cgroup_file(line + "\n") == (unit, None)
            if "name=systemd" not in text:
                assert Peer.from_ids(child.pid, 0, 0).unit == unit


# --- the executable ----------------------------------------------------------------------------


def test_a_deleted_executable_keeps_its_path_and_is_marked(tmp_path: Path) -> None:
    binary = tmp_path / "sleeper"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", binary)
    child = subprocess.Popen([str(binary), "60"])
    try:
        assert read_exe(child.pid) == (str(binary), False)
        binary.unlink()      # what an upgrade does: the file is replaced, the process runs on
        assert os.readlink(f"/proc/{child.pid}/exe") == f"{binary} (deleted)"
        p = Peer.from_ids(child.pid, 0, 0)
        assert (p.exe, p.exe_deleted) == (str(binary), True)
        # Hashing reads the running file through /proc/PID/exe, deleted or not.
        assert ExeHasher().digest(p) == hashlib.sha256(
            Path(shutil.which("sleep") or "/bin/sleep").read_bytes()).hexdigest()
    finally:
        child.kill()
        child.wait()


def test_a_file_really_named_deleted_keeps_its_name(tmp_path: Path) -> None:
    binary = tmp_path / "app (deleted)"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", binary)
    child = subprocess.Popen([str(binary), "60"])
    try:
        assert read_exe(child.pid) == (str(binary), False)
    finally:
        child.kill()
        child.wait()


def test_exe_hasher_caches_by_file_identity_and_limits_size(tmp_path: Path) -> None:
    sleep = Path(shutil.which("sleep") or "/bin/sleep")
    expected = hashlib.sha256(sleep.read_bytes()).hexdigest()
    copy = tmp_path / "sleep-copy"
    shutil.copy2(sleep, copy)
    hasher = ExeHasher()
    children = [subprocess.Popen([str(path), "60"]) for path in (sleep, sleep, copy)]
    try:
        peers = [Peer.from_ids(c.pid, 0, 0) for c in children]
        assert [hasher.digest(p) for p in peers] == [expected] * 3
        assert hasher.hashed == 2        # two files (same content), read once each
        small = ExeHasher(max_bytes=1024)
        assert small.digest(peers[0]) is None
    finally:
        for c in children:
            c.kill()
            c.wait()
    gone = Peer(pid=children[0].pid, uid=0, gid=0)
    assert hasher.digest(gone) is None


# --- pidfd and start time, on the real socket --------------------------------------------------


@needs_pidfd
def test_peer_from_socket_holds_a_pidfd_that_notices_exit() -> None:
    path = Path(socket_dir()) / "s"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    child = subprocess.Popen([sys.executable, "-c", CONNECT_AND_WAIT, str(path)],
                             stdin=subprocess.PIPE)
    conn, _ = listener.accept()
    with listener, conn:
        p = Peer.from_socket(conn)
        q = Peer.from_socket(conn, use_pidfd=False)
        try:
            assert p.pidfd is not None and q.pidfd is None
            assert p.pid == child.pid
            assert p.still_same_process() and q.still_same_process()
            assert child.stdin is not None
            child.stdin.close()
            child.wait()
            assert not p.still_same_process()
            assert not q.still_same_process()
        finally:
            p.close()
            p.close()      # idempotent
            q.close()


CONNECT_AND_WAIT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
sys.stdin.read()
"""

# Connect, hand the connected socket to the parent (SCM_RIGHTS), exit: the connection lives on
# in the parent, while SO_PEERCRED still names this (dead) process.
HANDOVER = """
import socket, sys
chan = socket.socket(fileno=int(sys.argv[2]))
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
socket.send_fds(chan, [b"x"], [s.fileno()])
"""


def handed_over_connection(path: Path) -> tuple[socket.socket, int]:
    """A connection to ``path`` made by a process that has exited since; and its pid."""
    mine, theirs = socket.socketpair()
    with mine, theirs:
        child = subprocess.Popen(
            [sys.executable, "-c", HANDOVER, str(path), str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
        )
        _, fds, _, _ = socket.recv_fds(mine, 1, 1)
        child.wait()
    return socket.socket(fileno=fds[0]), child.pid


def reuse_pid(pid: int, attempts: int = 200) -> subprocess.Popen[bytes] | None:
    """Start a process that gets ``pid`` (root only: /proc/sys/kernel/ns_last_pid), or None."""
    last = Path("/proc/sys/kernel/ns_last_pid")
    for _ in range(attempts):
        try:
            last.write_text(str(pid - 1))
        except OSError:
            return None
        child = subprocess.Popen(["sleep", "60"])
        if child.pid == pid:
            return child
        child.kill()
        child.wait()
    return None


def ask(sock: socket.socket, path: Path) -> object:
    sock.settimeout(10)
    client = Client(sock, str(path))
    try:
        return client.get("db", "username")["data"]
    except ClientError as exc:
        return exc
    finally:
        client.close()


@pytest.mark.parametrize(
    "use_pidfd", [pytest.param(True, marks=needs_pidfd), False], ids=["pidfd", "start-time"]
)
async def test_a_dead_or_recycled_peer_gets_no_answer(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], use_pidfd: bool
) -> None:
    seeded = seed(bao)
    sock = socket_dir() / "agentd.sock"
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=sock)

    def configure(agent: agentd.daemon.Agent) -> None:
        agent.server.identify = partial(Peer.from_socket, use_pidfd=use_pidfd)

    async with running_agent(cfg, configure=configure) as ra:
        with trio.fail_after(30):
            # A live peer is answered.
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(str(sock))
            assert await trio.to_thread.run_sync(ask, conn, sock) == "app"

            # The process that connected has exited: no answer, the connection is closed.
            conn, pid = await trio.to_thread.run_sync(handed_over_connection, sock)
            answer = await trio.to_thread.run_sync(ask, conn, sock)
            assert isinstance(answer, ClientError)
            assert "closed the connection" in str(answer)

            # Its pid now names another process: still no answer.
            conn, pid = await trio.to_thread.run_sync(handed_over_connection, sock)
            recycled = await trio.to_thread.run_sync(reuse_pid, pid)
            if recycled is None:
                conn.close()
                pytest.skip("could not get the pid reused (ns_last_pid) on this machine")
            try:
                assert Path(f"/proc/{pid}").exists()
                answer = await trio.to_thread.run_sync(ask, conn, sock)
                assert isinstance(answer, ClientError)
            finally:
                recycled.kill()
                recycled.wait()
            assert ra.agent.server.statistics().pid_reused == 2
            assert ra.audit_text().count('"pid_reused"') >= 1


# --- exe and exe_sha256 policies, end to end ---------------------------------------------------

# Standard library only (the interpreter under test need not see the repository or the venv):
# hand-packed msgpack requests, and the reply's "ok" flag or error code picked out of its bytes.
CLIENT = r"""
import json, socket, struct, sys
def request(name):
    n = name.encode()
    return (b"\x84\xa1v\x01\xa2id\x01\xa2op\xa3get\xa4name" + bytes([0xa0 | len(n)]) + n)
out = {}
for name in ("db", "api", "other"):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sys.argv[1])
    body = request(name)
    s.sendall(struct.pack(">I", len(body)) + body)
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    if b"\xa2ok\xc3" in data:
        out[name] = "ok"
    else:
        out[name] = next((c for c in ("forbidden", "not_found", "unavailable", "rate_limited")
                          if c.encode() in data), "other")
print(json.dumps(out))
"""


async def run_client_as_nobody(interpreter: Path, sock: Path) -> dict[str, str]:
    result = await trio.run_process(
        [str(interpreter), "-I", "-c", CLIENT, str(sock)],
        capture_stdout=True, capture_stderr=True, check=False,
        user=NOBODY, group=NOBODY, extra_groups=[],
    )
    assert result.returncode == 0, result.stderr.decode()
    answer: dict[str, str] = json.loads(result.stdout)
    return answer


@needs_system_python
async def test_exe_and_exe_sha256_policies_tell_interpreters_apart(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path]
) -> None:
    seeded = seed(bao)
    sock = socket_dir() / "agentd.sock"
    digest = hashlib.sha256(SYSTEM_PYTHON.read_bytes()).hexdigest()
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=sock, extra=f"""
[[policy]]
name = "by-path"
uids = [{NOBODY}]
exe = ["{SYSTEM_PYTHON}"]
allow = ["api"]

[[policy]]
name = "by-hash"
uids = [{NOBODY}]
exe_sha256 = ["{digest.upper()}"]
allow = ["other"]
""")
    elsewhere = socket_dir()            # 0755: nobody may run what is in it
    copy = elsewhere / "python3.11"
    shutil.copy2(SYSTEM_PYTHON, copy)
    changed = elsewhere / "python3.11-patched"
    changed.write_bytes(SYSTEM_PYTHON.read_bytes() + b"\0")
    changed.chmod(0o755)
    try:
        async with running_agent(cfg) as ra:
            with trio.fail_after(60):
                real = await run_client_as_nobody(SYSTEM_PYTHON, sock)
                copied = await run_client_as_nobody(copy, sock)
                patched = await run_client_as_nobody(changed, sock)
            # Same uid everywhere (nobody may read db); the exe decides the rest.
            assert real == {"db": "ok", "api": "ok", "other": "ok"}
            assert copied == {"db": "ok", "api": "forbidden", "other": "ok"}   # same bytes
            assert patched == {"db": "ok", "api": "forbidden", "other": "forbidden"}
            assert ra.agent.server.exe_hasher.hashed == 3    # three files, each read once
            assert str(copy) in ra.audit_text()
    finally:
        shutil.rmtree(elsewhere)
