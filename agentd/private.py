"""Private sockets: a listen queue of its own for each uid and group the policies name
(decision 13).

An AF_UNIX connect waits in the listener's queue before agentd can tell who is connecting, so
the main socket's queue is shared by everyone allowed to open it, and a uid that connects in a
loop takes the places a granted uid's connect needs: the kernel wakes a waiting connector for
each place agentd frees, and the storm's next connect often takes it first. So beside the main
socket agentd listens on ``<socket>.d/uid-<uid>`` for each uid a policy names, and on
``<socket>.d/gid-<gid>`` for each group named by a policy that names no uid; only that uid (or
the group's members) and root may connect to it. agentd's clients try their uid's socket, then
their groups', then the main one (``agentd.client``).

A private socket only chooses the queue, never what a peer may read: its connections are
admitted, identified, rate-limited, decided and audited exactly as on the main socket, and a
peer that is not the socket's uid (root) is judged as itself.

Who may connect is a POSIX ACL entry on a 0600 socket (the socket stays agentd's); on a file
system without ACLs, agentd running as root gives the file to the uid (or 0660 to the group)
instead. A reload opens the sockets of newly named uids and groups and closes the ones no
policy names any more (with the connections made through them: their clients reconnect, to the
main socket). On the way out every private socket and the directory are removed; clients then
fall back to the main socket, which systemd keeps across a restart.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from agentd import posixacl
from agentd.config import Config, PolicyConfig
from agentd.listen import open_listener
from agentd.server import Server

log = logging.getLogger("agentd.private")

MAX_PRIVATE_SOCKETS: Final = 256      # descriptors, and the client's tries, stay bounded
_NAME: Final = re.compile(r"(uid|gid)-[0-9]{1,10}")


def directory(socket_path: Path) -> Path:
    """Where the private sockets of the agent listening at ``socket_path`` are."""
    return Path(f"{socket_path}.d")


@dataclass(frozen=True, order=True)
class Queue:
    """One private socket: ``kind`` is "uid" or "gid"."""

    kind: str
    ident: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.ident}"


def wanted(policies: Iterable[PolicyConfig]) -> list[Queue]:
    """The private sockets ``policies`` call for: one per uid named, one per gid named by a rule
    that names no uid (a rule naming uids matches only those uids, whose sockets serve it). At
    most ``MAX_PRIVATE_SOCKETS``, uids first."""
    uids: set[int] = set()
    gids: set[int] = set()
    for rule in policies:
        uids.update(rule.uids)
        if not rule.uids:
            gids.update(rule.gids)
    queues = [Queue("uid", u) for u in sorted(uids)] + [Queue("gid", g) for g in sorted(gids)]
    return queues[:MAX_PRIVATE_SOCKETS]


def acl_entries(queue: Queue) -> list[posixacl.Entry]:
    """The access ACL that lets ``queue``'s uid or group (and the file's owner) connect: a
    0600 socket's entries, and read-write for that uid or group."""
    return posixacl.from_mode(0o600, [(posixacl.USER if queue.kind == "uid" else posixacl.GROUP,
                                       posixacl.RW, queue.ident)])


def open_private(path: Path, queue: Queue, *, backlog: int) -> socket.socket:
    """Listen on ``path`` for ``queue``'s uid or group only (and root).

    Raises:
        OSError: the socket could not be made, or not restricted to its uid or group (no ACLs
            and not root); nothing is left listening then.
    """
    sock = open_listener(path, mode=0o600, group=None, backlog=backlog)
    try:
        try:
            posixacl.write(path, acl_entries(queue))
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP) or os.geteuid() != 0:
                raise
            if queue.kind == "uid":
                os.chown(path, queue.ident, -1, follow_symlinks=False)
            else:
                os.chown(path, -1, queue.ident, follow_symlinks=False)
                os.chmod(path, 0o660)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return sock


def prepare_directory(path: Path) -> None:
    """Make ``path`` agentd's 0755 directory and empty it of earlier runs' sockets.

    Raises:
        OSError: ``path`` is not a directory of agentd's own (a symlink, a file, another
            owner's), or cannot be made.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o755)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise OSError(errno.EEXIST, f"{path} is not a directory of agentd's own")
        os.fchmod(fd, 0o755)    # anyone may look a socket up; each has its own ACL
    finally:
        os.close(fd)
    for entry in os.scandir(path):
        if _NAME.fullmatch(entry.name) and stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


class PrivateSockets:
    """Keeps one private socket per uid and group the server's config names, served by
    ``server`` (``run``)."""

    def __init__(self, server: Server, socket_path: Path) -> None:
        self._server = server
        self.path = directory(socket_path)
        self._open: dict[Queue, tuple[socket.socket, trio.CancelScope]] = {}
        self._backlog = 0
        self._refused: set[Queue] = set()      # logged once each, until a reload

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Open the sockets the config calls for, follow reloads, and remove them all when
        cancelled. A directory that is not agentd's own is logged and leaves the main socket
        alone serving everyone."""
        config = self._server.config
        if not config.agent.private_sockets:
            task_status.started()
            return
        try:
            prepare_directory(self.path)
        except OSError as exc:
            log.error("no private sockets: %s", exc.strerror or exc,
                      extra={"directory": str(self.path)})
            task_status.started()
            return
        try:
            async with trio.open_nursery() as nursery:
                seen = self._server.reload_generation
                self._sync(config, nursery)
                task_status.started()
                while True:
                    seen, config = await self._server.wait_reload(seen)
                    self._refused.clear()
                    self._sync(config, nursery)
        finally:                        # the serving tasks have closed the sockets
            for queue in list(self._open):
                self._close(queue)
            with contextlib.suppress(OSError):
                os.rmdir(self.path)

    def _sync(self, config: Config, nursery: trio.Nursery) -> None:
        want = wanted(config.policies)      # private_sockets itself needs a restart (run)
        for queue in set(self._open) - set(want):
            self._close(queue)
        backlog = config.agent.listen_backlog
        if backlog != self._backlog:
            for sock, _ in self._open.values():
                sock.listen(backlog)
            self._backlog = backlog
        for queue in want:
            if queue in self._open or queue in self._refused:
                continue
            try:
                sock = open_private(self.path / queue.name, queue, backlog=backlog)
            except OSError as exc:
                self._refused.add(queue)
                log.error("no private socket for %s %d: %s", queue.kind, queue.ident,
                          exc.strerror or exc)
                continue
            scope = trio.CancelScope()
            self._open[queue] = (sock, scope)
            nursery.start_soon(self._serve, sock, scope)
        self._server.private_sockets = len(self._open)

    async def _serve(self, sock: socket.socket, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self._server.serve(sock, shared=False)
        finally:
            sock.close()        # here, once nothing waits on it (trio's rule for an fd)

    def _close(self, queue: Queue) -> None:
        """Stop serving ``queue`` (its task closes the socket) and remove its file."""
        _, scope = self._open.pop(queue)
        scope.cancel()
        with contextlib.suppress(OSError):
            os.unlink(self.path / queue.name)
        self._server.private_sockets = len(self._open)
