import os
import socket
import subprocess
import sys

import pytest

from agentd.access import FileId, Peer, grants, process_start_time, rule_matches
from agentd.config import PolicyConfig


def peer(uid: int = 1000, gid: int = 1000, groups: tuple[int, ...] = (), **kw: object) -> Peer:
    return Peer(pid=1, uid=uid, gid=gid, groups=frozenset(groups) | {gid}, **kw)  # type: ignore[arg-type]


def test_peer_from_socketpair_is_this_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        me = Peer.from_socket(a)
    assert (me.pid, me.uid, me.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert me.start_time is not None
    assert me.user == "root"
    assert me.exe == os.path.realpath(sys.executable)
    assert me.still_same_process()


def test_start_time_changes_when_the_pid_names_another_process() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        ghost = Peer.from_ids(child.pid, 0, 0)
        assert ghost.still_same_process()
    finally:
        child.kill()
        child.wait()
    # The pid is gone now; a recycled pid would carry a different start time.
    assert not ghost.still_same_process()
    recycled = Peer(pid=os.getpid(), uid=0, gid=0, start_time=1)
    assert not recycled.still_same_process()


def test_start_time_parsed_after_the_last_parenthesis() -> None:
    # A command name with spaces and ')' must not shift the fields.
    script = (
        "import ctypes, sys, time; ctypes.CDLL(None).prctl(15, b'a) b (c', 0, 0, 0); "
        "print('named', flush=True); time.sleep(30)"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"named\n"
        with open(f"/proc/{child.pid}/stat") as f:
            stat = f.read()
        assert "(a) b (c)" in stat
        expected = int(stat.rsplit(")", 1)[1].split()[19])
        assert process_start_time(child.pid) == expected
        # A naive split on spaces would read a different field.
        assert int(stat.split()[21]) != expected
    finally:
        child.kill()
        child.communicate()


@pytest.mark.parametrize(
    ("rule", "p", "expected"),
    [
        (PolicyConfig(name="r", allow=("db",), uids=(1000,)), peer(), True),
        (PolicyConfig(name="r", allow=("db",), uids=(1001,)), peer(), False),
        # every listed attribute must match
        (PolicyConfig(name="r", allow=("db",), uids=(1000,), gids=(5,)), peer(), False),
        (PolicyConfig(name="r", allow=("db",), uids=(1000,), gids=(5,)), peer(groups=(5,)), True),
        # a list matches when any element does
        (PolicyConfig(name="r", allow=("db",), uids=(7, 1000)), peer(), True),
        # exe compares the file the peer runs with the file the path names, not path text
        (PolicyConfig(name="r", allow=("db",), uids=(1000,), exe=(sys.executable,)),
         peer(exe="/elsewhere", exe_id=FileId.of(os.stat(sys.executable))), True),
        (PolicyConfig(name="r", allow=("db",), uids=(1000,), exe=(sys.executable,)),
         peer(exe=sys.executable), False),
        (PolicyConfig(name="r", allow=("db",), uids=(1000,), exe=(sys.executable,)),
         peer(exe=None), False),
        # a program alone names nobody: any user can run it
        (PolicyConfig(name="r", allow=("db",), exe=(sys.executable,)),
         peer(exe=sys.executable, exe_id=FileId.of(os.stat(sys.executable))), False),
        (PolicyConfig(name="r", allow=("db",), exe_sha256=("0" * 64,)),
         peer(exe_sha256="0" * 64), False),
        (PolicyConfig(name="r", allow=("db",), units=("a.service",)), peer(unit="b.service"),
         False),
        # no selector: matches nobody
        (PolicyConfig(name="r", allow=("db",)), peer(), False),
    ],
)
def test_rule_matching(rule: PolicyConfig, p: Peer, expected: bool) -> None:
    assert rule_matches(rule, p) is expected


def test_grants_add_up_and_deny_by_default() -> None:
    rules = [
        PolicyConfig(name="app", allow=("db", "api-*"), uids=(1000,)),
        PolicyConfig(name="ops", allow=("tls",), gids=(50,), admin=True),
        PolicyConfig(name="other", allow=("*",), uids=(2000,)),
    ]
    g = grants(rules, peer(groups=(50,)))
    assert g.rules == ("app", "ops")
    assert g.admin
    assert g.readable(["db", "api-key", "api", "tls", "x"]) == ["api-key", "db", "tls"]
    nobody = grants(rules, peer(uid=3000, gid=3000))
    assert nobody.readable(["db", "tls"]) == []
    assert not nobody.admin


def test_may_read_matches_exactly_what_fnmatchcase_matches() -> None:
    # may_read runs the patterns as one regular expression: it must agree with fnmatchcase,
    # pattern by pattern, on every name.
    import fnmatch

    from agentd.access import Grants

    patterns = ("db", "api-*", "x?y", "[ab]c", "[!a]z", "lit.*+(x)", "Case", "*/*", "a*b*c",
                "p*q*r")
    names = ["db", "dbx", "xdb", "api-", "api-key", "api", "xzy", "xy", "ac", "bc", "cc", "az",
             "bz", "z", "lit.*+(x)", "lit.a+(x)", "case", "Case", "a/b", "ab", "db\n", "a\nb",
             "api-\n", "", "abc", "aXbYc", "acb", "pqr", "pqqr", "prq"]
    for count in range(len(patterns) + 1):
        g = Grants(patterns=patterns[:count])
        for name in names:
            expected = any(fnmatch.fnmatchcase(name, p) for p in patterns[:count])
            assert g.may_read(name) is expected, (patterns[:count], name)
    assert Grants(patterns=("db",)) == Grants(patterns=("db",))


def test_names_are_looked_up_once_a_minute_not_per_connection() -> None:
    from agentd.access import NAME_TTL, _Names

    asked: list[int] = []
    now = [1000.0]

    def lookup(number: int) -> str:
        asked.append(number)
        if number == 7:
            raise KeyError(number)
        return f"name{number}"

    names = _Names(lookup, clock=lambda: now[0])
    assert [names(0), names(0), names(7), names(7)] == ["name0", "name0", None, None]
    assert asked == [0, 7]                      # unknown ids are remembered too
    now[0] += NAME_TTL + 1
    assert names(0) == "name0" and asked == [0, 7, 0]
