"""CPU per upstream GET: agentd's transport against httpx and bare h11, one dev server.

Starts ``bao server -dev`` on a free loopback port, writes one KV v2 secret, then for each client
makes ``--requests`` GETs of it from ``--concurrency`` trio tasks and prints the process CPU time
per request (``time.process_time``: the figure that decides what polling costs the agent) and the
requests per second:

- ``agentd``: ``agentd.kinds.KV2.read`` over ``agentd.upstream.Upstream`` (transport.py,
  keep-alive pool, decoding);
- ``httpx``: an ``httpx.AsyncClient`` on trio, what agentd used before (a test dependency now);
- ``h11``: a bare h11 loop over one trio TCP stream per task, the floor.

Every loop is bounded by ``--requests``; traffic only to 127.0.0.1. Run:
``.venv/bin/python bench/http_bench.py`` (about 10 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import h11
import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentd.config import UpstreamConfig  # noqa: E402
from agentd.kinds import KV2  # noqa: E402
from agentd.upstream import Upstream  # noqa: E402
from tests.openbao import DevServer  # noqa: E402

PATH = "secret/data/http-bench"


async def _spread(requests: int, concurrency: int, one: Callable[[], Awaitable[None]]) -> None:
    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(worker, requests // concurrency + (i < requests % concurrency))


async def run_agentd(address: str, token: str, requests: int, concurrency: int) -> None:
    up = Upstream(UpstreamConfig(addresses=(address,)))
    up.token_source = lambda: token
    kv2 = KV2()

    async def one() -> None:
        await kv2.read(up, PATH)

    try:
        await _spread(requests, concurrency, one)
    finally:
        await up.aclose()


async def run_httpx(address: str, token: str, requests: int, concurrency: int) -> None:
    async with httpx.AsyncClient(trust_env=False, headers={"X-Vault-Token": token}) as client:
        async def one() -> None:
            reply = await client.get(f"{address}/v1/{PATH}")
            json.loads(reply.content)

        await _spread(requests, concurrency, one)


async def run_h11(address: str, token: str, requests: int, concurrency: int) -> None:
    host, port = address.rsplit("//", 1)[1].rsplit(":", 1)

    async def worker(n: int) -> None:
        stream = await trio.open_tcp_stream(host, int(port))
        conn = h11.Connection(h11.CLIENT)
        headers = [("Host", f"{host}:{port}"), ("X-Vault-Token", token)]
        try:
            for _ in range(n):
                out = conn.send(h11.Request(method="GET", target=f"/v1/{PATH}", headers=headers))
                await stream.send_all(out + conn.send(h11.EndOfMessage()))
                body: list[bytes] = []
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Data):
                        body.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage):
                        break
                json.loads(b"".join(body))
                conn.start_next_cycle()
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(worker, requests // concurrency + (i < requests % concurrency))


CLIENTS = {"agentd": run_agentd, "httpx": run_httpx, "h11": run_h11}


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    server = DevServer.start(Path(tempfile.mkdtemp(prefix="agentd-http-bench-")))
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in CLIENTS}
    try:
        server.kv_put("http-bench", {"password": "p" * 24})
        for _ in range(args.rounds):
            for name, run in CLIENTS.items():
                cpu, wall = time.process_time(), time.perf_counter()
                trio.run(run, server.address, server.token, args.requests, args.concurrency)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                results[name].append((cpu / args.requests * 1e6, args.requests / wall))
    finally:
        server.stop()
    print(f"\n{args.requests} GETs of one KV v2 secret, {args.concurrency} tasks, "
          f"{args.rounds} rounds (median [min-max])\n")
    print("| client | CPU µs per request | requests/s |")
    print("|---|---|---|")
    for name, runs in results.items():
        cpu_us = sorted(r[0] for r in runs)
        rate = sorted(r[1] for r in runs)
        mid = len(runs) // 2
        print(f"| {name} | {cpu_us[mid]:.0f} [{cpu_us[0]:.0f}-{cpu_us[-1]:.0f}] | "
              f"{rate[mid]:,.0f} [{rate[0]:,.0f}-{rate[-1]:,.0f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
