"""Rollback pin: `version = N` on a kv2 secret serves that version; without it, the latest."""

from __future__ import annotations

from pathlib import Path

import trio

from agentd import catalog
from tests.agentfixture import running_agent
from tests.kindsupport import call, unique, write_config
from tests.openbao import DevServer


def secret_toml(prefix: str, pin: str) -> str:
    return f"""
[secrets.db]
kind = "kv2"
path = "secret/data/{prefix}/db"
refresh = "1s"
{pin}
"""


async def test_pinned_version_is_served_until_the_pin_is_removed(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    prefix = unique("pin")
    for n in (1, 2, 3):
        bao.kv_put(f"{prefix}/db", {"password": f"v{n}"})
    path = write_config(tmp_path, bao, approle_files, secret_toml(prefix, "version = 2"))
    async with running_agent(path) as running:
        with trio.fail_after(20):
            reply = await call(running.socket, "get", name="db")
            assert (reply["data"], reply["version"]) == ({"password": "v2"}, 2)
            bao.kv_put(f"{prefix}/db", {"password": "v4"})
            await call(running.socket, "refresh", name="db")
            reply = await call(running.socket, "get", name="db")
            assert (reply["data"], reply["version"]) == ({"password": "v2"}, 2)
            status = await call(running.socket, "status")
            assert status["secrets"]["db"]["pinned"] == 2
            entry = catalog.entries(running.agent.config, status)[0]
            assert entry["pinned"] == 2
            assert entry["next_rotation"] is not None

            # Incident over: the pin goes, SIGHUP-style reload serves the latest again.
            path.write_text(path.read_text().replace("version = 2", ""))
            assert running.agent.reload()
            while True:
                reply = await call(running.socket, "get", name="db") \
                    if "db" in running.agent.cache.names() else None
                if reply is not None and reply["version"] == 4:
                    break
                await trio.sleep(0.05)
            assert reply["data"] == {"password": "v4"}
            status = await call(running.socket, "status")
            assert "pinned" not in status["secrets"]["db"]


async def test_pin_added_by_reload_rolls_back(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    prefix = unique("pin")
    for n in (1, 2):
        bao.kv_put(f"{prefix}/db", {"password": f"v{n}"})
    path = write_config(tmp_path, bao, approle_files, secret_toml(prefix, ""))
    async with running_agent(path) as running:
        with trio.fail_after(20):
            assert (await call(running.socket, "get", name="db"))["version"] == 2
            path.write_text(path.read_text().replace('refresh = "1s"',
                                                     'refresh = "1s"\nversion = 1'))
            assert running.agent.reload()
            while True:
                if "db" in running.agent.cache.names():
                    reply = await call(running.socket, "get", name="db")
                    if reply["version"] == 1:
                        break
                await trio.sleep(0.05)
            assert reply["data"] == {"password": "v1"}
