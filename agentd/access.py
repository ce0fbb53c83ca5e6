"""Who is asking, and what may they read (decision 7).

``Peer`` is the identity of the process at the other end of a Unix socket, taken once per
connection: pid, uid and gid from ``SO_PEERCRED`` (the kernel vouches for them); supplementary
groups from ``/proc/PID/status``; the executable from the ``/proc/PID/exe`` link (an upgrade that
replaced the file leaves a ``" (deleted)"`` suffix: the path is kept without it and ``exe_deleted``
set); the systemd unit from ``/proc/PID/cgroup`` (cgroup v1 ``name=systemd`` hierarchy, else the v2
``0::`` line); and, so that a later ``still_same_process()`` can tell whether the pid now names
another process, a pidfd (``SO_PEERPIDFD``, Linux >= 6.5) or else the start time from
``/proc/PID/stat``.

The executable's sha256 is not taken at accept: ``ExeHasher.digest(peer)`` reads the file through
``/proc/PID/exe`` (so it hashes what is running, even if the path now holds another file), up to
a size limit, and caches the digest by (device, inode, ctime, size). The server calls it off the
trio thread, and only when some policy lists ``exe_sha256``.

Units: a process inside a user's ``user@UID.service`` tree has ``unit = "user@UID.service"`` (the
system unit that contains it) and its unit within the user manager in ``user_unit``. Policies
match ``units`` against ``unit`` only, so a user's own ``foo.service`` never passes for the system
``foo.service``.

Every /proc read goes through ``proc`` (default ``/proc``) so tests can inject a fake proc root.

``grants(policies, peer)`` is the pure allow/deny decision: deny by default; within one rule every
listed attribute must match (a list matches when any element does); a peer's grants are the union
of the ``allow`` globs of every rule that matches it.

What this does not protect against: a process of the *same* uid can ptrace a granted process or
be handed its connection; exe and unit rules distinguish processes of different uids (see
docs/security.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import grp
import hashlib
import os
import pwd
import re
import signal
import socket
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agentd.config import UNIT_SUFFIXES, PolicyConfig

PROC = Path("/proc")
SO_PEERPIDFD = 77            # Linux >= 6.5; Python 3.11's socket module has no constant
MAX_EXE_BYTES = 512 * 1024 * 1024
_DELETED = " (deleted)"
_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    """One connected process, identified at accept. Close it with ``close()`` (its pidfd)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()
    start_time: int | None = None       # clock ticks after boot, field 22 of /proc/PID/stat
    user: str | None = None
    group: str | None = None
    exe: str | None = None              # without a " (deleted)" suffix
    unit: str | None = None             # the system unit (user@UID.service for user units)
    exe_deleted: bool = False
    user_unit: str | None = None        # the unit inside a user manager, if any
    exe_sha256: str | None = None       # filled in by ExeHasher when a policy needs it
    proc: Path = field(default=PROC, repr=False, compare=False)
    pidfd: int | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_socket(
        cls, sock: socket.socket, *, proc: Path = PROC, use_pidfd: bool = True
    ) -> Peer:
        """Identify the process connected to ``sock`` (an AF_UNIX stream socket).

        With ``use_pidfd`` (and a kernel that has ``SO_PEERPIDFD``) the peer holds a pidfd,
        closed by ``close()``; otherwise the start time is what ``still_same_process`` checks.

        Raises OSError if the kernel gives no credentials.
        """
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(raw)
        pidfd = _peer_pidfd(sock) if use_pidfd else None
        try:
            return cls.from_ids(pid, uid, gid, proc=proc, pidfd=pidfd)
        except BaseException:
            if pidfd is not None:
                os.close(pidfd)
            raise

    @classmethod
    def from_ids(
        cls, pid: int, uid: int, gid: int, *, proc: Path = PROC, pidfd: int | None = None
    ) -> Peer:
        exe, deleted = read_exe(pid, proc=proc)
        unit, user_unit = read_unit(pid, proc=proc)
        return cls(
            pid=pid,
            uid=uid,
            gid=gid,
            groups=frozenset(_supplementary_groups(pid, proc)) | {gid},
            start_time=process_start_time(pid, proc=proc),
            user=_user_name(uid),
            group=_group_name(gid),
            exe=exe,
            exe_deleted=deleted,
            unit=unit,
            user_unit=user_unit,
            proc=proc,
            pidfd=pidfd,
        )

    def still_same_process(self) -> bool:
        """True while ``pid`` still names the process identified at accept.

        False when the process is gone or its pid was reused by another process. With a pidfd
        the kernel answers (signal 0 to the pidfd); else the start time is compared.
        """
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True         # it exists; we may not signal it (agent not root)
            except OSError:
                return False
            return True
        if self.start_time is None:
            return False
        return process_start_time(self.pid, proc=self.proc) == self.start_time

    def close(self) -> None:
        """Close the pidfd, if any. Idempotent."""
        fd = self.pidfd
        if fd is not None:
            object.__setattr__(self, "pidfd", None)
            with contextlib.suppress(OSError):
                os.close(fd)

    def with_exe_sha256(self, digest: str | None) -> Peer:
        """A copy carrying ``digest``. The pidfd moves to the copy: close the copy, not this."""
        copy = dataclasses.replace(self, exe_sha256=digest)
        object.__setattr__(self, "pidfd", None)
        return copy


def _peer_pidfd(sock: socket.socket) -> int | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
    except OSError:
        return None             # ENOPROTOOPT: kernel older than 6.5
    fd = int.from_bytes(raw, "little", signed=True)
    return fd if fd >= 0 else None


def pidfd_supported() -> bool:
    """True if this kernel gives pidfds for socket peers (``SO_PEERPIDFD``)."""
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        fd = _peer_pidfd(a)
    if fd is None:
        return False
    os.close(fd)
    return True


def process_start_time(pid: int, *, proc: Path = PROC) -> int | None:
    """Start time of ``pid`` in clock ticks, or None if there is no such process.

    Parsed after the last ')' of /proc/PID/stat: the command name in parentheses may itself
    contain spaces and parentheses.
    """
    try:
        with open(proc / str(pid) / "stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    fields = stat_line[stat_line.rfind(b")") + 2 :].split()
    # fields[0] is field 3 (state); start time is field 22.
    try:
        return int(fields[22 - 3])
    except (IndexError, ValueError):
        return None


def read_exe(pid: int, *, proc: Path = PROC) -> tuple[str | None, bool]:
    """The executable's path and whether it was deleted (replaced by an upgrade).

    The kernel appends ``" (deleted)"`` to the link of an unlinked file; the suffix is removed
    only when the running file really has no links left, so a file literally named
    ``"x (deleted)"`` keeps its name.
    """
    link = proc / str(pid) / "exe"
    try:
        target = os.readlink(link)
    except OSError:
        return None, False
    if target.endswith(_DELETED):
        try:
            deleted = os.stat(link).st_nlink == 0
        except OSError:
            deleted = False
        if deleted:
            return target[: -len(_DELETED)], True
    return target, False


def read_unit(pid: int, *, proc: Path = PROC) -> tuple[str | None, str | None]:
    """``(system unit, unit inside a user manager)`` from /proc/PID/cgroup; None if none."""
    try:
        text = (proc / str(pid) / "cgroup").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, None
    return unit_from_cgroup_file(text)


def unit_from_cgroup_file(text: str) -> tuple[str | None, str | None]:
    """Parse the text of /proc/PID/cgroup as systemd does.

    With a cgroup v1 ``name=systemd`` hierarchy (legacy and hybrid layouts) its path counts,
    else the cgroup v2 line ``0::PATH`` (unified layout).
    """
    v1: str | None = None
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if "name=systemd" in controllers.split(","):
            v1 = path
        elif hierarchy == "0" and controllers == "":
            v2 = path
    chosen = v1 if v1 is not None else v2
    if chosen is None:
        return None, None
    return unit_from_cgroup_path(chosen)


def unit_from_cgroup_path(path: str) -> tuple[str | None, str | None]:
    """``(system unit, user unit)`` for a cgroup path such as
    ``/system.slice/foo.service`` or ``/user.slice/user-1000.slice/user@1000.service/app.slice/
    foo.service``: slices are skipped, the first other component is the unit (anything below it
    is the unit's own delegated subtree)."""
    unit = _first_unit(path.strip("/").split("/"))
    if unit is None:
        return None, None
    unit_name, rest = unit
    user_unit = None
    if unit_name.startswith("user@") and unit_name.endswith(".service"):
        found = _first_unit(rest)
        user_unit = found[0] if found else None
    return unit_name, user_unit


def _first_unit(parts: list[str]) -> tuple[str, list[str]] | None:
    for index, raw in enumerate(parts):
        name = raw[1:] if raw.startswith("_") else raw   # systemd's cgroup escaping
        if not name:
            return None
        if name.endswith(".slice"):
            continue
        if _is_unit_name(name):
            return name, parts[index + 1 :]
        return None
    return None


def _is_unit_name(name: str) -> bool:
    return (
        name.endswith(UNIT_SUFFIXES)
        and name not in UNIT_SUFFIXES
        and "/" not in name
        and len(name) <= 255
    )


class ExeHasher:
    """sha256 of executables read through ``/proc/PID/exe``, cached by file identity.

    The cache key is (device, inode, ctime, size) of the running file, so a file changed in place
    is hashed again. Files over ``max_bytes`` get no digest (no ``exe_sha256`` rule matches them).
    The cache holds at most ``max_entries`` digests (oldest dropped first). ``digest`` blocks on
    file I/O: call it from a worker thread.
    """

    def __init__(self, *, max_bytes: int = MAX_EXE_BYTES, max_entries: int = 1024) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple[int, int, int, int], str] = OrderedDict()
        self._lock = threading.Lock()
        self.hashed = 0             # files actually read (cache misses), for tests and status

    def digest(self, peer: Peer) -> str | None:
        """The hex sha256 of ``peer``'s executable, or None (gone, unreadable, too large)."""
        try:
            fd = os.open(peer.proc / str(peer.pid) / "exe", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > self.max_bytes:
                return None
            key = (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size)
            with self._lock:
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
                    return cached
            h = hashlib.sha256()
            total = 0
            while chunk := os.read(fd, 1 << 20):
                total += len(chunk)
                if total > self.max_bytes:
                    return None
                h.update(chunk)
            after = os.fstat(fd)
            if (after.st_ctime_ns, after.st_size) != (st.st_ctime_ns, st.st_size):
                return None         # changed while we read it: no trustworthy digest
        except OSError:
            return None
        finally:
            os.close(fd)
        digest = h.hexdigest()
        with self._lock:
            self.hashed += 1
            self._cache[key] = digest
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return digest


def needs_exe_sha256(policies: Iterable[PolicyConfig]) -> bool:
    return any(rule.exe_sha256 for rule in policies)


def _supplementary_groups(pid: int, proc: Path) -> list[int]:
    try:
        with open(proc / str(pid) / "status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


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
    # The patterns as one regular expression (fnmatchcase's translation of each, alternated):
    # one match per request instead of one fnmatchcase call per pattern.
    _match: Callable[[str], re.Match[str] | None] | None = field(
        default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.patterns:
            regex = re.compile("|".join(fnmatch.translate(p) for p in self.patterns))
            object.__setattr__(self, "_match", regex.match)

    def may_read(self, name: str) -> bool:
        return self._match is not None and self._match(name) is not None

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
    if rule.exe_sha256:
        checks.append(peer.exe_sha256 is not None and peer.exe_sha256 in rule.exe_sha256)
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
