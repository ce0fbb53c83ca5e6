"""Listening sockets and who gets into them: bind, the accept loop, storms, per-uid budgets.

Shared by the main socket (``server.py``), its private sockets (``private.py``) and the
credentials socket (``creds.py``); what is said on an admitted connection is theirs.

- ``open_listener`` binds a socket with its final mode and group before ``listen``.
- ``serve_listener`` accepts until the kernel's queue is empty each turn and lets an ``admit``
  callback refuse a connection from ``SO_PEERCRED`` alone, before any task exists for it
  (decision 13: a refused connect costs one accept, one ``getsockopt`` and one close).
- ``Storm`` tells a connect storm from a burst of clients by the refusals it causes; the server
  shortens its listen queue while one lasts (``STORM_BACKLOG``, ``STORM_BATCH``).
- ``Budget`` is one uid's token bucket with a fair queue for its connections (connect and
  request rates); ``budget_of`` keeps a bounded table of them.
- ``Warnings`` logs a refusal of one kind for one uid at most once per ``WARN_INTERVAL``.
"""

from __future__ import annotations

import _socket
import errno
import logging
import math
import os
import socket
import stat
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

# The server's logger: these are its sockets' lines (operators filter on it).
log = logging.getLogger("agentd.server")

LISTEN_BACKLOG = 1024   # connections queued by the kernel: [agent] listen_backlog's default
# A connect storm (decision 13): this many refused connects within one second (a burst of
# legitimate clients is accepted, not refused, and never comes near it) shorten the listen
# queue to STORM_BACKLOG, until STORM_HOLD seconds after the last such second.
STORM_REFUSALS = 1000
STORM_BACKLOG = 64
STORM_HOLD = 10.0
ACCEPT_BATCH = 64       # connections accepted in one turn before other tasks run
# During a storm the main socket takes turns of STORM_BATCH accepts: other tasks (a private
# socket's accept, a connection's reply; decision 13) wait for a short turn of refusals, not
# a long one.
STORM_BATCH = 16
# accept() errors that mean "out of a resource": pause accepting, do not end the server
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_PAUSE = 0.1      # seconds accepting pauses after one of those
WARN_INTERVAL = 10.0    # seconds between two warnings of one kind about one uid
MAX_BUDGETS = 4096      # per-uid buckets kept before full ones are forgotten

Handler = Callable[[trio.socket.SocketType], Awaitable[None]]


class Budget:
    """One uid's request budget: a token bucket, and a fair queue for its connections.

    A connection takes a token at once only when the bucket has one and no connection of the
    uid is queued; otherwise it queues (``trio.Lock`` is fair: first come, first served), so
    a uid's connections are served in turn and a newcomer cannot jump the queue.
    """

    __slots__ = ("at", "queue", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.at = now
        self.queue = trio.Lock()

    def _refill(self, rate: float, burst: float) -> float:
        now = trio.current_time()
        self.tokens = min(burst, self.tokens + (now - self.at) * rate)
        self.at = now
        return now

    def take(self, rate: float, burst: float) -> bool:
        """Take a token now if there is one and nobody is queued. Sync, never blocks."""
        self._refill(rate, burst)
        if self.tokens < 1.0 or self.queue.locked():
            return False
        self.tokens -= 1.0
        return True

    async def wait(self, rate: float, burst: float) -> None:
        """Queue behind the uid's other waiting connections, then take a token."""
        async with self.queue:
            while True:
                now = self._refill(rate, burst)
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                await trio.sleep_until(now + (1.0 - self.tokens) / rate)

    def idle(self, burst: float) -> bool:
        """True if the bucket is full and nobody waits: it carries no state."""
        return self.tokens >= burst and not self.queue.locked()


def budget_of(budgets: dict[int, Budget], uid: int, burst: float) -> Budget:
    """``uid``'s budget in ``budgets``, made full the first time. Past ``MAX_BUDGETS`` uids, the
    ones that carry no state (full, nobody queued) are forgotten to bound the table."""
    budget = budgets.get(uid)
    if budget is None:
        if len(budgets) >= MAX_BUDGETS:
            for key in [k for k, b in budgets.items() if b.idle(burst)]:
                del budgets[key]
        budget = budgets[uid] = Budget(burst, trio.current_time())
    return budget


class Warnings:
    """Warnings about refused peers, at most one per ``WARN_INTERVAL`` per (uid, kind); the
    ones left out are counted and their number is carried by the next one logged."""

    def __init__(self) -> None:
        self._last: dict[tuple[int | None, str], float] = {}
        self._left_out: Counter[tuple[int | None, str]] = Counter()
        self.suppressed = 0

    def warn(self, uid: int | None, kind: str, message: str, **extra: Any) -> None:
        key = (uid, kind)
        now = trio.current_time()
        last = self._last.get(key)
        if last is not None and now - last < WARN_INTERVAL:
            self._left_out[key] += 1
            self.suppressed += 1
            return
        if len(self._last) >= MAX_BUDGETS:
            self._last = {k: t for k, t in self._last.items() if now - t < WARN_INTERVAL}
        self._last[key] = now
        log.warning(message, extra={"uid": uid, "suppressed": self._left_out.pop(key, 0),
                                    **extra})


def open_listener(
    path: Path, *, mode: int, group: int | None, backlog: int = LISTEN_BACKLOG
) -> socket.socket:
    """Bind and listen on ``path`` with its final mode and group set before ``listen``.

    A stale socket file from an earlier run is replaced; any other kind of file is refused.
    The caller closes the socket and removes the path.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
        os.unlink(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # Bind under a restrictive umask so the socket is never reachable with a wider mode.
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_listener(
    listener: socket.socket,
    handle: Handler | None,
    *,
    admit: Callable[[_socket.socket], Handler | None] | None = None,
    after_turn: Callable[[], int | None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``listener`` until cancelled, one ``handle(conn)`` task per connection.

    Each turn accepts until the kernel's queue is empty (``EAGAIN``), at most ``ACCEPT_BATCH``
    at a time, so a connect storm cannot keep the backlog full and make other clients' connects
    fail. ``admit(sock)``, if given, is called on each new socket before any task exists for
    it: it returns the handler to run, or None to have the socket closed at once (a connection
    over a cap costs one accept, one ``getsockopt`` and one close); ``after_turn()``, if given,
    is called after each turn (the server sizes its queue there) and may return a smaller
    batch for the next turn (``STORM_BATCH`` during a storm). This is why this is not
    ``trio.serve_listeners``: its loop accepts one connection per iteration, with a checkpoint
    each, and starts a task for every connection before anything can refuse it.

    Resource handling: ``listener`` is made non-blocking and is not closed. Error handling:
    running out of descriptors or memory (``ACCEPT_CAPACITY_ERRNOS``) pauses accepting for
    ``ACCEPT_PAUSE`` instead of ending the server; ``ECONNABORTED`` is skipped; any other accept
    error is raised. ``admit`` and the handlers must catch their own errors.
    """
    if (handle is None) == (admit is None):
        raise TypeError("serve_listener takes one of handle and admit")
    listener.setblocking(False)
    family, kind = listener.family, listener.type
    batch = None
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(batch or ACCEPT_BATCH):
                try:
                    # the C-level accept and socket: a storm's refusals cost half as much
                    # without socket.socket's Python layer (only admitted ones get it)
                    fd, _ = listener._accept()  # type: ignore[attr-defined]
                    sock = _socket.socket(family, kind, 0, fd)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.ECONNABORTED:
                        continue
                    if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                        log.error("accept failed, pausing", extra={"error": str(exc)})
                        await trio.sleep(ACCEPT_PAUSE)
                        break
                    raise
                handler = handle if admit is None else admit(sock)
                if handler is None:
                    sock.close()
                    continue
                conn = socket.socket(family, kind, 0, fileno=sock.detach())
                nursery.start_soon(handler, trio.socket.from_stdlib_socket(conn))
            if after_turn is not None:
                batch = after_turn()


class Storm:
    """Tells a connect storm from a burst by the refusals it causes: ``threshold``
    (``STORM_REFUSALS``) within one second start one, which lasts until ``hold`` seconds after
    the last such second."""

    def __init__(self, hold: float = STORM_HOLD, threshold: int = STORM_REFUSALS) -> None:
        self.hold = hold
        self.threshold = threshold
        self._window = -math.inf
        self._count = 0
        self._until = -math.inf

    def refused(self, now: float) -> None:
        if now - self._window >= 1.0:
            self._window, self._count = now, 0
        self._count += 1
        if self._count >= self.threshold:
            self._until = now + self.hold

    def raging(self, now: float) -> bool:
        return now < self._until
