"""A value anyone with write access to a declared path can store upstream must not stop the
agent: a secret nested deeper than ``jsonnum.MAX_DEPTH`` (OpenBao's Go decoder takes 10,000
levels; Python's stops near 1,000 with a RecursionError, which stopped the agent) is an error
for that secret, served nowhere and logged without its value, while every other secret goes on
being served. Real OpenBao, an agent in this trio loop."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from agentd.client import AsyncClient
from agentd.errors import RequestError
from tests.agentfixture import RunningAgent, Seeded, running_agent, socket_dir, write_config
from tests.openbao import DevServer
from tests.support import until

DEPTH = 3000


def quick_ready_config(tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path],
                       seeded: Seeded, extra: str = "") -> Path:
    """write_config whose ready wait is short: a secret here never arrives."""
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=socket_dir() / "agentd.sock",
                       extra=extra)
    cfg.write_text(cfg.read_text().replace('ready_timeout = "10s"', 'ready_timeout = "2s"'))
    return cfg


def put_raw(bao: DevServer, path: str, body: bytes) -> None:
    req = urllib.request.Request(f"{bao.address}/v1/secret/data/{path}", data=body,
                                 method="POST")
    req.add_header("X-Vault-Token", bao.token)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status in (200, 204)


@pytest.fixture
async def deep_agent(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded
) -> AsyncIterator[RunningAgent]:
    marker = seeded.marker("deep")
    nested = b"[" * DEPTH + b"]" * DEPTH
    put_raw(bao, f"{seeded.prefix}/deep",
            b'{"data": {"marker": "' + marker.encode() + b'", "x": ' + nested + b"}}")
    extra = (f'\n[secrets.deep]\nkind = "kv2"\npath = "secret/data/{seeded.prefix}/deep"\n'
             'refresh = "1s"\n')
    cfg = quick_ready_config(tmp_path, bao, approle_files, seeded, extra)
    async with running_agent(cfg) as ra:
        yield ra


async def test_a_secret_nested_too_deep_is_an_error_not_a_stopped_agent(
    deep_agent: RunningAgent, seeded: Seeded
) -> None:
    refresher = deep_agent.agent.refresher
    with trio.fail_after(60):
        # several refreshes of it have failed, and the agent is still here
        await until(lambda: refresher.states["deep"].failures >= 2, "deep's refreshes fail")
        async with AsyncClient.connect(deep_agent.socket) as client:
            reply = await client.get("db")
            assert reply["data"]["password"] == seeded.markers["db"]
            with pytest.raises(RequestError):
                await client.get("deep")
            status = await client.status()
    assert seeded.markers["deep"] not in deep_agent.log.getvalue()
    assert seeded.markers["deep"] not in str(status)
    assert refresher.states["deep"].last_error


async def test_a_value_the_cache_cannot_hold_is_that_secret_s_error(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The net under jsonnum's bounds: whatever ``Cache.put`` refuses (here: made to refuse
    ``other``'s value, quoting it as msgpack's errors do) fails that secret's refresh, with
    nothing of the value in its error, while the agent goes on serving the rest."""
    from agentd.cache import Cache

    put = Cache.put

    def refusing_put(self: Cache, name: str, data: object, **kwargs: object) -> bool:
        if name == "other":
            raise TypeError(f"can not serialize {data!r}")
        return put(self, name, data, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Cache, "put", refusing_put)
    cfg = quick_ready_config(tmp_path, bao, approle_files, seeded)
    async with running_agent(cfg) as running:
        refresher = running.agent.refresher
        with trio.fail_after(60):
            await until(lambda: refresher.states["other"].failures >= 2, "other's refreshes fail")
            async with AsyncClient.connect(running.socket) as client:
                reply = await client.get("db")
                assert reply["data"]["password"] == seeded.markers["db"]
        error = refresher.states["other"].last_error
        assert error and "TypeError" in error
        assert seeded.markers["other"] not in error
        assert seeded.markers["other"] not in running.log.getvalue()
