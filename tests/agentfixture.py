"""Build a config for a real agent against the session's OpenBao and run it in-process.

``agent_fixture(agent_extra)`` makes the usual ``agent`` fixture of a test module: ``write_config``
over the session's OpenBao and the ``seeded`` fixture (conftest.py), run by ``running_agent``.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from agentd import config as config_mod
from agentd import logs
from agentd.client import Client
from agentd.connectguard import DirectoryGuard
from agentd.daemon import Agent
from tests.openbao import DevServer

NOBODY = 65534


@dataclass
class Seeded:
    """Secrets written to OpenBao for one test, each holding a unique marker string."""

    prefix: str
    markers: dict[str, str] = field(default_factory=dict)

    def marker(self, label: str) -> str:
        value = f"MARKER-{label}-{uuid.uuid4().hex}"
        self.markers[label] = value
        return value


@dataclass
class RunningAgent:
    agent: Agent
    socket: Path
    config_path: Path
    log: io.StringIO
    audit_path: Path

    def log_text(self) -> str:
        return self.log.getvalue()

    def audit_text(self) -> str:
        self.agent.audit.flush()
        return self.audit_path.read_text() if self.audit_path.exists() else ""


async def call(sock: Path, op: str, **args: Any) -> dict[str, Any]:
    """One request on a fresh blocking ``Client`` connection, run in a thread."""
    def blocking() -> dict[str, Any]:
        with Client.connect(sock, timeout=10) as c:
            return c.call(op, **args)

    return await trio.to_thread.run_sync(blocking)


_SOCKET_ROOT: list[Path] = []


def _remove_socket_root(owner: int) -> None:
    if os.getpid() == owner:            # not in a forked child that exits normally
        for root in _SOCKET_ROOT:
            shutil.rmtree(root, ignore_errors=True)


def socket_dir() -> Path:
    """A directory other uids can traverse (pytest's tmp dirs are 0700), short enough for a
    socket path, under one per-run directory removed when the run ends."""
    if not _SOCKET_ROOT:
        root = Path(tempfile.mkdtemp(prefix="agentd-socks-"))
        root.chmod(0o755)
        _SOCKET_ROOT.append(root)
        atexit.register(_remove_socket_root, os.getpid())
    path = Path(tempfile.mkdtemp(dir=_SOCKET_ROOT[0]))
    path.chmod(0o755)
    return path


def write_config(
    tmp_path: Path,
    bao: DevServer,
    approle: tuple[Path, Path],
    seeded: Seeded,
    *,
    sock: Path,
    addresses: list[str] | None = None,
    agent_extra: str = "",
    refresh: str = "1s",
    extra: str = "",
) -> Path:
    role_file, secret_file = approle
    addresses = addresses or [bao.address]
    p = seeded.prefix
    text = f"""
[agent]
socket = "{sock}"
state_dir = "{tmp_path / 'state'}"
ready_timeout = "10s"
log_level = "debug"
{agent_extra}

[upstream]
addresses = [{", ".join(f'"{a}"' for a in addresses)}]
timeout = "2s"

[upstream.auth]
method = "approle"
role_id_file = "{role_file}"
secret_id_file = "{secret_file}"

[audit]
path = "{tmp_path / 'audit.jsonl'}"
flush_interval = "1s"

[secrets.db]
kind = "kv2"
path = "secret/data/{p}/db"
refresh = "{refresh}"

[secrets.api]
kind = "kv1"
path = "kv1/{p}/api"
refresh = "{refresh}"

[secrets.other]
kind = "kv2"
path = "secret/data/{p}/other"
refresh = "{refresh}"

[[policy]]
name = "root-admin"
uids = [0]
allow = ["*"]
admin = true

[[policy]]
name = "nobody-db"
uids = [{NOBODY}]
allow = ["db"]
{extra}
"""
    path = tmp_path / "agentd.toml"
    path.write_text(text)
    return path


def seed(bao: DevServer) -> Seeded:
    seeded = Seeded(prefix=f"t-{uuid.uuid4().hex[:12]}")
    bao.kv_put(f"{seeded.prefix}/db", {"username": "app", "password": seeded.marker("db")})
    bao.api("POST", f"kv1/{seeded.prefix}/api", {"token": seeded.marker("api")})
    bao.kv_put(f"{seeded.prefix}/other", {"value": seeded.marker("other")})
    return seeded


@asynccontextmanager
async def running_agent(
    config_path: Path, *, configure: Callable[[Agent], None] | None = None,
    guard: DirectoryGuard | None = None,
) -> AsyncIterator[RunningAgent]:
    """Run an Agent (with the connect ``guard`` if given; it stays the caller's to close) in
    this trio loop until the block exits; JSON logs go to a StringIO."""
    buf = io.StringIO()
    logs.setup("debug", stream=buf)
    config = config_mod.load(config_path)
    agent = Agent(config)
    agent.server.blocks.guard = guard
    if configure:
        configure(agent)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            await nursery.start(agent.run)
        try:
            yield RunningAgent(
                agent=agent,
                socket=config.agent.socket,
                config_path=config_path,
                log=buf,
                audit_path=Path(str(config.audit.path)),
            )
        finally:
            nursery.cancel_scope.cancel()
    logging.getLogger("agentd").handlers.clear()
    os.environ.pop("NOTIFY_SOCKET", None)


def agent_fixture(
    agent_extra: str = "", *, configure: Callable[[Agent], None] | None = None,
    audit_flush: str = "1s", guard: bool = False,
) -> Any:
    """A fixture running the ``write_config`` agent (with ``agent_extra`` in its ``[agent]``
    table, its audit flushed every ``audit_flush``) over the ``seeded`` secrets, its socket in
    a ``socket_dir()``, ``configure(agent)`` called before it runs, and with ``guard`` the
    connect guard on that directory (decision 13); assign it to a name::

        agent = agent_fixture('frame_timeout = "1s"')
    """

    @pytest.fixture
    async def agent(
        tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path], seeded: Seeded
    ) -> AsyncIterator[RunningAgent]:
        sock = socket_dir() / "agentd.sock"
        cfg = write_config(tmp_path, bao, approle_files, seeded, sock=sock,
                           agent_extra=agent_extra)
        cfg.write_text(cfg.read_text().replace('flush_interval = "1s"',
                                               f'flush_interval = "{audit_flush}"'))
        opened = DirectoryGuard.open(sock) if guard else None
        try:
            async with running_agent(cfg, configure=configure, guard=opened) as ra:
                yield ra
        finally:
            if opened is not None:
                opened.close()

    return agent
