"""The listen queue is ``[agent] listen_backlog`` deep while agentd accepts (decision 13), on a
socket it bound and on one systemd passed, and deep again once agentd exits from an activated
socket (systemd keeps it; clients queue through the restart).

Measured the way a client meets it: with the agent stopped (SIGSTOP), nobody accepts, and a
non-blocking ``connect()`` fails with ``EAGAIN`` once the queue is full. Linux lets an AF_UNIX
queue take ``backlog + 1`` connections.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agentfixture import NOBODY, Seeded, socket_dir, write_config
from tests.openbao import DevServer
from tests.peers import run_as_blocking
from tests.support import wait_until

MOST = 5000       # connects tried before giving up on finding the queue's end


def fill_queue(path: Path, most: int) -> tuple[list[socket.socket], bool]:
    """Non-blocking connects to ``path`` until ``EAGAIN`` or ``most`` of them: the connected
    sockets (the caller closes them), and whether the queue filled."""
    held = []
    for _ in range(most):
        sock = socket.socket(socket.AF_UNIX)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            return held, True
        held.append(sock)
    return held, False


def queue_room(path: Path) -> int:
    """How many connections ``path``'s listen queue takes before ``EAGAIN`` (all closed)."""
    held, _ = fill_queue(path, MOST)
    for sock in held:
        sock.close()
    return len(held)


def pings(path: Path) -> bool:
    from agentd.client import Client
    from agentd.errors import ClientError
    try:
        with Client.connect(path, timeout=2) as client:
            client.ping()
        return True
    except ClientError:
        return False


@contextlib.contextmanager
def agent_process(cfg: Path, *, listener: socket.socket | None = None
                  ) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m agentd run``; with ``listener``, passed as systemd would (fd 3)."""
    env = dict(os.environ)
    pass_fds: tuple[int, ...] = ()
    argv = [sys.executable, "-m", "agentd", "run", "-c", str(cfg)]
    if listener is not None:
        fd = listener.fileno()
        pass_fds = (fd,)
        env["LISTEN_FDS"] = "1"
        # the socket as fd 3 and LISTEN_PID the agent's own pid: a launcher sets both and execs
        launch = (f"import os, sys; os.dup2({fd}, 3); os.close({fd}); "
                  "os.environ['LISTEN_PID'] = str(os.getpid()); "
                  "os.execv(sys.argv[1], sys.argv[1:])")
        argv = [sys.executable, "-c", launch, *argv]
    log = (cfg.parent / "agent.log").open("wb")
    proc = subprocess.Popen(argv, env=env, pass_fds=pass_fds, stdout=log, stderr=log)
    log.close()
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def config(tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded,
           sock: Path, extra: str) -> Path:
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=sock, agent_extra=extra)
    cfg.chmod(0o600)
    return cfg


@pytest.mark.parametrize("backlog", [8, None])
def test_the_listen_queue_is_as_deep_as_configured(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded,
    backlog: int | None,
) -> None:
    sock = socket_dir() / "agentd.sock"
    extra = "" if backlog is None else f"listen_backlog = {backlog}"
    with agent_process(config(tmp_path, bao, approle_files, seeded, sock, extra)) as proc:
        wait_until(lambda: pings(sock), timeout=30, what="agentd serving")
        proc.send_signal(signal.SIGSTOP)
        room = queue_room(sock)
        proc.send_signal(signal.SIGCONT)
    assert room in ((backlog or 1024), (backlog or 1024) + 1)


def test_an_activated_socket_gets_the_configured_queue_and_a_deep_one_after_exit(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded,
) -> None:
    sock = socket_dir() / "agentd.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.listen(4096)                  # systemd's default Backlog=
    try:
        cfg = config(tmp_path, bao, approle_files, seeded, sock, "listen_backlog = 16")
        with agent_process(cfg, listener=listener) as proc:
            wait_until(lambda: pings(sock), timeout=30, what="agentd serving")
            proc.send_signal(signal.SIGSTOP)
            while_serving = queue_room(sock)
            proc.send_signal(signal.SIGCONT)
        assert proc.returncode == 0
        after_exit = queue_room(sock)          # nobody accepts: the queue fills to its depth
        assert while_serving in (16, 17)
        assert after_exit > 1024
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            sock.unlink()


# --- private sockets: a queue no other uid can fill (decision 13) ----------------------------

OTHER = 4242          # a uid no policy names


def _through(sock_path: Path) -> str:
    """Where agentd's client connects for the calling uid, after a ping on that connection."""
    from agentd.client import Client
    with Client.connect(sock_path, timeout=5) as client:
        client.ping()
        return str(client._sock.getpeername())


def test_a_full_main_queue_leaves_a_granted_uid_its_own(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded,
) -> None:
    """With the main socket's queue full (what a connect storm makes it) and nobody accepting,
    root's client still connects at once, through root's private socket, and is answered as
    soon as the agent runs; on the main socket it would wait and fail."""
    from agentd.client import Client
    sock = socket_dir() / "agentd.sock"
    with agent_process(config(tmp_path, bao, approle_files, seeded, sock,
                              "listen_backlog = 8")) as proc:
        wait_until(lambda: pings(sock), timeout=30, what="agentd serving")
        assert sorted(os.listdir(f"{sock}.d")) == ["uid-0", f"uid-{NOBODY}"]
        proc.send_signal(signal.SIGSTOP)
        held, filled = fill_queue(sock, MOST)
        try:
            assert filled
            client = Client.connect(sock, timeout=10)      # does not wait: its queue is free
            with client:
                assert client._sock.getpeername() == f"{sock}.d/uid-0"
                proc.send_signal(signal.SIGCONT)
                client.ping()
        finally:
            for s in held:
                s.close()


def test_each_uid_gets_its_own_socket_and_others_the_main_one(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded,
) -> None:
    sock = socket_dir() / "agentd.sock"
    with agent_process(config(tmp_path, bao, approle_files, seeded, sock, "")):
        wait_until(lambda: pings(sock), timeout=30, what="agentd serving")
        nobody = run_as_blocking(NOBODY, NOBODY, lambda: _through(sock))
        other = run_as_blocking(OTHER, OTHER, lambda: _through(sock))
        root = _through(sock)
    assert nobody == {"ok": True, "value": f"{sock}.d/uid-{NOBODY}"}
    assert other == {"ok": True, "value": str(sock)}
    assert root == f"{sock}.d/uid-0"
    assert not Path(f"{sock}.d").exists()           # removed on the way out


def test_a_reload_opens_and_closes_private_sockets(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded,
) -> None:
    sock = socket_dir() / "agentd.sock"
    cfg = config(tmp_path, bao, approle_files, seeded, sock, "")
    with agent_process(cfg) as proc:
        wait_until(lambda: pings(sock), timeout=30, what="agentd serving")
        text = cfg.read_text()
        cfg.write_text(text.replace(f"uids = [{NOBODY}]", f"uids = [{OTHER}]"))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: sorted(os.listdir(f"{sock}.d")) == ["uid-0", f"uid-{OTHER}"],
                   timeout=30, what="the private sockets follow the policies")
        other = run_as_blocking(OTHER, OTHER, lambda: _through(sock))
        nobody = run_as_blocking(NOBODY, NOBODY, lambda: _through(sock))
    assert other == {"ok": True, "value": f"{sock}.d/uid-{OTHER}"}
    assert nobody == {"ok": True, "value": str(sock)}


def test_private_sockets_can_be_turned_off(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded,
) -> None:
    sock = socket_dir() / "agentd.sock"
    with agent_process(config(tmp_path, bao, approle_files, seeded, sock,
                              "private_sockets = false")):
        wait_until(lambda: pings(sock), timeout=30, what="agentd serving")
        assert not Path(f"{sock}.d").exists()
        assert _through(sock) == str(sock)


@pytest.mark.parametrize("what", ["file", "theirs"])
def test_a_private_socket_directory_that_is_not_agentds_stops_the_start(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded,
    what: str,
) -> None:
    from agentd import config as config_mod
    from agentd.daemon import preflight
    from agentd.errors import ConfigError
    sock = socket_dir() / "agentd.sock"
    place = Path(f"{sock}.d")
    if what == "file":
        place.write_text("")
    else:
        place.mkdir()
        os.chown(place, NOBODY, NOBODY)
    try:
        loaded = config_mod.load(config(tmp_path, bao, approle_files, seeded, sock, ""))
        with pytest.raises(ConfigError) as caught:
            preflight(loaded, activated=False)
        assert any(p.startswith(f"agent.private_sockets: {place} exists and is not a "
                                "directory of agentd's own") for p in caught.value.problems)
    finally:
        if place.is_dir():
            place.rmdir()
        else:
            place.unlink()


def test_a_group_named_without_uids_gets_a_socket_its_members_use(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded,
) -> None:
    from agentd.client import Client
    group = OTHER + 1
    sock = socket_dir() / "agentd.sock"
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=sock,
                       extra=f'[[policy]]\nname = "members"\ngids = [{group}]\nallow = ["db"]\n')
    cfg.chmod(0o600)

    def read_db() -> tuple[str, str]:
        with Client.connect(sock, timeout=5) as client:
            value = client.get("db", "password")["data"]
            return str(client._sock.getpeername()), value

    with agent_process(cfg):
        wait_until(lambda: pings(sock), timeout=30, what="agentd serving")
        assert f"gid-{group}" in os.listdir(f"{sock}.d")
        member = run_as_blocking(OTHER, OTHER, read_db, groups=[group])
        outsider = run_as_blocking(OTHER, OTHER, lambda: _through(sock))
    assert member == {"ok": True, "value": [f"{sock}.d/gid-{group}", seeded.markers["db"]]}
    assert outsider == {"ok": True, "value": str(sock)}
