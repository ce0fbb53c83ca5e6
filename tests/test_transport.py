"""agentd.transport: keep-alive, stale connections, bounds and timeouts.

Against the real OpenBao dev server where it can answer; against small loopback servers for the
connection-level behaviour a healthy OpenBao never shows on cue (closing a kept-alive connection
as the next request arrives, an endless reply, no reply at all).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest
import trio

from agentd.transport import (
    ConnectFailed,
    ConnectionLost,
    ReplyTooLarge,
    TimedOut,
    Transport,
)
from tests.openbao import DevServer, free_port

TOKEN_MARKER = "s.TOKEN-MARKER-5d1e"
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

Handler = Callable[[trio.SocketStream, int], Awaitable[None]]


async def _serve(handler: Handler, *, task_status: trio.TaskStatus[int]) -> None:
    """A loopback TCP server; ``handler(stream, n)`` gets each connection and its number."""
    count = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal count
        count += 1
        async with stream:
            await handler(stream, count)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def _read_request(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return data
        data += chunk
    return data


async def test_keep_alive_reuses_one_connection(bao: DevServer) -> None:
    bao.kv_put("transport-keepalive", {"v": "1"})
    transport = Transport(ssl_context=None, timeout=5.0,
                          headers=[("X-Vault-Token", bao.token)])
    try:
        with trio.fail_after(20):
            for _ in range(20):
                reply = await transport.request(bao.address, "GET",
                                                "/v1/secret/data/transport-keepalive")
                assert reply.status_code == 200
                assert json.loads(reply.content)["data"]["data"] == {"v": "1"}
    finally:
        await transport.aclose()
    assert transport.connects == 1
    assert transport.idle_connections() == 0


async def test_concurrent_requests_pool_up_to_max_idle(bao: DevServer) -> None:
    transport = Transport(ssl_context=None, timeout=5.0, max_idle=3)
    try:
        with trio.fail_after(20):
            for _ in range(3):
                async with trio.open_nursery() as nursery:
                    for _ in range(6):
                        nursery.start_soon(transport.request, bao.address, "GET",
                                           "/v1/sys/health")
            assert transport.idle_connections() == 3
    finally:
        await transport.aclose()
    # 6 at once the first time; later rounds reuse the 3 kept and open 3 more
    assert transport.connects == 6 + 3 + 3


async def test_connection_closed_by_server_while_idle_is_not_reused() -> None:
    async def one_reply_then_close(stream: trio.SocketStream, n: int) -> None:
        await _read_request(stream)
        await stream.send_all(OK)       # keep-alive reply, then the server drops it

    transport = Transport(ssl_context=None, timeout=5.0)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve, one_reply_then_close)
        address = f"http://127.0.0.1:{port}"
        with trio.fail_after(10):
            assert (await transport.request(address, "GET", "/a")).status_code == 200
            while transport.idle_connections() and not _idle_readable(transport):
                await trio.sleep(0.01)      # until the server's FIN has arrived
            assert (await transport.request(address, "GET", "/b")).status_code == 200
        nursery.cancel_scope.cancel()
    await transport.aclose()
    assert transport.connects == 2


def _idle_readable(transport: Transport) -> bool:
    return any(c.readable() for conns in transport._idle.values() for c in conns)


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("POST", False)])
async def test_race_with_server_close_retries_reads_only(method: str, retried: bool) -> None:
    """The server reads the second request on a kept-alive connection and closes it without a
    reply (its idle timeout firing as the request arrives): a read is retried on a fresh
    connection, a write is not (it may have been applied)."""

    async def close_on_second_request(stream: trio.SocketStream, n: int) -> None:
        await _read_request(stream)
        await stream.send_all(OK)
        if n == 1:
            await _read_request(stream)     # ...and close without answering

    transport = Transport(ssl_context=None, timeout=5.0)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve, close_on_second_request)
        address = f"http://127.0.0.1:{port}"
        with trio.fail_after(10):
            await transport.request(address, method, "/a", body=b"{}")
            if retried:
                assert (await transport.request(address, method, "/b")).status_code == 200
            else:
                with pytest.raises(ConnectionLost, match="closed by the server"):
                    await transport.request(address, method, "/b", body=b"{}")
        nursery.cancel_scope.cancel()
    await transport.aclose()
    assert transport.connects == (2 if retried else 1)


async def test_reply_body_is_bounded() -> None:
    async def endless(stream: trio.SocketStream, n: int) -> None:
        await _read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 4096
        with trio.move_on_after(10):
            for _ in range(10_000):         # bounded: 40 MB at most
                await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    transport = Transport(ssl_context=None, timeout=10.0, max_body=64 * 1024)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve, endless)
        with trio.fail_after(15), pytest.raises(ReplyTooLarge):
            await transport.request(f"http://127.0.0.1:{port}", "GET", "/big")
        nursery.cancel_scope.cancel()
    await transport.aclose()
    assert transport.idle_connections() == 0


async def test_one_deadline_covers_the_whole_exchange() -> None:
    async def trickle(stream: trio.SocketStream, n: int) -> None:
        await _read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):                # one byte every 0.1 s: no single read is slow
            await stream.send_all(b"x")
            await trio.sleep(0.1)

    transport = Transport(ssl_context=None, timeout=1.0)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve, trickle)
        with trio.fail_after(10), pytest.raises(TimedOut, match="timed out after 1s"):
            await transport.request(f"http://127.0.0.1:{port}", "GET", "/slow")
        nursery.cancel_scope.cancel()
    await transport.aclose()


async def test_connect_refused_and_bad_header_say_what_without_the_token() -> None:
    transport = Transport(ssl_context=None, timeout=5.0)
    with trio.fail_after(10):
        with pytest.raises(ConnectFailed, match="cannot connect"):
            await transport.request(f"http://127.0.0.1:{free_port()}", "GET", "/x")
        with pytest.raises(ValueError, match="not an http"):
            await transport.request("ftp://127.0.0.1:1", "GET", "/x")

        async def never(stream: trio.SocketStream, n: int) -> None:
            await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            port = await nursery.start(_serve, never)
            with pytest.raises(ConnectionLost) as info:
                await transport.request(f"http://127.0.0.1:{port}", "GET", "/x",
                                        headers=[("X-Vault-Token", TOKEN_MARKER + "\r\nX: y")])
            nursery.cancel_scope.cancel()
    await transport.aclose()
    assert TOKEN_MARKER not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
