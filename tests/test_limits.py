"""Per-peer limits: connections per uid, requests per second per uid, admin-only ops; a flood from
one uid leaves another uid served."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from agentd.client import AsyncClient, Client
from agentd.errors import RateLimited
from tests.agentfixture import (
    NOBODY,
    RunningAgent,
    agent_fixture,
)
from tests.peers import run_as


def frame(message: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message)
    return struct.pack(">I", len(body)) + body


def read_reply(sock: socket.socket) -> dict[str, Any]:
    head = _exactly(sock, 4)
    reply: dict[str, Any] = msgpack.unpackb(_exactly(sock, struct.unpack(">I", head)[0]))
    return reply


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def code(reply: dict[str, Any]) -> str:
    return "ok" if reply.get("ok") else str(reply["error"]["code"])


small = agent_fixture("max_connections_per_uid = 2\nrequests_per_second_per_uid = 1\n"
                      "request_burst_per_uid = 5")


async def test_requests_over_the_rate_wait_for_their_tokens(small: RunningAgent) -> None:
    # Backpressure, not refusal (issue 13, item 2): past the burst of 5, requests are answered
    # as the bucket refills (1/s), in order, and none is answered rate_limited.
    path = str(small.socket)

    def burst() -> list[str]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(20)
            sock.connect(path)
            sock.sendall(b"".join(frame({"v": 1, "id": i, "op": "ping"}) for i in range(7)))
            replies = [read_reply(sock) for _ in range(7)]
            assert [r["id"] for r in replies] == list(range(7))
            # The connection stays open, and a malformed request costs a token as well.
            sock.sendall(frame({"v": 1, "id": 98}))
            malformed = read_reply(sock)
            assert (malformed["id"], code(malformed)) == (98, "bad_request")
            return [code(r) for r in replies]

    with trio.fail_after(30):
        codes = await run_as(NOBODY, NOBODY, burst)
        assert codes == {"ok": True, "value": ["ok"] * 7}
        # Another uid has its own bucket.
        async with AsyncClient.connect(small.socket) as client:
            for _ in range(5):
                assert (await client.get("db", "username"))["data"] == "app"
    assert small.agent.server.statistics().rate_limited >= 2     # waits for a token


async def test_connections_per_uid_are_capped(small: RunningAgent) -> None:
    path = str(small.socket)

    def connect_three() -> list[str]:
        socks = []
        out = []
        for i in range(3):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(10)
            sock.connect(path)
            with contextlib.suppress(OSError):   # a refused one may be closed already
                sock.sendall(frame({"v": 1, "id": i, "op": "ping"}))
            socks.append(sock)
        try:
            for sock in socks:
                reply = read_reply(sock)
                out.append(f"{code(reply)}:{reply['id']}")
        finally:
            # Closed only once every reply is in: a connection closed earlier could let the
            # agent take the third one up after the first is gone (connect() returns as soon as
            # the kernel queues the connection, before the agent accepts it).
            for sock in socks:
                sock.close()
        return out

    with trio.fail_after(30):
        result = await run_as(NOBODY, NOBODY, connect_three)
        # Which of the three is refused depends on the order the agent takes them up.
        assert sorted(v.split(":")[0] for v in result["value"]) == ["ok", "ok", "rate_limited"]
        assert "rate_limited:None" in result["value"]
        # Root is another uid: not affected.
        async with AsyncClient.connect(small.socket) as a, AsyncClient.connect(small.socket) as b:
            await a.ping()
            await b.ping()
            async with AsyncClient.connect(small.socket) as c:
                with pytest.raises(RateLimited):
                    await c.ping()
    assert small.agent.server.statistics().refused_connections >= 2


# The flood below counts on the rate of a modest budget (100 a second, bursts of 200).
plain = agent_fixture("requests_per_second_per_uid = 100\nrequest_burst_per_uid = 200")


async def test_admin_ops_need_an_admin_rule(plain: RunningAgent) -> None:
    path = str(plain.socket)

    def try_admin() -> list[str]:
        out = []
        with Client.connect(path, timeout=10) as client:
            for op, args in (("status", {}), ("refresh", {"name": "db"})):
                try:
                    client.call(op, **args)
                    out.append("ok")
                except Exception as exc:
                    out.append(getattr(exc, "code", repr(exc)))
        return out

    with trio.fail_after(30):
        assert (await run_as(NOBODY, NOBODY, try_admin))["value"] == ["forbidden", "forbidden"]
        async with AsyncClient.connect(plain.socket) as client:
            assert (await client.status())["counts"]["secrets"] == 3
            assert (await client.refresh("db"))["version"] >= 1
    audit = plain.audit_text()
    assert '"status"' in audit and '"refresh"' in audit


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_flood_from_one_uid_leaves_another_served(plain: RunningAgent) -> None:
    """2,000 connections and 50,000 pipelined requests from nobody; root keeps being served."""
    path = str(plain.socket)

    def flood() -> dict[str, int]:
        tally: dict[str, int] = {}
        ping = frame({"v": 1, "id": 1, "op": "ping"})
        held: list[socket.socket] = []

        def drain() -> None:
            for sock in held:
                try:
                    key = code(read_reply(sock))
                except (ConnectionError, OSError):
                    key = "closed"
                tally[key] = tally.get(key, 0) + 1
                sock.close()
            held.clear()

        for _ in range(2000):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(30)
            for _ in range(30_000):
                try:
                    sock.connect(path)
                    break
                except BlockingIOError:   # the listen backlog is full (AF_UNIX: EAGAIN)
                    tally["backlog_full"] = tally.get("backlog_full", 0) + 1
                    time.sleep(0.001)
            with contextlib.suppress(OSError):
                sock.sendall(ping)        # refused and closed already: the reply is waiting
            held.append(sock)
            if len(held) >= 200:          # up to 200 open at once: over the per-uid cap of 64
                drain()
        drain()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(path)
            batch = b"".join(frame({"v": 1, "id": i, "op": "get", "name": "db"})
                             for i in range(1000))
            try:
                for _ in range(50):
                    sock.sendall(batch)
                    for _ in range(1000):
                        reply = read_reply(sock)
                        key = "req-" + code(reply) + ("-nil" if reply["id"] is None else "")
                        tally[key] = tally.get(key, 0) + 1
            except (ConnectionError, OSError):
                tally["req-closed"] = 1       # the agent gave up on this pipeline
        return tally

    before = rss_kib()
    served = 0
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            result: dict[str, Any] = {}

            async def run_flood() -> None:
                result.update(await run_as(NOBODY, NOBODY, flood))
                nursery.cancel_scope.cancel()

            nursery.start_soon(run_flood)
            async with AsyncClient.connect(plain.socket) as client:
                while True:
                    assert (await client.get("api", "token"))["data"]
                    served += 1
                    await trio.sleep(0.02)        # root stays under its own rate
    assert result["ok"], result
    tally = result["value"]
    assert sum(v for k, v in tally.items()
               if not k.startswith("req-") and k != "backlog_full") == 2000
    assert tally.get("rate_limited", 0) > 0               # the per-uid connection cap engaged
    # The pipeline over the rate was slowed down, then closed with rate_limited (id nil).
    assert tally.get("req-closed") == 1 and tally.get("req-rate_limited-nil") == 1
    assert tally.get("req-forbidden", 0) < 50_000
    assert served > 0
    # The agent is still there and answers everyone; its memory did not follow the flood.
    with trio.fail_after(30):
        async with AsyncClient.connect(plain.socket) as client:
            await client.ping()
        while True:
            # nobody's bucket refills at 100/s, and its flood connections wind down
            after = await run_as(NOBODY, NOBODY, lambda: _ping(path))
            if after.get("code") != "rate_limited":
                break
            await trio.sleep(0.05)
        assert after == {"ok": True, "value": "pong"}
        while plain.agent.server.statistics().connections:
            await trio.sleep(0.01)      # flood handlers wind down
    assert rss_kib() - before < 64 * 1024
    print(f"flood: {tally}, root served {served} times, rss +{rss_kib() - before} KiB")


def _ping(path: str) -> str:
    with Client.connect(path, timeout=10) as client:
        client.ping()
    return "pong"


roomy = agent_fixture('idle_timeout = "1s"\nframe_timeout = "500ms"\n'
                      "request_burst_per_uid = 100000\nrequests_per_second_per_uid = 100000")


async def read_stream_frame(stream: trio.SocketStream, buf: bytearray) -> dict[str, Any] | None:
    """The next reply on ``stream`` (bytes after it stay in ``buf``); None at EOF."""
    while True:
        if len(buf) >= 4:
            (n,) = struct.unpack(">I", buf[:4])
            if len(buf) >= 4 + n:
                reply: dict[str, Any] = msgpack.unpackb(bytes(buf[4 : 4 + n]), raw=False)
                del buf[: 4 + n]
                return reply
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buf += chunk


async def test_pipelined_requests_in_one_write_are_all_answered_in_order(
    roomy: RunningAgent,
) -> None:
    # More requests in one write than the server answers before it lets other connections
    # run: every one is answered, in order, and the batches do not mix up replies.
    requests = []
    for i in range(300):
        if i % 3 == 0:
            requests.append({"v": 1, "id": i, "op": "get", "name": "db"})
        elif i % 3 == 1:
            requests.append({"v": 1, "id": i, "op": "get", "name": "db", "field": "username"})
        else:
            requests.append({"v": 1, "id": i, "op": "get", "name": "nope"})
    with trio.fail_after(30):
        stream = await trio.open_unix_socket(str(roomy.socket))
        async with stream:
            await stream.send_all(b"".join(frame(r) for r in requests))
            buf = bytearray()
            replies = [await read_stream_frame(stream, buf) for _ in requests]
            # The connection is still served afterwards.
            await stream.send_all(frame({"v": 1, "id": 1000, "op": "ping"}))
            assert await read_stream_frame(stream, buf) == {"id": 1000, "ok": True}
    assert [r["id"] for r in replies if r is not None] == list(range(300))
    whole = replies[0]
    assert whole is not None and whole["data"]["username"] == "app"
    for i, reply in enumerate(replies):
        assert reply is not None
        if i % 3 == 0:
            assert reply["data"] == whole["data"] and reply["version"] == whole["version"]
        elif i % 3 == 1:
            assert reply["data"] == "app"
        else:
            assert reply["error"]["code"] == "forbidden"


async def test_a_busy_connection_outlives_idle_timeout_and_quiet_ones_are_closed(
    roomy: RunningAgent,
) -> None:
    # idle_timeout is 1 s: a connection that keeps asking (every 0.25 s, for three times
    # that) stays open; then half a frame is closed after frame_timeout; a connection that
    # never asks is closed after idle_timeout.
    with trio.fail_after(30):
        stream = await trio.open_unix_socket(str(roomy.socket))
        async with stream:
            buf = bytearray()
            for i in range(12):
                await stream.send_all(frame({"v": 1, "id": i, "op": "ping"}))
                assert await read_stream_frame(stream, buf) == {"id": i, "ok": True}
                await trio.sleep(0.25)
            await stream.send_all(struct.pack(">I", 100) + b"\x80")
            assert await stream.receive_some(100) == b""       # closed, no reply
        quiet = await trio.open_unix_socket(str(roomy.socket))
        async with quiet:
            assert await quiet.receive_some(100) == b""
        async with AsyncClient.connect(roomy.socket) as client:
            assert (await client.get("db", "username"))["data"] == "app"
