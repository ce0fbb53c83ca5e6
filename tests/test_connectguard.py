"""The connect guard (decision 13): a storming uid is shut out of the socket's directory.

Real directories, real ACLs, real sockets: connects are made by forked children as other uids,
and the kernel's path lookup is what refuses them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from agentd import posixacl
from agentd.client import AsyncClient, Client
from agentd.connectguard import MAX_HOLD, Blocks, DirectoryGuard, open_guard
from agentd.errors import ClientError, GuardUnavailable
from tests.agentfixture import (
    NOBODY,
    RunningAgent,
    Seeded,
    agent_fixture,
    socket_dir,
    write_config,
)
from tests.openbao import DevServer
from tests.peers import run_as, run_as_blocking
from tests.support import until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="other uids' connects need root")

OTHER_UID = 4242


def listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    path.chmod(0o666)
    sock.listen(64)
    return sock


def connect_errno(path: Path | str) -> int:
    """0 if a connect to ``path`` succeeds, else its errno."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        return exc.errno or -1
    finally:
        sock.close()
    return 0


def connect_as(uid: int, path: Path | str) -> int:
    result = run_as_blocking(uid, uid, lambda: connect_errno(path))
    assert result["ok"], result
    return int(result["value"])


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A directory of agentd's with a main socket and a private one in ``<socket>.d``."""
    main = socket_dir() / "agentd.sock"
    private = Path(f"{main}.d")
    private.mkdir(mode=0o755)
    with listening(main), listening(private / f"uid-{NOBODY}"):
        yield main


def test_a_blocked_uid_cannot_reach_any_socket_there_by_any_path(sockets: Path) -> None:
    guard = DirectoryGuard.open(sockets)
    child_reads, parent_writes = os.pipe()
    parent_reads, child_writes = os.pipe()
    child = os.fork()
    if child == 0:
        try:       # inside the directory, with a descriptor of it, before the block
            os.close(parent_writes)
            os.close(parent_reads)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.chdir(sockets.parent)
            held = os.open(sockets.parent, os.O_PATH)
            os.write(child_writes, b"1")
            os.read(child_reads, 1)
            tried = [connect_errno(path) for path in (
                sockets, sockets.name, f"./{sockets.name}", f"/proc/self/cwd/{sockets.name}",
                f"/proc/self/fd/{held}/{sockets.name}", f"{sockets.parent}//{sockets.name}",
                f"{sockets}.d/uid-{NOBODY}")]
            os.write(child_writes, repr(tried).encode())
        except BaseException as exc:
            os.write(child_writes, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(child_reads)
    os.close(child_writes)
    try:
        assert os.read(parent_reads, 1) == b"1"
        guard.block(NOBODY)
        os.write(parent_writes, b"1")
        assert os.read(parent_reads, 4096).decode() == repr([errno.EACCES] * 7)
    finally:
        os.close(parent_writes)
        os.close(parent_reads)
        os.waitpid(child, 0)
    assert connect_as(OTHER_UID, sockets) == 0          # not blocked
    assert connect_errno(sockets) == 0                  # root
    assert guard.blocked == {NOBODY}
    guard.unblock(NOBODY)
    assert connect_as(NOBODY, sockets) == 0
    assert os.listxattr(sockets.parent) == []           # no ACL left while nobody is blocked


def test_blocks_keep_the_directory_mode_and_close_lifts_them_all(sockets: Path) -> None:
    directory = sockets.parent
    guard = DirectoryGuard.open(sockets)
    guard.block(NOBODY)
    guard.block(OTHER_UID)
    guard.block(NOBODY)                                 # once is enough
    assert os.stat(directory).st_mode & 0o777 == 0o755
    assert connect_as(OTHER_UID, sockets) == errno.EACCES
    assert connect_as(OTHER_UID + 1, sockets) == 0      # "other" keeps r-x
    guard.close()
    guard.close()
    assert connect_as(NOBODY, sockets) == 0
    assert connect_as(OTHER_UID, sockets) == 0
    assert os.stat(directory).st_mode & 0o777 == 0o755


def test_opening_lifts_what_a_killed_agent_left(sockets: Path) -> None:
    posixacl.write(sockets.parent, posixacl.from_mode(
        0o755, [(posixacl.USER, posixacl.NONE, NOBODY)]))
    assert connect_as(NOBODY, sockets) == errno.EACCES
    guard = DirectoryGuard.open(sockets)
    assert connect_as(NOBODY, sockets) == 0
    assert guard.blocked == frozenset()


@pytest.mark.parametrize("defect", ["other file", "other owner", "group writable", "symlink"])
def test_a_directory_that_is_not_agentds_alone_is_refused(tmp_path: Path, defect: str) -> None:
    directory = socket_dir()
    main = directory / "agentd.sock"
    if defect == "other file":
        (directory / "notes.txt").write_text("not agentd's")
    elif defect == "other owner":
        os.chown(directory, NOBODY, NOBODY)
    elif defect == "group writable":
        directory.chmod(0o775)
    else:
        link = tmp_path / "link"
        link.symlink_to(directory)
        main = link / "agentd.sock"
    with listening(main), pytest.raises(GuardUnavailable) as caught:
        DirectoryGuard.open(main)
    assert str(main.parent) in str(caught.value)


def test_a_file_system_without_acls_is_refused_at_open(tmp_path: Path) -> None:
    """ramfs takes no ACLs: said at start, not at the first storm."""
    mounted = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(tmp_path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here: {mounted.stderr.strip()}")
    try:
        tmp_path.chmod(0o755)
        with pytest.raises(GuardUnavailable, match="its file system has no ACLs"):
            DirectoryGuard.open(tmp_path / "agentd.sock")
    finally:
        subprocess.run(["umount", str(tmp_path)], check=True)


def test_a_block_checks_the_directory_again(sockets: Path) -> None:
    guard = DirectoryGuard.open(sockets)
    (sockets.parent / "later").write_text("an operator's file")
    with pytest.raises(GuardUnavailable, match="holds more than agentd's sockets"):
        guard.block(NOBODY)
    assert connect_as(NOBODY, sockets) == 0


def test_open_guard_modes(sockets: Path) -> None:
    (sockets.parent / "other").write_text("x")
    assert open_guard("off", sockets) is None
    assert open_guard("auto", sockets) is None
    with pytest.raises(GuardUnavailable, match=r'connect_guard = "on", but .* holds more'):
        open_guard("on", sockets)
    (sockets.parent / "other").unlink()
    guard = open_guard("on", sockets)
    assert guard is not None and guard.directory == sockets.parent


def test_the_credentials_socket_may_share_the_directory(sockets: Path) -> None:
    creds = sockets.parent / "credentials.sock"
    with listening(creds):
        with pytest.raises(GuardUnavailable):
            DirectoryGuard.open(sockets)
        DirectoryGuard.open(sockets, also=[creds, None])


def test_blocks_start_at_the_threshold_and_come_back_longer(sockets: Path) -> None:
    blocks = Blocks(DirectoryGuard.open(sockets), threshold=100, hold=10.0)
    for n in range(99):
        blocks.refused(NOBODY, 100.0 + n / 200)
        blocks.refused(0, 100.0 + n / 200)              # root: never blocked
    blocks.refused(NOBODY, 101.5)                       # a new second: the count starts again
    assert blocks.blocked == 0
    for n in range(100):
        blocks.refused(NOBODY, 102.0 + n / 200)
        blocks.refused(0, 102.0 + n / 200)
    assert (blocks.blocked, blocks.blocks) == (1, 1)
    assert connect_as(NOBODY, sockets) == errno.EACCES
    blocks.lift_due(111.9)                              # blocked at 102.495 for 10 s
    assert blocks.blocked == 1
    blocks.lift_due(112.5)
    assert blocks.blocked == 0
    assert blocks.guarding(122.4) and not blocks.guarding(122.6)    # a hold after the lift
    assert connect_as(NOBODY, sockets) == 0
    # back within a hold of the end: a fiftieth of the evidence blocks it again, for twice as
    # long, then four times
    for start, hold in ((115.0, 20.0), (140.0, 40.0)):
        blocks.refused(NOBODY, start)
        assert blocks.blocked == 0
        blocks.refused(NOBODY, start + 0.01)
        assert blocks.blocked == 1
        blocks.lift_due(start + hold - 0.1)
        assert blocks.blocked == 1
        blocks.lift_due(start + hold + 0.5)
        assert blocks.blocked == 0
    # quiet for long enough: forgotten, so the whole evidence again, and the first hold
    blocks.lift_due(1000.0)
    for n in range(99):
        blocks.refused(NOBODY, 1000.0 + n / 200)
    assert blocks.blocked == 0
    blocks.refused(NOBODY, 1000.5)
    assert blocks.blocked == 1
    blocks.lift_due(1000.5 + 10.0)
    assert (blocks.blocked, blocks.blocks) == (0, 4)
    assert MAX_HOLD >= 40.0


def test_a_hard_link_made_before_the_block_is_the_way_past_it_and_is_logged(
    sockets: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """What the guard cannot stop (docs/security.md): a link to the socket elsewhere on the
    same file system, made while the uid could still reach it. It says so when it blocks."""
    elsewhere = socket_dir() / "link"
    os.link(sockets, elsewhere)
    blocks = Blocks(DirectoryGuard.open(sockets), threshold=1, hold=10.0)
    with caplog.at_level("WARNING", logger="agentd.connectguard"):
        blocks.refused(NOBODY, 1.0)
    assert connect_as(NOBODY, sockets) == errno.EACCES
    assert connect_as(NOBODY, elsewhere) == 0
    assert [r.links for r in caplog.records if "hard links" in r.getMessage()] == [1]


def test_without_a_guard_blocks_do_nothing() -> None:
    blocks = Blocks(None, threshold=1, hold=1.0)
    for n in range(10):
        blocks.refused(NOBODY, float(n))
    blocks.lift_due(20.0)
    assert (blocks.blocked, blocks.blocks) == (0, 0)


# --- with a running agent --------------------------------------------------------------------


def storm(path: str, *, limit: int = 100_000, enough: int = 3000) -> dict[str, int]:
    """Connect and close in a loop until ``enough`` connects were refused with EACCES (at
    most ``limit`` connects); the tally by outcome."""
    tally: Counter[str] = Counter()
    for _ in range(limit):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
            tally["connected"] += 1
        except OSError as exc:
            tally[errno.errorcode.get(exc.errno or 0, "other")] += 1
        finally:
            sock.close()
        if tally["EACCES"] >= enough:
            break
    return dict(tally)


def quick_blocks(agent: Any) -> None:
    # a storm a loaded CI runner can make (it accepts far fewer than STORM_REFUSALS a second),
    # and a block that lifts soon
    agent.server.blocks.threshold = 100
    agent.server.blocks.hold = 3.0


guarded = agent_fixture("connects_per_second_per_uid = 1\nconnect_burst_per_uid = 10",
                        configure=quick_blocks, guard=True)


async def test_a_storming_uid_is_shut_out_until_its_block_ends(
    guarded: RunningAgent, seeded: Seeded
) -> None:
    path = str(guarded.socket)
    server = guarded.agent.server

    def client_error() -> str:
        try:
            with Client.connect(path) as client:
                client.ping()
        except ClientError as exc:
            return str(exc)
        return "connected"

    with trio.fail_after(120):
        result = await run_as(NOBODY, NOBODY, lambda: storm(path))
        assert result["ok"], result
        assert result["value"]["EACCES"] == 3000        # without the guard: never EACCES
        stats = server.statistics()
        assert (stats.connect_guard, stats.blocked_uids, stats.connect_blocks) == (1, 1, 1)
        # root is never blocked, on either socket; nobody's client says what happened
        for private in (True, False):
            async with AsyncClient.connect(path, private=private) as client:
                got = await client.get("db", "password")
                assert got["data"] == seeded.markers["db"]
        said = await run_as(NOBODY, NOBODY, client_error)
        assert "connect guard" in said["value"], said
        await until(lambda: server.statistics().blocked_uids == 0, "the block lifted")
        # let in again, with an empty connect bucket: a storm that resumes is refused from
        # its first connect (and soon blocked again), not admitted a burst's worth first
        before = server.statistics().refused_connections
        assert await run_as(NOBODY, NOBODY, lambda: connect_errno(path)) == {
            "ok": True, "value": 0}
        await until(lambda: server.statistics().refused_connections == before + 1,
                    "the first connect after the block refused")
    # the agent saw the storm until the block (threshold refusals), and then only what was in
    # its queue already (listen_backlog + 1), never the 3,000 after
    assert server.statistics().refused_connections <= 100 + 1024 + 1
    audited = [json.loads(line) for line in guarded.audit_path.read_text().splitlines()
               if '"shut_out"' in line]
    assert [(line["op"], line["uid"]) for line in audited] == [("connect", NOBODY)]
    log = guarded.log.getvalue()
    assert "shut out of agentd's socket directory" in log
    assert "this uid may connect again" in log
    assert seeded.markers["db"] not in log


# --- the daemon ------------------------------------------------------------------------------


def _status(sock: Path) -> dict[str, Any]:
    with Client.connect(str(sock)) as client:
        return client.status()


def _answers(sock: Path) -> bool:
    try:
        _status(sock)
    except ClientError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "crowded", "ready"), [
    ("auto", False, 1), ("off", False, 0), ("auto", True, 0), ("on", True, None)])
def test_agentd_run_sets_the_guard_up_as_configured(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded,
    mode: str, crowded: bool, ready: int | None,
) -> None:
    sock = socket_dir() / "agentd.sock"
    if crowded:             # a directory with more than agentd's sockets in it
        (sock.parent / "notes.txt").write_text("an operator's file")
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=sock,
                       agent_extra=f'connect_guard = "{mode}"')
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "agentd", "run", "-c", str(cfg)],
                                stderr=err, stdout=subprocess.DEVNULL)
    try:
        if ready is None:
            assert proc.wait(timeout=30) == 2
            text = stderr.read_text()
            assert text.strip().splitlines()[-1] == (
                f'agentd: connect_guard = "on", but {sock.parent} holds more than agentd\'s '
                "sockets (notes.txt)")
            assert "Traceback" not in text
            assert not sock.exists()                    # nothing was served
            return

        async def started() -> None:
            with trio.fail_after(30):
                await until(lambda: _answers(sock), "the agent answers", proc=proc)

        trio.run(started)
        assert _status(sock)["server"]["connect_guard"] == ready
        text = stderr.read_text()
        assert ("connect guard ready" in text) == (ready == 1)
        assert ("connect guard off" in text) == (mode == "auto" and ready == 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        proc.wait(timeout=30)
