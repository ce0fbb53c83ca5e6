"""The trio shell around the sans-IO protocol: listen, identify the peer, enforce limits, dispatch.

Theory of operation: ``serve`` accepts connections on an already-listening AF_UNIX socket (bound by
``listen.open_listener`` or passed by systemd; or a private socket, see private.py: one server,
any number of listeners, the same rules on each). Each connection gets its own task that

1. is admitted by the accept loop (``listen.serve_listener``), which accepts until the backlog
   is empty (16 at a time during a connect storm) and, from ``SO_PEERCRED`` alone, closes a
   connection over the global or per-uid connection cap, or over its uid's connect rate
   (``connects_per_second_per_uid``, ``connect_burst_per_uid``), at once (a ``rate_limited``
   reply with id nil, written without waiting, except during a storm); an admitted one then
   takes the peer's full identity once (``SO_PEERCRED`` + /proc, see access.py);
2. feeds received bytes to a ``protocol.ServerConnection`` and handles its events in order, so
   pipelined requests are answered in order; the replies to the frames one read brought go out
   in one write (at most ``MAX_BATCH`` before other connections get a turn);
3. before the replies to each read (and again before a reply that had to wait, such as a
   ``refresh``'s), re-checks that the pid still names the process identified at accept; if not,
   the connection is closed without an answer (pid reuse). Between the check and the write of
   those replies there is no scheduling point;
3a. takes a token from the peer uid's bucket (``requests_per_second_per_uid``,
   ``request_burst_per_uid``) for each frame *before* it is parsed, checked or logged. When the
   bucket is empty the connection sends the replies it has, then waits in its uid's queue
   (first come, first served: a uid's connections take turns) and reads nothing meanwhile, so
   the kernel's buffers fill and the client blocks (backpressure): a flood costs the agent no
   more than the uid's rate. A connection still sending over the rate ``frame_timeout`` after it
   first had to wait (it never caught up: its socket was never found empty) is flooding: it gets
   a ``rate_limited`` reply with id nil, written without waiting, and is closed;
3b. after a successful ``watch``, gives the connection over to that watch: it compares the
   watched names' versions with what the client last heard of each time ``cache.changes``
   moves (so events are never lost to the cell skipping a value, and at most one event per name
   is pending), sends ``changed``/``revoked`` events, reads nothing but EOF, and drops a watcher
   that does not take an event within ``frame_timeout``;
4. closes the connection when a frame is not completed within ``frame_timeout`` of its first
   byte, when ``idle_timeout`` passes after the last complete request (neither is moved by
   bytes that arrive meanwhile), when a reply cannot be sent within ``frame_timeout`` (a
   client that does not read), or after a framing error (whose reply carries ``id`` nil).

One socket, two protocols: after identifying the peer, a connection's first byte is peeked once
(``_first_byte``): a method's capital letter hands it to ``_converse_http`` (the sans-IO core in
httpface.py, with an ``_HttpReader`` for its peer), anything else (a v1 frame's length starts
with 0x00 below 16 MiB) to ``_converse``, whose per-request path is unchanged. The HTTP loop
follows the v1 loop step for step: a request's token before it is parsed (step 3a), the pid
re-check before the replies to each read (3), the same deadlines (4); its reads take the same
decisions as ``get`` (``_open``) and are audited alike, with ``transport`` "http".

A handler catches its own errors: one bad client can never take the server down. Every decision on
a secret is written to the audit stream. Warnings about refused peers (over a cap, flooding, pid
reused, no identity) are logged at most once per ``WARN_INTERVAL`` per uid and kind, with the
count of those left out (``statistics().warnings_suppressed``); the audit stream coalesces
them by uid and decision (see audit.py). Error messages never echo a request's argument values
(names included): the client knows what it asked.

The read path is the hot path (issue #8: a cached ``get`` costs the agent about 20 µs of CPU),
and these choices come from profiling it: a reply is written at once with ``os.write`` on the
non-blocking socket, falling back to ``SocketStream.send_all`` under a ``frame_timeout`` only
for what does not fit; the wait for bytes is ``wait_readable`` then ``os.read``, timed out by
one cancel scope per connection whose deadline is moved lazily (see ``_converse``) instead of a
scope per wait; the peer's grants are computed once per connection and config; a ``get`` splices
the value's msgpack bytes, as the cache's seal opens them, into the reply.
"""

from __future__ import annotations

import _socket
import contextlib
import functools
import logging
import math
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from agentd import httpface, jsonnum, protocol
from agentd.access import ExeHasher, Grants, Peer, grants, needs_exe_sha256
from agentd.audit import Audit
from agentd.cache import Cache, stale_deadline
from agentd.cell import Cell
from agentd.config import AgentConfig, Config, SecretConfig
from agentd.connectguard import Blocks
from agentd.errors import (
    BadRequest,
    Forbidden,
    InternalError,
    NotFound,
    RateLimited,
    RequestError,
    Unavailable,
    UnknownOp,
    UpstreamError,
)
from agentd.listen import (
    STORM_BACKLOG,
    STORM_BATCH,
    STORM_HOLD,
    STORM_REFUSALS,
    Budget,
    Handler,
    Storm,
    Warnings,
    budget_of,
    serve_listener,
)
from agentd.readmodel import COUNTER, metric
from agentd.refresh import Refresher

log = logging.getLogger("agentd.server")

RECEIVE_SIZE = 65536
MAX_BATCH = 64          # replies to pipelined requests sent before other connections get a turn
_UCRED = struct.Struct("3i")

_TOO_MANY_CONNECTIONS = protocol.ServerConnection().send_error(
    None, RateLimited("too many connections"))
_FLOODING = protocol.ServerConnection().send_error(
    None, RateLimited("requests kept coming over this uid's rate; closing"))
_HTTP_TOO_MANY_CONNECTIONS = httpface.error_response(429, "too many connections")
_HTTP_FLOODING = httpface.error_response(429, "requests kept coming over this uid's rate; closing")


def _refuse(sock: _socket.socket) -> None:
    """Send the "too many connections" reply, without waiting, in the protocol the client
    speaks if its first byte is already there (an HTTP client sends its request at once), v1's
    otherwise; nothing to a client that has already hung up (most of a connect storm)."""
    try:
        first = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        first = None                # connected, nothing sent yet
    except OSError:
        return
    if first == b"":
        return                      # EOF: nobody to tell
    reply = _HTTP_TOO_MANY_CONNECTIONS if first is not None and httpface.looks_like_http(first) \
        else _TOO_MANY_CONNECTIONS
    with contextlib.suppress(OSError):
        sock.send(reply, socket.MSG_DONTWAIT)


def _write_now(fd: int, data: bytes) -> int | None:
    """Write ``data`` to the non-blocking socket ``fd`` at once; the bytes written, None if
    the client went away. Replies nearly always fit in the socket buffer: this is the hot path,
    with no checkpoint and no cancel scope (``Server._send_rest`` sends what did not fit)."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError:
        return None                 # EPIPE, ECONNRESET


class _Wait:
    """The clocks of one connection (see ``Server._converse``), in trio time."""

    __slots__ = ("deadline", "frame_since", "idle_since", "read_at", "throttled_since",
                 "waiting")

    def __init__(self, now: float) -> None:
        self.deadline = math.inf    # when the wait for bytes in progress is due
        self.waiting = False        # True while waiting for bytes
        self.read_at = now          # when the last bytes were read
        self.idle_since = now       # when the last complete request came in (or the connect)
        self.frame_since: float | None = None       # first byte of the partial frame
        self.throttled_since: float | None = None   # first wait for a token, not caught up

    def arm(self, partial: bool, fresh: bool, agent: AgentConfig,
            scope: trio.CancelScope) -> None:
        """Set the deadline of the next wait for bytes: a partial frame (or HTTP request) has
        ``frame_timeout`` from its first byte (``fresh``: it began in the last read, after a
        complete one), a connection with none ``idle_timeout`` from its last complete request.
        Bytes that trickle in move neither."""
        if partial:
            if fresh or self.frame_since is None:
                self.frame_since = self.read_at     # its first byte came in that read
            self.deadline = self.frame_since + agent.frame_timeout
        else:
            self.frame_since = None
            self.deadline = self.idle_since + agent.idle_timeout
        if self.deadline < scope.deadline:
            scope.deadline = self.deadline

    async def receive(self, fd: int) -> bytes | None:
        """The connection's next bytes (b"": EOF), or None when a wakeup brought none (look
        again). While throttled, what the client sent meanwhile is taken at once if there is
        any; nothing waiting means it caught up (no longer throttled), and it is waited for as
        usual. Raises OSError when the connection is gone (reset by the peer)."""
        if self.throttled_since is not None:
            try:
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                self.throttled_since = None
            else:
                self.read_at = trio.current_time()
                return data
        self.waiting = True
        await trio.lowlevel.wait_readable(fd)
        self.waiting = False
        try:
            data = os.read(fd, RECEIVE_SIZE)
        except BlockingIOError:
            return None
        self.read_at = trio.current_time()
        return data


@dataclass(frozen=True)
class ServerStatistics:
    """The main socket's counters (``Server.statistics()``); each ``metric`` field is a series."""

    connections: int = metric("Open connections on the socket", name="agentd_connections")
    refused_connections: int = metric("Connections refused over a cap or the connect rate",
                                    COUNTER, name="agentd_connections_refused")
    requests: int = metric("Requests on the socket (all ops)", COUNTER,
                         name="agentd_socket_requests")
    rate_limited: int = metric("Requests that waited for their uid's rate token", COUNTER,
                             name="agentd_requests_rate_limited")
    flood_closed: int = metric("Connections closed for sending over the rate for too long",
                             COUNTER, name="agentd_connections_flood_closed")
    watchers: int = metric("Open watch streams", name="agentd_watchers")
    pid_reused: int = metric("Replies refused because the pid no longer named the peer",
                           COUNTER, name="agentd_peer_pid_reused")
    no_identity: int = metric("Connections refused because the peer could not be identified",
                            COUNTER, name="agentd_peer_no_identity")
    warnings_suppressed: int = metric("Refusal warnings not logged (coalesced per uid)", COUNTER,
                                    name="agentd_warnings_suppressed")
    connect_storms: int = metric("Connect storms seen (the listen queue was shortened)",
                                 COUNTER, name="agentd_connect_storms")
    listen_backlog: int = metric("The main socket's listen queue length now",
                                 name="agentd_listen_backlog")
    private_sockets: int = metric("Private sockets listening (one per uid or group named)",
                                  name="agentd_private_sockets")
    connect_guard: int = metric("1 if the connect guard can shut storming uids out",
                                name="agentd_connect_guard")
    blocked_uids: int = metric("uids shut out of the socket's directory now (connect storms)",
                               name="agentd_connect_blocked_uids")
    connect_blocks: int = metric("uids shut out for a connect storm, each time", COUNTER,
                                 name="agentd_connect_blocks")



async def _with_deadlines(
    serve: Callable[[trio.CancelScope, _Wait], Awaitable[None]],
) -> None:
    """Run one connection's ``serve(scope, wait)`` under its deadlines (``_Wait``): when the
    scope is cancelled at a deadline that is not due yet (an earlier wait's), the same wait
    goes on in a fresh scope; at a due deadline (idle or frame timeout) the connection ends."""
    wait = _Wait(trio.current_time())
    scope = trio.CancelScope()
    while True:
        with scope:
            await serve(scope, wait)
            return
        if not wait.waiting or trio.current_time() >= wait.deadline:
            return      # idle_timeout, frame_timeout, or cut short outside a wait
        scope = trio.CancelScope(deadline=wait.deadline)

class Server:
    """Serves v1 frames and HTTP on the main socket for one daemon. Its state lives as long as
    the daemon."""

    def __init__(
        self,
        config: Config,
        cache: Cache,
        refresher: Refresher,
        audit: Audit,
        *,
        status: Callable[[], Mapping[str, Any]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._reloads: Cell[int] = Cell(0)     # moves when the config is replaced (watchers)
        self._cache = cache
        self._refresher = refresher
        self._audit = audit
        self._status = status
        self._clock = clock
        self._connections = 0
        self._per_uid: Counter[int] = Counter()
        self._watchers: Counter[int] = Counter()
        self._budgets: dict[int, Budget] = {}
        self._connect_budgets: dict[int, Budget] = {}   # new connections, per uid
        self._warnings = Warnings()
        self.refused_connections = 0
        self.storm = Storm()
        # the connect guard, set by the daemon once the socket's directory is known good
        self.blocks = Blocks(None, threshold=STORM_REFUSALS, hold=STORM_HOLD,
                             on_lift=self._empty_connect_budget)
        self.connect_storms = 0
        self._backlog = 0           # the listen queue length set last (0: not yet)
        self.private_sockets = 0    # set by agentd.private
        self._storming = False
        self.requests = 0
        self.requests_by_op: Counter[str] = Counter()            # for metrics
        self.decisions: Counter[tuple[str, str]] = Counter()     # (op, decision), for metrics
        # (op, policy) of every deny: the policies that matched the peer, "none" if none did
        self.denials: Counter[tuple[str, str]] = Counter()
        self.rate_limited = 0       # frames that had to wait for their uid's token
        self.flood_closed = 0       # connections closed for sending over their rate too long
        self.pid_reused = 0
        self.no_identity = 0
        # How a connection's peer is identified; tests swap it (fake proc root, no pidfd).
        self.identify: Callable[[socket.socket], Peer] = Peer.from_socket
        self.exe_hasher = ExeHasher()

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """Replace the config (a reload): later requests use it, and watchers re-check grants."""
        self._config = config
        self._reloads.set(self._reloads.value + 1)

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            connections=self._connections,
            refused_connections=self.refused_connections,
            requests=self.requests,
            rate_limited=self.rate_limited,
            flood_closed=self.flood_closed,
            watchers=sum(self._watchers.values()),
            pid_reused=self.pid_reused,
            no_identity=self.no_identity,
            warnings_suppressed=self._warnings.suppressed,
            connect_storms=self.connect_storms,
            listen_backlog=self._backlog,
            private_sockets=self.private_sockets,
            connect_guard=int(self.blocks.guard is not None),
            blocked_uids=self.blocks.blocked,
            connect_blocks=self.blocks.blocks,
        )

    @property
    def reload_generation(self) -> int:
        return self._reloads.generation

    async def wait_reload(self, seen: int) -> tuple[int, Config]:
        """Wait for a config newer than generation ``seen``; return (generation, config)."""
        generation, _ = await self._reloads.wait_changed(seen)
        return generation, self._config

    async def serve(
        self,
        listener: socket.socket,
        *,
        shared: bool = True,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``listener`` until cancelled. Does not close ``listener``.

        The main socket (``shared``) has its listen queue sized here: ``listen_backlog`` long
        (as the config is after a reload), and ``STORM_BACKLOG`` during a connect storm. A
        private socket (``agentd.private``, decision 13) is sized by its owner: only its own
        uid or group can fill it. With the main socket run the connect guard's blocks
        (``Blocks.run``: each lifted when its time is up)."""
        if not shared:
            await serve_listener(listener, None, admit=self._admit, task_status=task_status)
            return
        self._size_queue(listener)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.blocks.run)
            await serve_listener(listener, None, admit=self._admit,
                                 after_turn=functools.partial(self._size_queue, listener),
                                 task_status=task_status)

    def _size_queue(self, listener: socket.socket) -> int | None:
        """Size the main socket's queue for now; during a storm, return its next turn's batch."""
        deep = self.config.agent.listen_backlog
        # and while a uid is shut out, and for a while after: when its block ends and it
        # comes back storming, it finds a short queue, and is blocked again soon (decision 13)
        now = trio.current_time()
        raging = self.storm.raging(now) or self.blocks.guarding(now)
        wanted = min(STORM_BACKLOG, deep) if raging else deep
        if raging != self._storming:
            self._storming = raging
            if raging:
                self.connect_storms += 1
                log.warning("connect storm: listen queue shortened", extra={"backlog": wanted})
            else:
                log.info("connect storm over: listen queue restored", extra={"backlog": wanted})
        if wanted != self._backlog:         # a storm's start or end, or a reload
            listener.listen(wanted)
            self._backlog = wanted
        return STORM_BATCH if raging else None

    def _empty_connect_budget(self, uid: int) -> None:
        """A uid let in after a block (decision 13) starts with no connect tokens: they come
        back at its rate, so a storm that resumes is refused from its first connect."""
        burst = float(self.config.agent.connect_burst_per_uid)
        budget = budget_of(self._connect_budgets, uid, burst)
        budget.tokens, budget.at = 0.0, trio.current_time()

    def _admit(self, sock: _socket.socket) -> Handler | None:
        """Admit a new connection or refuse it at once, from ``SO_PEERCRED`` alone (no /proc):
        over a connection cap, it gets ``rate_limited`` (id nil) if the write does not block
        and no connect storm is on, and is closed. Counts the admitted connection; its handler
        uncounts it."""
        try:
            pid, uid, _gid = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError as exc:
            self.no_identity += 1
            self._warnings.warn(None, "no_identity", "no peer credentials; closing",
                                error=str(exc))
            return None
        agent = self.config.agent
        rate = float(agent.connects_per_second_per_uid)
        burst = float(agent.connect_burst_per_uid)
        if (
            self._connections >= agent.max_connections
            or self._per_uid[uid] >= agent.max_connections_per_uid
            or not budget_of(self._connect_budgets, uid, burst).take(rate, burst)
        ):
            self.refused_connections += 1
            now = trio.current_time()
            self.storm.refused(now)
            self._audit.record(op="connect", decision="rate_limited", pid=pid, uid=uid)
            if self.blocks.refused(uid, now):       # the connect guard shut the uid out
                self._audit.record(op="connect", decision="shut_out", pid=pid, uid=uid)
            self._warnings.warn(uid, "connections", "too many connections; refusing",
                                pid=pid, connections=self._per_uid[uid])
            if not self._storming:      # in a storm, a reply is work for nobody's benefit
                _refuse(sock)
            return None
        self._connections += 1
        self._per_uid[uid] += 1
        return functools.partial(self._handle, uid=uid)

    async def _handle(self, conn: trio.socket.SocketType, *, uid: int) -> None:
        stream = trio.SocketStream(conn)
        peer: Peer | None = None
        try:
            try:
                peer = self.identify(conn)  # type: ignore[arg-type]
            except OSError as exc:
                self.no_identity += 1
                self._warnings.warn(uid, "no_identity", "no peer identity; closing",
                                    error=str(exc))
                return
            if needs_exe_sha256(self.config.policies):
                digest = await trio.to_thread.run_sync(self.exe_hasher.digest, peer)
                peer = peer.with_exe_sha256(digest)
            speaks = await self._first_byte(conn)
            if speaks is _HTTP:
                await self._converse_http(stream, peer)
            elif speaks is not None:
                await self._converse(stream, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("connection handler failed")
        finally:
            self._connections -= 1
            self._per_uid[uid] -= 1
            if not self._per_uid[uid]:
                del self._per_uid[uid]
            if peer is not None:
                peer.close()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _converse(self, stream: trio.SocketStream, peer: Peer) -> None:
        """Serve requests on one connection until it closes, breaks or times out.

        Deadlines (item 10 of issue 13): a partial frame must be complete ``frame_timeout``
        after its first byte arrived, and a connection with no partial frame must bring a
        request within ``idle_timeout`` of the last complete one; bytes arriving meanwhile move
        neither, so a request trickled a byte at a time is closed.

        Timeouts without a cancel scope per wait: one scope covers the conversation, and its
        deadline is only ever moved *earlier* (to the deadline of the wait in progress) or to
        infinity before an await that is not a wait for bytes. So it may fire before the wait
        in progress is due (at the deadline of an earlier wait): then, if the connection was
        waiting for bytes and that wait is not due yet, the wait goes on in a new scope (the
        deadlines live in ``_Wait``, so it is the same deadline). Nothing is lost: a wait for
        readability consumes nothing.
        """
        agent = self.config.agent
        conn = protocol.ServerConnection(max_request_bytes=agent.max_request_bytes)
        await _with_deadlines(
            lambda scope, wait: self._serve_connection(stream, conn, peer, scope, wait))

    async def _serve_connection(
        self,
        stream: trio.SocketStream,
        conn: protocol.ServerConnection,
        peer: Peer,
        scope: trio.CancelScope,
        wait: _Wait,
    ) -> None:
        """The request loop of ``_converse``: every complete frame received is answered, in
        order, and the replies to one receive go out in one write (pipelined requests). Each
        frame takes its uid's token before it is parsed (``_throttle`` when there is none)."""
        agent = self.config.agent
        rate = float(agent.requests_per_second_per_uid)
        burst = float(agent.request_burst_per_uid)
        uid = peer.uid
        fd = stream.socket.fileno()
        out: list[bytes] = []           # replies not sent yet
        checked = False                 # the pid was re-checked since the last receive
        got = False                     # a frame came out since the last receive
        granted: tuple[Config, Grants] | None = None
        while True:
            if conn.event_ready and not budget_of(self._budgets, uid, burst).take(rate, burst):
                # The token comes before parsing, the pid check and any log or audit line.
                if out and not await self._flush(stream, fd, out, scope):
                    return
                out = []
                if not await self._throttle(fd, peer, scope, wait, rate, burst):
                    return
                checked = False
            event = conn.next_event()
            if event is protocol.NEED_DATA or event is protocol.CLOSED:
                if out:
                    data = out[0] if len(out) == 1 else b"".join(out)
                    sent = _write_now(fd, data)
                    if sent != len(data) and not await self._send_rest(stream, data, sent, scope):
                        return
                    out = []
                if event is protocol.CLOSED:
                    return
                if got:
                    wait.idle_since = trio.current_time()
                wait.arm(conn.has_partial_frame, got, agent, scope)
                got = False
                try:
                    received = await wait.receive(fd)
                except OSError:
                    return              # reset by the peer
                if received is not None:
                    conn.receive_data(received)
                    checked = False
                continue
            got = True
            if not checked:
                # Before the replies to what this receive brought (decision: pid reuse).
                if not self._same_process(peer):
                    return
                checked = True
            if type(event) is not protocol.Request:
                assert isinstance(event, protocol.Rejected)
                out.append(conn.send_error(event.id, event.error))
                if conn.broken:
                    await self._flush(stream, fd, out, scope)
                    return
                continue
            op = event.op
            self.requests += 1
            self.requests_by_op[op] += 1
            config = self._config
            if granted is None or granted[0] is not config:
                granted = (config, grants(config.policies, peer))
            allowed = granted[1]
            if op == "get":
                out.append(self._get(conn, event, peer, allowed))
            elif op == "watch":
                try:
                    names = self._check_watch(event, peer)
                except RequestError as exc:
                    out.append(conn.send_error(event.id, exc))
                    continue
                if out and not await self._flush(stream, fd, out, scope):
                    return
                scope.deadline = math.inf
                await self._watch(stream, conn, event.id, names, peer)
                return
            elif op == "refresh":
                # Answer what came before: refresh waits for the upstream.
                if out and not await self._flush(stream, fd, out, scope):
                    return
                out = []
                scope.deadline = math.inf
                try:
                    result = await self._dispatch(event, peer, allowed)
                except RequestError as exc:
                    reply = conn.send_error(event.id, exc)
                else:
                    reply = conn.send_result(event.id, result)
                if not self._same_process(peer):        # again, after the wait
                    return
                out.append(reply)
            else:
                try:
                    result = self._dispatch_now(event, peer, allowed)
                except RequestError as exc:
                    out.append(conn.send_error(event.id, exc))
                else:
                    out.append(conn.send_result(event.id, result))
            if len(out) >= MAX_BATCH:
                # A long pipeline: send what is ready and let other connections run.
                if not await self._flush(stream, fd, out, scope):
                    return
                out = []
                scope.deadline = math.inf
                await trio.lowlevel.checkpoint()
                checked = False

    async def _flush(
        self, stream: trio.SocketStream, fd: int, out: list[bytes], scope: trio.CancelScope
    ) -> bool:
        """Send the replies in ``out``; False (close) if the client is gone or does not take
        them within frame_timeout."""
        data = b"".join(out)
        return await self._send_rest(stream, data, _write_now(fd, data), scope)

    async def _send_rest(
        self, stream: trio.SocketStream, data: bytes, sent: int | None, scope: trio.CancelScope
    ) -> bool:
        """Send what ``_write_now`` left of ``data`` (``sent`` bytes went out; None: the client
        went away); False (close) if the client does not take it within frame_timeout."""
        if sent is None:
            return False
        if sent == len(data):
            return True
        scope.deadline = math.inf       # _send has its own timeout
        return await self._send(stream, data[sent:])

    def _same_process(self, peer: Peer) -> bool:
        """Re-check before a reply that the pid still names the peer; audit and log if not."""
        if peer.still_same_process():
            return True
        self.pid_reused += 1
        self._warnings.warn(peer.uid, "pid_reused", "peer pid now names another process; "
                            "closing", pid=peer.pid)
        self._audit.record(op="reply", decision="pid_reused", pid=peer.pid, uid=peer.uid,
                           exe=peer.exe, start_time=peer.start_time)
        return False

    async def _throttle(
        self, fd: int, peer: Peer, scope: trio.CancelScope, wait: _Wait, rate: float,
        burst: float, refusal: bytes = _FLOODING,
    ) -> bool:
        """Wait, reading nothing, for a token of ``peer.uid`` (in the uid's queue); False (close)
        if the connection has been sending over the rate for ``frame_timeout`` without ever
        catching up: it is told so (``refusal``: ``rate_limited`` with id nil, or HTTP's 429)
        if that write does not block."""
        self.rate_limited += 1
        now = trio.current_time()
        if wait.throttled_since is None:
            wait.throttled_since = now
        scope.deadline = math.inf
        with trio.move_on_at(wait.throttled_since + self.config.agent.frame_timeout):
            await budget_of(self._budgets, peer.uid, burst).wait(rate, burst)
            return True
        self.flood_closed += 1
        self._warnings.warn(peer.uid, "flooding",
                            "closing a connection that keeps sending over its uid's rate",
                            pid=peer.pid)
        self._audit.record(op="request", decision="rate_limited", pid=peer.pid, uid=peer.uid,
                           exe=peer.exe, unit=peer.unit, start_time=peer.start_time)
        _write_now(fd, refusal)
        return False

    # --- watch -------------------------------------------------------------------------------

    def _check_watch(self, request: protocol.Request, peer: Peer) -> tuple[str, ...]:
        names: tuple[str, ...] = tuple(dict.fromkeys(request.args["names"]))
        allowed = grants(self.config.policies, peer)
        for name in names:
            if name not in self.config.secrets or not allowed.may_read(name):
                self._record(peer, "watch", "deny", name=name)
                raise Forbidden("not allowed to read every watched name")
        if self._watchers[peer.uid] >= self.config.agent.max_watchers_per_uid:
            self._record(peer, "watch", "rate_limited")
            raise RateLimited(f"too many watches for uid {peer.uid}")
        for name in names:
            self._record(peer, "watch", "allow", name=name)
        return names

    def _version_of(self, name: str) -> int | None:
        info = self._cache.info(name)
        return None if info is None else info.version

    async def _watch(
        self,
        stream: trio.SocketStream,
        conn: protocol.ServerConnection,
        id_: int,
        names: tuple[str, ...],
        peer: Peer,
    ) -> None:
        """Serve one watch until the client goes away, is too slow, or loses its grant."""
        seen = (self._cache.changes.generation, self._reloads.generation)
        heard = {name: self._version_of(name) for name in names}
        self._watchers[peer.uid] += 1
        try:
            if not await self._send(stream, conn.send_result(id_, {})):
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_wait_eof, stream, nursery.cancel_scope)
                while True:
                    seen = await self._wait_wake(seen)
                    allowed = grants(self.config.policies, peer)
                    if any(n not in self.config.secrets or not allowed.may_read(n)
                           for n in names):
                        self._record(peer, "watch", "deny")
                        break
                    for name in names:
                        event = self._watch_event(name, heard)
                        if event is None:
                            continue
                        if not self._same_process(peer):
                            nursery.cancel_scope.cancel()
                            return
                        kind, version = event
                        frame = conn.send_event(id_, kind, name=name, version=version)
                        if not await self._send(stream, frame):
                            log.info("dropping a slow watcher", extra={"pid": peer.pid})
                            self._record(peer, "watch", "dropped", name=name)
                            nursery.cancel_scope.cancel()
                            return
                nursery.cancel_scope.cancel()
        finally:
            self._watchers[peer.uid] -= 1
            if not self._watchers[peer.uid]:
                del self._watchers[peer.uid]

    async def _wait_wake(self, seen: tuple[int, int]) -> tuple[int, int]:
        """Wait until the cache announces a change or the config is replaced; return the new
        (changes, reloads) generations."""
        result = list(seen)
        async with trio.open_nursery() as nursery:

            async def changed() -> None:
                result[0], _ = await self._cache.changes.wait_changed(seen[0])
                nursery.cancel_scope.cancel()

            async def reloaded() -> None:
                result[1], _ = await self._reloads.wait_changed(seen[1])
                nursery.cancel_scope.cancel()

            nursery.start_soon(changed)
            nursery.start_soon(reloaded)
        return result[0], result[1]

    def _watch_event(self, name: str, heard: dict[str, int | None]) -> tuple[str, int] | None:
        """The event the client is owed for ``name`` (updating ``heard``), or None."""
        version = self._version_of(name)
        last = heard[name]
        if version is not None:
            if version == last:
                return None
            heard[name] = version
            return "changed", version
        if last is None or not self._refresher.is_revoked(name):
            return None         # not fetched yet, or dropped without evidence: nothing to say
        heard[name] = None
        return "revoked", last

    async def _send(self, stream: trio.SocketStream, data: bytes) -> bool:
        """Send one reply; False (close) if the client does not take it within frame_timeout."""
        with trio.move_on_after(self.config.agent.frame_timeout):
            await stream.send_all(data)
            return True
        return False

    # --- ops ---------------------------------------------------------------------------------

    def _dispatch_now(
        self, request: protocol.Request, peer: Peer, allowed: Grants
    ) -> Mapping[str, Any]:
        """The result of an op answered without waiting (all but get, watch and refresh)."""
        op = request.op
        if op == "ping":
            return {}
        if op == "list":
            self._record(peer, "list", "allow")
            return {"names": allowed.readable(self.config.secrets)}
        if op in ("status", "refresh"):
            if not allowed.admin:
                self._record(peer, op, "deny", name=request.args.get("name"))
                raise Forbidden(f"{op} needs a policy with admin = true")
            if op == "status":
                self._record(peer, op, "allow")
                return self._status()
        raise UnknownOp(f"op {op!r} is not supported by this agent")

    async def _dispatch(
        self, request: protocol.Request, peer: Peer, allowed: Grants
    ) -> Mapping[str, Any]:
        if request.op == "refresh" and allowed.admin:
            return await self._refresh(request, peer)
        return self._dispatch_now(request, peer, allowed)

    def _open(
        self, name: str, peer: Peer, allowed: Grants, transport: str | None, *,
        exact: bool = False,
    ) -> tuple[bytes, int, float, float | None, bool]:
        """The decisions of a read of ``name`` (v1 ``get`` and every HTTP read): granted,
        fetched, not revoked, within its stale deadline. Returns the cache's opened entry
        ``(packed, version, fetched_at, expires_at, stale)`` (``packed`` in v1's plain form,
        or with ``exact`` as stored, numbers with their JSON text: ``Cache.get_packed``); the
        caller audits the outcome once it has checked the field. A refusal is audited here
        and raised.

        Raises:
            Forbidden: undeclared or not granted (one answer: no existence oracle).
            NotFound: revoked or deleted upstream. Unavailable: not fetched yet, or past the
                earlier of ``fetched_at + max_stale`` and the value's own expiry (decision 5).
        """
        config = self._config
        if name not in config.secrets or not allowed.may_read(name):
            self._record(peer, "get", "deny", name=name, transport=transport)
            raise Forbidden("not allowed to read this secret")
        opened = self._cache.get_packed(name, exact=exact)
        if opened is None:
            if self._refresher.is_revoked(name):
                self._record(peer, "get", "not_found", name=name, transport=transport)
                raise NotFound("the secret was deleted or revoked upstream")
            self._record(peer, "get", "unavailable", name=name, transport=transport)
            raise Unavailable("the secret has not been fetched yet")
        _packed, version, fetched_at, expires_at, stale = opened
        if self._clock() > stale_deadline(fetched_at, expires_at, stale,
                                          config.max_stale_for(name)):
            self._record(peer, "get", "unavailable", name=name, version=version, stale=stale,
                         transport=transport)
            raise Unavailable("the secret is past its stale deadline")
        return opened

    def _get(
        self,
        conn: protocol.ServerConnection,
        request: protocol.Request,
        peer: Peer,
        allowed: Grants,
    ) -> bytes:
        """The reply frame to a ``get``: the value goes from the opened seal into the reply
        as the msgpack bytes it is stored as (no unpack, copy and repack). With ``exact``,
        numbers whose upstream text Python would not write back travel as that text
        (msgpack ext 1, decision 14), as the render worker gets them."""
        args = request.args
        name = args["name"]
        field = args.get("field")
        try:
            packed, version, fetched_at, expires_at, stale = self._open(
                name, peer, allowed, None, exact=args.get("exact", False))
            meta = {"version": version, "fetched_at": fetched_at, "expires_at": expires_at,
                    "stale": stale}
            if field is None:
                self._record(peer, "get", "allow", name=name, version=version, stale=stale)
                return conn.send_result(request.id, meta, packed={"data": packed})
            data = msgpack.unpackb(packed, raw=False, strict_map_key=False)
            if field not in data:
                self._record(peer, "get", "not_found", name=name, version=version)
                raise NotFound("the secret has no such field")
            self._record(peer, "get", "allow", name=name, version=version, stale=stale)
            return conn.send_result(request.id, {"data": data[field], **meta})
        except RequestError as exc:
            return conn.send_error(request.id, exc)

    async def _refresh(self, request: protocol.Request, peer: Peer) -> Mapping[str, Any]:
        name = request.args["name"]
        if name not in self.config.secrets:
            self._record(peer, "refresh", "not_found", name=name)
            raise BadRequest("not a declared secret")
        try:
            version = await self._refresher.refresh(name)
        except UpstreamError as exc:
            self._record(peer, "refresh", "unavailable", name=name)
            raise Unavailable(f"refresh failed: {exc}") from exc
        except RequestError:
            raise
        except Exception as exc:
            log.exception("refresh failed", extra={"secret": name})
            raise InternalError("refresh failed") from exc
        self._record(peer, "refresh", "allow", name=name, version=version)
        return {"version": version}

    def _record(
        self,
        peer: Peer,
        op: str,
        decision: str,
        *,
        name: str | None = None,
        version: int | None = None,
        stale: bool | None = None,
        transport: str | None = None,
    ) -> None:
        self.decisions[(op, decision)] += 1
        if decision == "deny":
            matched = grants(self.config.policies, peer).rules
            self.denials[(op, ",".join(matched) or "none")] += 1
        self._audit.record(
            op=op, decision=decision, pid=peer.pid, uid=peer.uid, exe=peer.exe, unit=peer.unit,
            name=name, version=version, stale=stale, start_time=peer.start_time,
            transport=transport,
        )


    # --- HTTP face (httpface.py) --------------------------------------------------------------

    async def _first_byte(self, conn: trio.socket.SocketType) -> object | None:
        """Which protocol the client speaks, from its first byte (peeked, not consumed):
        ``_HTTP`` or ``_V1``; None if it closed or sent nothing within ``idle_timeout``. One
        peek per connection: the v1 request loop is untouched."""
        with trio.move_on_after(self.config.agent.idle_timeout):
            try:
                first = await conn.recv(1, socket.MSG_PEEK)
            except OSError:
                return None
            if not first:
                return None
            return _HTTP if httpface.looks_like_http(first) else _V1
        return None

    async def _converse_http(self, stream: trio.SocketStream, peer: Peer) -> None:
        """Serve HTTP/1.1 requests on one connection until it closes, breaks or times out.

        The limits of v1 frames, applied the same way (see ``_converse`` and
        ``_serve_connection``): a request's line and headers at most ``max_request_bytes`` and
        complete within ``frame_timeout`` of the read that brought their first byte, the next
        request within ``idle_timeout`` of the last; each request takes its uid's token before
        it is parsed (``_throttle``: backpressure, and a connection that never catches up is
        told 429 and closed); the pid is re-checked before the replies to each receive
        (``_HttpReader.admit``), and the connection closed without an answer if it was reused.
        Responses to pipelined requests go out in one write, at most ``MAX_BATCH`` at a time.
        """
        agent = self.config.agent
        reader = _HttpReader(self, peer)
        conn = httpface.HttpConnection(reader, max_head_bytes=agent.max_request_bytes,
                                       clock=self._clock)
        await _with_deadlines(
            lambda scope, wait: self._serve_http(stream, conn, reader, scope, wait))

    async def _serve_http(
        self,
        stream: trio.SocketStream,
        conn: httpface.HttpConnection,
        reader: _HttpReader,
        scope: trio.CancelScope,
        wait: _Wait,
    ) -> None:
        """The request loop of ``_converse_http``."""
        agent = self.config.agent
        rate = float(agent.requests_per_second_per_uid)
        burst = float(agent.request_burst_per_uid)
        peer = reader.peer
        fd = stream.socket.fileno()
        out: list[bytes] = []
        while True:
            if conn.request_ready and not budget_of(self._budgets, peer.uid, burst).take(
                    rate, burst):
                # The token comes before parsing, the pid check and any log or audit line.
                if out and not await self._flush(stream, fd, out, scope):
                    return
                out = []
                if not await self._throttle(fd, peer, scope, wait, rate, burst,
                                            _HTTP_FLOODING):
                    return
                reader.checked = False
            try:
                reply = conn.next_reply()
            except _PidReused:
                return
            if reply is not httpface.NEED_DATA and reply is not httpface.CLOSED:
                out.append(reply)
                wait.idle_since = wait.read_at      # that read completed a request
                wait.frame_since = None
                if len(out) < MAX_BATCH:
                    continue
                # A long pipeline: send what is ready and let other connections run.
                if not await self._flush(stream, fd, out, scope):
                    return
                out = []
                scope.deadline = math.inf
                await trio.lowlevel.checkpoint()
                reader.checked = False
                continue
            if out:
                data = out[0] if len(out) == 1 else b"".join(out)
                sent = _write_now(fd, data)
                if sent != len(data) and not await self._send_rest(stream, data, sent, scope):
                    return
                out = []
            if reply is httpface.CLOSED:
                return
            wait.arm(conn.has_partial_request, False, agent, scope)
            try:
                received = await wait.receive(fd)
            except OSError:
                return          # reset by the peer
            if received is not None:
                conn.receive_data(received)
                reader.checked = False

    def _read(
        self, name: str, field: str | None, version: int | None, peer: Peer, allowed: Grants,
    ) -> httpface.Value:
        """An HTTP read of ``name``: ``_open``'s decisions and the audit lines of a v1 ``get``
        (with ``transport`` "http"), and ``version`` (kv2's ``?version=N``) only if it is the
        one held."""
        packed, held, fetched_at, expires_at, stale = self._open(name, peer, allowed, "http",
                                                                exact=True)
        if version is not None and version != held:
            self._record(peer, "get", "deny", name=name, transport="http")
            raise Forbidden("not allowed to read this secret at that version")
        # numbers with the upstream's text: the HTTP face answers 1e-7 as OpenBao does
        data, texts = jsonnum.unpackb_texts(packed)
        if field is not None:
            if field not in data:
                self._record(peer, "get", "not_found", name=name, version=held,
                             transport="http")
                raise NotFound("the secret has no such field")
            data = data[field]
        self._record(peer, "get", "allow", name=name, version=held, stale=stale,
                     transport="http")
        return httpface.Value(data, held, fetched_at, expires_at, stale, texts=texts)

async def _wait_eof(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """Read a watch connection until the client closes it or sends anything: then end the watch
    (a watch connection carries nothing from the client after the watch request)."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.receive_some(1)
    scope.cancel()


_HTTP = object()        # _first_byte: the client speaks HTTP/1.1
_V1 = object()          # ... v1 frames


class _PidReused(Exception):
    """The peer's pid names another process now: close without an answer (``_HttpReader``)."""


class _HttpReader:
    """The ``httpface.Reader`` of one HTTP connection: the server's decisions for its peer.

    ``checked`` is cleared by the shell after each receive; the first request after it re-checks
    the pid (``_PidReused`` if it was reused), as the v1 loop does before its replies.
    """

    def __init__(self, server: Server, peer: Peer) -> None:
        self._server = server
        self.peer = peer
        self._granted: tuple[Config, Grants] | None = None
        self.checked = False

    @property
    def secrets(self) -> Mapping[str, SecretConfig]:
        return self._server.config.secrets

    def _grants(self) -> Grants:
        config = self._server.config
        if self._granted is None or self._granted[0] is not config:
            self._granted = (config, grants(config.policies, self.peer))
        return self._granted[1]

    def admit(self) -> None:
        """The pid re-check (the uid's token was taken by the shell before parsing)."""
        server, peer = self._server, self.peer
        if not self.checked:
            if not server._same_process(peer):
                raise _PidReused
            self.checked = True
        server.requests += 1
        server.requests_by_op["http"] += 1

    def may_read(self, name: str) -> bool:
        return self._grants().may_read(name)

    def get(self, name: str, field: str | None, *, version: int | None = None
            ) -> httpface.Value:
        return self._server._read(name, field, version, self.peer, self._grants())

    def refuse(self, op: str) -> None:
        self._server._record(self.peer, op, "deny", transport="http")

    def readable(self) -> list[str]:
        self._server._record(self.peer, "list", "allow", transport="http")
        return self._grants().readable(self.secrets)

    def health(self) -> Mapping[str, Any]:
        return {"ok": True}

    def status(self) -> Mapping[str, Any]:
        server, peer = self._server, self.peer
        if not self._grants().admin:
            server._record(peer, "status", "deny", transport="http")
            raise Forbidden("status needs a policy with admin = true")
        server._record(peer, "status", "allow", transport="http")
        return server._status()
