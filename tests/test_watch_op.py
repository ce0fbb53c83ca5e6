"""The ``watch`` op against a real agent and a real OpenBao: events, grants, bounds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from agentd.client import AsyncClient, Client, Event, open_client
from agentd.errors import ClientError, Forbidden, RateLimited
from tests.agentfixture import (
    NOBODY,
    RunningAgent,
    Seeded,
    agent_fixture,
    running_agent,
    socket_dir,
    write_config,
)
from tests.openbao import DevServer
from tests.peers import run_as

agent = agent_fixture('max_watchers_per_uid = 3\nframe_timeout = "1s"')


async def next_event(events: AsyncIterator[Event]) -> Event:
    with trio.fail_after(20):
        return await events.__anext__()


async def test_an_update_gives_one_changed_event_and_a_deletion_revoked(
    agent: RunningAgent, bao: DevServer, seeded: Seeded
) -> None:
    with trio.fail_after(60):
        async with AsyncClient.connect(agent.socket) as client:
            before = (await client.get("db"))["version"]
            events = await client.watch(["db", "other"])
            version = bao.kv_put(f"{seeded.prefix}/db", {"username": "app", "password": "v2"})
            assert version == before + 1
            event = await next_event(events)
            assert (event.event, dict(event.fields)) == ("changed", {"name": "db",
                                                                     "version": version})
            # Nothing more about db: the next event is about the next change, elsewhere.
            other = bao.kv_put(f"{seeded.prefix}/other", {"value": "x"})
            event = await next_event(events)
            assert (event.event, dict(event.fields)) == ("changed", {"name": "other",
                                                                     "version": other})
            bao.api("DELETE", f"secret/metadata/{seeded.prefix}/db")
            event = await next_event(events)
            assert (event.event, dict(event.fields)) == ("revoked", {"name": "db",
                                                                     "version": version})
        async with AsyncClient.connect(agent.socket) as client:
            with pytest.raises(Exception) as info:
                await client.get("db")
            assert getattr(info.value, "code", None) == "not_found"
    # No value ever travels in an event (or reaches the logs through one).
    assert "v2" not in agent.log_text()
    for marker in seeded.markers.values():
        assert marker not in agent.log_text()
        assert marker not in agent.audit_text()
    assert '"watch"' in agent.audit_text()


async def test_watch_needs_every_name_readable(agent: RunningAgent) -> None:
    path = str(agent.socket)

    def watch(names: list[str]) -> str:
        with Client.connect(path, timeout=10) as client:
            client.watch(names)
            return "watching"

    with trio.fail_after(30):
        assert (await run_as(NOBODY, NOBODY, lambda: watch(["db"])))["ok"] is True
        for names in (["other"], ["db", "other"], ["no-such-secret"], ["db", "x" * 256]):
            result = await run_as(NOBODY, NOBODY, lambda names=names: watch(names))
            assert result == {"ok": False, "code": "forbidden", "message": result["message"]}
        # The same answer for a declared name and an unknown one: no existence oracle.
        async with AsyncClient.connect(agent.socket) as client:
            with pytest.raises(Forbidden):
                await client.watch(["nosuch"])


async def test_watchers_per_uid_are_bounded_and_released(agent: RunningAgent) -> None:
    with trio.fail_after(30):
        clients = [await open_client(agent.socket) for _ in range(4)]
        try:
            for client in clients[:3]:
                await client.watch(["db"])
            with pytest.raises(RateLimited):
                await clients[3].watch(["db"])
            assert agent.agent.server.statistics().watchers == 3
        finally:
            for client in clients:
                await client.aclose()
        # Closed watch connections give their slots back.
        while agent.agent.server.statistics().watchers:
            await trio.sleep(0.01)
        async with AsyncClient.connect(agent.socket) as client:
            await client.watch(["db"])


async def test_a_watch_connection_carries_nothing_else(agent: RunningAgent) -> None:
    with trio.fail_after(30):
        client = await open_client(agent.socket)
        async with client:
            await client.watch(["db"])
            # A request on a watch connection ends it.
            _, frame = client._conn.send_request("ping")
            await client._stream.send_all(frame)
            with pytest.raises(ClientError):
                await client._next()


async def test_a_watcher_that_does_not_read_is_dropped(agent: RunningAgent) -> None:
    cache = agent.agent.cache
    with trio.fail_after(60):
        client = await open_client(agent.socket)
        async with client:
            await client.watch(["api"])           # and never read again
            version = 1000
            while agent.agent.server.statistics().watchers:
                version += 1
                cache.put("api", {"token": f"t{version}"}, version=version)
                await trio.sleep(0)
                assert version < 1_000_000
        assert '"dropped"' in agent.audit_text()


async def test_a_reload_that_takes_the_grant_away_ends_the_watch(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded
) -> None:
    sock = socket_dir() / "agentd.sock"
    grant = f"""
[[policy]]
name = "nobody-api"
uids = [{NOBODY}]
allow = ["api"]
"""
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=sock, extra=grant)
    path = str(sock)

    def watch_until_closed() -> str:
        with Client.connect(path, timeout=10) as client:
            events = client.watch(["api"])
            try:
                next(events)
            except ClientError:
                return "closed"
            return "event"

    async with running_agent(cfg) as ra:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                outcome: dict[str, object] = {}

                async def watcher() -> None:
                    outcome.update(await run_as(NOBODY, NOBODY, watch_until_closed))

                nursery.start_soon(watcher)
                while not ra.agent.server.statistics().watchers:
                    await trio.sleep(0.01)
                write_config(tmp_path, bao, approle_files, seeded, sock=sock)   # no nobody-api
                assert ra.agent.reload()
            assert outcome == {"ok": True, "value": "closed"}
            assert ra.agent.server.statistics().watchers == 0
