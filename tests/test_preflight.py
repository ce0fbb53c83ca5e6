"""The agent refuses unsafe or occupied paths before it starts anything (issue 13 item 13).

Each case runs the real ``Agent.run`` against an upstream that is never reached: a refusal must
come first, as a ``ConfigError`` naming the key, not as a traceback after a login.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from agentd import config as config_mod
from agentd.daemon import Agent
from agentd.errors import ConfigError


@pytest.fixture
def base(shared_tmp: Path) -> Path:
    return shared_tmp

def _config(base: Path, *, socket: Path, state_dir: Path) -> config_mod.Config:
    token = base / "token"
    token.write_text("s.never-used\n")
    token.chmod(0o600)
    path = base / "agentd.toml"
    path.write_text(f"""
[agent]
socket = "{socket}"
state_dir = "{state_dir}"
ready_timeout = "1s"

[upstream]
addresses = ["http://127.0.0.1:1"]

[upstream.auth]
method = "token_file"
token_file = "{token}"

[secrets.db]
kind = "kv2"
path = "secret/data/app/db"
""")
    return config_mod.load(path)


async def _refused(config: config_mod.Config) -> list[str]:
    with trio.fail_after(20), pytest.raises(ConfigError) as info:
        await Agent(config).run()        # the constructor already refuses
    return info.value.problems


async def test_a_regular_file_at_the_socket_path(base: Path) -> None:
    sock = base / "run" / "agentd.sock"
    sock.parent.mkdir()
    sock.write_text("not a socket")
    problems = await _refused(_config(base, socket=sock, state_dir=base / "state"))
    assert problems == [f"agent.socket: {sock} exists and is not a socket: remove it or "
                        "choose another path"]
    assert sock.read_text() == "not a socket"
    assert not (base / "state").exists()            # nothing started, nothing written


async def test_a_socket_in_a_sticky_world_writable_directory(base: Path) -> None:
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    problems = await _refused(_config(base, socket=shared / "agentd.sock",
                                      state_dir=base / "state"))
    assert problems == [f"agent.socket: {shared}: directory is writable by others (mode 1777): "
                        "chmod go-w"]


async def test_a_socket_directory_still_to_be_made_in_a_shared_one(base: Path) -> None:
    """/tmp-like: whoever makes the missing directory first owns it, so that is refused too."""
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    problems = await _refused(_config(base, socket=shared / "agentd" / "agentd.sock",
                                      state_dir=base / "state"))
    assert problems == [f"agent.socket: {shared}: directory is writable by others (mode 1777): "
                        "chmod go-w"]


async def test_a_state_dir_owned_by_another_user(base: Path) -> None:
    state = base / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    problems = await _refused(_config(base, socket=base / "run" / "agentd.sock", state_dir=state))
    assert len(problems) == 1
    assert problems[0].startswith(f"agent.state_dir: {state}: directory is owned by uid 65534")
