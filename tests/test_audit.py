from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agentd import audit as audit_module
from agentd.audit import Audit
from agentd.config import AuditConfig

LINE_KEYS = {"time", "socket", "op", "decision", "pid", "uid", "unit", "exe", "name", "version",
             "stale", "count"}
T0 = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def file_cfg(tmp_path: Path, **kw: Any) -> AuditConfig:
    return AuditConfig(path=str(tmp_path / "log" / "audit.jsonl"), **kw)


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def get(audit: Audit, **kw: Any) -> None:
    args: dict[str, Any] = {"op": "get", "decision": "allow", "pid": 42, "uid": 1000,
                            "exe": "/usr/bin/app", "unit": "app.service", "name": "db",
                            "version": 3, "stale": False, "start_time": 12345}
    args.update(kw)
    audit.record(**args)


def test_coalescing_counts_identical_records(tmp_path: Path) -> None:
    clock = FakeClock()
    audit = Audit(file_cfg(tmp_path), clock=clock)
    for _ in range(100):
        get(audit)
        clock.now += 0.001
    audit.flush()
    path = tmp_path / "log" / "audit.jsonl"
    raw = path.read_text()
    assert raw.endswith("\n") and raw.count("\n") == 1
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")) + "\n"
    assert read_lines(path) == [{
        "time": "2023-11-14T22:13:20.250Z", "socket": "main", "op": "get", "decision": "allow",
        "pid": 42, "uid": 1000, "unit": "app.service", "exe": "/usr/bin/app", "name": "db",
        "version": 3, "stale": False, "count": 100,
    }]
    stats = audit.statistics()
    assert (stats.records, stats.lines_written, stats.dropped, stats.write_errors) == (
        100, 1, 0, 0)
    # the next flush starts a new group
    get(audit)
    audit.flush()
    lines = read_lines(path)
    assert [line["count"] for line in lines] == [100, 1]
    audit.close()


def test_different_keys_get_their_own_lines(tmp_path: Path) -> None:
    audit = Audit(file_cfg(tmp_path), clock=FakeClock())
    for _ in range(3):
        get(audit, version=3)
        get(audit, version=4)
        get(audit, version=4, stale=True)
        get(audit, decision="deny", name="other", version=None, stale=None)
        get(audit, pid=43, start_time=999)
        get(audit, pid=42, start_time=54321)  # pid reused by another process
        get(audit, socket="credentials")
    audit.flush()
    lines = read_lines(tmp_path / "log" / "audit.jsonl")
    assert len(lines) == 7
    assert all(line["count"] == 3 for line in lines)
    assert [(line["version"], line["stale"], line["decision"]) for line in lines[:4]] == [
        (3, False, "allow"), (4, False, "allow"), (4, True, "allow"), (None, None, "deny")]
    assert lines[-1]["socket"] == "credentials"
    audit.close()


def test_lines_have_only_the_expected_keys(tmp_path: Path) -> None:
    marker = "s3cr3t-MARKER-91b2"
    audit = Audit(file_cfg(tmp_path), clock=FakeClock())
    get(audit)
    audit.record(op="list", decision="allow", pid=1, uid=0)
    audit.record(op="get", decision="error", pid=1, uid=0, exe="/bin/odd\nname\udcff")
    audit.flush()
    text = (tmp_path / "log" / "audit.jsonl").read_text()
    assert marker not in text
    lines = read_lines(tmp_path / "log" / "audit.jsonl")
    assert len(lines) == 3  # the newline in the exe name did not split a line
    for line in lines:
        assert set(line) == LINE_KEYS
    assert lines[1]["name"] is None and lines[1]["exe"] is None
    assert lines[2]["exe"] == "/bin/odd\nname\udcff"
    audit.close()


def test_file_is_created_0600_with_0700_dirs(tmp_path: Path) -> None:
    audit = Audit(file_cfg(tmp_path), clock=FakeClock())
    get(audit)
    audit.flush()
    path = tmp_path / "log" / "audit.jsonl"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(path.parent).st_mode & 0o777 == 0o700
    audit.close()


def test_existing_file_is_appended(tmp_path: Path) -> None:
    path = tmp_path / "log" / "audit.jsonl"
    path.parent.mkdir()
    path.write_text('{"old":1}\n')
    audit = Audit(file_cfg(tmp_path), clock=FakeClock())
    get(audit)
    audit.flush()
    assert path.read_text().splitlines()[0] == '{"old":1}'
    assert len(path.read_text().splitlines()) == 2
    audit.close()


def test_rotation_by_size_keeps_backups(tmp_path: Path) -> None:
    audit = Audit(file_cfg(tmp_path, max_bytes=600, backups=2), clock=FakeClock())
    path = tmp_path / "log" / "audit.jsonl"
    for i in range(40):
        get(audit, name=f"secret-{i:02d}")
        audit.flush()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    names: list[str] = []
    for p in (path.with_name("audit.jsonl.2"), path.with_name("audit.jsonl.1"), path):
        assert 0 < p.stat().st_size <= 600
        assert p.stat().st_mode & 0o777 == 0o600
        names += [line["name"] for line in read_lines(p)]
    # the kept lines are the newest ones, in order, with nothing missing in between
    assert names == [f"secret-{i:02d}" for i in range(40 - len(names), 40)]
    assert len(names) >= 6
    assert audit.statistics().lines_written == 40
    audit.close()


def test_rotation_without_backups(tmp_path: Path) -> None:
    audit = Audit(file_cfg(tmp_path, max_bytes=300, backups=0), clock=FakeClock())
    for i in range(10):
        get(audit, name=f"s{i}")
        audit.flush()
    path = tmp_path / "log" / "audit.jsonl"
    assert [p.name for p in path.parent.iterdir()] == ["audit.jsonl"]
    assert read_lines(path)[-1]["name"] == "s9"
    audit.close()


def test_reopens_after_external_rotation(tmp_path: Path) -> None:
    audit = Audit(file_cfg(tmp_path), clock=FakeClock())
    path = tmp_path / "log" / "audit.jsonl"
    get(audit, name="a")
    audit.flush()
    path.rename(path.with_name("moved"))
    get(audit, name="b")
    audit.flush()
    assert [line["name"] for line in read_lines(path)] == ["b"]
    assert [line["name"] for line in read_lines(path.with_name("moved"))] == ["a"]
    audit.close()


def test_dropped_past_pending_bound(tmp_path: Path) -> None:
    clock = FakeClock()
    audit = Audit(file_cfg(tmp_path), clock=clock, max_pending=3)
    for pid in range(5):
        get(audit, pid=pid)
    get(audit, pid=0)  # an already pending key is still counted
    audit.flush()
    stats = audit.statistics()
    assert (stats.records, stats.dropped) == (6, 2)
    lines = read_lines(tmp_path / "log" / "audit.jsonl")
    assert [(line["pid"], line["count"]) for line in lines[:3]] == [(0, 2), (1, 1), (2, 1)]
    assert lines[3]["decision"] == "dropped" and lines[3]["count"] == 2
    assert set(lines[3]) == LINE_KEYS
    assert len(lines) == 4
    # after a flush there is room again
    get(audit, pid=9)
    audit.flush()
    assert audit.statistics().dropped == 2
    assert read_lines(tmp_path / "log" / "audit.jsonl")[-1]["pid"] == 9
    audit.close()


def test_write_errors_are_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "log").write_text("a file where the directory should be")
    audit = Audit(file_cfg(tmp_path), clock=FakeClock())
    with caplog.at_level(logging.ERROR, logger="agentd.audit"):
        for _ in range(3):
            get(audit, name="a")
            get(audit, name="b")
            audit.flush()  # never raises
    assert audit.statistics().write_errors == 6
    assert audit.statistics().lines_written == 0
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    # the disk comes back
    (tmp_path / "log").unlink()
    get(audit)
    audit.flush()
    assert audit.statistics().lines_written == 1
    audit.close()


def test_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    target = tmp_path / "target"
    (tmp_path / "log" / "audit.jsonl").symlink_to(target)
    audit = Audit(file_cfg(tmp_path), clock=FakeClock())
    get(audit)
    audit.flush()
    assert audit.statistics().write_errors == 1
    assert not target.exists()


def test_off_records_nothing(tmp_path: Path) -> None:
    audit = Audit(AuditConfig(path=None))
    assert not audit.enabled
    get(audit)
    audit.flush()
    stats = audit.statistics()
    assert (stats.records, stats.lines_written, stats.dropped, stats.write_errors) == (0, 0, 0, 0)


def test_relative_path_is_rejected() -> None:
    with pytest.raises(ValueError, match="absolute"):
        Audit(AuditConfig(path="audit.jsonl"))


def test_journal_falls_back_to_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(audit_module, "JOURNAL_SOCKET", str(tmp_path / "no-journal"))
    audit = Audit(AuditConfig(path="journal"), clock=FakeClock())
    for _ in range(4):
        get(audit)
    audit.flush()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    line = json.loads(err[0])
    assert set(line) == LINE_KEYS and line["count"] == 4
    assert audit.statistics().lines_written == 1


def test_journal_native_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock_path = tmp_path / "journal.sock"
    monkeypatch.setattr(audit_module, "JOURNAL_SOCKET", str(sock_path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
        journal.bind(str(sock_path))
        journal.settimeout(10)
        audit = Audit(AuditConfig(path="journal"), clock=FakeClock())
        get(audit, name="a")
        get(audit, name="b")
        audit.flush()
        datagrams = [journal.recv(65536).decode(), journal.recv(65536).decode()]
    for datagram, name in zip(datagrams, ["a", "b"], strict=True):
        fields = dict(f.split("=", 1) for f in datagram.rstrip("\n").split("\n"))
        assert set(fields) == {"MESSAGE", "SYSLOG_IDENTIFIER", "AGENTD_AUDIT", "PRIORITY"}
        assert (fields["SYSLOG_IDENTIFIER"], fields["AGENTD_AUDIT"], fields["PRIORITY"]) == (
            "agentd-audit", "1", "6")
        assert json.loads(fields["MESSAGE"])["name"] == name
    assert audit.statistics().lines_written == 2


async def test_run_flushes_periodically(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # No fail_after here: autojump would jump to its deadline while a flush thread runs.
    audit = Audit(file_cfg(tmp_path, flush_interval=2.0), clock=FakeClock())
    path = tmp_path / "log" / "audit.jsonl"
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        start = trio.current_time()
        for _ in range(5):
            get(audit, name="a")
        generation, _ = await audit.flushed.wait_changed(audit.flushed.generation)
        assert trio.current_time() - start >= 2.0
        assert [(line["name"], line["count"]) for line in read_lines(path)] == [("a", 5)]
        get(audit, name="b")
        await audit.flushed.wait_changed(generation)
        assert [line["name"] for line in read_lines(path)] == ["a", "b"]
        nursery.cancel_scope.cancel()


async def test_run_flushes_when_cancelled(tmp_path: Path) -> None:
    audit = Audit(file_cfg(tmp_path, flush_interval=3600.0), clock=FakeClock())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(audit.run)
            get(audit, name="last")
            nursery.cancel_scope.cancel()
    lines = read_lines(tmp_path / "log" / "audit.jsonl")
    assert [(line["name"], line["count"]) for line in lines] == [("last", 1)]


async def test_a_sync_flush_writes_what_a_running_flush_took_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # run()'s flush takes the table and writes it in a worker thread. A sync flush() while that
    # thread has not written yet (a test's audit_text(), the daemon's exit) must still leave
    # every line recorded before it in the file, in order: the CI once read an audit file that
    # lacked the allow lines a periodic flush had taken a moment before.
    audit = Audit(file_cfg(tmp_path, flush_interval=0.01), clock=FakeClock())
    path = tmp_path / "log" / "audit.jsonl"
    taken, release = threading.Event(), threading.Event()
    write_unwritten = audit._write_unwritten

    def held(close: bool = False) -> None:
        taken.set()
        release.wait(10)
        write_unwritten(close)

    monkeypatch.setattr(audit, "_write_unwritten", held)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            get(audit, name="first")
            await nursery.start(audit.run)
            await trio.to_thread.run_sync(taken.wait, 10)   # its thread holds "first"
            get(audit, name="second")
            audit.flush()
            assert [line["name"] for line in read_lines(path)] == ["first", "second"]
            release.set()
            nursery.cancel_scope.cancel()
    assert [line["name"] for line in read_lines(path)] == ["first", "second"]
    assert audit.statistics().lines_written == 2


async def test_run_when_off_just_waits(autojump_clock: trio.testing.MockClock) -> None:
    audit = Audit(AuditConfig(path=None))
    with trio.move_on_after(60):
        await audit.run()
    assert audit.statistics().lines_written == 0


# --- flooding the audit stream (issue 13, item 8) ----------------------------------------------


def test_refusals_coalesce_by_uid_and_decision_not_by_pid_or_exe(tmp_path: Path) -> None:
    # A fork/connect/exit loop: a new pid (and exe, unit, name) every time.
    audit = Audit(file_cfg(tmp_path), clock=FakeClock())
    for pid in range(1000, 1500):
        for decision in ("pid_reused", "rate_limited"):
            get(audit, op="reply", decision=decision, pid=pid, exe=f"/tmp/x{pid}",
                unit=f"u{pid}.service", name=f"n{pid}", start_time=pid)
    get(audit, op="reply", decision="pid_reused", uid=2000, pid=7)
    audit.flush()
    lines = read_lines(tmp_path / "log" / "audit.jsonl")
    by = {(line["uid"], line["decision"]): line for line in lines}
    assert len(lines) == 3 and set(by) == {(1000, "pid_reused"), (1000, "rate_limited"),
                                            (2000, "pid_reused")}
    first = by[(1000, "pid_reused")]
    # The first record's fields, and the count of the whole group.
    assert (first["pid"], first["exe"], first["count"]) == (1000, "/tmp/x1000", 500)
    assert by[(2000, "pid_reused")]["count"] == 1


def test_fields_are_cut_and_one_uid_has_a_bounded_number_of_lines(tmp_path: Path) -> None:
    audit = Audit(file_cfg(tmp_path), clock=FakeClock())
    exe = "/opt/" + "d" * 3800 + "/app"
    for i in range(2000):           # a new made-up name every time, from a 3.8 KB path
        get(audit, decision="deny", exe=exe, name=f"{i:0256d}", unit="u" * 300)
    for i in range(10):             # another uid is not affected
        get(audit, decision="deny", uid=2000, name=f"other{i}")
    audit.flush()
    path = tmp_path / "log" / "audit.jsonl"
    lines = read_lines(path)
    deny = [line for line in lines if line["decision"] == "deny" and line["uid"] == 1000]
    assert len(deny) == audit_module.MAX_KEYS_PER_UID
    assert len([line for line in lines if line["uid"] == 2000]) == 10
    dropped = [line for line in lines if line["decision"] == "dropped"]
    assert dropped and dropped[0]["count"] == 2000 - audit_module.MAX_KEYS_PER_UID
    assert audit.statistics().dropped == 2000 - audit_module.MAX_KEYS_PER_UID
    for line in deny:
        for key in ("exe", "unit", "name"):
            assert len(line[key]) <= audit_module.MAX_FIELD_CHARS
    assert deny[0]["exe"].startswith("/opt/ddd") and deny[0]["exe"].endswith("d/app")
    assert max(len(raw) for raw in path.read_text().splitlines()) < 1024


def test_http_reads_carry_their_transport(tmp_path: Path) -> None:
    audit = Audit(file_cfg(tmp_path), clock=FakeClock())
    get(audit)
    get(audit)
    get(audit, transport="http")
    audit.flush()
    v1, http = read_lines(tmp_path / "log" / "audit.jsonl")
    assert set(v1) == LINE_KEYS and v1["count"] == 2
    assert set(http) == LINE_KEYS | {"transport"} and http["transport"] == "http"
    assert {k: v for k, v in http.items() if k not in ("transport", "count")} == {
        k: v for k, v in v1.items() if k != "count"}
    audit.close()
