"""Who is asking, and what may they read (decision 7).

``Peer`` is the identity of the process at the other end of a Unix socket, taken once per
connection: pid, uid and gid from ``SO_PEERCRED`` (the kernel vouches for them); everything else
from the process's ``/proc/PID`` directory, opened once at accept and read through that
directory fd: supplementary groups from ``status``; the executable from the ``exe`` link, both its
path text (an upgrade that replaced the file leaves a ``" (deleted)"`` suffix: the path is kept
without it and ``exe_deleted`` set) and the (device, inode) of the file the process runs
(``exe_id``); the systemd unit from ``cgroup`` (cgroup v1 ``name=systemd`` hierarchy, else the v2
``0::`` line); and the start time from ``stat``.

Theory of operation (SPIRE's ``peertracker``): a pid is only a number, and the process that
connected may exit and its pid be reused, before accept or between replies. So the ``/proc/PID``
directory fd is the handle: it names the process that held the pid when it was opened, and reads
through it fail with ESRCH once that process has been reaped, whoever gets the pid next. At
accept the directory is checked to belong to the process that connected: with a pidfd
(``SO_PEERPIDFD``, Linux >= 6.5) the pidfd's process must still be alive after the reads (a live
process keeps its pid); on every kernel the effective uid and gid in ``status`` must be the ones
``SO_PEERCRED`` gave, and the process must not be a zombie. Before every reply
``still_same_process()`` repeats the check through the same fds and also requires the same
running file (``exe_id``) and, without a pidfd, the same start time: an ``execve`` keeps the pid
and the start time but changes ``/proc/PID/exe``, so a process that connected and then exec'd a
granted program is not answered. A process that failed the check at accept has no directory
fd; it is never "the same process", and every reply to it is refused.

Executables are compared by file identity, never by path text: a policy's ``exe`` path is
resolved with ``stat()`` in the agent's own mount namespace (following symlinks) and matches a
peer whose running file has that (device, inode). ``/proc/PID/exe`` shows a path in the caller's
mount namespace (``unshare -Urm`` and a bind mount make any program show any path), so its text is
kept for logs and the audit only. ``ExePaths`` remembers the files each path has named, so a
process still running a binary that an upgrade replaced (deleted, no links left) keeps matching.

The executable's sha256 is not taken at accept: ``ExeHasher.digest(peer)`` reads the file
through the peer's ``/proc/PID`` directory fd, only if it is still the file identified at accept,
up to a size limit, and caches the digest by (device, inode, ctime, size). The server calls it off
the trio thread, and only when some policy lists ``exe_sha256``.

Units: a process inside a user's ``user@UID.service`` tree has ``unit = "user@UID.service"`` (the
system unit that contains it) and its unit within the user manager in ``user_unit``. Policies
match ``units`` against ``unit`` only, so a user's own ``foo.service`` never passes for the system
``foo.service``.

Every /proc read goes through ``proc`` (default ``/proc``) so tests can inject a fake proc root.

``grants(policies, peer)`` is the pure allow/deny decision: deny by default; within one rule every
listed attribute must match (a list matches when any element does); a peer's grants are the union
of the ``allow`` globs of every rule that matches it. A rule whose only selectors are ``exe`` or
``exe_sha256`` matches nobody (any user can run a program): ``config.policy_problems`` reports it.

What this does not protect against: a process of the *same* uid can ptrace a granted process or
be handed its connection; exe and unit rules distinguish processes of different uids (see
docs/security.md). A process that exec's a granted program after connecting but before agentd
reads its identity cannot be told apart from one that ran it from the start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import grp
import hashlib
import logging
import os
import pwd
import re
import signal
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from agentd.config import PROGRAM_ONLY_MESSAGE, UNIT_SUFFIXES, PolicyConfig

log = logging.getLogger("agentd.access")

PROC = Path("/proc")
SO_PEERPIDFD = 77            # Linux >= 6.5; Python 3.11's socket module has no constant
MAX_EXE_BYTES = 512 * 1024 * 1024
MAX_PROC_FILE_BYTES = 64 * 1024     # stat, status and cgroup are far smaller
_DELETED = " (deleted)"
_UCRED = struct.Struct("3i")
_DEAD_STATES = (b"Z", b"X")         # zombie, dead: exited, not (yet) reaped
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class FileId(NamedTuple):
    """A file's identity on this host: ``st_dev`` and ``st_ino`` as the agent sees them."""

    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_dev, st.st_ino)


@dataclass(frozen=True)
class Peer:
    """One connected process, identified at accept.

    Resource handling: a peer made by ``from_socket``/``from_ids`` holds the ``/proc/PID``
    directory fd and, where the kernel offers one, a pidfd; ``close()`` closes both.
    """

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()
    start_time: int | None = None       # clock ticks after boot, field 22 of /proc/PID/stat
    user: str | None = None
    group: str | None = None
    exe: str | None = None              # without a " (deleted)" suffix; for logs and the audit
    unit: str | None = None             # the system unit (user@UID.service for user units)
    exe_deleted: bool = False
    user_unit: str | None = None        # the unit inside a user manager, if any
    exe_sha256: str | None = None       # filled in by ExeHasher when a policy needs it
    exe_id: FileId | None = None        # (device, inode) of the file the process runs
    proc: Path = field(default=PROC, repr=False, compare=False)
    pidfd: int | None = field(default=None, repr=False, compare=False)
    procfd: int | None = field(default=None, repr=False, compare=False)   # /proc/PID dir
    # Whether this peer's grants depend on the file it runs (a matching rule names exe or
    # exe_sha256): only then must an exec after accept be looked for before each reply.
    # ``grants`` sets it; True until then.
    exe_bound: bool = field(default=True, repr=False, compare=False)

    @classmethod
    def from_socket(
        cls, sock: socket.socket, *, proc: Path = PROC, use_pidfd: bool = True
    ) -> Peer:
        """Identify the process connected to ``sock`` (an AF_UNIX stream socket).

        With ``use_pidfd`` (and a kernel that has ``SO_PEERPIDFD``) the peer also holds a pidfd.
        The fds are closed by ``close()``.

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
        """Identify process ``pid``, which the kernel said has effective ``uid`` and ``gid``.

        The peer takes ownership of ``pidfd``. If ``/proc/PID`` is gone, or is not the process
        the credentials came from (another uid or gid, a zombie, the pidfd's process dead), the
        peer carries only pid, uid and gid, and ``still_same_process()`` is always False.
        """
        user, group = _user_name(uid), _group_name(gid)
        gone = cls(pid=pid, uid=uid, gid=gid, groups=frozenset({gid}), user=user, group=group,
                   proc=proc, pidfd=pidfd)
        try:
            dirfd = os.open(proc / str(pid), _DIR_FLAGS)
        except OSError:
            return gone
        try:
            seen = _observe(dirfd, with_start_time=True)
            exe, deleted = _exe_text(dirfd, seen.exe_id)
            unit, user_unit = _unit_at(dirfd)
            # Only now: a pidfd's process alive after the reads held the pid during them.
            if not seen.alive_as(uid, gid) or (pidfd is not None and not _pidfd_alive(pidfd)):
                os.close(dirfd)
                return gone
        except OSError:
            os.close(dirfd)
            return gone
        except BaseException:
            os.close(dirfd)
            raise
        return cls(
            pid=pid,
            uid=uid,
            gid=gid,
            groups=frozenset(seen.groups) | {gid},
            start_time=seen.start_time,
            user=user,
            group=group,
            exe=exe,
            exe_deleted=deleted,
            exe_id=seen.exe_id,
            unit=unit,
            user_unit=user_unit,
            proc=proc,
            pidfd=pidfd,
            procfd=dirfd,
        )

    def still_same_process(self) -> bool:
        """True while ``pid`` still names the process identified at accept, running the same
        file with the same credentials.

        Read through the ``/proc/PID`` directory fd held since accept (and the pidfd, if any):
        False when that process has exited (even if its pid now names another process), is a
        zombie, has another effective uid or gid than at accept, or runs another file (it
        called ``execve``); without a pidfd, also when the start time differs. Never blocks:
        with a pidfd, a poll of it and one ``stat()`` of ``exe`` (a few microseconds: this runs
        before every batch of replies); without one, ``status`` and ``stat`` read too.
        """
        dirfd = self.procfd
        if dirfd is None:
            return False
        if self.pidfd is not None:
            # A pidfd names this one process for good: its pid cannot be reused under it and
            # it reads as exited once the process is a zombie. What is left to see is an exec
            # (one stat). Its credentials can only have been dropped since connect (a setuid
            # exec changes the running file too), so the status read is for the no-pidfd path.
            if not _pidfd_alive(self.pidfd):
                return False
            if not self.exe_bound:
                return True
            try:
                return FileId.of(os.stat("exe", dir_fd=dirfd)) == self.exe_id
            except (FileNotFoundError, PermissionError):
                return self.exe_id is None
            except OSError:
                return False
        try:
            now = _observe(dirfd, with_start_time=True)
        except OSError:
            return False
        return (
            now.alive_as(self.uid, self.gid)
            and now.start_time == self.start_time
            and now.exe_id == self.exe_id
        )

    def close(self) -> None:
        """Close the pidfd and the /proc directory fd, if any. Idempotent."""
        for name in ("pidfd", "procfd"):
            fd = getattr(self, name)
            if fd is not None:
                object.__setattr__(self, name, None)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def with_exe_sha256(self, digest: str | None) -> Peer:
        """A copy carrying ``digest``. The fds move to the copy: close the copy, not this."""
        copy = dataclasses.replace(self, exe_sha256=digest)
        object.__setattr__(self, "pidfd", None)
        object.__setattr__(self, "procfd", None)
        return copy


class _Observed(NamedTuple):
    """What ``still_same_process`` compares with the state at accept."""

    state: bytes | None
    euid: int | None
    egid: int | None
    groups: list[int]
    start_time: int | None
    exe_id: FileId | None

    def alive_as(self, uid: int, gid: int) -> bool:
        return (
            self.state is not None
            and self.state not in _DEAD_STATES
            and (self.euid, self.egid) == (uid, gid)
        )


def _observe(dirfd: int, *, with_start_time: bool) -> _Observed:
    """Read state, effective ids, groups, running file and (if asked) start time through a
    /proc/PID dir fd.

    Raises OSError (ESRCH) if that process has been reaped. A running file that cannot be
    stat'ed (a zombie has none; an agent without CAP_SYS_PTRACE may not see it) is None.
    """
    status = _read_at(dirfd, "status")
    state = _status_field(status, b"State")
    uids, gids = _status_ids(status, b"Uid"), _status_ids(status, b"Gid")
    start_time = _start_time(_read_at(dirfd, "stat")) if with_start_time else None
    try:
        exe_id: FileId | None = FileId.of(os.stat("exe", dir_fd=dirfd))
    except (FileNotFoundError, PermissionError):
        exe_id = None
    return _Observed(
        state=state[0] if state else None,
        # real, effective, saved, fs: SO_PEERCRED reports the effective ids
        euid=uids[1] if len(uids) > 1 else None,
        egid=gids[1] if len(gids) > 1 else None,
        groups=_status_ids(status, b"Groups"),
        start_time=start_time,
        exe_id=exe_id,
    )


def _read_at(dirfd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dirfd)
    try:
        data = b""
        while len(data) < MAX_PROC_FILE_BYTES and (chunk := os.read(fd, 8192)):
            data += chunk
        return data
    finally:
        os.close(fd)


def _start_time(line: bytes) -> int | None:
    """The start time from /proc/PID/stat, parsed after the last ')': the command name in
    parentheses may itself contain spaces and parentheses."""
    fields = line[line.rfind(b")") + 2 :].split()
    # fields[0] is field 3 (state); start time is field 22.
    try:
        return int(fields[22 - 3])
    except (IndexError, ValueError):
        return None


def _status_field(status: bytes, key: bytes) -> list[bytes]:
    """The words of line ``KEY:`` of /proc/PID/status (never the first line, ``Name:``, whose
    value the process chooses)."""
    start = status.find(b"\n" + key + b":")
    if start < 0:
        return []
    start += len(key) + 2
    end = status.find(b"\n", start)
    return status[start : end if end >= 0 else len(status)].split()


def _status_ids(status: bytes, key: bytes) -> list[int]:
    try:
        return [int(word) for word in _status_field(status, key)]
    except ValueError:
        return []


def _exe_text(dirfd: int, exe_id: FileId | None) -> tuple[str | None, bool]:
    """The ``exe`` link's text and whether the running file was deleted (replaced by an
    upgrade). The kernel appends ``" (deleted)"`` to the link of an unlinked file; the suffix is
    removed only when the running file really has no links left, so a file literally named
    ``"x (deleted)"`` keeps its name."""
    try:
        target = os.readlink("exe", dir_fd=dirfd)
    except OSError:
        return None, False
    if target.endswith(_DELETED) and exe_id is not None:
        try:
            deleted = os.stat("exe", dir_fd=dirfd).st_nlink == 0
        except OSError:
            deleted = False
        if deleted:
            return target[: -len(_DELETED)], True
    return target, False


def _unit_at(dirfd: int) -> tuple[str | None, str | None]:
    try:
        text = _read_at(dirfd, "cgroup").decode("utf-8", "replace")
    except OSError:
        return None, None
    return unit_from_cgroup_file(text)


def _pidfd_alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except PermissionError:
        return True         # it exists; we may not signal it (agent not root)
    except OSError:
        return False        # ESRCH: it has exited
    return True


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


@contextlib.contextmanager
def _proc_dir(pid: int, proc: Path) -> Iterator[int | None]:
    try:
        dirfd = os.open(proc / str(pid), _DIR_FLAGS)
    except OSError:
        yield None
        return
    try:
        yield dirfd
    finally:
        os.close(dirfd)


def process_start_time(pid: int, *, proc: Path = PROC) -> int | None:
    """Start time of ``pid`` in clock ticks, or None if there is no such process."""
    with _proc_dir(pid, proc) as dirfd:
        if dirfd is None:
            return None
        try:
            return _start_time(_read_at(dirfd, "stat"))
        except OSError:
            return None


def read_exe(pid: int, *, proc: Path = PROC) -> tuple[str | None, bool]:
    """The executable's path text and whether it was deleted (replaced by an upgrade)."""
    with _proc_dir(pid, proc) as dirfd:
        if dirfd is None:
            return None, False
        try:
            exe_id: FileId | None = FileId.of(os.stat("exe", dir_fd=dirfd))
        except OSError:
            exe_id = None
        return _exe_text(dirfd, exe_id)


def read_unit(pid: int, *, proc: Path = PROC) -> tuple[str | None, str | None]:
    """``(system unit, unit inside a user manager)`` from /proc/PID/cgroup; None if none."""
    with _proc_dir(pid, proc) as dirfd:
        return (None, None) if dirfd is None else _unit_at(dirfd)


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
    """sha256 of executables read through the peer's ``/proc/PID`` fd, cached by file identity.

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
        """The hex sha256 of ``peer``'s executable, or None (gone, unreadable, too large, or no
        longer the file identified at accept: the process called ``execve`` since)."""
        if peer.procfd is None or peer.exe_id is None:
            return None
        try:
            fd = os.open("exe", os.O_RDONLY | os.O_CLOEXEC, dir_fd=peer.procfd)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if FileId.of(st) != peer.exe_id:
                return None
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


class ExePaths:
    """The files that policy ``exe`` paths name, by (device, inode) in the agent's mount
    namespace.

    ``runs_any(paths, peer)`` stats each path now (following symlinks, as the agent sees it)
    and compares with the file the peer runs (``peer.exe_id``, from ``/proc/PID/exe`` at
    accept). So a bind mount over the path in another mount namespace, or any other way of
    making ``/proc/PID/exe`` show the path's text, does not match; an upgrade that replaced the
    file matches new processes at once. A process still running a file that the path named
    earlier (seen by this object since start or since ``prime``) matches only if that file is
    deleted (no links left), which is what an upgrade leaves behind. A path that does not exist
    matches nothing; that is logged once (until it exists again).

    The history is bounded (``history`` files per path, ``max_paths`` paths, oldest dropped).
    Thread-safe; every call blocks on one ``stat`` per path (fast: no file is read).
    """

    def __init__(self, *, history: int = 8, max_paths: int = 4096) -> None:
        self.history = history
        self.max_paths = max_paths
        self._seen: OrderedDict[str, list[FileId]] = OrderedDict()
        self._missing: set[str] = set()
        self._lock = threading.Lock()

    def prime(self, policies: Iterable[PolicyConfig]) -> None:
        """Resolve every ``exe`` path of ``policies`` now (at load and on reload), so that a
        process that keeps running a binary replaced later still matches."""
        for rule in policies:
            for path in rule.exe:
                self.resolve(path)

    def resolve(self, path: str) -> FileId | None:
        """The (device, inode) ``path`` names now, or None if it names nothing."""
        try:
            current: FileId | None = FileId.of(os.stat(path))
        except OSError as exc:
            current = None
            error = exc.strerror
        with self._lock:
            if current is None:
                if path not in self._missing:
                    self._missing.add(path)
                    log.warning("policy exe path cannot be resolved; rules naming it match no "
                                "process running it", extra={"path": path[:256],
                                                             "error": error})
                return None
            self._missing.discard(path)
            seen = self._seen.setdefault(path, [])
            self._seen.move_to_end(path)
            if current not in seen:
                seen.append(current)
                del seen[: -self.history]
            while len(self._seen) > self.max_paths:
                self._seen.popitem(last=False)
        return current

    def runs_any(self, paths: Iterable[str], peer: Peer) -> bool:
        """True if ``peer`` runs the file one of ``paths`` names (or named, and that file has
        since been deleted)."""
        running = peer.exe_id
        if running is None:
            return False
        for path in paths:
            if self.resolve(path) == running:
                return True
            if peer.exe_deleted:
                with self._lock:
                    if running in self._seen.get(path, ()):
                        return True
        return False


EXE_PATHS = ExePaths()
"""The process-wide default ``rule_matches`` and ``grants`` use."""

_warned: set[tuple[str, str]] = set()


def _warn_once(key: tuple[str, str], message: str, *args: object) -> None:
    if key in _warned:
        return
    if len(_warned) >= 1024:
        _warned.clear()
    _warned.add(key)
    log.warning(message, *args)


def needs_exe_sha256(policies: Iterable[PolicyConfig]) -> bool:
    return any(rule.exe_sha256 for rule in policies)


class _Names:
    """A name service lookup remembered for ``NAME_TTL`` seconds: every accepted connection
    names its uid and gid (for logs and the audit; policies match numbers), and an NSS lookup
    (files, or sssd/LDAP) per connection was the largest cost of a connect storm's admitted
    connections. Bounded to ``NAME_CACHE_SIZE`` ids."""

    def __init__(self, lookup: Callable[[int], str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lookup = lookup
        self._clock = clock
        self._known: dict[int, tuple[str | None, float]] = {}

    def __call__(self, number: int) -> str | None:
        now = self._clock()
        known = self._known.get(number)
        if known is not None and known[1] > now:
            return known[0]
        try:
            name: str | None = self._lookup(number)
        except KeyError:
            name = None
        if len(self._known) >= NAME_CACHE_SIZE:
            self._known.clear()
        self._known[number] = (name, now + NAME_TTL)
        return name


NAME_TTL = 60.0
NAME_CACHE_SIZE = 4096
_user_name = _Names(lambda uid: pwd.getpwuid(uid).pw_name)
_group_name = _Names(lambda gid: grp.getgrgid(gid).gr_name)


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


def rule_matches(
    rule: PolicyConfig, peer: Peer, *, exe_paths: ExePaths | None = None
) -> bool:
    """Every attribute the rule lists must match; a list matches when any element does.

    ``exe`` compares files, not path text (``exe_paths``, default the process-wide
    ``EXE_PATHS``). A rule that ``config.policy_problems`` refuses for naming a program and nobody
    matches no process.
    """
    if rule.names_only_a_program:
        _warn_once(("program-only", rule.name), "policy %r names only exe/exe_sha256 and "
                   "matches no process: %s", rule.name, PROGRAM_ONLY_MESSAGE)
        return False
    checks: list[bool] = []
    if rule.uids:
        checks.append(peer.uid in rule.uids)
    if rule.gids:
        checks.append(bool(peer.groups.intersection(rule.gids)) or peer.gid in rule.gids)
    if rule.exe:
        checks.append((exe_paths or EXE_PATHS).runs_any(rule.exe, peer))
    if rule.exe_sha256:
        checks.append(peer.exe_sha256 is not None and peer.exe_sha256 in rule.exe_sha256)
    if rule.units:
        checks.append(peer.unit is not None and peer.unit in rule.units)
    # A rule with no selector matches nobody: deny by default.
    return bool(checks) and all(checks)


def grants(
    policies: Iterable[PolicyConfig], peer: Peer, *, exe_paths: ExePaths | None = None
) -> Grants:
    """What ``peer`` may read: the union of the rules that match it. Notes on the peer whether
    any of them names its executable (``Peer.exe_bound``: then an exec is looked for before
    each reply)."""
    patterns: list[str] = []
    admin = False
    names: list[str] = []
    exe_bound = False
    for rule in policies:
        if rule_matches(rule, peer, exe_paths=exe_paths):
            patterns.extend(rule.allow)
            admin = admin or rule.admin
            names.append(rule.name)
            exe_bound = exe_bound or bool(rule.exe or rule.exe_sha256)
    object.__setattr__(peer, "exe_bound", exe_bound)
    return Grants(patterns=tuple(dict.fromkeys(patterns)), admin=admin, rules=tuple(names))
