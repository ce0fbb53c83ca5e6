"""End to end: a real agent (in this trio loop) against the session's real OpenBao."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from agentd.client import Client
from agentd.errors import Forbidden, RequestError
from tests.agentfixture import (
    NOBODY,
    RunningAgent,
    Seeded,
    agent_fixture,
    call,
)
from tests.openbao import DevServer
from tests.peers import run_as

agent = agent_fixture('frame_timeout = "1s"\nidle_timeout = "30s"')


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


async def read_frame(stream: trio.SocketStream) -> dict[str, Any] | None:
    buf = b""
    while True:
        if len(buf) >= 4:
            (n,) = struct.unpack(">I", buf[:4])
            if len(buf) >= 4 + n:
                return msgpack.unpackb(buf[4 : 4 + n], raw=False)  # type: ignore[no-any-return]
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buf += chunk


async def test_get_returns_data_version_and_field(agent: RunningAgent, seeded: Seeded) -> None:
    with trio.fail_after(10):
        reply = await call(agent.socket, "get", name="db")
        assert reply["data"] == {"username": "app", "password": seeded.markers["db"]}
        assert reply["version"] == 1
        assert reply["stale"] is False
        assert reply["expires_at"] is None
        assert reply["fetched_at"] > 0
        field = await call(agent.socket, "get", name="db", field="password")
        assert field["data"] == seeded.markers["db"]
        kv1 = await call(agent.socket, "get", name="api", field="token")
        assert kv1["data"] == seeded.markers["api"]
        assert kv1["version"] == 1


async def test_pipelined_requests_are_answered_in_order(agent: RunningAgent) -> None:
    with trio.fail_after(10):
        stream = await trio.open_unix_socket(str(agent.socket))
        async with stream:
            requests = [
                {"v": 1, "id": 10, "op": "get", "name": "db", "field": "username"},
                {"v": 1, "id": 11, "op": "ping"},
                {"v": 1, "id": 12, "op": "get", "name": "nope"},
                {"v": 1, "id": 13, "op": "list"},
            ]
            await stream.send_all(b"".join(frame(r) for r in requests))
            buf = b""
            replies = []
            while len(replies) < 4:
                buf += await stream.receive_some(65536)
                while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                    (n,) = struct.unpack(">I", buf[:4])
                    replies.append(msgpack.unpackb(buf[4 : 4 + n], raw=False))
                    buf = buf[4 + n :]
    assert [r["id"] for r in replies] == [10, 11, 12, 13]
    assert replies[0]["data"] == "app"
    assert replies[1] == {"id": 11, "ok": True}
    assert replies[2]["error"]["code"] == "forbidden"
    assert replies[3]["names"] == ["api", "db", "other"]


async def test_other_uid_sees_only_its_grant(agent: RunningAgent, seeded: Seeded) -> None:
    sock = agent.socket

    def get(name: str) -> Any:
        with Client.connect(sock, timeout=10) as c:
            return c.get(name, "password")["data"]

    def names() -> Any:
        with Client.connect(sock, timeout=10) as c:
            return c.list()

    with trio.fail_after(20):
        own = await run_as(NOBODY, NOBODY, lambda: get("db"))
        assert own == {"ok": True, "value": seeded.markers["db"]}
        other = await run_as(NOBODY, NOBODY, lambda: get("other"))
        assert other["code"] == "forbidden"
        missing = await run_as(NOBODY, NOBODY, lambda: get("does-not-exist"))
        assert missing["code"] == "forbidden"
        # the same message whether the name exists or not: no existence oracle
        assert other["message"].replace("other", "X") == missing["message"].replace(
            "does-not-exist", "X"
        )
        assert (await run_as(NOBODY, NOBODY, names))["value"] == ["db"]
        # a uid no policy names gets nothing at all
        assert (await run_as(1000, 1000, names))["value"] == []
        stranger = await run_as(1000, 1000, lambda: get("db"))
        assert stranger["code"] == "forbidden"
        def status() -> Any:
            with Client.connect(sock, timeout=10) as c:
                return c.status()

        admin_op = await run_as(NOBODY, NOBODY, status)
        assert admin_op["code"] == "forbidden"
    audit = [json.loads(line) for line in agent.audit_text().splitlines()]
    denied = {(a["uid"], a["name"]) for a in audit if a["decision"] == "deny"}
    assert {(NOBODY, "other"), (NOBODY, "does-not-exist"), (1000, "db")} <= denied
    allowed = [
        a for a in audit if a["decision"] == "allow" and a["uid"] == NOBODY and a["op"] == "get"
    ]
    assert allowed and allowed[0]["name"] == "db" and allowed[0]["version"] == 1
    assert seeded.markers["db"] not in agent.audit_text()


async def test_new_version_is_served_within_a_refresh(
    agent: RunningAgent, bao: DevServer, seeded: Seeded
) -> None:
    new_value = seeded.marker("db-v2")
    version = bao.kv_put(f"{seeded.prefix}/db", {"username": "app", "password": new_value})
    assert version == 2
    with trio.fail_after(15):  # refresh is 1 s +-10%
        while True:
            reply = await call(agent.socket, "get", name="db", field="password")
            if reply["version"] == 2:
                break
            await trio.sleep(0.1)
    assert reply["data"] == new_value
    assert reply["stale"] is False


async def test_admin_status_and_refresh(
    agent: RunningAgent, bao: DevServer, seeded: Seeded
) -> None:
    with trio.fail_after(10):
        status = await call(agent.socket, "status")
        assert status["ready"] is True
        assert status["auth"]["state"] == "ok"
        assert status["counts"]["cached"] == 3
        assert set(status["secrets"]) == {"api", "db", "other"}
        bao.kv_put(f"{seeded.prefix}/other", {"value": seeded.marker("other-v2")})
        assert (await call(agent.socket, "refresh", name="other"))["version"] == 2
    text = json.dumps(status)
    for marker in seeded.markers.values():
        assert marker not in text


async def test_bad_input_gets_the_right_answer_and_others_keep_being_served(
    agent: RunningAgent,
) -> None:
    async def exchange(payload: bytes) -> tuple[dict[str, Any] | None, bool]:
        """Send raw bytes; return the reply and whether the connection stayed open."""
        stream = await trio.open_unix_socket(str(agent.socket))
        async with stream:
            await stream.send_all(payload)
            reply = await read_frame(stream)
            try:
                await stream.send_all(frame({"v": 1, "id": 99, "op": "ping"}))
                after = await read_frame(stream)
            except trio.BrokenResourceError:
                after = None
        return reply, after is not None

    with trio.fail_after(20):
        cases = {
            "unknown op": (frame({"v": 1, "id": 1, "op": "explode"}), "unknown_op", 1, True),
            "wrong v": (frame({"v": 2, "id": 2, "op": "ping"}), "unsupported_version", 2, True),
            "no name": (frame({"v": 1, "id": 3, "op": "get"}), "bad_request", 3, True),
            "not msgpack": (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "bad_request", None, False),
            "not a map": (frame([1, 2, 3]), "bad_request", None, False),
            "too large": (struct.pack(">I", 10_000_000), "too_large", None, False),
        }
        for label, (payload, code, rid, stays_open) in cases.items():
            reply, open_after = await exchange(payload)
            assert reply is not None, label
            assert reply["ok"] is False, label
            assert reply["error"]["code"] == code, label
            assert reply["id"] == rid, label
            assert open_after is stays_open, label

        # A half-sent frame left hanging is closed after frame_timeout, and meanwhile (and after)
        # other clients are served.
        hanging = await trio.open_unix_socket(str(agent.socket))
        async with hanging:
            await hanging.send_all(struct.pack(">I", 100) + b"\x80")
            assert (await call(agent.socket, "ping")) == {}
            assert await hanging.receive_some(100) == b""   # closed by the agent, no reply
        assert (await call(agent.socket, "get", name="db", field="username"))["data"] == "app"


async def test_client_errors_carry_codes(agent: RunningAgent) -> None:
    def blocking() -> None:
        with Client.connect(agent.socket, timeout=10) as c:
            c.get("other-unknown")

    with trio.fail_after(10), pytest.raises(Forbidden):
        await trio.to_thread.run_sync(blocking)
    assert issubclass(Forbidden, RequestError)


async def test_no_secret_or_credential_in_logs_audit_or_errors(
    agent: RunningAgent, seeded: Seeded, approle_files: tuple[Path, Path]
) -> None:
    with trio.fail_after(10):
        replies = [
            await call(agent.socket, "get", name="db"),
            await call(agent.socket, "get", name="api"),
            await call(agent.socket, "status"),
        ]
        for bad in ({"name": "db", "field": "nope"}, {"name": "zzz"}):
            with pytest.raises(RequestError) as info:
                await call(agent.socket, "get", **bad)
            replies.append({"error": str(info.value)})
    secret_id = approle_files[1].read_text().strip()
    role_id = approle_files[0].read_text().strip()
    token = agent.agent.auth.token()
    assert token
    logs_text = agent.log_text()
    audit_text = agent.audit_text()
    assert "secret updated" in logs_text or "agentd ready" in logs_text   # the logs are captured
    assert audit_text.count("\n") >= 3                                   # and so is the audit
    for marker in [*seeded.markers.values(), secret_id, role_id, token]:
        assert marker not in logs_text
        assert marker not in audit_text
        assert marker not in json.dumps(replies[2:])


async def test_reload_applies_a_good_config_and_keeps_serving_on_a_bad_one(
    agent: RunningAgent, bao: DevServer, seeded: Seeded
) -> None:
    original = agent.config_path.read_text()
    # A broken file: refused, the running config keeps serving.
    agent.config_path.write_text(original + "\n[secrets.bad]\nkind = 'nope'\n")
    assert agent.agent.reload() is False
    with trio.fail_after(10):
        assert (await call(agent.socket, "get", name="db", field="username"))["data"] == "app"
    log_text = agent.log_text()
    assert "reload refused" in log_text
    assert "secrets.bad.kind" in log_text

    # A good one: a new secret is fetched and granted; a removed grant takes effect.
    extra_value = seeded.marker("extra")
    bao.kv_put(f"{seeded.prefix}/extra", {"v": extra_value})
    agent.config_path.write_text(
        original.replace('allow = ["db"]', 'allow = ["extra"]')
        + f'\n[secrets.extra]\nkind = "kv2"\npath = "secret/data/{seeded.prefix}/extra"\n'
    )
    assert agent.agent.reload() is True
    with trio.fail_after(10):
        while True:
            try:
                reply = await call(agent.socket, "get", name="extra", field="v")
                break
            except RequestError as exc:
                assert exc.code == "unavailable"
                await trio.sleep(0.05)
    assert reply["data"] == extra_value

    def nobody_list() -> Any:
        with Client.connect(agent.socket, timeout=10) as c:
            return c.list()

    with trio.fail_after(10):
        assert (await run_as(NOBODY, NOBODY, nobody_list))["value"] == ["extra"]
        # the cache was not dropped: db keeps its version and was not re-fetched as new
        assert (await call(agent.socket, "get", name="db"))["version"] == 1
