"""End to end: the main socket's HTTP face, on a real agent against the session's real OpenBao,
read by the real ``bao`` binary, curl, and raw sockets."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from agentd.client import Client
from tests.agentfixture import (
    NOBODY,
    RunningAgent,
    Seeded,
    running_agent,
    seed,
    socket_dir,
    write_config,
)
from tests.openbao import ROOT_TOKEN, DevServer, bao_binary
from tests.peers import run_as

STRANGER = 65533            # a uid no policy names
DENIED = b'{"errors":["permission denied"]}'


@pytest.fixture
def seeded(bao: DevServer) -> Seeded:
    return seed(bao)


@pytest.fixture
async def agent(
    bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded, tmp_path: Path
) -> AsyncIterator[RunningAgent]:
    path = write_config(
        tmp_path, bao, approle_files, seeded, sock=socket_dir() / "agentd.sock",
        agent_extra='frame_timeout = "1s"\nidle_timeout = "30s"\n'
                    # the pipeline tests count on a modest budget (100 a second, bursts of 200)
                    'requests_per_second_per_uid = 100\nrequest_burst_per_uid = 200',
    )
    async with running_agent(path) as running:
        running.socket.chmod(0o666)
        yield running


def client_env(sock: Path, home: Path) -> dict[str, str]:
    """An environment with the agent's address and no token anywhere."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BAO_", "VAULT_"))}
    env.update(BAO_AGENT_ADDR=f"unix://{sock}", HOME=str(home), BAO_ADDR="http://127.0.0.1:9")
    return env


async def run(argv: list[str], env: dict[str, str], *, uid: int | None = None
              ) -> subprocess.CompletedProcess[bytes]:
    if uid is not None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    with trio.fail_after(20):
        return await trio.run_process(argv, env=env, capture_stdout=True, capture_stderr=True,
                                      check=False)


@pytest.fixture
def home() -> Iterator[Path]:
    """A HOME other uids can use (the CLI looks for its token helper there)."""
    path = Path(tempfile.mkdtemp(prefix="agentd-home-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def raw_exchange(sock: Path, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection, half-close, read until EOF (blocking)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        chunks = []
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass            # the agent closed early: read what it answered before
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass
        return b"".join(chunks)


async def http_get(sock: Path, target: str, headers: str = "", method: str = "GET",
                   body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    request = (f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
               f"{headers}\r\n").encode() + body
    data = await trio.to_thread.run_sync(raw_exchange, sock, request)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), hdrs, rest


async def v1_get(sock: Path, name: str, field: str | None = None) -> dict[str, Any]:
    def blocking() -> dict[str, Any]:
        with Client.connect(sock, timeout=10) as c:
            return c.call("get", name=name, **({"field": field} if field else {}))

    return await trio.to_thread.run_sync(blocking)


# --- the real bao CLI ---------------------------------------------------------------------------


async def test_bao_kv_get_reads_through_the_agent_without_a_token(
    agent: RunningAgent, seeded: Seeded, home: Path
) -> None:
    bao_bin, env, p = bao_binary(), client_env(agent.socket, home), seeded.prefix
    password = seeded.markers["db"]
    done = await run([bao_bin, "kv", "get", "-field=password", f"secret/{p}/db"], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == password
    done = await run([bao_bin, "kv", "get", "-format=json", "-mount=secret", f"{p}/db"], env)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["data"]["data"] == {"username": "app", "password": password}
    assert body["data"]["metadata"]["version"] >= 1
    done = await run([bao_bin, "kv", "get", "-field=token", f"kv1/{p}/api"], env)
    assert (done.returncode, done.stdout.decode()) == (0, seeded.markers["api"]), done.stderr
    # nobody has a grant for db (and only db); a uid no policy names has none
    done = await run([bao_bin, "kv", "get", "-field=password", f"secret/{p}/db"], env,
                     uid=NOBODY)
    assert (done.returncode, done.stdout.decode()) == (0, password), done.stderr
    for uid, path in ((STRANGER, f"secret/{p}/db"), (NOBODY, f"secret/{p}/other")):
        done = await run([bao_bin, "kv", "get", "-field=password", path], env, uid=uid)
        assert done.returncode != 0
        assert password.encode() not in done.stdout + done.stderr
        assert seeded.markers["other"].encode() not in done.stdout + done.stderr
        assert b"permission denied" in done.stderr
    audit = [json.loads(line) for line in agent.audit_text().splitlines()]
    http_reads = [a for a in audit if a.get("transport") == "http" and a["op"] == "get"]
    assert {(a["uid"], a["name"], a["decision"]) for a in http_reads} >= {
        (0, "db", "allow"), (0, "api", "allow"), (NOBODY, "db", "allow"),
        (NOBODY, "other", "deny")}
    # the stranger was refused at the CLI's mounts lookup already (no name: no oracle)
    assert any(a["uid"] == STRANGER and a["decision"] == "deny" for a in audit)
    # the same fields as a v1 get's line, plus the transport
    await v1_get(agent.socket, "db")
    audit = [json.loads(line) for line in agent.audit_text().splitlines()]
    v1 = next(a for a in audit if "transport" not in a and a["op"] == "get")
    http = next(a for a in http_reads if a["decision"] == "allow")
    assert set(http) == set(v1) | {"transport"}


# --- curl ---------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_bao_pointed_at_its_private_socket_reads_and_other_uids_cannot_connect(
    agent: RunningAgent, seeded: Seeded, home: Path
) -> None:
    """What docs/security.md tells Go clients to do about connect storms: the bao CLI with
    its agent address at its own uid's private socket (decision 13)."""
    bao_bin, p, password = bao_binary(), seeded.prefix, seeded.markers["db"]
    env = client_env(Path(f"{agent.socket}.d/uid-{NOBODY}"), home)
    argv = [bao_bin, "kv", "get", "-field=password", f"secret/{p}/db"]
    done = await run(argv, env, uid=NOBODY)
    assert (done.returncode, done.stdout.decode()) == (0, password), done.stderr
    done = await run(argv, env, uid=STRANGER)
    assert done.returncode != 0
    assert b"connect: permission denied" in done.stderr         # refused by the kernel
    assert password.encode() not in done.stdout + done.stderr


async def test_curl_reads_the_same(agent: RunningAgent, seeded: Seeded, home: Path) -> None:
    env, p = client_env(agent.socket, home), seeded.prefix
    sock = str(agent.socket)
    done = await run(["curl", "-sS", "--unix-socket", sock,
                      f"http://localhost/v1/secret/data/{p}/db"], env)
    body = json.loads(done.stdout)
    assert body["data"]["data"]["password"] == seeded.markers["db"]
    assert body["lease_id"] == "" and body["auth"] is None and body["warnings"] is None
    done = await run(["curl", "-sS", "--unix-socket", sock,
                      "http://localhost/agentd/v1/secret/db/password?format=raw"], env)
    assert done.stdout.decode() == seeded.markers["db"]
    # keep-alive: several requests on one connection
    done = await run(["curl", "-sSv", "--unix-socket", sock,
                      "http://localhost/agentd/v1/secret/db/password?format=raw",
                      "http://localhost/agentd/v1/secret/api/token?format=raw",
                      "http://localhost/agentd/v1/list"], env)
    both = seeded.markers["db"] + seeded.markers["api"]
    assert done.stdout.decode().startswith(both)
    assert json.loads(done.stdout.decode()[len(both):]) == {"names": ["api", "db", "other"]}
    assert done.stderr.count(b"Re-using existing connection") == 2, done.stderr
    done = await run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket",
                      sock, "http://localhost/agentd/v1/secret/db/password"], env,
                     uid=STRANGER)
    assert done.stdout == b"403"


# --- tokens are ignored, writes refused, nothing proxied -------------------------------------


async def test_root_token_on_a_write_or_undeclared_path_gets_403(
    agent: RunningAgent, seeded: Seeded, bao: DevServer
) -> None:
    p = seeded.prefix
    before = bao.api("GET", f"secret/data/{p}/db")["data"]
    token = f"X-Vault-Token: {ROOT_TOKEN}\r\n"
    evil = json.dumps({"data": {"password": "evil"}}).encode()
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        status, _, body = await http_get(
            agent.socket, f"/v1/secret/data/{p}/db", method=method, body=evil,
            headers=token + f"Content-Type: application/json\r\nContent-Length: {len(evil)}\r\n")
        assert (status, body) == (403, DENIED), method
    for target in (f"/v1/secret/data/{p}/undeclared", f"/v1/secret/metadata/{p}/db",
                   "/v1/sys/mounts", "/v1/auth/token/lookup-self", "/v1/sys/seal-status"):
        status, _, body = await http_get(agent.socket, target, headers=token)
        assert (status, body) == (403, DENIED), target
    after = bao.api("GET", f"secret/data/{p}/db")["data"]
    assert after["data"] == before["data"]
    assert after["metadata"]["version"] == before["metadata"]["version"]
    assert ROOT_TOKEN not in agent.log_text() and ROOT_TOKEN not in agent.audit_text()


# --- outage: served stale from the cache -------------------------------------------------------


async def test_reads_go_on_from_cache_marked_stale_when_openbao_is_stopped(
    agent: RunningAgent, seeded: Seeded, bao: DevServer
) -> None:
    p = seeded.prefix
    status, headers, _ = await http_get(agent.socket, f"/v1/secret/data/{p}/db")
    assert status == 200 and "x-agentd-stale" not in headers
    bao.pause()
    try:
        with trio.fail_after(20):
            while True:
                status, headers, body = await http_get(agent.socket,
                                                       f"/v1/secret/data/{p}/db")
                assert status == 200
                if headers.get("x-agentd-stale") == "true":
                    break
                await trio.sleep(0.2)
        envelope = json.loads(body)
        assert envelope["data"]["data"]["password"] == seeded.markers["db"]
        assert envelope["warnings"] and "stale" in envelope["warnings"][0]
        status, headers, body = await http_get(agent.socket,
                                               "/agentd/v1/secret/db/password?format=raw")
        assert (status, body) == (200, seeded.markers["db"].encode())
        assert headers["x-agentd-stale"] == "true"
    finally:
        bao.resume()


# --- hostile clients: 4xx or close, others keep being served ----------------------------------


async def test_malformed_requests_get_4xx_or_close_and_others_are_served(
    agent: RunningAgent, seeded: Seeded
) -> None:
    sock = agent.socket
    marker = seeded.markers["db"].encode()

    def status_of(data: bytes) -> int | None:
        return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else None

    async def exchange(data: bytes) -> bytes:
        return await trio.to_thread.run_sync(raw_exchange, sock, data)

    async def served() -> None:
        status, _, body = await http_get(sock, "/agentd/v1/secret/db/password?format=raw")
        assert (status, body) == (200, marker)
        assert (await v1_get(sock, "db", "password"))["data"] == marker.decode()

    cases = {       # each is answered 4xx, then closed
        "bad content-length": b"GET /agentd/v1/list HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: nope\r\n\r\n",
        "header flood": b"GET /agentd/v1/list HTTP/1.1\r\nHost: x\r\n"
                        + b"X-Flood: aaaaaaaaaaaaaaaa\r\n" * 50000 + b"\r\n",
        "1 MiB request line": b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "body on a read": b"GET /agentd/v1/list HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 4\r\n\r\nabcd",
    }
    for label, data in cases.items():
        reply = await exchange(data)
        status = status_of(reply)
        assert status is not None and 400 <= status < 500, label
        assert b"\r\nConnection: close\r\n" in reply, label
        assert marker not in reply
        await served()

    # half a v1 frame, then HTTP: the connection is v1 (its first byte is 0x00) and is closed
    half = struct.pack(">I", 100) + msgpack.packb({"v": 1})[:3]
    reply = await exchange(half + b"GET /agentd/v1/secret/db HTTP/1.1\r\nHost: x\r\n\r\n")
    assert marker not in reply and not reply.startswith(b"HTTP/")

    # slowloris: a request trickled a byte at a time is closed after frame_timeout (1 s),
    # while another client is served meanwhile
    async with trio.open_nursery() as nursery:
        result: dict[str, Any] = {}

        async def slowloris() -> None:
            stream = await trio.open_unix_socket(str(sock))
            request = b"GET /agentd/v1/secret/db HTTP/1.1\r\nHost: x\r\n\r\n"
            start = trio.current_time()
            try:
                for byte in request:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.2)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            with trio.move_on_after(5):
                got = b""
                try:
                    while chunk := await stream.receive_some(65536):
                        got += chunk
                except trio.BrokenResourceError:
                    pass
            result["elapsed"] = trio.current_time() - start
            result["got"] = got
            await stream.aclose()

        nursery.start_soon(slowloris)
        await trio.sleep(0.5)
        await served()
    assert marker not in result["got"] and not result["got"]
    assert result["elapsed"] < 5
    await served()


# --- hvac ---------------------------------------------------------------------------------------


async def test_hvac_over_requests_unixsocket(agent: RunningAgent, seeded: Seeded) -> None:
    hvac: Any = pytest.importorskip("hvac")
    unixsocket: Any = pytest.importorskip("requests_unixsocket")
    url = "http+unix://" + str(agent.socket).replace("/", "%2F")

    def read() -> tuple[Any, Any]:
        client = hvac.Client(url=url, session=unixsocket.Session())
        kv2 = client.secrets.kv.v2.read_secret_version(
            path=f"{seeded.prefix}/db", mount_point="secret", raise_on_deleted_version=True)
        kv1 = client.secrets.kv.v1.read_secret(path=f"{seeded.prefix}/api", mount_point="kv1")
        return kv2, kv1

    kv2, kv1 = await trio.to_thread.run_sync(read)
    assert kv2["data"]["data"]["password"] == seeded.markers["db"]
    assert kv1["data"]["token"] == seeded.markers["api"]


# --- pipelining and the per-uid rate --------------------------------------------------------


def split_replies(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    replies = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        replies.append((int(lines[0].split()[1]), headers, data[:length]))
        data = data[length:]
    return replies


ONE = b"GET /agentd/v1/secret/db/password?format=raw HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_a_pipeline_over_the_burst_is_slowed_and_answered_in_order(
    agent: RunningAgent, seeded: Seeded
) -> None:
    """250 requests in one write, past the uid's burst (200 by default, then 100 a second):
    the agent stops reading until the uid's tokens come back (backpressure, as for v1 frames)
    and answers every one, in order; another uid is served meanwhile."""
    async with trio.open_nursery() as nursery:
        got: dict[str, bytes] = {}

        async def pipeline() -> None:
            got["data"] = await trio.to_thread.run_sync(raw_exchange, agent.socket, ONE * 250)

        nursery.start_soon(pipeline)
        other = await run_as(NOBODY, NOBODY, lambda: Client.connect(
            agent.socket, timeout=10).call("get", name="db", field="password"))
        assert other["ok"] and other["value"]["data"] == seeded.markers["db"]
    replies = split_replies(got["data"])
    assert len(replies) == 250
    assert all(status == 200 and body == seeded.markers["db"].encode()
               for status, _, body in replies)
    assert agent.agent.server.statistics().rate_limited > 0


async def test_a_pipeline_that_keeps_over_the_rate_gets_429_and_is_closed(
    agent: RunningAgent, seeded: Seeded
) -> None:
    """1,000 requests in one write need 8 s of the uid's rate: past frame_timeout (1 s) of
    waiting without catching up, the connection is told 429 and closed, as a v1 flood is."""
    data = await trio.to_thread.run_sync(raw_exchange, agent.socket, ONE * 1000)
    replies = split_replies(data)
    assert 200 < len(replies) < 1000
    *served, (status, headers, body) = replies
    assert all(s == 200 and b == seeded.markers["db"].encode() for s, _, b in served)
    assert status == 429 and headers["connection"] == "close" and b"rate" in body
    assert agent.agent.server.statistics().flood_closed == 1
    assert (await v1_get(agent.socket, "db", "password"))["data"] == seeded.markers["db"]


# --- field for field with OpenBao ------------------------------------------------------------


def shape(value: Any) -> Any:
    """The keys of ``value``, recursively, in order (values of leaves are left out)."""
    if isinstance(value, dict):
        return [(key, shape(item)) for key, item in value.items()]
    return type(value).__name__


async def test_replies_have_openbao_s_shape_field_for_field(
    agent: RunningAgent, seeded: Seeded, bao: DevServer
) -> None:
    p = seeded.prefix
    for path, via_agent in ((f"secret/data/{p}/db", f"/v1/secret/data/{p}/db"),
                            (f"kv1/{p}/api", f"/v1/kv1/{p}/api"),
                            (f"sys/internal/ui/mounts/secret/{p}/db",
                             f"/v1/sys/internal/ui/mounts/secret/{p}/db"),
                            ("sys/internal/ui/mounts/kv1", "/v1/sys/internal/ui/mounts/kv1")):
        upstream = bao.api("GET", path)
        status, headers, body = await http_get(agent.socket, via_agent)
        ours = json.loads(body)
        assert status == 200 and headers["content-type"] == "application/json"
        assert list(ours) == list(upstream), path
        # the envelope and the metadata match OpenBao's keys, order and types exactly;
        # leaves that differ in type: OpenBao's kv1 lease_duration is its TTL hint (an int too)
        assert shape(ours) == shape(upstream), path
        if "mounts" in path:
            for key in ("type", "options", "path", "config", "local", "seal_wrap"):
                assert ours["data"][key] == upstream["data"][key], (path, key)
        else:
            assert ours["data"] == upstream["data"] or (
                ours["data"]["data"] == upstream["data"]["data"]
                and ours["data"]["metadata"]["version"]
                == upstream["data"]["metadata"]["version"]), path


async def test_a_dead_peer_gets_no_http_answer(agent: RunningAgent) -> None:
    """The pid is re-checked before HTTP replies as before v1 ones (test_identity.py)."""
    from tests.test_identity import handed_over_connection

    def ask() -> bytes:
        conn, _pid = handed_over_connection(agent.socket)
        with conn:
            conn.settimeout(10)
            conn.sendall(b"GET /agentd/v1/secret/db/username?format=raw HTTP/1.1\r\n"
                         b"Host: x\r\n\r\n")
            chunks = []
            with contextlib.suppress(ConnectionResetError):
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
            return b"".join(chunks)

    assert await trio.to_thread.run_sync(ask) == b""
    assert agent.agent.server.statistics().pid_reused == 1


def test_over_the_cap_refusal_speaks_the_client_s_protocol() -> None:
    """A connection refused at accept is told so in HTTP when its request is already there, in
    v1 otherwise."""
    from agentd.server import _refuse

    for sent, http in ((b"GET / HTTP/1.1\r\n", True), (b"\x00\x00\x00\x05", False), (b"", False)):
        a, b = socket.socketpair(socket.AF_UNIX)
        with a, b:
            if sent:
                a.sendall(sent)
            _refuse(b)
            reply = a.recv(4096, socket.MSG_DONTWAIT)
            assert reply.startswith(b"HTTP/1.1 429 ") is http
            assert (b"Connection: close" in reply) is http
            assert (b"rate_limited" in reply) is not http
            assert b.recv(64, socket.MSG_DONTWAIT) == sent if sent else True    # peeked only
