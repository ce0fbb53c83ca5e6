"""The real command: ``agentd run`` as a subprocess with systemd's notify protocol, the CLI
client commands, and the token lifecycle with short TTLs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from agentd.client import Client
from tests.agentfixture import running_agent, seed, socket_dir, write_config
from tests.openbao import DevServer

pytestmark = pytest.mark.slow


def agentd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentd", *args], capture_output=True, text=True, timeout=30,
        env=env,
    )


async def test_run_notifies_ready_serves_cli_and_stops_cleanly(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    seeded = seed(bao)
    sock = socket_dir() / "agentd.sock"
    config = write_config(tmp_path, bao, approle_files, seeded, sock=sock)
    notify_path = tmp_path / "notify.sock"
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(notify_path))
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
    stderr_path = tmp_path / "agentd.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentd", "run", "-c", str(config)],
            stderr=stderr, stdout=subprocess.DEVNULL, env=env,
        )
    try:
        with trio.fail_after(30):
            message = await notify.recv(4096)
        assert message == b"READY=1"
        assert sock.is_socket()

        got = await trio.to_thread.run_sync(
            lambda: agentd("get", "--socket", str(sock), "db", "password")
        )
        assert (got.returncode, got.stdout) == (0, seeded.markers["db"] + "\n")
        whole = await trio.to_thread.run_sync(lambda: agentd("get", "-c", str(config), "db"))
        assert json.loads(whole.stdout) == {"username": "app", "password": seeded.markers["db"]}
        listed = await trio.to_thread.run_sync(
            lambda: agentd("list", env=dict(os.environ, AGENTD_SOCKET=str(sock)))
        )
        assert listed.stdout.split() == ["api", "db", "other"]
        denied = await trio.to_thread.run_sync(
            lambda: agentd("get", "--socket", str(sock), "nope")
        )
        assert denied.returncode == 1
        assert denied.stderr.startswith("agentd: forbidden:")
        assert "Traceback" not in denied.stderr
        status = await trio.to_thread.run_sync(
            lambda: agentd("status", "--json", "--socket", str(sock))
        )
        assert json.loads(status.stdout)["auth"]["state"] == "ok"
        human = await trio.to_thread.run_sync(lambda: agentd("status", "--socket", str(sock)))
        assert human.returncode == 0
        rows = {line.split()[0]: line.split() for line in human.stdout.splitlines() if line}
        assert rows["auth"][1:3] == ["approle", "ok"]
        assert rows["upstream"][1:3] == [bao.address, "up"]
        assert rows["db"][1:3] == ["kv2", "1"]
        assert rows["api"][1:3] == ["kv1", "1"]
        assert "recent errors: none" in human.stdout

        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(lambda: proc.wait(timeout=20)) == 0
        with trio.fail_after(5):
            assert await notify.recv(4096) == b"STOPPING=1"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert not sock.exists()
    lines = stderr_path.read_text().splitlines()
    assert lines, "the daemon logged nothing"
    entries = [json.loads(line) for line in lines]          # every line is JSON
    assert any(e["msg"] == "agentd ready" for e in entries)
    text = stderr_path.read_text()
    secret_id = approle_files[1].read_text().strip()
    for marker in [*seeded.markers.values(), secret_id]:
        assert marker not in text


def test_client_commands_without_an_agent(tmp_path: Path) -> None:
    missing = tmp_path / "none.sock"
    got = agentd("get", "--socket", str(missing), "db")
    assert got.returncode == 1
    assert got.stderr.strip() == (
        f"agentd: cannot connect to agentd at {missing}: No such file or directory"
    )
    usage = agentd("get")
    assert usage.returncode == 2
    assert "Traceback" not in usage.stderr


def test_check_config_reports_every_problem_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "agentd.toml"
    bad.write_text('[agent]\nsocket = 5\nbogus = 1\n')
    got = agentd("check-config", "-c", str(bad))
    assert got.returncode == 2
    assert "Traceback" not in got.stderr
    problems = got.stderr.strip().splitlines()
    assert f"{bad}:2: agent.socket: expected a string" in problems[0] or any(
        p.startswith(f"{bad}:2: agent.socket:") for p in problems
    )
    assert any(p.startswith(f"{bad}:3: agent.bogus: unknown key") for p in problems)
    good = agentd("check-config", "-c", "config/agentd.example.toml")
    assert "Traceback" not in good.stderr


def read_password(sock: Path) -> dict[str, object]:
    with Client.connect(sock, timeout=10) as client:
        return client.get("db", "password")


async def test_short_token_ttl_renews_and_logs_in_again(
    bao: DevServer, tmp_path: Path
) -> None:
    seeded = seed(bao)
    role_id, secret_id = bao.approle(
        "agentd-short", policies=["agentd-read"], token_ttl="2s", token_max_ttl="4s"
    )
    role_file, secret_file = tmp_path / "role_id", tmp_path / "secret_id"
    role_file.write_text(role_id)
    secret_file.write_text(secret_id)
    secret_file.chmod(0o600)
    role_file.chmod(0o600)
    config = write_config(
        tmp_path, bao, (role_file, secret_file), seeded, sock=socket_dir() / "a.sock"
    )
    async with running_agent(config) as running:
        sock = running.socket
        first_token = running.agent.auth.token()
        # Over three max TTLs the agent must keep a working token and keep refreshing.
        for round_ in range(3):
            value = seeded.marker(f"round{round_}")
            version = bao.kv_put(f"{seeded.prefix}/db", {"username": "app", "password": value})
            with trio.fail_after(20):
                while True:
                    reply = await trio.to_thread.run_sync(read_password, sock)
                    if reply["version"] == version:
                        break
                    await trio.sleep(0.2)
            assert reply["data"] == value
            assert reply["stale"] is False
            with trio.fail_after(10):
                await trio.sleep(2)
        stats = running.agent.auth.statistics()
        assert stats.logins >= 2
        assert stats.renewals >= 1
        assert running.agent.auth.token() != first_token
        log_text = running.log_text()
    assert secret_id not in log_text
    assert role_id not in log_text
