"""A fault-injecting TCP proxy for trio tests (no asyncio, no threads).

Run it as a task in the test's own trio run::

    proxy = FaultProxy(bao.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)          # listens on 127.0.0.1:proxy.port
        proxy.mode = "blackhole"
        ...
        nursery.cancel_scope.cancel()

``mode`` is read at each accepted connection and again at each chunk of open ones, so switching
it also breaks connections a client keeps alive:

- ``pass``: forward both ways;
- ``blackhole``: accept and read everything, never answer, never close;
- ``reset``: read the first chunk of the request, then close with SO_LINGER 0 (the peer sees RST);
- ``delay``: forward, but hold each chunk from the server for ``delay`` seconds.

Counters: ``connections`` (accepted so far), ``active`` and ``peak_active`` (open at once), and
``requests``: every HTTP/1.1 request head a client sent, as ``(trio time, mode, "METHOD target")``
(found by its request line at the start of a chunk or after a blank line: fine for the small
requests agentd sends, not a parser).
Cleanup: cancelling ``run()`` closes the listener and every connection.
"""

from __future__ import annotations

import re
import socket
import struct

import trio

MODES = ("pass", "blackhole", "reset", "delay")
REQUEST_LINE = re.compile(rb"(?:\A|\r\n\r\n)([A-Z]+) (\S+) HTTP/1\.1\r\n")


class FaultProxy:
    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.delay = 0.5
        self.port = 0
        self.connections = 0
        self.active = 0
        self.peak_active = 0
        self.requests: list[tuple[float, str, str]] = []

    def _saw(self, data: bytes) -> None:
        for m in REQUEST_LINE.finditer(data):
            self.requests.append((trio.current_time(), self.mode,
                                  f"{m.group(1).decode()} {m.group(2).decode()}"))

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}")
        self.connections += 1
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        try:
            async with client:
                await self._serve(client, self.mode)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.active -= 1

    async def _serve(self, client: trio.SocketStream, mode: str) -> None:
        if mode == "blackhole":
            while data := await client.receive_some(65536):
                self._saw(data)
            await trio.sleep_forever()
        if mode == "reset":
            self._saw(await client.receive_some(65536))
            _linger_zero(client)
            return
        server = await trio.open_tcp_stream(*self.target)
        async with server, trio.open_nursery() as nursery:
            nursery.start_soon(self._upstream_pump, client, server, nursery.cancel_scope)
            nursery.start_soon(self._downstream_pump, server, client, nursery.cancel_scope)

    async def _upstream_pump(
        self, client: trio.SocketStream, server: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        """Client -> server. A mode change also hits connections that are already open."""
        try:
            while data := await client.receive_some(65536):
                self._saw(data)
                if self.mode == "reset":
                    _linger_zero(client)
                    break
                if self.mode == "blackhole":
                    continue
                await server.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            scope.cancel()  # one side closed: close both

    async def _downstream_pump(
        self, server: trio.SocketStream, client: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        """Server -> client, held back by ``delay`` in delay mode."""
        try:
            while data := await server.receive_some(65536):
                if self.mode == "delay":
                    await trio.sleep(self.delay)
                await client.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            scope.cancel()


def _linger_zero(stream: trio.SocketStream) -> None:
    """Make the coming close() send RST instead of FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
