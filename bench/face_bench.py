"""Agent CPU per request on the main socket: v1 ``get`` against the HTTP face, client cost aside.

Starts ``bao server -dev`` and ``python -m agentd run`` (audit on, to a file) in a private temp
directory (removed at the end) with the helpers from ``agentd.demo``, then reads one KV v2
secret over one connection with a bare socket client (no HTTP or msgpack library on the client
side, so the figures are the agent's, whatever the client costs):

- ``v1 get``: a ``get`` frame, the whole secret (the value's msgpack bytes spliced into the reply);
- ``http kv2``: ``GET /v1/secret/data/bench/db`` as the ``bao`` CLI sends it (OpenBao's envelope);
- ``http raw``: ``GET /agentd/v1/secret/db/password?format=raw`` (a field's bare bytes);

each ``--requests`` times one at a time (a wake-up per request) and ``--requests`` x 8 pipelined
by ``--batch`` (the per-request work alone), ``--rounds`` rounds in turn. The agent's CPU comes
from ``/proc/<pid>/stat``. Every loop is bounded; everything started is stopped in a ``finally``.

Run: ``.venv/bin/python bench/face_bench.py`` (about 30 s).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchagent import SECRET, bench_agent
from socket_bench import UNLIMITED, agent_cpu_seconds

Counter = Callable[[bytes], tuple[int, bytes]]


def count_frames(buf: bytes) -> tuple[int, bytes]:
    """Complete v1 frames at the start of ``buf``, and what is left."""
    n = 0
    while len(buf) >= 4:
        length = struct.unpack(">I", buf[:4])[0]
        if len(buf) < 4 + length:
            break
        buf = buf[4 + length:]
        n += 1
    return n, buf


def count_responses(buf: bytes) -> tuple[int, bytes]:
    """Complete HTTP responses (Content-Length framed) at the start of ``buf``, and the rest."""
    n = 0
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            break
        at = buf.find(b"Content-Length: ", 0, end)
        length = int(buf[at + 16:buf.index(b"\r\n", at)])
        if len(buf) < end + 4 + length:
            break
        buf = buf[end + 4 + length:]
        n += 1
    return n, buf


def cpu_per_request(path: str, pid: int, request: bytes, requests: int, batch: int,
                    count: Counter) -> float:
    """Agent CPU µs per request for ``requests`` requests sent ``batch`` at a time."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(30)
        conn.connect(path)
        buf = b""
        cpu0 = agent_cpu_seconds(pid)
        for _ in range(requests // batch):
            conn.sendall(request * batch)
            got = 0
            while got < batch:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("agentd closed the connection")
                buf += chunk
                n, buf = count(buf)
                got += n
        return (agent_cpu_seconds(pid) - cpu0) / (requests // batch * batch) * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=4000, help="sequential requests (4000)")
    parser.add_argument("--batch", type=int, default=32, help="pipelined per write (32)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    args = parser.parse_args(argv)
    body = msgpack.packb({"v": 1, "id": 1, "op": "get", "name": SECRET})
    kinds: list[tuple[str, bytes, Counter]] = [
        ("v1 get", struct.pack(">I", len(body)) + body, count_frames),
        ("http kv2", b"GET /v1/secret/data/bench/db HTTP/1.1\r\nHost: localhost\r\n"
                     b"User-Agent: Go-http-client/1.1\r\nX-Vault-Request: true\r\n"
                     b"Accept-Encoding: gzip\r\n\r\n", count_responses),
        ("http raw", f"GET /agentd/v1/secret/{SECRET}/password?format=raw HTTP/1.1\r\n"
                     f"Host: localhost\r\n\r\n".encode(), count_responses),
    ]
    work = Path(tempfile.mkdtemp(prefix="agentd-face-bench-"))
    try:
        with bench_agent(work, agent_lines=UNLIMITED) as ba:
            results: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in kinds}
            for _ in range(args.rounds):
                for label, request, count in kinds:
                    seq = cpu_per_request(ba.socket, ba.agent.pid, request, args.requests, 1,
                                          count)
                    pipe = cpu_per_request(ba.socket, ba.agent.pid, request, args.requests * 8,
                                           args.batch, count)
                    results[label].append((seq, pipe))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| request | agent CPU µs/req, one at a time | agent CPU µs/req, pipelined |")
    print("|---|---|---|")
    for label, rows in results.items():
        seqs = sorted(r[0] for r in rows)
        pipes = sorted(r[1] for r in rows)
        print(f"| {label} | {seqs[len(seqs) // 2]:.1f} [{seqs[0]:.1f}-{seqs[-1]:.1f}] | "
              f"{pipes[len(pipes) // 2]:.1f} [{pipes[0]:.1f}-{pipes[-1]:.1f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
