"""The connect guard (decision 13): a storming uid may not even look agentd's sockets up.

In a connect storm agentd refuses the storming uid's connections itself, at the cost of a kernel
accept and close each (about 8 µs): two processes connecting in a loop keep the agent busy all
the time, and a read by anyone else waits for a CPU slice behind the refusals. The guard moves
the refusing into the storming process's own ``connect()``: the socket's directory (which holds
nothing but agentd's sockets, like the packaged ``/run/agentd``) gets a POSIX ACL entry that
gives that uid no permissions at all, so the kernel's path lookup fails with ``EACCES`` before
any socket is reached, however the path is spelt (absolute, relative from inside, through
``/proc/self/cwd`` or a descriptor of the directory opened before), and to every agentd socket
there, the private ones in ``<socket>.d`` included. The agent never sees the storm.

``Blocks`` decides: a uid is blocked when the agent refused ``threshold`` (``STORM_REFUSALS``)
of its connects within one second (a fiftieth of that, 20, if it was blocked in the last ten
minutes or so), for ``hold`` (``STORM_HOLD``) seconds, twice as long each time it is blocked again
within a hold of the last block's end (at most ``MAX_HOLD``). uid 0 is never blocked: root
passes any permission check, and systemd fetches credentials as root.

What it does not stop: a hard link to the main socket made before the block, in a directory
the uid may write on the same file system (``fs.protected_hardlinks`` allows it for a 0666
socket); a storm through one is refused by the agent, as without the guard.

Lifetime: the ACL is the directory's, so it outlives an agent that is killed; the next agent
removes it when it starts (``DirectoryGuard.open``), and a clean exit lifts every block. It
needs no privilege but ownership of the directory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from agentd import posixacl
from agentd.errors import GuardUnavailable

log = logging.getLogger("agentd.connectguard")

MAX_BLOCKED: Final = 256        # uids blocked at once (entries in one ACL)
MAX_HOLD: Final = 320.0         # seconds: the longest block, for a uid that keeps coming back


class DirectoryGuard:
    """The directory of agentd's sockets and the uids its ACL shuts out.

    Get one with ``DirectoryGuard.open(socket)``; ``close()`` lifts every block. The methods
    are sync and quick (one ``setxattr`` each).
    """

    def __init__(self, directory: Path, allowed: frozenset[str], socket: str = "") -> None:
        self.directory = directory
        self._allowed = allowed         # names agentd keeps there
        self._socket = socket           # the main socket's name
        self._blocked: set[int] = set()

    @classmethod
    def open(cls, socket: Path, *, also: Iterable[Path | None] = ()) -> DirectoryGuard:
        """The guard for the main socket at ``socket`` (and ``also`` agentd's other sockets in
        the same directory, the credentials socket): removes what an earlier run left. Makes
        the directory if it is not there yet (call it after the paths were checked).

        Raises:
            GuardUnavailable: the directory is not agentd's alone, or takes no ACLs.
        """
        directory = socket.parent
        with contextlib.suppress(OSError):      # as open_listener will: the check then says
            directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        names = {socket.name, f"{socket.name}.d"} | {
            path.name for path in also if path is not None and path.parent == directory}
        guard = cls(directory, frozenset(names), socket.name)
        with guard._opened() as fd:
            guard._check(fd)
            guard._write(fd)        # no entries: an earlier run's blocks are lifted
        return guard

    @property
    def blocked(self) -> frozenset[int]:
        return frozenset(self._blocked)

    def block(self, uid: int) -> None:
        """Shut ``uid`` out of the directory (nothing if it already is).

        Raises:
            GuardUnavailable: the directory no longer passes ``open``'s checks, or
                ``MAX_BLOCKED`` uids are blocked.
        """
        if uid in self._blocked:
            return
        if len(self._blocked) >= MAX_BLOCKED:
            raise GuardUnavailable(f"{MAX_BLOCKED} uids are blocked already")
        with self._opened() as fd:
            self._check(fd)
            self._blocked.add(uid)
            try:
                self._write(fd)
            except GuardUnavailable:
                self._blocked.discard(uid)
                raise

    def unblock(self, uid: int) -> None:
        """Let ``uid`` in again (nothing if it was not blocked)."""
        if uid in self._blocked:
            self._blocked.discard(uid)
            self._rewrite()

    def other_links(self) -> int:
        """Hard links to the main socket outside the directory: the way past the guard."""
        try:
            return os.stat(self.directory / self._socket, follow_symlinks=False).st_nlink - 1
        except (OSError, ValueError):
            return 0

    def close(self) -> None:
        """Lift every block. Idempotent."""
        if self._blocked:
            self._blocked.clear()
            self._rewrite()

    def _rewrite(self) -> None:
        """``_write`` after an unblock: a failure leaves the uid out a little longer, logged
        by nobody (the next block reports a directory gone wrong)."""
        with contextlib.suppress(GuardUnavailable), self._opened() as fd:
            self._write(fd)

    @contextlib.contextmanager
    def _opened(self) -> Iterator[int]:
        """A descriptor of the directory itself (never through a symlink), closed after.

        Raises:
            GuardUnavailable: it cannot be opened.
        """
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
        except OSError as exc:
            raise GuardUnavailable(f"{self.directory}: {exc.strerror}") from exc
        try:
            yield fd
        finally:
            os.close(fd)

    def _check(self, fd: int) -> None:
        """The directory is agentd's (its owner, writable by nobody else) and holds only
        agentd's sockets: an ACL on it keeps a uid from nothing else."""
        info = os.fstat(fd)
        if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise GuardUnavailable(f"{self.directory} is not a directory of agentd's own")
        others = sorted(set(os.listdir(fd)) - self._allowed)
        if others:
            raise GuardUnavailable(f"{self.directory} holds more than agentd's sockets "
                                   f"({others[0]})")

    def _write(self, fd: int) -> None:
        """The directory's ACL: its mode's entries, and no permission for each blocked uid.
        With none blocked, the mode's entries alone, which the kernel keeps as the mode: a
        no-op that still fails where the file system takes no ACLs (so ``open`` can tell)."""
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            posixacl.write(fd, posixacl.from_mode(
                mode, [(posixacl.USER, posixacl.NONE, uid) for uid in self._blocked]))
        except OSError as exc:
            reason = ("its file system has no ACLs"
                      if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP) else exc.strerror)
            raise GuardUnavailable(f"cannot set the ACL of {self.directory}: {reason}") from exc
        if not self._blocked:
            with contextlib.suppress(OSError):      # none left as an xattr either
                os.removexattr(fd, posixacl.XATTR)


def open_guard(mode: str, socket: Path, *, also: Iterable[Path | None] = ()
               ) -> DirectoryGuard | None:
    """The guard for the main socket at ``socket`` as ``[agent] connect_guard`` says: ``off``,
    none; ``auto``, one if the socket's directory allows it (else None, logged once); ``on``,
    one or an error.

    Raises:
        GuardUnavailable: ``on``, and the guard cannot work here.
    """
    if mode == "off":
        return None
    try:
        guard = DirectoryGuard.open(socket, also=also)
    except GuardUnavailable as exc:
        if mode == "on":
            raise GuardUnavailable(f'connect_guard = "on", but {exc}') from exc
        log.info("connect guard off: connect storms are refused by the agent alone",
                 extra={"reason": str(exc)})
        return None
    log.info("connect guard ready: a storming uid will be shut out of the socket's directory",
             extra={"directory": str(guard.directory)})
    return guard


@dataclass
class Blocks:
    """Which uids the guard shuts out, and for how long (the policy; ``DirectoryGuard`` is the
    mechanism). Without a guard it does nothing."""

    guard: DirectoryGuard | None
    threshold: int
    hold: float
    # called with a uid let in again: the server empties its connect bucket, so a comeback is
    # refused (and blocked again) from its first connect, not admitted a burst's worth first
    on_lift: Callable[[int], None] | None = None
    blocks: int = 0                 # blocks imposed (a counter)
    _windows: dict[int, tuple[float, int]] = field(default_factory=dict)
    _until: dict[int, float] = field(default_factory=dict)      # blocked uid: its block's end
    _strikes: dict[int, tuple[int, float]] = field(default_factory=dict)  # (blocks, last end)
    _lifted: float = -math.inf      # when a block was last lifted
    _failure_logged: bool = False
    _links_logged: bool = False

    @property
    def blocked(self) -> int:
        return len(self._until)

    def guarding(self, now: float) -> bool:
        """Whether a uid is blocked, or one was let in again less than ``hold`` ago (the
        server keeps its storm footing meanwhile)."""
        return bool(self._until) or now - self._lifted < self.hold

    def refused(self, uid: int, now: float) -> bool:
        """The agent refused a connect by ``uid`` (over its connect rate or a cap); True if
        that blocked the uid (the server audits it)."""
        if self.guard is None or uid == 0 or uid in self._until:
            return False
        start, count = self._windows.get(uid, (-math.inf, 0))
        if now - start >= 1.0:
            start, count = now, 0
        count += 1
        # a uid blocked not long ago is known: a fiftieth of the evidence (its bucket is empty,
        # so these are 20 connects over its rate) blocks it again, and its comeback holds the
        # main socket's queue for a millisecond or so, not for a thousand refusals
        needed = self.threshold if uid not in self._strikes else max(1, self.threshold // 50)
        if count < needed:
            self._windows[uid] = (start, count)
            return False
        self._windows.pop(uid, None)
        try:
            self.guard.block(uid)
        except GuardUnavailable as exc:
            if not self._failure_logged:
                self._failure_logged = True
                log.warning("connect guard: cannot block a uid; the agent refuses it alone",
                            extra={"uid": uid, "error": str(exc)})
            return False
        strikes, ended = self._strikes.get(uid, (0, -math.inf))
        strikes = strikes + 1 if now - ended < self.hold * 2 ** strikes else 0
        hold = min(self.hold * 2 ** strikes, MAX_HOLD)
        self._strikes[uid] = (strikes, now + hold)
        self._until[uid] = now + hold
        self.blocks += 1
        log.warning("connect storm: this uid is shut out of agentd's socket directory",
                    extra={"uid": uid, "seconds": hold})
        links = self.guard.other_links()
        if links and not self._links_logged:
            self._links_logged = True
            log.warning("the main socket has hard links elsewhere: a storm through them "
                        "reaches the agent", extra={"links": links})
        return True

    def lift_due(self, now: float) -> None:
        """Lift the blocks whose time is up; forget refusal counts and strikes gone stale."""
        self._windows = {uid: window for uid, window in self._windows.items()
                         if now - window[0] < 1.0}
        self._strikes = {uid: (strikes, ended) for uid, (strikes, ended) in self._strikes.items()
                         if now - ended < MAX_HOLD * 2}
        if self.guard is None:
            return
        for uid, until in list(self._until.items()):
            if now >= until:
                self.guard.unblock(uid)
                del self._until[uid]
                self._lifted = now
                if self.on_lift is not None:
                    self.on_lift(uid)
                log.info("connect storm over: this uid may connect again", extra={"uid": uid})

    async def run(self, *, interval: float = 1.0) -> None:
        """Lift blocks as they end, every ``interval``, until cancelled. What is blocked then
        is lifted by whoever opened the guard, as it closes it (the daemon, at exit)."""
        if self.guard is None:
            return
        while True:
            await trio.sleep(interval)
            self.lift_due(trio.current_time())
