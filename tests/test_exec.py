"""``agentd exec``: values in the child's environment; restart on change (signal, grace, kill).

The command runs for real (``python -m agentd exec``) against an agent running in this process
and the session's OpenBao.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import msgpack
import pytest
import trio

import agentd
from agentd.errors import UsageError
from agentd.execcmd import EnvSpec, exit_status, parse_env_spec, parse_grace, parse_signal
from tests.agentfixture import (
    NOBODY,
    RunningAgent,
    Seeded,
    agent_fixture,
    socket_dir,
)
from tests.openbao import DevServer

SYSTEM_PYTHON = Path("/usr/bin/python3.11")
AGENTD = [sys.executable, "-m", "agentd"]


agent = agent_fixture()


def test_env_spec_parsing() -> None:
    assert parse_env_spec("DB_PASSWORD=db.password") == EnvSpec("DB_PASSWORD", "db", "password")
    assert parse_env_spec("DB=db") == EnvSpec("DB", "db", None)
    assert parse_env_spec("X=db.a.b") == EnvSpec("X", "db", "a.b")
    for bad in ("DB", "=db", "1X=db", "X=", "X=.f", "X=db.", "A-B=db"):
        with pytest.raises(UsageError):
            parse_env_spec(bad)
    assert parse_signal("TERM") == signal.SIGTERM
    assert parse_signal("sighup") == signal.SIGHUP
    assert parse_signal("9") == 9
    with pytest.raises(UsageError):
        parse_signal("NOPE")
    assert parse_grace("2.5") == 2.5
    assert parse_grace("1m") == 60.0
    with pytest.raises(UsageError):
        parse_grace("-1")
    assert exit_status(-15) == 143 and exit_status(3) == 3


DUMP_ENV = (
    'import json, os, sys; json.dump({k: os.environ.get(k) for k in sys.argv[2:]}, '
    'open(sys.argv[1], "w"))'
)


async def test_exec_puts_the_values_into_the_environment(
    agent: RunningAgent, seeded: Seeded, tmp_path: Path
) -> None:
    out = tmp_path / "env.json"
    with trio.fail_after(60):
        result = await trio.run_process(
            [*AGENTD, "exec", "--socket", str(agent.socket),
             "--env", "DB_PASSWORD=db.password", "--env", "API_TOKEN=api.token",
             "--env", "DB_JSON=db",
             "--", sys.executable, "-c", DUMP_ENV, str(out), "DB_PASSWORD", "API_TOKEN",
             "DB_JSON", "HOME"],
            capture_stderr=True, check=False,
        )
    assert result.returncode == 0, result.stderr.decode()
    env = json.loads(out.read_text())
    assert env["DB_PASSWORD"] == seeded.markers["db"]
    assert env["API_TOKEN"] == seeded.markers["api"]
    assert json.loads(env["DB_JSON"]) == {"username": "app", "password": seeded.markers["db"]}
    assert env["HOME"] == os.environ.get("HOME")          # the rest of the environment stays
    for marker in seeded.markers.values():
        assert marker.encode() not in result.stderr


async def test_exec_asks_as_the_calling_user(agent: RunningAgent, tmp_path: Path) -> None:
    if not SYSTEM_PYTHON.is_file():
        pytest.skip("needs /usr/bin/python3.11 (the venv's interpreter may be unreadable to "
                    "nobody)")
    paths = [str(Path(agentd.__file__).parent.parent), str(Path(msgpack.__file__).parent.parent)]
    run_cli = (f"import sys; sys.path[:0] = {paths!r}; from agentd.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    probe = await trio.run_process(
        [str(SYSTEM_PYTHON), "-I", "-c", run_cli.replace("sys.exit(main(sys.argv[1:]))", "")],
        capture_stderr=True, check=False, user=NOBODY, group=NOBODY, extra_groups=[],
    )
    if probe.returncode != 0:
        pytest.skip("nobody cannot import agentd from this checkout (a 0700 directory on the "
                    f"way?): {probe.stderr.decode()[-200:]}")
    work = socket_dir()
    os.chown(work, NOBODY, NOBODY)
    try:
        async def as_nobody(*env: str) -> trio.CompletedProcess[bytes]:
            argv = [str(SYSTEM_PYTHON), "-I", "-c", run_cli, "exec", "--socket",
                    str(agent.socket)]
            for spec in env:
                argv += ["--env", spec]
            argv += ["--", "/bin/sh", "-c", 'echo "uid=$(id -u)" > "$0"',
                     str(work / f"out-{len(env)}")]
            return await trio.run_process(argv, capture_stderr=True, check=False,
                                          user=NOBODY, group=NOBODY, extra_groups=[])

        with trio.fail_after(60):
            granted = await as_nobody("P=db.password")
            assert granted.returncode == 0, granted.stderr.decode()
            assert (work / "out-1").read_text() == f"uid={NOBODY}\n"
            refused = await as_nobody("P=db.password", "O=other.value")
            assert refused.returncode == 1
            assert b"forbidden" in refused.stderr
            assert not (work / "out-2").exists()      # nothing runs without every value
    finally:
        for path in work.iterdir():
            path.unlink()
        work.rmdir()


async def wait_for_lines(path: Path, count: int) -> list[str]:
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        await trio.sleep(0.05)       # nothing to await: the child writes a file


CHILD = 'trap "{trap}" TERM; echo "$DB_PASSWORD" >> "$0"; while :; do sleep 0.1; done'


@pytest.mark.parametrize("ignores_term", [False, True], ids=["stops-on-term", "needs-kill"])
async def test_restart_on_change(
    agent: RunningAgent, bao: DevServer, seeded: Seeded, tmp_path: Path, ignores_term: bool
) -> None:
    log = tmp_path / "starts.log"
    child = CHILD.format(trap="" if ignores_term else "exit 0")
    process = await trio.lowlevel.open_process(
        [*AGENTD, "exec", "--socket", str(agent.socket), "--restart-on-change",
         "--grace", "0.5s", "--env", "DB_PASSWORD=db.password", "--env", "U=db.username",
         "--", "/bin/sh", "-c", child, str(log)],
        start_new_session=True,
    )
    try:
        with trio.fail_after(60):
            assert await wait_for_lines(log, 1) == [seeded.markers["db"]]
            # A change elsewhere (not a value this program uses) restarts nothing; a change
            # of db does.
            bao.kv_put(f"{seeded.prefix}/other", {"value": "changed"})
            new = f"NEW-{seeded.markers['db']}"
            bao.kv_put(f"{seeded.prefix}/db", {"username": "app", "password": new})
            assert await wait_for_lines(log, 2) == [seeded.markers["db"], new]
            assert process.returncode is None
            if not ignores_term:
                process.send_signal(signal.SIGTERM)   # passed on; the child exits 0
                assert await process.wait() == 0
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            with trio.move_on_after(10):
                await process.wait()
    assert len(log.read_text().splitlines()) == 2


def test_exec_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from agentd.cli import main

    assert main(["exec", "--", "true"]) == 2
    assert "give at least one --env" in capsys.readouterr().err
    assert main(["exec", "--env", "X=db"]) == 2
    assert "no program given" in capsys.readouterr().err
    assert main(["exec", "--env", "1X=db", "--", "true"]) == 2
    assert main(["exec", "--env", "X=db", "--signal", "NOPE", "--", "true"]) == 2
    assert main(["exec", "--env", "X=db", "--socket", "/nonexistent/agentd.sock", "--",
                 "true"]) == 1
    assert "cannot connect" in capsys.readouterr().err
