"""Small clients for agentd's socket, built on the sans-IO core in ``protocol.py``.

``Client`` is blocking (stdlib ``socket``): for the CLI and for applications that have no event
loop. ``AsyncClient`` is the same on trio: for tests, the bench and trio applications. Both send
one request at a time and wait for its reply; a reply that is an error is raised as the matching
``RequestError`` subclass (``Forbidden``, ``NotFound``, ``Unavailable``...), and anything wrong
with the connection itself (no socket, EOF, garbage, timeout) as ``ClientError``.

``watch(names)`` sends the request and checks its reply at once (so ``Forbidden`` is raised by
the call), then returns an iterator of ``Event``; the connection is given over to that stream.

Connecting waits in the kernel while the agent's listen queue is full (a burst, or a connect
storm by another process). A non-blocking AF_UNIX ``connect()`` would fail at once with
``EAGAIN``, and retrying it races the storm for each place the agent frees, a race a loop in C
wins; a blocking one sleeps on the listener's queue of waiting connectors, which the kernel
wakes one at a time as the agent accepts (decision 13). So both clients connect blocking, the
wait bounded by ``SO_SNDTIMEO`` to ``CONNECT_WAIT_SECONDS`` (and never past ``Client.connect``'s
``timeout``); a queue that stays full that long is ``ClientError``. ``AsyncClient`` first tries
a non-blocking connect and only when the queue is full waits in a worker thread, not
cancellable but bounded by the same limit. Every other connect error is raised at once.

Both connect through the process's private socket when the agent keeps one beside the main
socket (``<socket>.d/uid-<euid>``, then ``gid-<gid>`` for its groups; ``agentd.private``): a
queue no other uid can fill. The path given stays the main socket's (messages name it).

``resolve_socket_path()`` implements the CLI's rule for finding the socket.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Final

import trio

from agentd.errors import ClientError, ConfigError, UsageError
from agentd.protocol import CLOSED, NEED_DATA, ClientConnection, Event, Response

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "DEFAULT_SOCKET",
    "AsyncClient",
    "Client",
    "Event",
    "open_client",
    "resolve_socket_path",
]

DEFAULT_SOCKET: Final = "/run/agentd/agentd.sock"
RECEIVE_SIZE: Final = 65536
_TIMEVAL: Final = struct.Struct("@ll")   # struct timeval
CONNECT_WAIT_SECONDS: Final = 2.0      # waiting for a place in a full listen queue, at most
MAX_GROUP_TRIES: Final = 16          # group sockets tried before the main socket, at most
# A private socket that is not this process's (or was left by an agent that is gone): next.
_NOT_MINE: Final = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.ECONNREFUSED,
                              errno.ENOTDIR})

log = logging.getLogger("agentd.client")


def _queue_full(exc: OSError) -> bool:
    return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)


def private_paths(where: str) -> list[str]:
    """The private sockets (decision 13) beside the main socket ``where`` that may be this
    process's: its effective uid's, then its groups' (at most ``MAX_GROUP_TRIES``). Empty if
    the agent keeps none there."""
    base = f"{where}.d"
    if not os.path.isdir(base):
        return []
    groups = list(dict.fromkeys([os.getegid(), *os.getgroups()]))[:MAX_GROUP_TRIES]
    return [f"{base}/uid-{os.geteuid()}", *(f"{base}/gid-{gid}" for gid in groups)]


def _candidates(where: str, private: bool) -> list[str]:
    """Where to connect, in order: this process's private sockets (if ``private``), then the
    main socket ``where``."""
    return [*(private_paths(where) if private else ()), where]


def _not_mine(path: str, where: str, exc: OSError) -> bool:
    """Whether a failed connect to ``path`` means "try the next": a private socket that is
    another's, or one left by an agent that is gone. The main socket's errors are errors."""
    return path != where and exc.errno in _NOT_MINE


def _connect_one(path: str, deadline: float) -> socket.socket:
    """A socket connected to ``path`` by a blocking ``connect()`` that waits until
    ``deadline`` (``time.monotonic()``) in the kernel for a place in a full listen queue. The
    socket is left blocking; the caller sets its own timeout.

    A signal whose handler returns ends the wait early, and Python then reports the AF_UNIX
    connect as done without it being so: ``getpeername()`` tells, and the wait goes on.

    Raises:
        OSError: the connect failed; ``EAGAIN`` or ``ENOTCONN``: the queue stayed full.
    """
    while True:
        left = max(0.001, deadline - time.monotonic())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            _TIMEVAL.pack(int(left), int(left % 1 * 1_000_000)))
            sock.connect(path)
            try:
                sock.getpeername()
            except OSError as exc:
                if exc.errno != errno.ENOTCONN or time.monotonic() >= deadline:
                    raise
                sock.close()
                continue                # interrupted by a signal: wait again
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(0, 0))
        except BaseException:
            sock.close()
            raise
        return sock


def _connect_waiting(where: str, wait: float, *, private: bool = True) -> socket.socket:
    """A socket connected to the agent whose main socket is ``where``: through this process's
    private socket if the agent keeps one (``private_paths``), else the main one, waiting up to
    ``wait`` seconds in the kernel for a place in a full listen queue (decision 13).

    Raises:
        ClientError: the queue stayed full for ``wait`` seconds, or any other connect error.
    """
    whole = max(0.001, wait)
    deadline = time.monotonic() + whole
    for path in _candidates(where, private):
        try:
            return _connect_one(path, deadline)
        except OSError as exc:
            if _not_mine(path, where, exc):
                continue
            if _queue_full(exc) or exc.errno == errno.ENOTCONN:
                raise ClientError(f"cannot connect to agentd at {where}: its connection queue "
                                  f"stayed full for {whole:.1f} s") from exc
            raise ClientError(
                f"cannot connect to agentd at {where}: {_connect_reason(exc)}") from exc
    raise AssertionError("unreachable: the main socket's outcome is returned or raised")


def _get_args(field: str | None, exact: bool) -> dict[str, Any]:
    """``get``'s optional arguments, sent only when they say something (the common request
    stays four keys: the agent's fast path)."""
    args: dict[str, Any] = {}
    if field is not None:
        args["field"] = field
    if exact:
        args["exact"] = True
    return args


def resolve_socket_path(
    socket: str | None, config_path: str | None, environ: Mapping[str, str]
) -> str:
    """The socket a client command should use.

    ``--socket`` wins; else, with ``-c FILE``, the ``[agent] socket`` of that file (or the
    default path if it sets none, since that is where its agent listens); else
    ``$AGENTD_SOCKET`` if set and not empty; else ``/run/agentd/agentd.sock``.

    Raises:
        UsageError: ``--socket`` is an empty string.
        ConfigError: the config file cannot be read or parsed, or ``agent.socket`` is not a
            non-empty string.
    """
    if socket is not None:
        if not socket:
            raise UsageError("--socket must not be empty")
        return socket
    if config_path is not None:
        return _socket_from_config(config_path)
    return environ.get("AGENTD_SOCKET") or DEFAULT_SOCKET


def _socket_from_config(config_path: str) -> str:
    # Only agent.socket is read here, on purpose: a client needs no full config validation.
    try:
        with open(config_path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError([f"{config_path}: {exc.strerror or exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{config_path}: {exc}"]) from exc
    agent = data.get("agent", {})
    if not isinstance(agent, dict):
        raise ConfigError([f"{config_path}: agent: must be a table"])
    path = agent.get("socket", DEFAULT_SOCKET)
    if not isinstance(path, str) or not path:
        raise ConfigError([f"{config_path}: agent.socket: must be a non-empty string"])
    return path


def _names(result: Mapping[str, Any]) -> list[str]:
    names = result.get("names")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ClientError("agentd sent a list reply without a list of 'names'")
    return names


def _result(response: Response | Event, id_: int) -> dict[str, Any]:
    """The result of the reply to request ``id_``, or its error raised."""
    if isinstance(response, Event):
        raise ClientError(f"agentd sent a watch event while a reply to request {id_} was due")
    if response.error is not None:
        # An error with id nil answers a request the agent could not read (or a refused
        # connection): it still belongs to the one request outstanding.
        if response.id in (id_, None):
            raise response.error
    elif response.id == id_:
        return dict(response.result)
    raise ClientError(f"agentd answered request {response.id} while {id_} was due")


# --- blocking client ----------------------------------------------------------------------------


class Client:
    """A blocking connection to agentd. Close it with ``close()`` or use it as a context
    manager; it is not safe to share between threads.

    Every method raises the ``RequestError`` subclass of an error reply, or ``ClientError`` if
    the connection fails, times out or carries garbage (the client is unusable afterwards).
    """

    def __init__(self, sock: socket.socket, path: str) -> None:
        self._sock = sock
        self._path = path
        self._conn = ClientConnection()
        self._broken: str | None = None

    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, timeout: float = 10.0,
                private: bool = True) -> Client:
        """Connect to the agent listening at ``path`` (through this process's private socket
        beside it, if there is one, unless ``private`` is false); ``timeout`` (seconds) applies
        to the connect and to each reply.

        Raises:
            ClientError: the socket is missing, refuses the connection or does not answer.
        """
        where = os.fspath(path)
        sock = _connect_waiting(where, min(CONNECT_WAIT_SECONDS, timeout), private=private)
        sock.settimeout(timeout)
        return cls(sock, where)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection. Idempotent."""
        self._broken = self._broken or "the client was closed"
        self._sock.close()

    def call(self, op: str, /, **args: Any) -> dict[str, Any]:
        """Send one request and return its result (the reply without id and ok)."""
        if self._broken is not None:
            raise ClientError(f"connection to agentd at {self._path} is unusable: {self._broken}")
        done = False
        try:
            id_ = self._send(op, **args)
            response = self._next()
            done = True
        finally:
            if not done:
                self._broken = "an earlier call did not complete"
        return _result(response, id_)

    def ping(self) -> None:
        """Check that the agent answers."""
        self.call("ping")

    def get(self, name: str, field: str | None = None, *, exact: bool = False
            ) -> dict[str, Any]:
        """The ``get`` result: ``data`` (or the field's value), ``version``, ``fetched_at``,
        ``expires_at`` and ``stale``. ``exact``: a number whose upstream text Python would not
        write back (``-0``, ``1e-7``) is a ``jsonnum.LiteralFloat``/``LiteralInt`` carrying
        that text, as templates see it."""
        return self.call("get", name=name, **_get_args(field, exact))

    def list(self) -> list[str]:
        """The names this process may read, sorted."""
        return _names(self.call("list"))

    def status(self) -> dict[str, Any]:
        """The agent's status (admin only)."""
        return self.call("status")

    def refresh(self, name: str) -> dict[str, Any]:
        """Re-read ``name`` from the upstream now; the result holds the new ``version``
        (admin only)."""
        return self.call("refresh", name=name)

    def watch(self, names: Sequence[str]) -> Iterator[Event]:
        """Watch ``names``; the request is checked here, and events come from the iterator.

        The connection is given over to the stream: make no other call on this client. The
        iterator waits without a timeout and raises ``ClientError`` when the agent closes the
        connection.
        """
        self.call("watch", names=list(names))
        self._broken = "the connection is given over to a watch"
        self._sock.settimeout(None)
        return self._events()

    def _events(self) -> Iterator[Event]:
        while True:
            event = self._next()
            if not isinstance(event, Event):
                raise ClientError(f"agentd sent a reply to request {event.id} during a watch")
            yield event

    def _send(self, op: str, /, **args: Any) -> int:
        id_, data = self._conn.send_request(op, **args)
        try:
            self._sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            # The agent closed the connection, perhaps after a reply such as rate_limited that
            # is still waiting to be read: let _next() find it (or report the close).
            pass
        except TimeoutError as exc:
            raise ClientError(f"agentd at {self._path} did not take the request in time") from exc
        except OSError as exc:
            raise ClientError(f"cannot send to agentd at {self._path}: {_reason(exc)}") from exc
        return id_

    def _next(self) -> Response | Event:
        while True:
            event = self._conn.next_event()
            if event is NEED_DATA:
                try:
                    data = self._sock.recv(RECEIVE_SIZE)
                except TimeoutError as exc:
                    raise ClientError(f"agentd at {self._path} did not answer in time") from exc
                except OSError as exc:
                    raise ClientError(f"cannot read from agentd at {self._path}: "
                                      f"{_reason(exc)}") from exc
                self._conn.receive_data(data)
            elif event is CLOSED:
                raise ClientError(f"agentd at {self._path} closed the connection")
            else:
                return event


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _connect_reason(exc: OSError) -> str:
    if exc.errno == errno.EACCES:   # the socket's mode, or the connect guard (decision 13)
        return ("permission denied: the socket's mode does not let this uid connect, or "
                "agentd's connect guard has shut this uid out for a while after it opened "
                "connections far over its rate")
    return _reason(exc)


# --- trio client --------------------------------------------------------------------------------


class AsyncClient:
    """A trio connection to agentd: the same methods as ``Client``, async.

    Get one with ``async with AsyncClient.connect(path) as client:`` or
    ``client = await open_client(path)`` (then ``await client.aclose()``). Calls from several
    tasks are serialised, one request at a time. There is no timeout parameter: wrap calls in
    ``trio.fail_after()``. A call cancelled half-way leaves the connection unusable (later calls
    raise ``ClientError``), since its reply may still be in flight.
    """

    def __init__(self, stream: trio.SocketStream, path: str) -> None:
        self._stream = stream
        self._path = path
        self._conn = ClientConnection()
        self._lock = trio.Lock()
        self._broken: str | None = None

    @classmethod
    @asynccontextmanager
    async def connect(cls, path: str | os.PathLike[str], *, private: bool = True
                      ) -> AsyncIterator[AsyncClient]:
        """Connect for the duration of an ``async with`` block; closed on exit. ``private``: as
        for ``open_client``.

        Raises:
            ClientError: the socket is missing or refuses the connection.
        """
        client = await open_client(path, private=private)
        async with client:
            yield client

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection. Idempotent."""
        self._broken = self._broken or "the client was closed"
        await self._stream.aclose()

    async def call(self, op: str, /, **args: Any) -> dict[str, Any]:
        """Send one request and return its result (the reply without id and ok)."""
        async with self._lock:
            self._check()
            done = False
            try:
                id_ = await self._send(op, **args)
                response = await self._next()
                done = True
            finally:
                if not done:
                    self._broken = self._broken or "an earlier call did not complete"
        return _result(response, id_)

    async def ping(self) -> None:
        """Check that the agent answers."""
        await self.call("ping")

    async def get(self, name: str, field: str | None = None, *, exact: bool = False
                  ) -> dict[str, Any]:
        """The ``get`` result, as ``Client.get``."""
        return await self.call("get", name=name, **_get_args(field, exact))

    async def list(self) -> list[str]:
        """The names this process may read, sorted."""
        return _names(await self.call("list"))

    async def status(self) -> dict[str, Any]:
        """The agent's status (admin only)."""
        return await self.call("status")

    async def refresh(self, name: str) -> dict[str, Any]:
        """Re-read ``name`` from the upstream now (admin only)."""
        return await self.call("refresh", name=name)

    async def watch(self, names: Sequence[str]) -> AsyncIterator[Event]:
        """Watch ``names``: ``async for event in await client.watch(["db"]):``.

        The request is checked here (``Forbidden`` is raised by this call); the connection is
        then given over to the returned stream (other calls raise ``ClientError``), which
        raises ``ClientError`` when the agent closes the connection.
        """
        await self.call("watch", names=list(names))
        self._broken = "the connection is given over to a watch"
        return _EventStream(self)

    def _check(self) -> None:
        if self._broken is not None:
            raise ClientError(f"connection to agentd at {self._path} is unusable: {self._broken}")

    async def _send(self, op: str, /, **args: Any) -> int:
        id_, data = self._conn.send_request(op, **args)
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError:
            # The agent closed the connection, perhaps after a reply such as rate_limited that
            # is still waiting to be read: let _next() find it (or report the close).
            pass
        except OSError as exc:
            raise ClientError(f"cannot send to agentd at {self._path}: {_reason(exc)}") from exc
        return id_

    async def _next(self) -> Response | Event:
        while True:
            event = self._conn.next_event()
            if event is NEED_DATA:
                try:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                except (OSError, trio.BrokenResourceError) as exc:
                    raise ClientError(f"cannot read from agentd at {self._path}: "
                                      f"{exc}") from exc
                self._conn.receive_data(data)
            elif event is CLOSED:
                raise ClientError(f"agentd at {self._path} closed the connection")
            else:
                return event


class _EventStream:
    """The events of one watch (an async iterator; not an async generator, so nothing is left
    to finalise when the consumer stops early)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    def __aiter__(self) -> _EventStream:
        return self

    async def __anext__(self) -> Event:
        async with self._client._lock:
            event = await self._client._next()
        if not isinstance(event, Event):
            raise ClientError(f"agentd sent a reply to request {event.id} during a watch")
        return event


async def open_client(path: str | os.PathLike[str], *, private: bool = True) -> AsyncClient:
    """Connect to the agent at ``path`` (through this process's private socket beside it, if
    there is one, unless ``private`` is false); the caller closes it with ``aclose()`` (or uses
    it in ``async with``). Bound the wait with ``trio.fail_after()``.

    Raises:
        ClientError: the socket is missing or refuses the connection.
    """
    where = os.fspath(path)
    for candidate in _candidates(where, private):
        try:
            stream = await _open_unix_stream(candidate)
        except OSError as exc:
            if _not_mine(candidate, where, exc):
                continue
            if not _queue_full(exc):
                raise ClientError(f"cannot connect to agentd at {where}: {_connect_reason(exc)}"
                                  ) from exc
            log.debug("agentd's connection queue is full; waiting for a place")
            sock = await trio.to_thread.run_sync(functools.partial(
                _connect_waiting, candidate, CONNECT_WAIT_SECONDS, private=False))
            sock.setblocking(False)
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        return AsyncClient(stream, where)
    raise AssertionError("unreachable: the main socket's outcome is returned or raised")


async def _open_unix_stream(where: str) -> trio.SocketStream:
    """Connect to ``where``. Not ``trio.open_unix_socket``: on a full listen queue it returns an
    unconnected socket (it takes ``EAGAIN`` for a connect in progress) instead of raising.

    Raises:
        OSError: the connect failed; ``EAGAIN``: the listen queue is full.
    """
    await trio.lowlevel.checkpoint()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        sock.connect(where)     # AF_UNIX: connected at once, or an error (EAGAIN included)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
