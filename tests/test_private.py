"""Private sockets (``agentd.private``, decision 13): which ones the policies call for, who can
connect to one (real connects from forked children as other uids), the directory they live in,
and the client's choice of socket."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from agentd import private
from agentd.client import _connect_waiting, private_paths
from agentd.config import PolicyConfig
from agentd.private import Queue, open_private, prepare_directory, wanted
from tests.agentfixture import NOBODY, socket_dir
from tests.peers import run_as_blocking

OTHER = 4242          # a uid and a gid no test user has


def rule(name: str, **selectors: tuple[int, ...]) -> PolicyConfig:
    return PolicyConfig(name=name, allow=("*",), **selectors)


def test_a_socket_for_each_uid_and_for_the_groups_of_rules_that_name_no_uid() -> None:
    policies = [
        rule("a", uids=(1000, 0)),
        rule("b", uids=(1000,), gids=(50,)),     # matches uid 1000 only: its socket serves it
        rule("c", gids=(100, 50)),
        rule("d", uids=(), gids=()),
    ]
    assert wanted(policies) == [Queue("uid", 0), Queue("uid", 1000), Queue("gid", 50),
                                Queue("gid", 100)]


def test_the_number_of_private_sockets_is_bounded() -> None:
    many = [rule(f"r{n}", uids=(n,)) for n in range(private.MAX_PRIVATE_SOCKETS + 10)]
    assert len(wanted(many)) == private.MAX_PRIVATE_SOCKETS


def _connects(path: Path) -> int:
    """0 if a connect to ``path`` works, else its errno."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError as exc:
            return exc.errno or -1
    return 0


@pytest.fixture
def place() -> Path:
    where = socket_dir() / f"q{os.getpid()}-{os.urandom(3).hex()}"
    where.mkdir(mode=0o755)
    return where


@pytest.mark.parametrize("acl", [True, False], ids=["acl", "no-acl-chown"])
def test_only_its_uid_and_root_can_connect_to_a_uid_socket(
    place: Path, acl: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not acl:     # a file system without POSIX ACLs: root gives the socket to the uid
        def no_acls(*_: object, **__: object) -> None:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        monkeypatch.setattr(os, "setxattr", no_acls)
    path = place / "uid-4242"
    with open_private(path, Queue("uid", OTHER), backlog=8):
        assert run_as_blocking(OTHER, OTHER, lambda: _connects(path))["value"] == 0
        assert run_as_blocking(NOBODY, NOBODY, lambda: _connects(path))["value"] == errno.EACCES
        assert run_as_blocking(NOBODY, OTHER, lambda: _connects(path))["value"] == errno.EACCES
        assert _connects(path) == 0                                      # root
        assert os.stat(path).st_mode & 0o007 == 0                        # never world-reachable


@pytest.mark.parametrize("acl", [True, False], ids=["acl", "no-acl-chown"])
def test_only_its_groups_members_can_connect_to_a_gid_socket(
    place: Path, acl: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not acl:
        def no_acls(*_: object, **__: object) -> None:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        monkeypatch.setattr(os, "setxattr", no_acls)
    path = place / "gid-4242"
    with open_private(path, Queue("gid", OTHER), backlog=8):
        member = run_as_blocking(NOBODY, NOBODY, lambda: _connects(path), groups=[OTHER])
        outsider = run_as_blocking(NOBODY, NOBODY, lambda: _connects(path))
        as_primary = run_as_blocking(NOBODY, OTHER, lambda: _connects(path))
    assert member["value"] == 0
    assert as_primary["value"] == 0
    assert outsider["value"] == errno.EACCES


def test_the_directory_is_agentds_and_loses_an_earlier_runs_sockets(place: Path) -> None:
    where = place / "agentd.sock.d"
    where.mkdir()
    where.chmod(0o777)                              # as a careless operator left it
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(where / "uid-7"))
    stale.close()                                   # what a SIGKILLed agent leaves
    (where / "notes").write_text("an operator's file")
    prepare_directory(where)
    assert sorted(os.listdir(where)) == ["notes"]   # only agentd's own names are removed
    assert os.stat(where).st_mode & 0o777 == 0o755


def test_a_directory_of_someone_elses_or_a_symlink_is_refused(place: Path) -> None:
    theirs = place / "theirs.d"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(OSError, match="not a directory of agentd's own"):
        prepare_directory(theirs)
    link = place / "link.d"
    link.symlink_to(place)
    with pytest.raises(OSError) as caught:
        prepare_directory(link)
    assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_the_client_tries_its_uid_then_its_groups_then_the_main_socket(place: Path) -> None:
    main = place / "agentd.sock"
    assert private_paths(str(main)) == []           # no directory: the main socket only
    (place / "agentd.sock.d").mkdir()
    paths = private_paths(str(main))
    assert paths[0] == f"{main}.d/uid-{os.geteuid()}"
    assert f"{main}.d/gid-{os.getegid()}" in paths[1:]


def test_the_client_connects_through_its_private_socket_and_falls_back_to_the_main_one(
    place: Path,
) -> None:
    main_path = place / "agentd.sock"
    with socket.socket(socket.AF_UNIX) as main:
        main.bind(str(main_path))
        main.listen(8)
        (place / "agentd.sock.d").mkdir()
        # a socket another uid's: root may connect to it, but it is not root's, so never tried
        with open_private(place / "agentd.sock.d" / f"uid-{OTHER}", Queue("uid", OTHER),
                          backlog=8):
            with _connect_waiting(str(main_path), 1.0) as sock:
                assert sock.getpeername() == str(main_path)
            # a private socket left by an agent that is gone: refused, so the main one
            stale = socket.socket(socket.AF_UNIX)
            stale.bind(str(place / "agentd.sock.d" / f"uid-{os.geteuid()}"))
            stale.close()
            with _connect_waiting(str(main_path), 1.0) as sock:
                assert sock.getpeername() == str(main_path)
            os.unlink(place / "agentd.sock.d" / f"uid-{os.geteuid()}")
            with open_private(place / "agentd.sock.d" / f"uid-{os.geteuid()}",
                              Queue("uid", os.geteuid()), backlog=8), \
                    _connect_waiting(str(main_path), 1.0) as sock:
                assert sock.getpeername() == f"{main_path}.d/uid-{os.geteuid()}"
