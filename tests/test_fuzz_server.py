"""Socket fuzz against a running agent: random frames and random HTTP requests on many
connections, then a well-formed client is still answered and no handler failed.

(The sans-IO core has its hypothesis fuzz targets in test_protocol.py.)
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path
from typing import Any

import msgpack
import trio

from agentd.client import AsyncClient
from tests.agentfixture import running_agent, seed, socket_dir, write_config
from tests.openbao import DevServer

KEYS = ["v", "id", "op", "name", "field", "names", "x", ""]
OPS = ["ping", "get", "list", "watch", "status", "refresh", "nope", ""]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(-999, 999)])
    if kind == 3:
        return rng.choice([*OPS, "db", "api", "other", "x" * 300, "\u00e9\u2603", "db.password"])
    if kind == 4:
        return os.urandom(rng.randrange(8))
    if kind == 5:
        return rng.random()
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    if kind == 7:
        return [rng.choice(["db", "api", "other", "nosuch"]) for _ in range(rng.randrange(300))]
    return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def random_frame(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return os.urandom(rng.randrange(1, 64))                       # not even a header
    if kind == 1:
        return struct.pack(">I", rng.choice([0, 2**32 - 1, 65537, 10**6]))   # bad lengths
    if kind == 2:
        body = os.urandom(rng.randrange(1, 64))
        return struct.pack(">I", len(body)) + body
    if kind == 3:                                                     # a truncated frame
        body = msgpack.packb({"v": 1, "id": 1, "op": "get", "name": "db"})
        return (struct.pack(">I", len(body)) + body)[: rng.randrange(1, len(body) + 4)]
    if kind == 4:                                                     # nested garbage map
        body = msgpack.packb(random_value(rng), use_bin_type=rng.choice([True, False]))
        return struct.pack(">I", len(body)) + body
    # a request-shaped map with random values
    message = {"v": rng.choice([1, 1, 1, 2, "1", None]),
               "id": rng.choice([1, 2**40, -5, "7", None, True]),
               "op": rng.choice(OPS)}
    for key in rng.sample(KEYS[3:], rng.randrange(3)):
        message[key] = random_value(rng)
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


HTTP_PIECES = [
    b"GET ", b"HEAD ", b"POST ", b"DELETE ", b"/v1/secret/data/", b"/agentd/v1/secret/db",
    b"/password", b"?format=raw", b"?version=", b"1", b"/v1/sys/internal/ui/mounts/secret",
    b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", b"Host: x\r\n", b"Content-Length: 3\r\n",
    b"Content-Length: x\r\n", b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n",
    b"X-Vault-Token: root\r\n", b"\r\n", b"%", b"\x00", b"\xff",
]


def random_http(rng: random.Random) -> bytes:
    """An HTTP request, well-formed or not (the socket tells HTTP from v1 by the first byte)."""
    if rng.random() < 0.3:
        target = rng.choice([b"/v1/secret/data/", b"/agentd/v1/secret/db/username",
                             b"/agentd/v1/list", b"/agentd/v1/status"])
        return rng.choice([b"GET ", b"HEAD ", b"PUT "]) + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    return rng.choice([b"GET ", b"POST "]) + b"".join(
        rng.choice(HTTP_PIECES) if rng.random() < 0.8 else os.urandom(rng.randrange(1, 16))
        for _ in range(rng.randrange(1, 16)))


async def fuzz_connection(path: Path, rng: random.Random) -> None:
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError:
        return
    async with stream:
        if rng.random() < 0.3:
            data = b"".join(random_http(rng) for _ in range(rng.randrange(1, 6)))
        else:
            data = b"".join(random_frame(rng) for _ in range(rng.randrange(1, 6)))
        try:
            await stream.send_all(data)
            if rng.random() < 0.5:
                await stream.send_eof()
            # Read whatever comes back for a moment; the agent may answer, close or wait.
            with trio.move_on_after(0.2):
                while await stream.receive_some(65536):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def test_random_frames_never_stop_the_server(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path]
) -> None:
    seeded = seed(bao)
    sock = socket_dir() / "agentd.sock"
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=sock,
                       agent_extra='frame_timeout = "1s"\nrequest_burst_per_uid = 100000\n'
                                   "requests_per_second_per_uid = 100000")
    seed_value = random.randrange(2**32)
    print(f"fuzz seed {seed_value}")
    rng = random.Random(seed_value)
    async with running_agent(cfg) as ra:
        with trio.fail_after(120):
            for _ in range(20):
                async with trio.open_nursery() as nursery:
                    for _ in range(25):
                        nursery.start_soon(fuzz_connection, sock,
                                           random.Random(rng.randrange(2**32)))
                async with AsyncClient.connect(sock) as client:
                    reply = await client.get("db", "username")
                    assert reply["data"] == "app"
            while ra.agent.server.statistics().connections:
                await trio.sleep(0.01)      # fuzz handlers wind down (frame_timeout at most)
        log = ra.log_text()
        assert "connection handler failed" not in log, log[-3000:]
        assert '"level":"error"' not in log
        assert ra.agent.server.statistics().requests > 0
        for marker in seeded.markers.values():
            assert marker not in log
