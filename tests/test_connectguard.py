"""The connect guard (decision 13): a storming uid's connects are refused by the kernel.

Everything here runs the real program in the real kernel (root's cgroup BPF, Linux 6.7+):
connects are made by forked children as other uids. On an older kernel, or without cgroup v2,
these tests skip; where both are there, the guard must load.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from agentd.client import AsyncClient, Client
from agentd.connectguard import (
    CAP_BPF,
    CAP_NET_ADMIN,
    CAP_PERFMON,
    CAP_SETPCAP,
    CAP_SYS_ADMIN,
    Blocks,
    ConnectGuard,
    cgroup2_root,
    open_guard,
    read_kernel_types,
)
from agentd.errors import ClientError, GuardUnavailable
from tests.agentfixture import (
    NOBODY,
    RunningAgent,
    Seeded,
    running_agent,
    socket_dir,
    write_config,
)
from tests.openbao import DevServer
from tests.peers import run_as, run_as_blocking
from tests.support import until

OTHER_UID = 4242
DROPPED = (1 << CAP_BPF | 1 << CAP_PERFMON | 1 << CAP_NET_ADMIN | 1 << CAP_SYS_ADMIN
           | 1 << CAP_SETPCAP)


def _kernel() -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(found[1]), int(found[2])) if found else (0, 0)


def _cgroup2() -> bool:
    try:
        cgroup2_root()
    except GuardUnavailable:
        return False
    return True


pytestmark = pytest.mark.skipif(
    _kernel() < (6, 7) or os.geteuid() != 0 or not _cgroup2(),
    reason="the connect guard needs Linux 6.7, cgroup v2 and root",
)


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
def sockets() -> Iterator[tuple[Path, Path]]:
    """A listening socket whose path is 8 * k + 7 bytes long (so the program compares it in
    chunks of 8, 4, 2 and 1) and one beside it whose name differs in the last byte only."""
    base = socket_dir()
    name = "agentd.sock"
    while len(f"{base}/{name}") % 8 != 7:
        name = "x" + name
    ours, neighbour = base / name, base / (name[:-1] + "l")
    with listening(ours), listening(neighbour):
        yield ours, neighbour


@pytest.fixture
def guard(sockets: tuple[Path, Path]) -> Iterator[ConnectGuard]:
    loaded = ConnectGuard.load([sockets[0]])
    try:
        yield loaded
    finally:
        loaded.close()


def test_the_kernel_refuses_a_blocked_uid_on_the_agent_paths_only(
    sockets: tuple[Path, Path], guard: ConnectGuard
) -> None:
    ours, neighbour = sockets
    guard.block(NOBODY)
    assert connect_as(NOBODY, ours) == errno.EPERM
    # the private sockets share the prefix: refused before the path is even looked up
    assert connect_as(NOBODY, f"{ours}.d/uid-{NOBODY}") == errno.EPERM
    assert connect_as(NOBODY, neighbour) == 0           # one byte off: not agentd's
    assert connect_as(OTHER_UID, ours) == 0             # not blocked
    assert connect_errno(ours) == 0                     # root
    assert guard.refused() == {NOBODY: 2}


def test_unblocking_or_closing_lets_the_uid_connect_again(
    sockets: tuple[Path, Path], guard: ConnectGuard
) -> None:
    ours, _ = sockets
    guard.block(NOBODY)
    guard.block(NOBODY)                                 # blocking twice keeps one entry
    assert connect_as(NOBODY, ours) == errno.EPERM
    guard.unblock(NOBODY)
    guard.unblock(NOBODY)                               # and unblocking twice is no error
    assert guard.refused() == {}
    assert connect_as(NOBODY, ours) == 0
    guard.block(NOBODY)
    guard.close()
    assert connect_as(NOBODY, ours) == 0
    guard.close()                                       # idempotent


def test_a_path_that_names_the_socket_another_way_passes(
    sockets: tuple[Path, Path], guard: ConnectGuard
) -> None:
    """What the guard is not (docs/security.md): it matches the path the client passes, so a
    relative one reaches the socket, and the agent's own refusals are what is left."""
    ours, _ = sockets
    guard.block(NOBODY)

    def relative() -> int:
        os.chdir(ours.parent)
        return connect_errno(ours.name)

    result = run_as_blocking(NOBODY, NOBODY, relative)
    assert result == {"ok": True, "value": 0}


def test_the_program_goes_with_the_process_that_loaded_it(sockets: tuple[Path, Path]) -> None:
    """Nothing is pinned: a SIGKILLed agent leaves no block behind."""
    ours, _ = sockets
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_fd)
            loaded = ConnectGuard.load([ours])
            loaded.block(NOBODY)
            os.write(write_fd, b"1")
            signal.pause()
        finally:
            os._exit(1)
    os.close(write_fd)
    try:
        assert os.read(read_fd, 1) == b"1"
        assert connect_as(NOBODY, ours) == errno.EPERM
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(read_fd)
    assert connect_as(NOBODY, ours) == 0


def test_blocks_start_at_the_threshold_and_lift_after_a_quiet_hold(
    sockets: tuple[Path, Path], guard: ConnectGuard
) -> None:
    ours, _ = sockets
    blocks = Blocks(guard, threshold=50, hold=10.0)
    for n in range(49):
        blocks.refused(NOBODY, 100.0 + n / 100)
        blocks.refused(0, 100.0 + n / 100)              # root: never blocked
    blocks.refused(NOBODY, 101.5)                       # a new second: the count starts again
    assert blocks.blocked == 0
    assert connect_as(NOBODY, ours) == 0
    for n in range(50):
        blocks.refused(NOBODY, 102.0 + n / 100)
        blocks.refused(0, 102.0 + n / 100)
    assert blocks.blocked == 1
    assert connect_as(NOBODY, ours) == errno.EPERM

    def storm() -> dict[str, int]:
        return dict(Counter(errno.errorcode.get(connect_errno(ours), "ok") for _ in range(30)))

    # 31 refused by the kernel since the block: over 20 a second keeps it past its first hold
    assert run_as_blocking(NOBODY, NOBODY, storm) == {"ok": True, "value": {"EPERM": 30}}
    blocks.check(now=103.0, allowed=20)
    assert (blocks.blocked, blocks.kernel_refused) == (1, 31)
    blocks.check(now=112.9, allowed=20)                 # quiet, but not for 10 s yet
    assert blocks.blocked == 1
    blocks.check(now=113.0, allowed=20)
    assert blocks.blocked == 0
    assert connect_as(NOBODY, ours) == 0
    assert blocks.kernel_refused == 31


def test_without_a_guard_blocks_do_nothing() -> None:
    blocks = Blocks(None, threshold=1, hold=1.0)
    for n in range(10):
        blocks.refused(NOBODY, float(n))
    blocks.check(now=20.0, allowed=0)
    assert blocks.blocked == 0


def test_kernel_types_come_from_btf_and_a_file_that_is_not_btf_is_refused(
    tmp_path: Path,
) -> None:
    types = read_kernel_types()
    assert types.uaddrlen > types.uaddr >= 0
    assert len({types.cast_to_kern_ctx, types.rdonly_cast, types.sockaddr_un}) == 3
    (tmp_path / "vmlinux").write_bytes(b"\0" * 64)
    with pytest.raises(GuardUnavailable, match="is not BTF"):
        read_kernel_types(tmp_path / "vmlinux")
    with pytest.raises(GuardUnavailable, match="cannot read the kernel's BTF"):
        read_kernel_types(tmp_path / "missing")


def _in_child(call: Any) -> dict[str, Any]:
    """``call()`` as root in a forked child (``open_guard`` gives up this process's
    capabilities: not the test runner's)."""
    return run_as_blocking(0, 0, call)


def capabilities(pid: int | str = "self") -> dict[str, int]:
    """A process's capability sets (``CapEff``, ``CapPrm``, ``CapBnd``...) as numbers."""
    return {key: int(value, 16) for key, _, value in (
        line.partition(":\t") for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        if key.startswith("Cap")}


def test_open_guard_drops_the_privileges_to_load_it_and_keeps_working(
    sockets: tuple[Path, Path],
) -> None:
    ours, _ = sockets

    def load_drop_block() -> dict[str, Any]:
        guard = open_guard("on", ours)
        assert guard is not None
        guard.block(NOBODY)                 # the map needs no capability
        refused = connect_as(NOBODY, ours)
        try:
            ConnectGuard.load([ours])
            again = "loaded"
        except GuardUnavailable as exc:
            again = str(exc)
        return {"capabilities": capabilities(), "refused": refused, "again": again}

    result = _in_child(load_drop_block)
    assert result["ok"], result
    held = result["value"]["capabilities"]
    for kind in ("CapEff", "CapPrm", "CapBnd"):
        assert held[kind] & DROPPED == 0, kind
        assert held[kind] & 1 << 0, kind                # CAP_CHOWN and the rest stay
    assert result["value"]["refused"] == errno.EPERM
    assert result["value"]["again"] == (
        "cannot create the map: Operation not permitted (loading the connect guard needs "
        "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)")


def test_open_guard_modes(sockets: tuple[Path, Path]) -> None:
    too_long = Path("/" + "x" * 120)

    def modes() -> dict[str, Any]:
        off = open_guard("off", sockets[0])
        auto = open_guard("auto", too_long)
        try:
            open_guard("on", too_long)
            on = "loaded"
        except GuardUnavailable as exc:
            on = str(exc)
        return {"off": off is None, "auto": auto is None, "on": on}

    result = _in_child(modes)
    assert result == {"ok": True, "value": {
        "off": True, "auto": True,
        "on": 'connect_guard = "on", but socket paths must be 1 to 107 bytes'}}


# --- with a running agent --------------------------------------------------------------------


def storm(path: str, *, limit: int = 50_000, enough: int = 200) -> dict[str, int]:
    """Connect and close in a loop until ``enough`` connects were refused with EPERM (at most
    ``limit`` connects); the tally by outcome."""
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
        if tally["EPERM"] >= enough:
            break
    return dict(tally)


def quick_blocks(agent: Any) -> None:
    # a storm a loaded CI runner can make (it accepts far fewer than STORM_REFUSALS a second),
    # and a block that lifts soon
    agent.server.blocks.threshold = 100
    agent.server.blocks.hold = 3.0


@pytest.fixture
async def guarded(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded
) -> AsyncIterator[RunningAgent]:
    sock = socket_dir() / "agentd.sock"
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=sock,
                       agent_extra="connects_per_second_per_uid = 1\nconnect_burst_per_uid = 10")
    loaded = ConnectGuard.load([sock])
    try:
        async with running_agent(cfg, guard=loaded, configure=quick_blocks) as ra:
            yield ra
    finally:
        loaded.close()


async def test_a_storming_uid_is_refused_by_the_kernel_until_it_has_been_quiet(
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
        result = await run_as(NOBODY, NOBODY, lambda: storm(path, enough=3000))
        assert result["ok"], result
        assert result["value"]["EPERM"] == 3000         # without the guard: never EPERM
        stats = server.statistics()
        assert (stats.connect_guard, stats.blocked_uids) == (1, 1)
        # root is never blocked, on either socket; nobody's client says what happened
        for private in (True, False):
            async with AsyncClient.connect(path, private=private) as client:
                got = await client.get("db", "password")
                assert got["data"] == seeded.markers["db"]
        said = await run_as(NOBODY, NOBODY, client_error)
        assert "connect guard" in said["value"], said
        await until(lambda: server.statistics().blocked_uids == 0, "the block lifted")
        assert await run_as(NOBODY, NOBODY, lambda: connect_errno(path)) == {
            "ok": True, "value": 0}
    stats = server.statistics()
    assert stats.kernel_refused_connections >= 3000
    # the agent saw the storm until the block (threshold refusals), and then only what was in
    # its queue already (listen_backlog + 1), never the 3,000 after
    assert stats.refused_connections <= 100 + 1024 + 1
    log = guarded.log.getvalue()
    assert "the kernel refuses this uid's connects" in log
    assert "this uid may connect again" in log
    assert seeded.markers["db"] not in log


# --- the daemon ------------------------------------------------------------------------------


def _status(sock: Path) -> dict[str, Any]:
    with Client.connect(str(sock)) as client:
        return client.status()


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "bounding", "loaded"), [
    ("auto", "", 1), ("off", "", 0),
    ("auto", "-bpf,-sys_admin", 0), ("on", "-bpf,-sys_admin", None),
])
def test_agentd_run_loads_the_guard_as_configured_and_drops_its_privileges(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded,
    mode: str, bounding: str, loaded: int | None,
) -> None:
    sock = socket_dir() / "agentd.sock"
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=sock,
                       agent_extra=f'connect_guard = "{mode}"')
    command = [sys.executable, "-m", "agentd", "run", "-c", str(cfg)]
    if bounding:        # a host where agentd may not load BPF (CAP_BPF not in its bounding set)
        command = ["setpriv", f"--bounding-set={bounding}", "--", *command]
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(command, stderr=err, stdout=subprocess.DEVNULL)
    try:
        if loaded is None:
            assert proc.wait(timeout=30) != 0
            text = stderr.read_text()
            assert text.strip().splitlines()[-1].startswith(
                'agentd: connect_guard = "on", but cannot create the map: Operation not permitted')
            assert "Traceback" not in text
            return
        trio.run(partial_until(proc, sock))
        status = _status(sock)
        assert status["server"]["connect_guard"] == loaded
        held = capabilities(proc.pid)           # whether it loaded the guard or not
        for kind in ("CapEff", "CapPrm", "CapBnd"):
            assert held[kind] & DROPPED == 0, kind
        text = stderr.read_text()
        assert ("connect guard loaded" in text) == (loaded == 1)
        assert ("connect guard not loaded" in text) == (mode == "auto" and loaded == 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        proc.wait(timeout=30)


def partial_until(proc: subprocess.Popen[bytes], sock: Path) -> Any:
    async def ready() -> None:
        with trio.fail_after(30):
            await until(sock.is_socket, "the agent's socket", proc=proc)
            await until(lambda: _answers(sock), "the agent answers", proc=proc)
    return ready


def _answers(sock: Path) -> bool:
    try:
        _status(sock)
    except ClientError:
        return False
    return True
