"""`check = [...]`: a program validates each new value before it goes live."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

from agentd.errors import Unavailable
from tests.agentfixture import running_agent
from tests.kindsupport import call, unique, write_config
from tests.openbao import DevServer

CHECK = """
import json, os, sys
path = os.environ["AGENTD_SECRET_FILE"]
with open(sys.argv[1], "a") as seen:
    seen.write(path + " " + oct(os.stat(path).st_mode & 0o777) + " "
               + os.environ["AGENTD_SECRET_NAME"] + "\\n")
sys.exit(1 if json.load(open(path))["password"].startswith("bad") else 0)
"""


async def test_a_failing_check_keeps_the_previous_value(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    prefix = unique("check")
    bao.kv_put(f"{prefix}/db", {"password": "good-1"})
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    seen = tmp_path / "seen.txt"
    secrets = f"""
[secrets.db]
kind = "kv2"
path = "secret/data/{prefix}/db"
refresh = "1h"
check = ["{sys.executable}", "{script}", "{seen}"]
"""
    path = write_config(tmp_path, bao, approle_files, secrets)
    async with running_agent(path) as running:
        with trio.fail_after(20):
            assert (await call(running.socket, "get", name="db"))["data"]["password"] == "good-1"
            bao.kv_put(f"{prefix}/db", {"password": "bad-2"})
            with pytest.raises(Unavailable, match="check exited with status 1"):
                await call(running.socket, "refresh", name="db")
            reply = await call(running.socket, "get", name="db")
            assert (reply["data"]["password"], reply["version"]) == ("good-1", 1)
            status = (await call(running.socket, "status"))["secrets"]["db"]
            assert status["check_failures"] == 1
            bao.kv_put(f"{prefix}/db", {"password": "good-3"})
            assert (await call(running.socket, "refresh", name="db"))["version"] == 3
            assert (await call(running.socket, "get", name="db"))["data"]["password"] == "good-3"
    lines = seen.read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        file, mode, name = line.split()
        assert (mode, name) == ("0o600", "db")
        assert not os.path.exists(file)      # removed after the check
    assert "bad-2" not in running.log_text()
