"""Issue 13, items 4 and 9: attacks on peer identity, each run as another uid (nobody).

- 4a: a policy naming only a program grants every uid that can run it: ``policy_problems``.
- 4b: executables are compared by (device, inode) as the agent sees them, not by the text of
  ``/proc/PID/exe`` (``unshare -Urm`` + a bind mount make any program show any path).
- 4c: a process that connects and then execs a granted program is not answered as that program.
- 9: without ``SO_PEERPIDFD``, a pid that names another process (reused, or a zombie) is caught
  through the ``/proc/PID`` directory fd: start time, state, and effective uid/gid against
  ``SO_PEERCRED``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import agentd
from agentd.access import (
    ExeHasher,
    ExePaths,
    FileId,
    Peer,
    grants,
    pidfd_supported,
    rule_matches,
)
from agentd.config import PROGRAM_ONLY_MESSAGE, PolicyConfig, PolicyProblem, policy_problems
from tests.agentfixture import NOBODY, running_agent, seed, socket_dir, write_config
from tests.openbao import DevServer
from tests.test_identity import (
    CLIENT,
    SYSTEM_PYTHON,
    ask,
    fake_process,
    needs_system_python,
    reuse_pid,
    run_client_as_nobody,
)

needs_pidfd = pytest.mark.skipif(not pidfd_supported(), reason="kernel has no SO_PEERPIDFD")
BOTH_PATHS = pytest.mark.parametrize(
    "use_pidfd", [pytest.param(True, marks=needs_pidfd), False], ids=["pidfd", "no-pidfd"]
)
SLEEP = Path(shutil.which("sleep") or "/bin/sleep")
V2 = "0::/system.slice/acc.service\n"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A 0755 directory: nobody may run (not write) what is in it."""
    path = socket_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path)


def as_nobody(argv: list[str], **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, user=NOBODY, group=NOBODY, extra_groups=[],  # type: ignore[call-overload, no-any-return]
                            text=True, **kw)


def stop(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


def wait_for_exe(pid: int, path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while os.readlink(f"/proc/{pid}/exe") != str(path):
        assert time.monotonic() < deadline, "the attacker did not exec"
        time.sleep(0.002)


@contextlib.contextmanager
def listening(directory: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = directory / "s"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    path.chmod(0o777)
    listener.listen()
    with listener:
        yield listener, path


# --- 4a: a program alone names nobody ----------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "problems"),
    [
        (PolicyConfig(name="r", allow=("db",), exe=("/usr/bin/app",)),
         [PolicyProblem(("exe",), PROGRAM_ONLY_MESSAGE)]),
        (PolicyConfig(name="r", allow=("db",), exe_sha256=("a" * 64,)),
         [PolicyProblem(("exe_sha256",), PROGRAM_ONLY_MESSAGE)]),
        (PolicyConfig(name="r", allow=("db",), exe=("/usr/bin/app",), exe_sha256=("a" * 64,)),
         [PolicyProblem(("exe",), PROGRAM_ONLY_MESSAGE)]),
        (PolicyConfig(name="r", allow=("db",), exe=("/usr/bin/app",), uids=(1000,)), []),
        (PolicyConfig(name="r", allow=("db",), exe=("/usr/bin/app",), gids=(50,)), []),
        (PolicyConfig(name="r", allow=("db",), exe=("/usr/bin/app",), uids=(0,),
                      users=("root",)), []),
        (PolicyConfig(name="r", allow=("db",), exe_sha256=("a" * 64,), groups=("adm",),
                      gids=(4,)), []),
        # only systemd (root) puts processes into a system unit's cgroup
        (PolicyConfig(name="r", allow=("db",), exe=("/usr/bin/app",), units=("a.service",)),
         []),
        (PolicyConfig(name="r", allow=("db",), uids=(1000,)), []),
    ],
)
def test_policy_problems_refuse_a_rule_that_names_only_a_program(
    rule: PolicyConfig, problems: list[PolicyProblem]
) -> None:
    assert policy_problems(rule) == problems


def test_the_message_says_why() -> None:
    assert PROGRAM_ONLY_MESSAGE == (
        "name a uid, user, gid or group too: exe alone can be run by any user")


def test_a_program_only_rule_matches_no_process_even_unvalidated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    me = socket.socketpair()
    with me[0], me[1]:
        peer = Peer.from_socket(me[0])
    try:
        exe_only = PolicyConfig(name="exe-only", allow=("db",), exe=(str(peer.exe),))
        with caplog.at_level(logging.WARNING, logger="agentd.access"):
            assert not rule_matches(exe_only, peer)
            assert not rule_matches(exe_only, peer)
        assert [r.getMessage() for r in caplog.records].count(
            f"policy 'exe-only' names only exe/exe_sha256 and matches no process: "
            f"{PROGRAM_ONLY_MESSAGE}") == 1
        with_uid = PolicyConfig(name="ok", allow=("db",), exe=(str(peer.exe),), uids=(peer.uid,))
        assert rule_matches(with_uid, peer)
    finally:
        peer.close()


# --- 4b: files, not path text ------------------------------------------------------------------


def running(path: Path) -> subprocess.Popen[bytes]:
    child = subprocess.Popen([str(path), "60"])
    wait_for_exe(child.pid, path)
    return child


def test_exe_paths_compare_files_not_text(tmp_path: Path) -> None:
    granted = tmp_path / "granted"
    shutil.copy2(SLEEP, granted)
    copy = tmp_path / "copy"                 # same bytes, another file
    shutil.copy2(SLEEP, copy)
    hardlink = tmp_path / "hardlink"         # the same file under another name
    os.link(granted, hardlink)
    symlink = tmp_path / "symlink"           # a policy path that is a symlink: its target counts
    symlink.symlink_to(granted)
    children = {name: running(path) for name, path in
                [("granted", granted), ("copy", copy), ("hardlink", hardlink)]}
    paths = ExePaths()
    try:
        peers = {name: Peer.from_ids(c.pid, 0, 0) for name, c in children.items()}
        assert peers["granted"].exe_id == FileId.of(granted.stat())
        assert paths.runs_any([str(granted)], peers["granted"])
        assert paths.runs_any([str(granted)], peers["hardlink"])
        assert not paths.runs_any([str(granted)], peers["copy"])
        assert paths.runs_any([str(symlink)], peers["granted"])
        # The text of /proc/PID/exe does not matter, only the file it resolves to.
        forged = Peer(pid=1, uid=0, gid=0, exe=str(granted), exe_id=FileId.of(copy.stat()))
        assert not paths.runs_any([str(granted)], forged)
    finally:
        for c in children.values():
            c.kill()
            c.wait()
        for p in peers.values():
            p.close()


def test_an_upgraded_binary_keeps_matching_its_running_processes(tmp_path: Path) -> None:
    granted = tmp_path / "app"
    shutil.copy2(SLEEP, granted)
    rule = PolicyConfig(name="app", allow=("db",), uids=(0,), exe=(str(granted),))
    paths = ExePaths()
    paths.prime([rule])
    old = running(granted)
    moved_away = None
    try:
        old_peer = Peer.from_ids(old.pid, 0, 0)
        # An upgrade: a new file renamed over the path; the old one is deleted.
        new_file = tmp_path / "app.new"
        new_file.write_bytes(SLEEP.read_bytes() + b"\0")
        new_file.chmod(0o755)
        new_file.rename(granted)
        old_after = Peer.from_ids(old.pid, 0, 0)
        assert old_after.exe_deleted and old_after.exe == str(granted)
        assert grants([rule], old_after, exe_paths=paths).may_read("db")
        new = running(granted)
        new_peer = Peer.from_ids(new.pid, 0, 0)
        assert grants([rule], new_peer, exe_paths=paths).may_read("db")
        # A file the path once named but that still exists elsewhere (not deleted) is no longer
        # what the path names.
        keep = tmp_path / "still-here"
        os.link(granted, keep)
        newer = tmp_path / "app.newer"
        shutil.copy2(SLEEP, newer)
        newer.rename(granted)
        moved_away = Peer.from_ids(new.pid, 0, 0)
        assert not moved_away.exe_deleted
        assert not grants([rule], moved_away, exe_paths=paths).may_read("db")
        new.kill()
        new.wait()
        for p in (old_peer, old_after, new_peer):
            p.close()
    finally:
        old.kill()
        old.wait()
        if moved_away is not None:
            moved_away.close()


def test_a_missing_policy_path_matches_nothing_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    me = socket.socketpair()
    with me[0], me[1]:
        peer = Peer.from_socket(me[0])
    missing = str(tmp_path / "not-installed")
    paths = ExePaths()
    try:
        with caplog.at_level(logging.WARNING, logger="agentd.access"):
            assert not paths.runs_any([missing], peer)
            assert not paths.runs_any([missing], peer)
        assert len([r for r in caplog.records if "cannot be resolved" in r.getMessage()]) == 1
    finally:
        peer.close()


@needs_system_python
async def test_a_bind_mount_over_the_granted_path_in_a_user_namespace_is_refused(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], shared_dir: Path
) -> None:
    """As nobody: ``unshare -Urm``, bind-mount the system python over the granted copy's path
    and run it: ``/proc/PID/exe`` shows the granted path, but it is another file."""
    probe = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", "mount --bind /bin/true /bin/false"],
        user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"unshare -Urm as nobody does not work here: {probe.stderr[:200]!r}")
    granted = shared_dir / "granted-python"
    shutil.copy2(SYSTEM_PYTHON, granted)
    seeded = seed(bao)
    sock = socket_dir() / "agentd.sock"
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=sock, extra=f"""
[[policy]]
name = "by-path"
uids = [{NOBODY}]
exe = ["{granted}"]
allow = ["api"]
""")
    async with running_agent(cfg) as ra:
        with trio.fail_after(60):
            real = await run_client_as_nobody(granted, sock)
            forged = await trio.run_process(
                ["unshare", "-Urm", "sh", "-c", 'mount --bind "$1" "$2" && shift && exec "$@"',
                 "sh", str(SYSTEM_PYTHON), str(granted), "-I", "-c", CLIENT, str(sock)],
                capture_stdout=True, capture_stderr=True, check=False,
                user=NOBODY, group=NOBODY, extra_groups=[],
            )
        assert real == {"db": "ok", "api": "ok", "other": "forbidden"}
        assert forged.returncode == 0, forged.stderr.decode()
        # The file is the system python, not the granted copy, whatever path it shows.
        assert json.loads(forged.stdout) == {"db": "ok", "api": "forbidden", "other": "forbidden"}
        lines = [json.loads(line) for line in ra.audit_text().splitlines()]
        forged_pid = next(line["pid"] for line in reversed(lines) if line.get("name") == "api")
        assert {(line.get("exe"), line["decision"]) for line in lines
                if line.get("pid") == forged_pid and line.get("name") == "api"} == {
            (str(granted), "deny")}


# --- 4c: connect, then exec the granted program ------------------------------------------------

EXEC_AFTER_CONNECT = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
print("connected", flush=True)
sys.stdin.readline()
os.execv(sys.argv[2], [sys.argv[2], "60"])
"""


@needs_system_python
@BOTH_PATHS
def test_a_process_that_execs_a_granted_program_after_accept_is_not_that_program(
    shared_dir: Path, use_pidfd: bool
) -> None:
    granted = shared_dir / "granted-sleep"
    shutil.copy2(SLEEP, granted)
    rule = PolicyConfig(name="sleep", allow=("db",), uids=(NOBODY,), exe=(str(granted),))
    with listening(shared_dir) as (listener, path):
        attacker = as_nobody([str(SYSTEM_PYTHON), "-I", "-c", EXEC_AFTER_CONNECT, str(path),
                              str(granted)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert attacker.stdin is not None and attacker.stdout is not None
        try:
            assert attacker.stdout.readline() == "connected\n"
            conn, _ = listener.accept()
            with conn:
                peer = Peer.from_socket(conn, use_pidfd=use_pidfd)
                try:
                    assert (peer.pid, peer.uid) == (attacker.pid, NOBODY)
                    assert peer.exe == str(SYSTEM_PYTHON)
                    assert not rule_matches(rule, peer)
                    assert peer.still_same_process()
                    attacker.stdin.write("exec\n")
                    attacker.stdin.flush()
                    wait_for_exe(attacker.pid, granted)
                    # Same pid, same start time, same uid: but another program now.
                    assert not peer.still_same_process()
                    # Nor does the digest taken after accept describe the new program.
                    assert ExeHasher().digest(peer) is None
                finally:
                    peer.close()
                # The residual (docs/security.md): identity read only after the exec cannot
                # tell it from a process that ran the granted program from the start.
                late = Peer.from_socket(conn, use_pidfd=use_pidfd)
                try:
                    assert rule_matches(rule, late) and late.still_same_process()
                finally:
                    late.close()
        finally:
            stop(attacker)


# The connecting process forks a sibling that keeps the connection, then execs the granted
# program; the sibling asks once the exec is done. Standard library only.
EXEC_AND_ASK = r"""
import os, socket, struct, sys, time
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
parent = os.getpid()
if os.fork() == 0:
    deadline = time.monotonic() + 10
    while os.readlink(f"/proc/{parent}/exe") != sys.argv[2]:
        if time.monotonic() > deadline:
            print("no-exec", flush=True)
            os._exit(1)
        time.sleep(0.002)
    body = b"\x84\xa1v\x01\xa2id\x01\xa2op\xa3get\xa4name\xa5other"
    s.sendall(struct.pack(">I", len(body)) + body)
    data = b""
    try:
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    if not data:
        print("closed", flush=True)
    elif b"\xa2ok\xc3" in data:
        print("ok", flush=True)
    else:
        print("refused", flush=True)
    os._exit(0)
print("connected", flush=True)
sys.stdin.readline()
os.execv(sys.argv[2], [sys.argv[2], "60"])
"""


@needs_system_python
@BOTH_PATHS
async def test_exec_of_a_hash_granted_program_after_accept_gets_no_answer(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], shared_dir: Path,
    use_pidfd: bool,
) -> None:
    """The hash is read after accept (off the trio thread): an exec in between used to make
    the connection count as the granted program's."""
    granted = shared_dir / "granted-sleep"
    shutil.copy2(SLEEP, granted)
    digest = hashlib.sha256(granted.read_bytes()).hexdigest()
    seeded = seed(bao)
    sock = socket_dir() / "agentd.sock"
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=sock, extra=f"""
[[policy]]
name = "by-hash"
uids = [{NOBODY}]
exe_sha256 = ["{digest}"]
allow = ["other"]
""")
    attacker: subprocess.Popen[str] | None = None

    def identify(conn: socket.socket) -> Peer:
        peer = Peer.from_socket(conn, use_pidfd=use_pidfd)
        if attacker is not None and peer.pid == attacker.pid:
            # agentd is slow between accept and hashing: the attacker execs right then.
            assert attacker.stdin is not None
            attacker.stdin.write("exec\n")
            attacker.stdin.flush()
            wait_for_exe(attacker.pid, granted)
        return peer

    def configure(agent: agentd.daemon.Agent) -> None:
        agent.server.identify = identify

    async with running_agent(cfg, configure=configure) as ra:
        attacker = as_nobody([str(SYSTEM_PYTHON), "-I", "-c", EXEC_AND_ASK, str(sock),
                              str(granted)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert attacker.stdout is not None
            with trio.fail_after(30):
                first = await trio.to_thread.run_sync(attacker.stdout.readline)
                answer = await trio.to_thread.run_sync(attacker.stdout.readline)
            assert first == "connected\n"
            assert answer == "closed\n"
            assert ra.agent.server.statistics().pid_reused == 1
        finally:
            stop(attacker)


# --- 9: pid reuse and zombies without SO_PEERPIDFD ---------------------------------------------

HANDOVER = """
import socket, sys
chan = socket.socket(fileno=int(sys.argv[2]))
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
socket.send_fds(chan, [b"x"], [s.fileno()])
"""


@needs_system_python
@BOTH_PATHS
def test_a_pid_reused_before_accept_by_another_uid_is_not_the_peer(
    shared_dir: Path, use_pidfd: bool
) -> None:
    """nobody connects, hands the connection over and exits; a root process in group 4 gets
    its pid before the agent reads /proc. The groups (and exe, unit) read then were that
    process's, under nobody's SO_PEERCRED."""
    group = 4
    rule = PolicyConfig(name="adm", allow=("db",), gids=(group,))
    with listening(shared_dir) as (listener, path):
        mine, theirs = socket.socketpair()
        with mine, theirs:
            child = as_nobody([str(SYSTEM_PYTHON), "-I", "-c", HANDOVER, str(path),
                               str(theirs.fileno())], pass_fds=[theirs.fileno()])
            _, fds, _, _ = socket.recv_fds(mine, 1, 1)
            child.wait()
        handed = socket.socket(fileno=fds[0])
        conn, _ = listener.accept()
        recycled = None
        with handed, conn:
            for _ in range(5):
                recycled = reuse_pid_as(child.pid, group)
                if recycled is not None:
                    break
            if recycled is None:
                pytest.skip("could not get the pid reused (ns_last_pid) on this machine")
            try:
                peer = Peer.from_socket(conn, use_pidfd=use_pidfd)
                try:
                    assert (peer.pid, peer.uid) == (child.pid, NOBODY)
                    assert group not in peer.groups
                    assert peer.exe is None and peer.start_time is None
                    assert not rule_matches(rule, peer)
                    assert not peer.still_same_process()
                finally:
                    peer.close()
            finally:
                recycled.kill()
                recycled.wait()


def handed_over_by_nobody(path: Path) -> tuple[socket.socket, int]:
    """A connection to ``path`` made by a process of nobody's that has exited since; its pid."""
    mine, theirs = socket.socketpair()
    with mine, theirs:
        child = as_nobody([str(SYSTEM_PYTHON), "-I", "-c", HANDOVER, str(path),
                           str(theirs.fileno())], pass_fds=[theirs.fileno()])
        _, fds, _, _ = socket.recv_fds(mine, 1, 1)
        child.wait()
    return socket.socket(fileno=fds[0]), child.pid


@needs_system_python
async def test_agent_without_pidfd_does_not_answer_a_connection_whose_pid_was_reused_first(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path]
) -> None:
    """The attack of item 9, end to end: nobody connects, passes the connection on and exits;
    a root process gets the pid before agentd reads /proc. The start time then read is the new
    process's, so comparing start times alone answered the connection (nobody may read db)."""
    seeded = seed(bao)
    sock = socket_dir() / "agentd.sock"
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=sock)
    recycled: list[subprocess.Popen[bytes]] = []

    def identify(conn: socket.socket) -> Peer:
        first = Peer.from_socket(conn, use_pidfd=False)
        first.close()
        if first.pid != os.getpid():
            deadline = time.monotonic() + 10
            while Path(f"/proc/{first.pid}").exists():     # until the connector is reaped
                assert time.monotonic() < deadline
                time.sleep(0.002)
            new = reuse_pid(first.pid)
            if new is not None:
                recycled.append(new)
        return Peer.from_socket(conn, use_pidfd=False)

    def configure(agent: agentd.daemon.Agent) -> None:
        agent.server.identify = identify

    async with running_agent(cfg, configure=configure) as ra:
        try:
            with trio.fail_after(30):
                conn, pid = await trio.to_thread.run_sync(handed_over_by_nobody, sock)
                answer = await trio.to_thread.run_sync(ask, conn, sock)
            if not recycled:
                pytest.skip("could not get the pid reused (ns_last_pid) on this machine")
            assert recycled[0].pid == pid
            assert not isinstance(answer, str), "answered as the process that got the pid"
            assert "closed the connection" in str(answer)
            assert ra.agent.server.statistics().pid_reused == 1
        finally:
            for p in recycled:
                p.kill()
                p.wait()


def reuse_pid_as(pid: int, group: int) -> subprocess.Popen[bytes] | None:
    """Like tests.test_identity's ``reuse_pid``: a root ``sleep`` that also has ``group``."""
    last = Path("/proc/sys/kernel/ns_last_pid")
    for _ in range(200):
        try:
            last.write_text(str(pid - 1))
        except OSError:
            return None
        child = subprocess.Popen(["sleep", "60"], extra_groups=[group])
        if child.pid == pid:
            return child
        child.kill()
        child.wait()
    return None


@BOTH_PATHS
def test_an_exited_but_unreaped_peer_is_not_the_same_process(
    shared_dir: Path, use_pidfd: bool
) -> None:
    """A zombie keeps its pid and start time (the old start-time check said "same")."""
    with listening(shared_dir) as (listener, path):
        child = subprocess.Popen(
            ["python3", "-c", "import socket, sys; s = socket.socket(socket.AF_UNIX); "
             "s.connect(sys.argv[1]); sys.stdin.read()", str(path)], stdin=subprocess.PIPE)
        conn, _ = listener.accept()
        with conn:
            peer = Peer.from_socket(conn, use_pidfd=use_pidfd)
            try:
                assert peer.still_same_process()
                assert child.stdin is not None
                child.stdin.close()
                os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)   # exited, not reaped
                assert Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] == "Z"
                assert not peer.still_same_process()
            finally:
                peer.close()
                child.wait()


def test_uid_and_gid_compared_with_the_kernels_in_a_fake_proc_root(tmp_path: Path) -> None:
    fake_process(tmp_path, 9, cgroup=V2, start_time=100, uid=1000, gid=1000)
    p = Peer.from_ids(9, 1000, 1000, proc=tmp_path)
    try:
        assert p.still_same_process()
        # The same start time (a reuse within one clock tick), another uid: not the peer.
        fake_process(tmp_path, 9, cgroup=V2, start_time=100, uid=0, gid=1000)
        assert not p.still_same_process()
        fake_process(tmp_path, 9, cgroup=V2, start_time=100, uid=1000, gid=0)
        assert not p.still_same_process()
        fake_process(tmp_path, 9, cgroup=V2, start_time=100, uid=1000, gid=1000, state="Z")
        assert not p.still_same_process()
        fake_process(tmp_path, 9, cgroup=V2, start_time=100, uid=1000, gid=1000)
        assert p.still_same_process()
        (tmp_path / "9" / "status").unlink()      # unreadable: not confirmed, not the same
        assert not p.still_same_process()
    finally:
        p.close()
    # At accept: SO_PEERCRED says 1000, /proc/PID says 0: the pid names someone else; nothing
    # of that process (groups, exe, unit) is taken.
    fake_process(tmp_path, 10, cgroup=V2, uid=0, gid=0)
    q = Peer.from_ids(10, 1000, 1000, proc=tmp_path)
    assert (q.groups, q.exe, q.unit, q.procfd) == (frozenset({1000}), None, None, None)
    assert not q.still_same_process()
    assert not grants([PolicyConfig(name="u", allow=("db",), units=("acc.service",))],
                      q).may_read("db")


@BOTH_PATHS
def test_the_proc_dir_fd_is_held_until_close_and_moves_with_the_digest(use_pidfd: bool) -> None:
    a, b = socket.socketpair()
    with a, b:
        peer = Peer.from_socket(a, use_pidfd=use_pidfd)
    assert peer.procfd is not None and (peer.pidfd is not None) is use_pidfd
    procfd = peer.procfd
    assert os.readlink(f"/proc/self/fd/{procfd}") == f"/proc/{os.getpid()}"
    copy = peer.with_exe_sha256(ExeHasher().digest(peer))
    assert copy.exe_sha256 is not None
    assert (peer.procfd, peer.pidfd, copy.procfd) == (None, None, procfd)
    assert not peer.still_same_process() and copy.still_same_process()
    copy.close()
    copy.close()
    with pytest.raises(OSError):
        os.fstat(procfd)
