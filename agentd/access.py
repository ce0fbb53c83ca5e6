"""Who is asking, and what may they read.

``Peer`` is the identity of the process at the other end of a Unix socket, taken once per
connection: pid, uid and gid from ``SO_PEERCRED`` (the kernel vouches for them), supplementary
groups from ``/proc/PID/status``, and the pid's start time from ``/proc/PID/stat`` so that a later
``still_same_process()`` can tell whether the pid now names another process (pid reuse).

``grants(policies, peer)`` is the pure allow/deny decision: deny by default; within one rule every
listed attribute must match (a list matches when any element does); a peer's grants are the union
of the ``allow`` globs of every rule that matches it.
"""

from __future__ import annotations

import fnmatch
import grp
import os
import pwd
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from agentd.config import PolicyConfig

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()
    start_time: int | None = None       # clock ticks after boot, field 22 of /proc/PID/stat
    user: str | None = None
    group: str | None = None
    exe: str | None = None
    unit: str | None = None

    @classmethod
    def from_socket(cls, sock: socket.socket) -> Peer:
        """Identify the process connected to ``sock`` (an AF_UNIX stream socket).

        Raises OSError if the kernel gives no credentials.
        """
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(raw)
        return cls.from_ids(pid, uid, gid)

    @classmethod
    def from_ids(cls, pid: int, uid: int, gid: int) -> Peer:
        return cls(
            pid=pid,
            uid=uid,
            gid=gid,
            groups=frozenset(_supplementary_groups(pid)) | {gid},
            start_time=process_start_time(pid),
            user=_user_name(uid),
            group=_group_name(gid),
            exe=_exe(pid),
        )

    def still_same_process(self) -> bool:
        """True while ``pid`` still names the process identified at accept.

        False when the process is gone or its pid was reused by another process.
        """
        if self.start_time is None:
            return False
        return process_start_time(self.pid) == self.start_time


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks, or None if there is no such process.

    Parsed after the last ')' of /proc/PID/stat: the command name in parentheses may itself
    contain spaces and parentheses.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    # fields[0] is field 3 (state); start time is field 22.
    try:
        return int(fields[22 - 3])
    except (IndexError, ValueError):
        return None


def _supplementary_groups(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


@dataclass(frozen=True)
class Grants:
    """What one peer may do: read names matching ``patterns``; ``admin`` ops if any rule says so."""

    patterns: tuple[str, ...] = ()
    admin: bool = False
    rules: tuple[str, ...] = ()         # names of the matching rules, for the audit and status

    def may_read(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def readable(self, names: Iterable[str]) -> list[str]:
        return sorted(n for n in names if self.may_read(n))


def rule_matches(rule: PolicyConfig, peer: Peer) -> bool:
    """Every attribute the rule lists must match; a list matches when any element does."""
    checks: list[bool] = []
    if rule.uids:
        checks.append(peer.uid in rule.uids)
    if rule.gids:
        checks.append(bool(peer.groups.intersection(rule.gids)) or peer.gid in rule.gids)
    if rule.exe:
        checks.append(peer.exe is not None and peer.exe in rule.exe)
    if rule.units:
        checks.append(peer.unit is not None and peer.unit in rule.units)
    # A rule with no selector matches nobody: deny by default.
    return bool(checks) and all(checks)


def grants(policies: Iterable[PolicyConfig], peer: Peer) -> Grants:
    patterns: list[str] = []
    admin = False
    names: list[str] = []
    for rule in policies:
        if rule_matches(rule, peer):
            patterns.extend(rule.allow)
            admin = admin or rule.admin
            names.append(rule.name)
    return Grants(patterns=tuple(dict.fromkeys(patterns)), admin=admin, rules=tuple(names))
