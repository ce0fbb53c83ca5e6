"""Anomaly signals: a KV secret set back to a previous value (reuse, by keyed fingerprints) and a
secret that rotates more often than `expect_rotation_every` allows."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from agentd import metrics
from tests.agentfixture import running_agent
from tests.kindsupport import call, unique, write_config
from tests.openbao import DevServer


def warnings(log_text: str, anomaly: str) -> list[dict[str, object]]:
    out = []
    for line in log_text.splitlines():
        record = json.loads(line)
        if record.get("anomaly") == anomaly:
            out.append(record)
    return out


async def wait_version(sock: Path, name: str, version: int) -> None:
    while (await call(sock, "refresh", name=name))["version"] < version:
        await trio.sleep(0.05)


async def test_value_set_back_to_a_previous_one_is_reported_as_reuse(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    prefix = unique("reuse")
    old = f"MARKER-old-{prefix}"
    bao.kv_put(f"{prefix}/db", {"password": old})
    secrets = f"""
[secrets.db]
kind = "kv2"
path = "secret/data/{prefix}/db"
refresh = "1h"

[metrics]
detailed = true
"""
    path = write_config(tmp_path, bao, approle_files, secrets)
    async with running_agent(path) as running:
        with trio.fail_after(20):
            bao.kv_put(f"{prefix}/db", {"password": f"MARKER-new-{prefix}"})
            await wait_version(running.socket, "db", 2)
            status = await call(running.socket, "status")
            assert status["secrets"]["db"]["anomalies"] == {"reuse": 0, "rotation": 0}
            bao.kv_put(f"{prefix}/db", {"password": old})            # rolled back upstream
            await wait_version(running.socket, "db", 3)
            status = await call(running.socket, "status")
    assert status["secrets"]["db"]["anomalies"]["reuse"] == 1
    exposed = metrics.exposition(metrics.registry_for(running.agent)).decode()
    assert 'agentd_secret_anomalies_total{anomaly="reuse",kind="kv2",name="db"} 1.0' in exposed
    (record,) = warnings(running.log_text(), "reuse")
    assert record["secret"] == "db" and record["level"] == "warning"
    assert "MARKER" not in running.log_text()
    assert "MARKER" not in json.dumps(status)


async def test_rotation_faster_than_expected_is_reported(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    prefix = unique("rot")
    bao.kv_put(f"{prefix}/db", {"password": "one"})
    bao.kv_put(f"{prefix}/calm", {"password": "one"})
    secrets = f"""
[secrets.db]
kind = "kv2"
path = "secret/data/{prefix}/db"
refresh = "1h"
expect_rotation_every = "1h"

[secrets.calm]
kind = "kv2"
path = "secret/data/{prefix}/calm"
refresh = "1h"
"""
    path = write_config(tmp_path, bao, approle_files, secrets)
    async with running_agent(path) as running:
        with trio.fail_after(20):
            bao.kv_put(f"{prefix}/db", {"password": "two"})
            bao.kv_put(f"{prefix}/calm", {"password": "two"})
            await wait_version(running.socket, "db", 2)
            await wait_version(running.socket, "calm", 2)
            status = await call(running.socket, "status")
    assert status["secrets"]["db"]["anomalies"] == {"reuse": 0, "rotation": 1}
    assert status["secrets"]["calm"]["anomalies"] == {"reuse": 0, "rotation": 0}
    (record,) = warnings(running.log_text(), "rotation")
    assert record["secret"] == "db"
    assert record["expect_rotation_every"] == 3600.0
