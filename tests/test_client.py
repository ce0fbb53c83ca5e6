"""The blocking and trio clients against a tiny real agent on a Unix socket in tmp_path."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from agentd import errors
from agentd.client import (
    DEFAULT_SOCKET,
    AsyncClient,
    Client,
    open_client,
    resolve_socket_path,
)
from agentd.protocol import CLOSED, NEED_DATA, Event, Rejected, Request, ServerConnection

SECRETS: dict[str, dict[str, Any]] = {
    "db": {"user": "app", "password": "pw"},
    "tls": {"key": b"\x00\x01binary"},
}

Handler = Callable[[trio.SocketStream], Awaitable[None]]


def answer(conn: ServerConnection, request: Request) -> bytes:
    """What the tiny agent replies: ping, get, list and watch; everything else is admin-only."""
    if request.op == "ping":
        return conn.send_result(request.id, {})
    if request.op == "list":
        return conn.send_result(request.id, {"names": sorted(SECRETS)})
    if request.op == "get":
        name, field = request.args["name"], request.args.get("field")
        if name not in SECRETS:
            return conn.send_error(request.id, errors.Forbidden(f"not allowed to read {name!r}"))
        data = SECRETS[name]
        if field is not None:
            if field not in data:
                return conn.send_error(request.id, errors.NotFound("no such field"))
            data = data[field]
        return conn.send_result(
            request.id,
            {"data": data, "version": 1, "fetched_at": 1.5, "expires_at": None, "stale": False},
        )
    if request.op == "watch":
        names = request.args["names"]
        if any(name not in SECRETS for name in names):
            return conn.send_error(request.id, errors.Forbidden("not allowed"))
        return conn.send_result(request.id, {}) + b"".join(
            conn.send_event(request.id, "changed", name=name, version=2) for name in names
        )
    return conn.send_error(request.id, errors.Forbidden(f"{request.op} needs admin"))


async def tiny_agent(stream: trio.SocketStream) -> None:
    conn = ServerConnection()
    async with stream:
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif event is CLOSED:
                    return
                elif isinstance(event, Rejected):
                    await stream.send_all(conn.send_error(event.id, event.error))
                    if conn.broken:
                        return
                else:
                    await stream.send_all(answer(conn, event))
        except trio.BrokenResourceError:
            return


async def serve(nursery: trio.Nursery, path: Path, handler: Handler) -> Path:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()
    await nursery.start(trio.serve_listeners, handler, [trio.SocketListener(sock)])
    return path


@pytest.fixture
async def agent(nursery: trio.Nursery, tmp_path: Path) -> Path:
    return await serve(nursery, tmp_path / "agentd.sock", tiny_agent)


def sync(fn: Callable[[], Any]) -> Awaitable[Any]:
    """Run blocking client code in a thread while the agent runs in trio."""
    return trio.to_thread.run_sync(fn)


# --- blocking client ----------------------------------------------------------------------------


async def test_blocking_client(agent: Path) -> None:
    def scenario() -> None:
        with Client.connect(agent, timeout=5) as client:
            client.ping()
            reply = client.get("db")
            assert reply["data"] == {"user": "app", "password": "pw"}
            assert reply["version"] == 1
            assert reply["stale"] is False
            assert "id" not in reply and "ok" not in reply
            assert client.get("db", "password")["data"] == "pw"
            assert client.get("tls", "key")["data"] == b"\x00\x01binary"
            assert client.list() == ["db", "tls"]
            assert client.call("ping") == {}

    with trio.fail_after(10):
        await sync(scenario)


async def test_blocking_client_raises_the_reply_errors(agent: Path) -> None:
    def scenario() -> None:
        with Client.connect(str(agent), timeout=5) as client:
            with pytest.raises(errors.Forbidden, match="not allowed to read 'nope'"):
                client.get("nope")
            with pytest.raises(errors.NotFound):
                client.get("db", "port")
            with pytest.raises(errors.Forbidden, match="needs admin"):
                client.status()
            with pytest.raises(errors.Forbidden):
                client.refresh("db")
            with pytest.raises(errors.UnknownOp):
                client.call("teleport")
            with pytest.raises(errors.BadRequest, match="'name'"):
                client.call("get")
            client.ping()  # request errors leave the connection usable

    with trio.fail_after(10):
        await sync(scenario)


async def test_blocking_client_watch(agent: Path) -> None:
    def scenario() -> list[Event]:
        with Client.connect(agent, timeout=5) as client:
            with pytest.raises(errors.Forbidden):
                client.watch(["db", "nope"])  # checked by the call, not on first next()
            events = client.watch(["db", "tls"])
            got = [next(events), next(events)]
            with pytest.raises(errors.ClientError, match="watch"):
                client.ping()
            return got

    with trio.fail_after(10):
        got = await sync(scenario)
    assert [(e.event, dict(e.fields)) for e in got] == [
        ("changed", {"name": "db", "version": 2}),
        ("changed", {"name": "tls", "version": 2}),
    ]
    assert got[0].id == got[1].id


async def test_blocking_client_missing_socket(tmp_path: Path) -> None:
    path = tmp_path / "missing.sock"
    with pytest.raises(errors.ClientError) as info:
        Client.connect(path)
    assert str(info.value) == f"cannot connect to agentd at {path}: No such file or directory"


# --- trio client --------------------------------------------------------------------------------


async def test_async_client(agent: Path) -> None:
    with trio.fail_after(10):
        async with AsyncClient.connect(agent) as client:
            await client.ping()
            assert (await client.get("db"))["data"]["user"] == "app"
            assert (await client.get("db", field="user"))["data"] == "app"
            assert await client.list() == ["db", "tls"]
            with pytest.raises(errors.Forbidden):
                await client.get("nope")
            with pytest.raises(errors.Forbidden):
                await client.status()
            with pytest.raises(errors.UnknownOp):
                await client.call("teleport")
            await client.ping()


async def test_async_client_calls_from_many_tasks(agent: Path) -> None:
    results: list[Any] = []
    with trio.fail_after(10):
        client = await open_client(agent)
        async with client, trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(lambda: _collect(client, results))
    assert results == ["pw"] * 20


async def _collect(client: AsyncClient, results: list[Any]) -> None:
    results.append((await client.get("db", "password"))["data"])


async def test_async_client_watch(agent: Path) -> None:
    with trio.fail_after(10):
        async with AsyncClient.connect(agent) as client:
            with pytest.raises(errors.Forbidden):
                await client.watch(["nope"])
            got = []
            async for event in await client.watch(["tls"]):
                got.append(event)
                break
            with pytest.raises(errors.ClientError, match="watch"):
                await client.ping()
    assert got == [Event(2, "changed", {"name": "tls", "version": 2})]


async def test_async_client_missing_socket(tmp_path: Path) -> None:
    path = tmp_path / "missing.sock"
    expected = re.escape(f"cannot connect to agentd at {path}: No such file or directory")
    with pytest.raises(errors.ClientError, match=expected):
        async with AsyncClient.connect(path):
            pass
    with pytest.raises(errors.ClientError, match="No such file"):
        await open_client(path)


# --- broken agents ------------------------------------------------------------------------------


async def half_reply(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.receive_some(65536)
        await stream.send_all(ServerConnection().send_result(1, {"x": 1})[:-2])


async def no_reply(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.receive_some(65536)


async def refuse(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.send_all(ServerConnection().send_error(None, errors.RateLimited("busy")))


async def garbage(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.receive_some(65536)
        await stream.send_all(b"\x00\x00\x00\x02\x92\x01")


async def hang(stream: trio.SocketStream) -> None:
    async with stream:
        await trio.sleep_forever()


@pytest.mark.parametrize(
    ("handler", "error", "match"),
    [
        (half_reply, errors.ClientError, "middle of a reply"),
        (no_reply, errors.ClientError, "closed the connection"),
        (refuse, errors.RateLimited, "busy"),
        (garbage, errors.ClientError, "not a msgpack map"),
    ],
)
async def test_broken_agent(
    nursery: trio.Nursery,
    tmp_path: Path,
    handler: Handler,
    error: type[Exception],
    match: str,
) -> None:
    path = await serve(nursery, tmp_path / "agentd.sock", handler)

    def blocking() -> None:
        with Client.connect(path, timeout=5) as client, pytest.raises(error, match=match):
            client.ping()

    with trio.fail_after(10):
        await sync(blocking)
        async with AsyncClient.connect(path) as client:
            with pytest.raises(error, match=match):
                await client.ping()


async def test_refusal_is_read_even_after_the_agent_closed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # The server refuses a connection over its limits with rate_limited (id nil) and closes at
    # once: the client's send then fails, but the reply is there to be read.
    closed = trio.Event()

    async def refuse_then_signal(stream: trio.SocketStream) -> None:
        await refuse(stream)
        closed.set()

    path = await serve(nursery, tmp_path / "agentd.sock", refuse_then_signal)

    def blocking() -> None:
        with Client.connect(path, timeout=5) as client:
            trio.from_thread.run(closed.wait)
            with pytest.raises(errors.RateLimited, match="busy"):
                client.ping()

    with trio.fail_after(10):
        await sync(blocking)
        closed = trio.Event()
        async with AsyncClient.connect(path) as client:
            await closed.wait()
            with pytest.raises(errors.RateLimited, match="busy"):
                await client.ping()


async def test_blocking_client_timeout(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = await serve(nursery, tmp_path / "agentd.sock", hang)

    def scenario() -> None:
        with Client.connect(path, timeout=0.1) as client:
            with pytest.raises(errors.ClientError, match="did not answer in time"):
                client.ping()
            with pytest.raises(errors.ClientError, match="unusable"):
                client.ping()

    with trio.fail_after(10):
        await sync(scenario)


async def test_async_client_cancelled_call_leaves_it_unusable(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    path = await serve(nursery, tmp_path / "agentd.sock", hang)
    async with AsyncClient.connect(path) as client:
        with trio.move_on_after(5) as scope:
            await client.ping()
        assert scope.cancelled_caught
        with pytest.raises(errors.ClientError, match="unusable"):
            await client.ping()


# --- socket path --------------------------------------------------------------------------------


def test_resolve_socket_flag_wins(tmp_path: Path) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text('[agent]\nsocket = "/from/config.sock"\n')
    env = {"AGENTD_SOCKET": "/from/env.sock"}
    assert resolve_socket_path("/from/flag.sock", str(config), env) == "/from/flag.sock"
    assert resolve_socket_path(None, str(config), env) == "/from/config.sock"
    assert resolve_socket_path(None, None, env) == "/from/env.sock"
    assert resolve_socket_path(None, None, {}) == DEFAULT_SOCKET == "/run/agentd/agentd.sock"
    assert resolve_socket_path(None, None, {"AGENTD_SOCKET": ""}) == DEFAULT_SOCKET


def test_resolve_socket_config_without_socket_is_its_default(tmp_path: Path) -> None:
    # An agent run with this config listens on the default path, whatever the environment says.
    config = tmp_path / "agentd.toml"
    config.write_text('[upstream]\naddresses = ["https://bao:8200"]\n')
    env = {"AGENTD_SOCKET": "/from/env.sock"}
    assert resolve_socket_path(None, str(config), env) == DEFAULT_SOCKET


def test_resolve_socket_bad_config(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(errors.ConfigError, match=r"missing\.toml: No such file"):
        resolve_socket_path(None, str(missing), {})
    broken = tmp_path / "broken.toml"
    broken.write_text("[agent\n")
    with pytest.raises(errors.ConfigError, match=r"broken\.toml"):
        resolve_socket_path(None, str(broken), {})
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[agent]\nsocket = 5\n")
    with pytest.raises(errors.ConfigError, match=r"agent\.socket: must be a non-empty string"):
        resolve_socket_path(None, str(wrong), {})


def test_resolve_socket_empty_flag() -> None:
    with pytest.raises(errors.UsageError):
        resolve_socket_path("", None, {})
