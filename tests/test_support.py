"""backoff, cell, systemd notify and socket activation."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from agentd import systemd
from agentd.backoff import Backoff, jittered
from agentd.cell import Cell


def test_backoff_grows_is_capped_and_resets() -> None:
    b = Backoff(1, 60, rng=random.Random(7))
    delays = [b.next_delay() for _ in range(12)]
    assert all(0.5 <= d <= 60 for d in delays)
    assert max(delays[8:]) > 8          # grew well past the base
    ceilings = [min(60, 2.0**n) for n in range(12)]
    assert all(d <= c for d, c in zip(delays, ceilings, strict=True))
    assert b.next_delay(at_least=120) == 120       # Retry-After wins
    b.reset()
    assert b.next_delay() <= 1


def test_jitter_stays_within_ten_percent() -> None:
    rng = random.Random(1)
    values = [jittered(300, rng=rng) for _ in range(200)]
    assert all(270 <= v <= 330 for v in values)
    assert len({round(v) for v in values}) > 10


async def test_cell_waiters_skip_to_the_latest_value() -> None:
    cell: Cell[int] = Cell(0)
    seen = []

    async def consumer() -> None:
        gen = 0
        while True:
            gen, value = await cell.wait_changed(gen)
            seen.append(value)
            if value == 3:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.testing.wait_all_tasks_blocked()
        cell.set(1)
        cell.set(2)
        cell.set(3)
    assert seen == [3]
    assert cell.generation == 3


async def test_notify_sends_datagrams_to_the_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd.notify("READY=1")
        assert receiver.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd.notify("READY=1")


def test_watchdog_interval_is_half_and_only_for_us(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval() is None


def test_listen_fds_takes_sockets_from_systemd_socket_activate(tmp_path: Path) -> None:
    activate = "/usr/bin/systemd-socket-activate"
    if not os.path.exists(activate):
        pytest.skip("systemd-socket-activate is not installed")
    path = tmp_path / "act.sock"
    script = (
        "from agentd import systemd; s = systemd.listen_fds(); "
        "print(len(s), s[0].getsockname(), flush=True); c, _ = s[0].accept(); c.sendall(b'hi')"
    )
    proc = subprocess.Popen(
        [activate, "-l", str(path), "-E", "PYTHONPATH", sys.executable, "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)),
    )
    try:
        with socket.socket(socket.AF_UNIX) as client:
            for _ in range(200):
                try:
                    client.connect(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    import time
                    time.sleep(0.05)
            client.settimeout(10)
            assert client.recv(10) == b"hi"
        assert proc.stdout is not None
        assert proc.stdout.readline().decode().split() == ["1", str(path)]
    finally:
        proc.kill()
        proc.communicate()
