"""The trio shell around the sans-IO protocol: listen, identify the peer, enforce limits, dispatch.

Theory of operation: ``serve`` accepts connections on an already-listening AF_UNIX socket (bound by
``open_listener`` or passed by systemd). Each connection gets its own task that

1. takes the peer's identity once (``SO_PEERCRED`` + /proc, see access.py) and refuses the
   connection when the global or per-uid connection cap is reached;
2. feeds received bytes to a ``protocol.ServerConnection`` and handles its events in order, so
   pipelined requests are answered in order;
3. before each reply re-checks that the pid still names the process identified at accept; if
   not, the connection is closed without an answer (pid reuse);
4. closes the connection when a frame is not completed within ``frame_timeout``, when it is idle
   for ``idle_timeout``, when a reply cannot be sent within ``frame_timeout`` (a client that does
   not read), or after a framing error (whose reply carries ``id`` nil).

A handler catches its own errors: one bad client can never take the server down. Every decision on
a secret is written to the audit stream.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from agentd import protocol
from agentd.access import Grants, Peer, grants
from agentd.audit import Audit
from agentd.cache import Cache
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
        self.config = config
        self._cache = cache
        self._refresher = refresher
        self._audit = audit
        self._status = status
        self._clock = clock
        self._connections = 0
        self._per_uid: Counter[int] = Counter()
        self.refused_connections = 0
        self.requests = 0

    def statistics(self) -> dict[str, int]:
        return {
            "connections": self._connections,
            "refused_connections": self.refused_connections,
            "requests": self.requests,
        }

    async def serve(
        self,
        listener: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``listener`` until cancelled. Does not close ``listener``."""
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
                nursery.start_soon(self._handle, conn)

    async def _handle(self, conn: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(conn)
        uid: int | None = None
        try:
            try:
                peer = Peer.from_socket(conn)  # type: ignore[arg-type]
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
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _converse(self, stream: trio.SocketStream, peer: Peer) -> None:
        agent = self.config.agent
        conn = protocol.ServerConnection(max_request_bytes=agent.max_request_bytes)
        while True:
            event = conn.next_event()
            if event is protocol.NEED_DATA:
                timeout = agent.frame_timeout if conn.has_partial_frame else agent.idle_timeout
                data = b""
                with trio.move_on_after(timeout) as scope:
                    data = await stream.receive_some(RECEIVE_SIZE)
                if scope.cancelled_caught:
                    return
                conn.receive_data(data)
                continue
            if event is protocol.CLOSED:
                return
            if not peer.still_same_process():
                log.warning("peer pid now names another process; closing", extra={"pid": peer.pid})
                self._audit.record(op="reply", decision="pid_reused", pid=peer.pid, uid=peer.uid,
                                   exe=peer.exe, start_time=peer.start_time)
                return
            if isinstance(event, protocol.Rejected):
                reply = conn.send_error(event.id, event.error)
                if not await self._send(stream, reply):
                    return
                if conn.broken:
                    return
                continue
            assert isinstance(event, protocol.Request)
            self.requests += 1
            try:
                result = await self._dispatch(event, peer)
            except RequestError as exc:
                reply = conn.send_error(event.id, exc)
            else:
                reply = conn.send_result(event.id, result)
            if not await self._send(stream, reply):
                return

    async def _send(self, stream: trio.SocketStream, data: bytes) -> bool:
        """Send one reply; False (close) if the client does not take it within frame_timeout."""
        with trio.move_on_after(self.config.agent.frame_timeout):
            await stream.send_all(data)
            return True
        return False

    # --- ops ---------------------------------------------------------------------------------

    async def _dispatch(self, request: protocol.Request, peer: Peer) -> Mapping[str, Any]:
        allowed = grants(self.config.policies, peer)
        op = request.op
        if op == "ping":
            return {}
        if op == "get":
            return self._get(request, peer, allowed)
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
            return await self._refresh(request, peer)
        raise UnknownOp(f"op {op!r} is not supported by this agent")

    def _get(self, request: protocol.Request, peer: Peer, allowed: Grants) -> Mapping[str, Any]:
        name = request.args["name"]
        field = request.args.get("field")
        if name not in self.config.secrets or not allowed.may_read(name):
            # The same answer whether the name exists or not: no existence oracle.
            self._record(peer, "get", "deny", name=name)
            raise Forbidden(f"not allowed to read {name[:64]!r}")
        entry = self._cache.get(name)
        if entry is None:
            if self._refresher.is_revoked(name):
                self._record(peer, "get", "not_found", name=name)
                raise NotFound(f"secret {name!r} was deleted or revoked upstream")
            self._record(peer, "get", "unavailable", name=name)
            raise Unavailable(f"secret {name!r} has not been fetched yet")
        if entry.stale and self._clock() > entry.fetched_at + self.config.max_stale_for(name):
            self._record(peer, "get", "unavailable", name=name, version=entry.version, stale=True)
            raise Unavailable(f"secret {name!r} is past its max_stale")
        data: Any = entry.data
        if field is not None:
            if field not in entry.data:
                self._record(peer, "get", "not_found", name=name, version=entry.version)
                raise NotFound(f"secret {name!r} has no field {field[:64]!r}")
            data = entry.data[field]
        self._record(peer, "get", "allow", name=name, version=entry.version, stale=entry.stale)
        return {
            "data": _plain(data),
            "version": entry.version,
            "fetched_at": entry.fetched_at,
            "expires_at": entry.expires_at,
            "stale": entry.stale,
        }

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
        self._audit.record(
            op=op, decision=decision, pid=peer.pid, uid=peer.uid, exe=peer.exe, unit=peer.unit,
            name=name, version=version, stale=stale, start_time=peer.start_time,
        )


def _plain(value: Any) -> Any:
    """Read-only mappings from the cache -> plain dicts and lists msgpack can pack."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
