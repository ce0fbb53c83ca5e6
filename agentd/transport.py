"""HTTP/1.1 for the upstream: h11 over trio streams, with a small keep-alive pool per address.

Theory of operation: ``Transport.request()`` sends one request to one address and returns the
whole reply (status, headers, body) or raises one of three ``TransportError`` kinds:
``ConnectFailed`` (TCP connect or TLS handshake, including certificate verification: the request
never left), ``TimedOut`` (the attempt's deadline passed), ``ConnectionLost`` (reset, EOF or a
protocol error mid-exchange). ``upstream.py`` decides what each means for failover.

- **One deadline per attempt**: connect, TLS handshake, send and the whole reply together must fit
  in ``timeout`` (the ``upstream.timeout`` setting: "timeout of one HTTP request").
- **Keep-alive**: after a complete exchange both sides of the h11 state machine are DONE and the
  connection goes back to its address's idle list (LIFO, at most ``max_idle``). Before reuse, an
  idle connection is checked without blocking: if its socket is readable (the server closed it,
  or sent something unasked) it is dropped. Connections idle longer than ``IDLE_EXPIRY`` are
  dropped too, before the server's own idle timeout (OpenBao's default is 5 minutes, the same as
  the default refresh) can race a request. A request that fails on a reused connection before a
  byte of reply arrived is retried once on a fresh connection when it is a read (GET): the server
  closed the connection as we sent.
- **TLS**: ``trio.SSLStream`` with the caller's ``ssl.SSLContext`` (verifying; TLS 1.2 at least)
  and ``server_name`` (``tls_server_name``) for SNI and the certificate check. ``set_ssl_context``
  swaps it (the cert auth method's renewed client certificate): idle connections are closed and
  connections in flight are not pooled again.
- **Bounded**: a reply body over ``max_body`` bytes fails the attempt (``ReplyTooLarge``).

Why not httpx (DESIGN decision 1): the agent's steady cost is one small GET per secret per refresh
interval, and through httpx/httpcore/anyio one such request cost about 4x the CPU of the same
exchange through h11 directly (``bench/`` figures in the CHANGELOG); with 1,000 secrets polled
every second that was two thirds of a core. h11 is what httpcore uses underneath, so the
protocol handling is the same code.
"""

from __future__ import annotations

import select
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from agentd import __version__

MAX_BODY = 32 << 20          # bytes of one reply body (OpenBao's own request limit is 32 MiB)
IDLE_EXPIRY = 240.0          # seconds an idle connection is kept (< OpenBao's 5 min idle timeout)
READ_SIZE = 65536
USER_AGENT = f"agentd/{__version__}"
IDEMPOTENT = frozenset({"GET", "HEAD", "LIST"})


class TransportError(Exception):
    """The exchange failed below HTTP. ``str()`` says what, never a header or a body."""


class ConnectFailed(TransportError):
    """TCP connect or TLS handshake failed: the request was not sent."""


class TimedOut(TransportError):
    """The attempt's deadline passed."""


class ConnectionLost(TransportError):
    """The connection broke mid-exchange (reset, EOF, protocol error)."""

    def __init__(self, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale       # a reused connection, and not a byte of reply had arrived


class ReplyTooLarge(TransportError):
    """The reply body is larger than ``max_body``."""


@dataclass(frozen=True)
class Response:
    status_code: int
    headers: Mapping[str, str]      # lower-case names
    content: bytes


@dataclass(frozen=True)
class _Origin:
    key: tuple[str, str, int]
    tls: bool
    host: str
    port: int
    host_header: str


class _Conn:
    __slots__ = ("fd", "generation", "h11", "idle_since", "reused", "stream")

    def __init__(self, stream: trio.abc.Stream, fd: int, generation: int) -> None:
        self.stream = stream
        self.fd = fd
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        self.idle_since = 0.0
        self.generation = generation     # Transport._generation when it was opened
        self.reused = False

    def close(self) -> None:
        """Drop the connection at once (no TLS close_notify: nothing can block here)."""
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if isinstance(stream, trio.SocketStream):
            stream.socket.close()

    def readable(self) -> bool:
        """True when the idle connection has something to read: the server closed it (EOF) or
        sent something unasked. Either way it must not carry a new request."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))


def _socket_fd(stream: trio.SocketStream) -> int:
    return int(stream.socket.fileno())


class Transport:
    """Keep-alive HTTP/1.1 connections to a set of addresses (``scheme://host:port``).

    Use from any trio task; ``aclose()`` closes every idle connection.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None, timeout: float,
                 server_name: str | None = None, max_idle: int = 8,
                 max_body: int = MAX_BODY, headers: Sequence[tuple[str, str]] = ()) -> None:
        self._context = ssl_context
        self.timeout = timeout
        self._server_name = server_name
        self._max_idle = max_idle
        self._max_body = max_body
        self._headers = [("User-Agent", USER_AGENT), *headers]
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._closed = False
        self._generation = 0                # grows with each set_ssl_context()
        self.connects = 0                   # connections opened (statistics, tests)

    # --- public -------------------------------------------------------------------------------

    async def request(self, address: str, method: str, target: str,
                      headers: Sequence[tuple[str, str]] = (),
                      body: bytes | None = None) -> Response:
        """One exchange with ``address``; ``target`` is the path and query (``/v1/...``).

        Raises:
            ConnectFailed, TimedOut, ConnectionLost, ReplyTooLarge.
            ValueError: ``address`` is not an http or https URL.
        """
        origin = self._origin(address)
        conn: _Conn | None = None
        with trio.move_on_after(self.timeout) as scope:
            try:
                conn = self._take(origin)
                if conn is None:
                    conn = await self._connect(origin)
                try:
                    response = await self._exchange(conn, origin, method, target, headers, body)
                except ConnectionLost as exc:
                    conn.close()
                    conn = None
                    if not (exc.stale and method in IDEMPOTENT):
                        raise
                    conn = await self._connect(origin)
                    response = await self._exchange(conn, origin, method, target, headers, body)
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
            self._release(origin, conn)
            return response
        assert scope.cancelled_caught
        if conn is not None:
            conn.close()
        raise TimedOut(f"timed out after {self.timeout:g}s")

    def set_ssl_context(self, context: ssl.SSLContext) -> None:
        """New connections use ``context``; idle ones are closed, busy ones not pooled again."""
        self._context = context
        self._generation += 1
        self._close_idle()

    async def aclose(self) -> None:
        """Close every idle connection. Idempotent."""
        self._closed = True
        self._close_idle()
        await trio.lowlevel.checkpoint()

    def idle_connections(self) -> int:
        return sum(len(v) for v in self._idle.values())

    # --- internals ----------------------------------------------------------------------------

    def _close_idle(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def _origin(self, address: str) -> _Origin:
        origin = self._origins.get(address)
        if origin is None:
            split = urlsplit(address)
            if split.scheme not in ("http", "https") or not split.hostname:
                raise ValueError(f"not an http(s) URL: {address!r}")
            tls = split.scheme == "https"
            port = split.port or (443 if tls else 80)
            origin = _Origin(key=(split.scheme, split.hostname, port), tls=tls,
                             host=split.hostname, port=port, host_header=split.netloc)
            self._origins[address] = origin
        return origin

    def _take(self, origin: _Origin) -> _Conn | None:
        idle = self._idle.get(origin.key)
        now = trio.current_time()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since > IDLE_EXPIRY or conn.readable():
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    def _release(self, origin: _Origin, conn: _Conn) -> None:
        state = conn.h11
        if (self._closed or conn.generation != self._generation
                or state.our_state is not h11.DONE or state.their_state is not h11.DONE):
            conn.close()
            return
        state.start_next_cycle()
        idle = self._idle.setdefault(origin.key, [])
        if len(idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = trio.current_time()
        idle.append(conn)

    async def _connect(self, origin: _Origin) -> _Conn:
        try:
            tcp = await trio.open_tcp_stream(origin.host, origin.port)
        except OSError as exc:
            raise ConnectFailed(f"cannot connect ({exc.strerror or type(exc).__name__})") from exc
        self.connects += 1
        fd = _socket_fd(tcp)
        if not origin.tls:
            return _Conn(tcp, fd, self._generation)
        context = self._context or ssl.create_default_context()
        stream = trio.SSLStream(tcp, context, server_hostname=self._server_name or origin.host,
                                https_compatible=True)
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            tcp.socket.close()
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            reason = getattr(cause, "reason", None) or type(cause).__name__
            raise ConnectFailed(f"cannot connect (TLS: {reason})") from exc
        except BaseException:
            tcp.socket.close()
            raise
        return _Conn(stream, fd, self._generation)

    async def _exchange(self, conn: _Conn, origin: _Origin, method: str, target: str,
                        headers: Sequence[tuple[str, str]], body: bytes | None) -> Response:
        state = conn.h11
        all_headers = [("Host", origin.host_header), *self._headers, *headers]
        if body is not None:
            all_headers.append(("Content-Length", str(len(body))))
        received = False
        try:
            out = state.send(h11.Request(method=method, target=target, headers=all_headers))
            if body:
                out += state.send(h11.Data(data=body))
            out += state.send(h11.EndOfMessage())
            await conn.stream.send_all(out)
            status = 0
            reply_headers: dict[str, str] = {}
            chunks: list[bytes] = []
            size = 0
            while True:
                event = state.next_event()
                if event is h11.NEED_DATA:
                    data = await conn.stream.receive_some(READ_SIZE)
                    received = received or bool(data)
                    state.receive_data(bytes(data))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    reply_headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                                     for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > self._max_body:
                        raise ReplyTooLarge(f"reply larger than {self._max_body} bytes")
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionLost("connection failed (closed by the server)",
                                         stale=conn.reused and not received)
                # InformationalResponse (1xx): keep reading
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                ssl.SSLError) as exc:
            cause = exc.__cause__ or exc
            raise ConnectionLost(f"connection failed ({type(cause).__name__})",
                                 stale=conn.reused and not received) from exc
        except h11.RemoteProtocolError as exc:
            what = "closed by the server" if not received else "protocol error"
            raise ConnectionLost(f"connection failed ({what})",
                                 stale=conn.reused and not received) from exc
        except h11.LocalProtocolError:
            # (its message may quote a header: the token)
            raise ConnectionLost("connection failed (the request is not valid HTTP)") from None
        return Response(status, reply_headers, b"".join(chunks))

