"""The trio shell around the sans-IO protocol: listen, identify the peer, enforce limits, dispatch.

Theory of operation: ``serve`` accepts connections on an already-listening AF_UNIX socket (bound by
``open_listener`` or passed by systemd). Each connection gets its own task that

1. takes the peer's identity once (``SO_PEERCRED`` + /proc, see access.py) and refuses the
   connection when the global or per-uid connection cap is reached;
2. feeds received bytes to a ``protocol.ServerConnection`` and handles its events in order, so
   pipelined requests are answered in order; the replies to the frames one read brought go out
   in one write (at most ``MAX_BATCH`` before other connections get a turn);
3. before the replies to each read (and again before a reply that had to wait, such as a
   ``refresh``'s), re-checks that the pid still names the process identified at accept; if not,
   the connection is closed without an answer (pid reuse). Between the check and the write of
   those replies there is no scheduling point;
3a. takes a token from the peer uid's bucket for each request (``requests_per_second_per_uid``,
   ``request_burst_per_uid``); a request over the rate is answered ``rate_limited``, so a flood
   from one uid costs that uid its answers and leaves other uids served;
3b. after a successful ``watch``, gives the connection over to that watch: it compares the
   watched names' versions with what the client last heard of each time ``cache.changes``
   moves (so events are never lost to the cell skipping a value, and at most one event per name
   is pending), sends ``changed``/``revoked`` events, reads nothing but EOF, and drops a watcher
   that does not take an event within ``frame_timeout``;
4. closes the connection when a frame is not completed within ``frame_timeout``, when it is idle
   for ``idle_timeout``, when a reply cannot be sent within ``frame_timeout`` (a client that does
   not read), or after a framing error (whose reply carries ``id`` nil).

A handler catches its own errors: one bad client can never take the server down. Every decision on
a secret is written to the audit stream.

The read path is the hot path (issue #8: a cached ``get`` costs the agent about 20 µs of CPU),
and these choices come from profiling it: a reply is written at once with ``os.write`` on the
non-blocking socket, falling back to ``SocketStream.send_all`` under a ``frame_timeout`` only
for what does not fit; the wait for bytes is ``wait_readable`` then ``os.read``, timed out by
one cancel scope per connection whose deadline is moved lazily (see ``_converse``) instead of a
scope per wait; the peer's grants are computed once per connection and config; a ``get`` splices
the value's msgpack bytes, as the cache's seal opens them, into the reply.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import msgpack
import trio

from agentd import protocol
from agentd.access import ExeHasher, Grants, Peer, grants, needs_exe_sha256
from agentd.audit import Audit
from agentd.cache import Cache, stale_deadline
from agentd.cell import Cell
from agentd.config import Config
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
from agentd.refresh import Refresher

log = logging.getLogger("agentd.server")

RECEIVE_SIZE = 65536
MAX_BATCH = 64          # replies to pipelined requests sent before other connections get a turn


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
    """The wait for bytes in progress on one connection (see ``Server._converse``)."""

    __slots__ = ("deadline", "resume", "waiting")

    def __init__(self) -> None:
        self.deadline = math.inf    # when the wait in progress is due
        self.waiting = False        # True while waiting for bytes
        self.resume = False         # the next wait goes on with ``deadline`` (cut short)


def open_listener(
    path: Path, *, mode: int, group: int | None, backlog: int = 128
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
    handle: Callable[[trio.socket.SocketType], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``listener`` until cancelled, one ``handle(conn)`` task per connection.

    Running out of descriptors or memory pauses accepting briefly instead of ending the server;
    ``handle`` must catch its own errors. Does not close ``listener``.
    """
    sock = trio.socket.from_stdlib_socket(listener)
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed, pausing", extra={"error": str(exc)})
                    await trio.sleep(0.1)
                    continue
                raise
            nursery.start_soon(handle, conn)


class Server:
    """Serves the v1 protocol for one daemon. Its state lives as long as the daemon."""

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
        self._buckets: dict[int, list[float]] = {}      # uid -> [tokens, trio time of update]
        self.refused_connections = 0
        self.requests = 0
        self.requests_by_op: Counter[str] = Counter()            # for metrics
        self.decisions: Counter[tuple[str, str]] = Counter()     # (op, decision), for metrics
        # (op, policy) of every deny: the policies that matched the peer, "none" if none did
        self.denials: Counter[tuple[str, str]] = Counter()
        self.rate_limited = 0
        self.pid_reused = 0
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

    def statistics(self) -> dict[str, int]:
        return {
            "connections": self._connections,
            "refused_connections": self.refused_connections,
            "requests": self.requests,
            "rate_limited": self.rate_limited,
            "watchers": sum(self._watchers.values()),
            "pid_reused": self.pid_reused,
        }

    async def serve(
        self,
        listener: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``listener`` until cancelled. Does not close ``listener``."""
        await serve_listener(listener, self._handle, task_status=task_status)

    async def _handle(self, conn: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(conn)
        uid: int | None = None
        peer: Peer | None = None
        try:
            try:
                peer = self.identify(conn)  # type: ignore[arg-type]
            except OSError as exc:
                log.warning("no peer credentials", extra={"error": str(exc)})
                return
            agent = self.config.agent
            if (
                self._connections >= agent.max_connections
                or self._per_uid[peer.uid] >= agent.max_connections_per_uid
            ):
                self.refused_connections += 1
                self._audit.record(op="connect", decision="rate_limited", pid=peer.pid,
                                   uid=peer.uid, exe=peer.exe, start_time=peer.start_time)
                reply = protocol.ServerConnection().send_error(
                    None, RateLimited("too many connections")
                )
                with trio.move_on_after(agent.frame_timeout):
                    await stream.send_all(reply)
                return
            uid = peer.uid
            self._connections += 1
            self._per_uid[uid] += 1
            if needs_exe_sha256(self.config.policies):
                digest = await trio.to_thread.run_sync(self.exe_hasher.digest, peer)
                peer = peer.with_exe_sha256(digest)
            await self._converse(stream, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("connection handler failed")
        finally:
            if uid is not None:
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

        Timeouts without a cancel scope per wait: one scope covers the conversation, and its
        deadline is only ever moved *earlier* (to the deadline of the wait in progress) or to
        infinity before an await that is not a wait for bytes. So it may fire before the wait
        in progress is due (at the deadline of an earlier wait): then, if the connection was
        waiting for bytes and that wait is not due yet, the wait goes on in a new scope. Nothing
        is lost: a wait for readability consumes nothing.
        """
        agent = self.config.agent
        conn = protocol.ServerConnection(max_request_bytes=agent.max_request_bytes)
        wait = _Wait()
        scope = trio.CancelScope()
        while True:
            with scope:
                await self._serve_connection(stream, conn, peer, scope, wait)
                return
            if not wait.waiting or trio.current_time() >= wait.deadline:
                return      # idle_timeout, frame_timeout, or cut short outside a wait
            wait.resume = True
            scope = trio.CancelScope(deadline=wait.deadline)

    async def _serve_connection(
        self,
        stream: trio.SocketStream,
        conn: protocol.ServerConnection,
        peer: Peer,
        scope: trio.CancelScope,
        wait: _Wait,
    ) -> None:
        """The request loop of ``_converse``: every complete frame received is answered, in
        order, and the replies to one receive go out in one write (pipelined requests)."""
        agent = self.config.agent
        fd = stream.socket.fileno()
        out: list[bytes] = []           # replies not sent yet
        checked = False                 # the pid was re-checked since the last receive
        granted: tuple[Config, Grants] | None = None
        while True:
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
                if wait.resume:         # a wait cut short by an early deadline goes on
                    wait.resume = False
                else:
                    timeout = agent.frame_timeout if conn.has_partial_frame else agent.idle_timeout
                    wait.deadline = trio.current_time() + timeout
                if wait.deadline < scope.deadline:
                    scope.deadline = wait.deadline
                wait.waiting = True
                await trio.lowlevel.wait_readable(fd)
                wait.waiting = False
                try:
                    data = os.read(fd, RECEIVE_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    return              # reset by the peer
                conn.receive_data(data)
                checked = False
                continue
            if not checked:
                # Before the replies to what this receive brought (decision: pid reuse).
                if not self._same_process(peer):
                    return
                checked = True
            if type(event) is not protocol.Request:
                assert isinstance(event, protocol.Rejected)
                error = event.error
                if not conn.broken and not self._take_token(peer.uid):
                    # Malformed requests cost a token too, or they would be a free flood.
                    self.rate_limited += 1
                    error = RateLimited(f"over {agent.requests_per_second_per_uid} requests per "
                                        f"second for uid {peer.uid}")
                out.append(conn.send_error(event.id, error))
                if conn.broken:
                    await self._flush(stream, fd, out, scope)
                    return
                continue
            op = event.op
            self.requests += 1
            self.requests_by_op[op] += 1
            if not self._take_token(peer.uid):
                self.rate_limited += 1
                out.append(conn.send_error(event.id, RateLimited(
                    f"over {agent.requests_per_second_per_uid} requests per second for uid "
                    f"{peer.uid}")))
                continue
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
        log.warning("peer pid now names another process; closing", extra={"pid": peer.pid})
        self._audit.record(op="reply", decision="pid_reused", pid=peer.pid, uid=peer.uid,
                           exe=peer.exe, start_time=peer.start_time)
        return False

    def _take_token(self, uid: int) -> bool:
        """Take one request token from ``uid``'s bucket; False if it is empty."""
        agent = self.config.agent
        rate, burst = float(agent.requests_per_second_per_uid), float(agent.request_burst_per_uid)
        now = trio.current_time()
        bucket = self._buckets.get(uid)
        if bucket is None:
            if len(self._buckets) >= 4096:
                # Buckets refilled to the brim carry no state: drop them to bound the table.
                for key in [k for k, (t, at) in self._buckets.items()
                            if t + (now - at) * rate >= burst]:
                    del self._buckets[key]
            bucket = self._buckets[uid] = [burst, now]
        tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    # --- watch -------------------------------------------------------------------------------

    def _check_watch(self, request: protocol.Request, peer: Peer) -> tuple[str, ...]:
        names: tuple[str, ...] = tuple(dict.fromkeys(request.args["names"]))
        allowed = grants(self.config.policies, peer)
        for name in names:
            if name not in self.config.secrets or not allowed.may_read(name):
                self._record(peer, "watch", "deny", name=name)
                raise Forbidden(f"not allowed to read {name[:64]!r}")
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

    def _get(
        self,
        conn: protocol.ServerConnection,
        request: protocol.Request,
        peer: Peer,
        allowed: Grants,
    ) -> bytes:
        """The reply frame to a ``get``: the value goes from the opened seal into the reply
        as the msgpack bytes it is stored as (no unpack, copy and repack)."""
        args = request.args
        name = args["name"]
        field = args.get("field")
        config = self._config
        try:
            if name not in config.secrets or not allowed.may_read(name):
                # The same answer whether the name exists or not: no existence oracle.
                self._record(peer, "get", "deny", name=name)
                raise Forbidden(f"not allowed to read {name[:64]!r}")
            opened = self._cache.get_packed(name)
            if opened is None:
                if self._refresher.is_revoked(name):
                    self._record(peer, "get", "not_found", name=name)
                    raise NotFound(f"secret {name!r} was deleted or revoked upstream")
                self._record(peer, "get", "unavailable", name=name)
                raise Unavailable(f"secret {name!r} has not been fetched yet")
            packed, version, fetched_at, expires_at, stale = opened
            if self._clock() > stale_deadline(fetched_at, expires_at, stale,
                                              config.max_stale_for(name)):
                # past the earlier of fetched_at + max_stale and the value's own expiry
                # (decision 5)
                self._record(peer, "get", "unavailable", name=name, version=version,
                             stale=stale)
                raise Unavailable(f"secret {name!r} is past its stale deadline")
            meta = {"version": version, "fetched_at": fetched_at, "expires_at": expires_at,
                    "stale": stale}
            if field is None:
                self._record(peer, "get", "allow", name=name, version=version, stale=stale)
                return conn.send_result(request.id, meta, packed={"data": packed})
            data = msgpack.unpackb(packed, raw=False, strict_map_key=False)
            if field not in data:
                self._record(peer, "get", "not_found", name=name, version=version)
                raise NotFound(f"secret {name!r} has no field {field[:64]!r}")
            self._record(peer, "get", "allow", name=name, version=version, stale=stale)
            return conn.send_result(request.id, {"data": data[field], **meta})
        except RequestError as exc:
            return conn.send_error(request.id, exc)

    async def _refresh(self, request: protocol.Request, peer: Peer) -> Mapping[str, Any]:
        name = request.args["name"]
        if name not in self.config.secrets:
            self._record(peer, "refresh", "not_found", name=name)
            raise BadRequest(f"{name[:64]!r} is not a declared secret")
        try:
            version = await self._refresher.refresh(name)
        except UpstreamError as exc:
            self._record(peer, "refresh", "unavailable", name=name)
            raise Unavailable(f"refresh of {name!r} failed: {exc}") from exc
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
    ) -> None:
        self.decisions[(op, decision)] += 1
        if decision == "deny":
            matched = grants(self.config.policies, peer).rules
            self.denials[(op, ",".join(matched) or "none")] += 1
        self._audit.record(
            op=op, decision=decision, pid=peer.pid, uid=peer.uid, exe=peer.exe, unit=peer.unit,
            name=name, version=version, stale=stale, start_time=peer.start_time,
        )


async def _wait_eof(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """Read a watch connection until the client closes it or sends anything: then end the watch
    (a watch connection carries nothing from the client after the watch request)."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.receive_some(1)
    scope.cancel()

