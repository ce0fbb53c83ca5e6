"""The systemd credentials socket, against a real agent, with callers in real cgroups.

A caller here does what systemd 252 does (checked under systemd-nspawn, see
test_creds_nspawn.py): from a process inside the unit's cgroup, bind the abstract address
``\\0<16 hex>/unit/<unit>/<ID>``, connect, shut down the write side, read until EOF.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from agentd.access import Peer
from agentd.creds import DENIAL_BYTES, parse_address
from tests.agentfixture import (
    NOBODY,
    RunningAgent,
    Seeded,
    running_agent,
    seed,
    socket_dir,
    write_config,
)
from tests.openbao import DevServer
from tests.peers import run_as

SYSTEMD_LIKE = r"""
import os, socket, sys
path, unit, cred_id = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(b"\0" + os.urandom(8).hex().encode() + f"/unit/{unit}/{cred_id}".encode())
s.connect(path)
s.shutdown(socket.SHUT_WR)
data = b""
while chunk := s.recv(1 << 16):
    data += chunk
sys.stdout.buffer.write(data)
"""


def cgroup_root() -> Path | None:
    """A hierarchy systemd units show up in, where we may make a cgroup (root only)."""
    for root in (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup")):
        if (root / "cgroup.procs").exists() and os.access(root, os.W_OK):
            return root
    return None


ROOT = cgroup_root()
needs_cgroup = pytest.mark.skipif(ROOT is None, reason="no writable cgroup hierarchy")


@dataclass
class Setup:
    ra: RunningAgent
    seeded: Seeded
    creds: Path
    unit: str            # granted db
    other: str           # granted nothing
    groups: list[Path]
    use_cgroups: bool = True

    async def load(self, cred_id: str, *, claim: str | None = None,
                   inside: str | None = None) -> bytes:
        """Ask for ``cred_id`` as systemd would for unit ``claim`` (default ``self.unit``),
        from a process in the cgroup of ``inside`` (default: the claimed unit)."""
        claim = claim or self.unit
        group = ROOT / (inside or claim) if ROOT and self.use_cgroups else None
        argv = [sys.executable, "-c", SYSTEMD_LIKE, str(self.creds), claim, cred_id]
        if group is not None:
            group.mkdir(exist_ok=True)
            self.groups.append(group)
            argv = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *argv]
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                        check=False)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout


@asynccontextmanager
async def creds_agent(
    tmp_path: Path, bao: DevServer, approle: tuple[Path, Path], extra_policy: str = ""
) -> AsyncIterator[Setup]:
    seeded = seed(bao)
    sockets = socket_dir()
    unit = f"acc-{uuid.uuid4().hex[:8]}.service"
    other = f"other-{uuid.uuid4().hex[:8]}.service"
    cfg = write_config(
        tmp_path, bao, approle, seeded, sock=sockets / "agentd.sock",
        agent_extra=f'credentials_socket = "{sockets / "creds.sock"}"',
        extra=f"""
[[policy]]
name = "acc-creds"
units = ["{unit}"]
allow = ["db", "api", "missing"]

[secrets.missing]
kind = "kv2"
path = "secret/data/{seeded.prefix}/never-written"

[[policy]]
name = "units-and-uid"
units = ["{other}"]
uids = [0]
allow = ["db"]
{extra_policy}
""")
    setup = None
    try:
        async with running_agent(cfg) as ra:
            setup = Setup(ra, seeded, sockets / "creds.sock", unit, other, [])
            with trio.fail_after(30):
                yield setup
        assert not setup.creds.exists()       # removed at shutdown
    finally:
        for group in setup.groups if setup else []:
            for _ in range(200):
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    await trio.sleep(0.01)   # the exited caller leaves the cgroup asynchronously


def is_denial(data: bytes) -> bool:
    return len(data) == DENIAL_BYTES and data.count(0) == DENIAL_BYTES


def test_parse_address() -> None:
    assert parse_address(b"\0" + b"a1" * 8 + b"/unit/acc.service/db.password") == (
        "acc.service", "db.password")
    assert parse_address(b"\0abc/unit/acc.service/db") == ("acc.service", "db")
    assert parse_address(b"\0abc/unit/acc.service") is None
    assert parse_address(b"\0xyz/unit/acc.service/db") is None
    assert parse_address(b"/tmp/sock") is None
    assert parse_address(b"") is None


@needs_cgroup
async def test_a_granted_unit_gets_exactly_the_value(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path]
) -> None:
    async with creds_agent(tmp_path, bao, approle_files) as s:
        mode = os.stat(s.creds).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert await s.load("db.password") == s.seeded.markers["db"].encode()
        assert await s.load("db.username") == b"app"
        whole = await s.load("db")
        assert json.loads(whole) == {"username": "app", "password": s.seeded.markers["db"]}
        assert json.loads(await s.load("api")) == {"token": s.seeded.markers["api"]}
        audit = s.ra.audit_text()
        assert '"credential"' in audit and s.unit in audit
        for marker in s.seeded.markers.values():
            assert marker not in audit
            assert marker not in s.ra.log_text()


@needs_cgroup
async def test_everything_denied_gets_the_over_limit_answer(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path]
) -> None:
    async with creds_agent(tmp_path, bao, approle_files) as s:
        # Another unit; a name the unit is not granted; a name nobody declared; a field that is
        # not there; an ID that is not a name at all.
        assert is_denial(await s.load("db.password", claim=f"nope-{uuid.uuid4().hex[:6]}.service"))
        assert is_denial(await s.load("other.value"))
        assert is_denial(await s.load("nosuch.password"))
        assert is_denial(await s.load("db.nosuchfield"))
        # Granted and declared, but there is no value (deleted upstream / never written).
        assert is_denial(await s.load("missing"))
        # A rule that also lists uids does not apply here (the unit's processes are not the
        # caller), even though the caller is uid 0.
        assert is_denial(await s.load("db.password", claim=s.other))
        # Any root process can bind an address naming any unit: the caller's own cgroup must be
        # the claimed unit's.
        spoofer = f"spoof-{uuid.uuid4().hex[:6]}.service"
        assert is_denial(await s.load("db.password", inside=spoofer))
        stats = s.ra.agent.credentials.statistics()
        assert stats.denied == 7 and stats.served == 0
        assert s.ra.audit_text().count('"deny"') >= 1


async def test_a_non_root_caller_gets_nothing(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path]
) -> None:
    async with creds_agent(tmp_path, bao, approle_files) as s:
        path = str(s.creds)

        def connect() -> str:
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(b"\0" + os.urandom(8).hex().encode() + f"/unit/{s.unit}/db".encode())
            sock.connect(path)
            return "connected"

        result = await run_as(NOBODY, NOBODY, connect)
        assert result["ok"] is False
        assert "PermissionError" in result["message"]
        stats = s.ra.agent.credentials.statistics()
        assert (stats.served, stats.denied) == (0, 0)


async def test_a_caller_from_the_wrong_cgroup_by_fake_proc_root(
    tmp_path: Path, bao: DevServer, approle_files: tuple[Path, Path]
) -> None:
    """Without touching real cgroups: the unit comes from an injected proc root."""
    proc = tmp_path / "proc"

    def identify_in(unit: str):  # type: ignore[no-untyped-def]
        def identify(sock: socket.socket) -> Peer:
            real = Peer.from_socket(sock)
            d = proc / str(real.pid)
            d.mkdir(parents=True, exist_ok=True)
            (d / "cgroup").write_text(f"0::/system.slice/{unit}\n")
            (d / "stat").write_text(Path(f"/proc/{real.pid}/stat").read_text())
            (d / "status").write_text(Path(f"/proc/{real.pid}/status").read_text())
            real.close()
            return Peer.from_ids(real.pid, real.uid, real.gid, proc=proc)
        return identify

    async with creds_agent(tmp_path, bao, approle_files) as s:
        s.use_cgroups = False         # the caller runs in our own cgroup
        s.ra.agent.credentials.identify = identify_in(s.unit)
        assert await s.load("db.password") == s.seeded.markers["db"].encode()
        s.ra.agent.credentials.identify = identify_in("elsewhere.service")
        assert is_denial(await s.load("db.password"))
        s.ra.agent.credentials.identify = identify_in(f"user@0.service/app.slice/{s.unit}")
        assert is_denial(await s.load("db.password"))


def test_the_denial_is_over_systemds_limit() -> None:
    # systemd reads at most 1 MiB (1 MiB + 128 KiB encrypted); more fails the unit's start.
    assert DENIAL_BYTES > 1024 * 1024 + 128 * 1024
