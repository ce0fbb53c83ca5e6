"""agentd.upstream against a real OpenBao dev server (plus a fault proxy for outages)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from agentd.config import UpstreamConfig
from agentd.errors import AuthError, PermanentError, TransientError, UpstreamNotFound
from agentd.kinds import KINDS, KV1
from agentd.upstream import SecretValue, Upstream
from tests.faultproxy import FaultProxy
from tests.openbao import DevServer, free_port


async def read_kv(upstream: Upstream, kind: str, path: str) -> SecretValue:
    """Read a KV secret through ``upstream`` as kind ``kind`` does ("kv2": a path like
    ``secret/data/x``; "kv1"): what the refresher asks of the kinds, without a cache."""
    reader = KINDS[kind]
    assert isinstance(reader, KV1)
    return await reader.read(upstream, path)


SECRET_MARKER = "SECRET-MARKER-7f3a"
TOKEN_MARKER = "s.TOKEN-MARKER-91c2"


def _path() -> str:
    return f"agentd-test/{uuid.uuid4().hex[:12]}"


def _upstream(*addresses: str, token: str | None, **settings: Any) -> Upstream:
    up = Upstream(UpstreamConfig(addresses=addresses, **settings))
    up.token_source = lambda: token
    return up


@pytest.fixture
async def upstream(bao: DevServer) -> AsyncIterator[Upstream]:
    up = _upstream(bao.address, token=bao.token, timeout=5.0)
    yield up
    await up.aclose()


@pytest.fixture
async def proxy(bao: DevServer) -> AsyncIterator[FaultProxy]:
    fault = FaultProxy(bao.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(fault.run)
        yield fault
        nursery.cancel_scope.cancel()


async def _canned_http(response: bytes, *, task_status: trio.TaskStatus[int]) -> None:
    """A one-trick HTTP server for replies a real OpenBao never gives (429, non-JSON 200)."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(response)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


# --- reads --------------------------------------------------------------------------------


async def test_kv2_read_gives_data_and_version(bao: DevServer, upstream: Upstream) -> None:
    path = _path()
    version = bao.kv_put(path, {"password": SECRET_MARKER, "port": 5432})
    with trio.fail_after(10):
        value = await read_kv(upstream, "kv2", f"secret/data/{path}")
    assert value.data == {"password": SECRET_MARKER, "port": 5432}
    assert value.version == version == 1
    assert value.expires_at is None and value.lease_id is None
    assert SECRET_MARKER not in repr(value)


async def test_kv2_new_version_after_put(bao: DevServer, upstream: Upstream) -> None:
    path = _path()
    bao.kv_put(path, {"v": "one"})
    with trio.fail_after(10):
        first = await read_kv(upstream, "kv2", f"secret/data/{path}")
        bao.kv_put(path, {"v": "two"})
        second = await read_kv(upstream, "kv2", f"secret/data/{path}")
    assert (first.version, dict(first.data)) == (1, {"v": "one"})
    assert (second.version, dict(second.data)) == (2, {"v": "two"})


async def test_kv1_read_has_no_version(bao: DevServer, upstream: Upstream) -> None:
    path = _path()
    bao.api("POST", f"kv1/{path}", {"user": "app", "password": SECRET_MARKER})
    with trio.fail_after(10):
        value = await read_kv(upstream, "kv1", f"kv1/{path}")
    assert value == SecretValue(data={"user": "app", "password": SECRET_MARKER}, version=None)


@pytest.mark.parametrize("kind, prefix", [("kv2", "secret/data"), ("kv1", "kv1")])
async def test_missing_path_is_not_found(upstream: Upstream, kind: str, prefix: str) -> None:
    with trio.fail_after(10), pytest.raises(UpstreamNotFound) as info:
        await read_kv(upstream, kind, f"{prefix}/{_path()}")
    assert info.value.status == 404


async def test_deleted_kv2_version_is_not_found(bao: DevServer, upstream: Upstream) -> None:
    path = _path()
    bao.kv_put(path, {"password": SECRET_MARKER})
    bao.api("DELETE", f"secret/data/{path}")
    with trio.fail_after(10), pytest.raises(UpstreamNotFound, match="version 1 deleted"):
        await read_kv(upstream, "kv2", f"secret/data/{path}")


async def test_destroyed_kv2_version_is_not_found(bao: DevServer, upstream: Upstream) -> None:
    path = _path()
    bao.kv_put(path, {"password": SECRET_MARKER})
    bao.api("POST", f"secret/destroy/{path}", {"versions": [1]})
    with trio.fail_after(10), pytest.raises(UpstreamNotFound, match="version 1 destroyed") as info:
        await read_kv(upstream, "kv2", f"secret/data/{path}")
    assert SECRET_MARKER not in str(info.value)


async def test_metadata_deleted_path_is_not_found(bao: DevServer, upstream: Upstream) -> None:
    path = _path()
    bao.kv_put(path, {"password": SECRET_MARKER})
    bao.api("DELETE", f"secret/metadata/{path}")
    with trio.fail_after(10), pytest.raises(UpstreamNotFound):
        await read_kv(upstream, "kv2", f"secret/data/{path}")


async def test_bad_token_is_auth_error(bao: DevServer) -> None:
    path = _path()
    bao.kv_put(path, {"password": SECRET_MARKER})
    up = _upstream(bao.address, token=TOKEN_MARKER)
    try:
        with trio.fail_after(10), pytest.raises(AuthError) as info:
            await read_kv(up, "kv2", f"secret/data/{path}")
    finally:
        await up.aclose()
    assert info.value.status == 403
    assert "permission denied" in str(info.value)
    assert TOKEN_MARKER not in str(info.value)


async def test_request_json_and_204(upstream: Upstream) -> None:
    with trio.fail_after(10):
        health = await upstream.request("GET", "sys/health", authenticated=False)
        empty = await upstream.request(
            "PUT", "sys/policies/acl/agentd-upstream-test", json={"policy": 'path "x" {}'}
        )
    assert health["initialized"] is True
    assert empty == {}


async def test_other_4xx_is_permanent_and_not_failed_over(bao: DevServer) -> None:
    up = _upstream(bao.address, f"http://127.0.0.1:{free_port()}", token=bao.token)
    try:
        with trio.fail_after(10), pytest.raises(PermanentError) as info:
            await up.request("POST", "sys/mounts/secret", json={"type": "kv"})
    finally:
        await up.aclose()
    assert not isinstance(info.value, (UpstreamNotFound, TransientError))
    assert info.value.status == 400
    assert up.statistics().address == bao.address


async def test_429_is_transient_with_retry_after() -> None:
    reply = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_canned_http, reply)
            up = _upstream(f"http://127.0.0.1:{port}", token=None)
            with pytest.raises(TransientError) as info:
                await up.request("GET", "secret/data/x")
            await up.aclose()
            nursery.cancel_scope.cancel()
    assert info.value.status == 429
    assert info.value.retry_after == 7.0


async def test_non_json_200_is_permanent() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 6\r\n\r\n<html>"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_canned_http, reply)
            up = _upstream(f"http://127.0.0.1:{port}", token=None)
            with pytest.raises(PermanentError, match="not JSON"):
                await up.request("GET", "secret/data/x")
            await up.aclose()
            nursery.cancel_scope.cancel()


def test_unreadable_ca_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="ca_file"):
        Upstream(UpstreamConfig(addresses=("https://bao:8200",), ca_file=tmp_path / "missing.pem"))


def test_no_address_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one address"):
        Upstream(UpstreamConfig())


# --- failover and faults ------------------------------------------------------------------


async def test_failover_from_closed_port_is_sticky(bao: DevServer) -> None:
    path = _path()
    bao.kv_put(path, {"k": "v"})
    dead = f"http://127.0.0.1:{free_port()}"
    up = _upstream(dead, bao.address, token=bao.token)
    try:
        with trio.fail_after(10):
            assert (await read_kv(up, "kv2", f"secret/data/{path}")).data == {"k": "v"}
            stats = up.statistics()
            assert stats.address == bao.address and stats.up
            await read_kv(up, "kv2", f"secret/data/{path}")
    finally:
        await up.aclose()
    assert up.statistics().errors == 0


async def test_failover_from_black_hole_then_sticky(
    bao: DevServer, proxy: FaultProxy
) -> None:
    path = _path()
    bao.kv_put(path, {"k": "v"})
    proxy.mode = "blackhole"
    up = _upstream(proxy.address, bao.address, token=bao.token, timeout=0.5)
    try:
        with trio.fail_after(10):
            await read_kv(up, "kv2", f"secret/data/{path}")
            await read_kv(up, "kv2", f"secret/data/{path}")
    finally:
        await up.aclose()
    assert proxy.connections == 1  # the second read went straight to the good address
    assert up.statistics().address == bao.address


async def test_all_addresses_down_is_transient() -> None:
    up = _upstream(
        f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}", token=TOKEN_MARKER
    )
    try:
        with trio.fail_after(10), pytest.raises(TransientError) as info:
            await read_kv(up, "kv2", "secret/data/x")
    finally:
        await up.aclose()
    assert type(info.value) is TransientError
    assert "cannot connect" in str(info.value)
    stats = up.statistics()
    assert not stats.up and stats.errors == 1 and stats.last_error == str(info.value)


async def test_reset_is_transient(bao: DevServer, proxy: FaultProxy) -> None:
    proxy.mode = "reset"
    up = _upstream(proxy.address, token=TOKEN_MARKER)
    try:
        with trio.fail_after(10), pytest.raises(TransientError) as info:
            await read_kv(up, "kv2", "secret/data/x")
    finally:
        await up.aclose()
    assert TOKEN_MARKER not in str(info.value)


async def test_delay_past_timeout_is_transient(bao: DevServer, proxy: FaultProxy) -> None:
    path = _path()
    bao.kv_put(path, {"k": "v"})
    proxy.mode = "delay"
    proxy.delay = 1.0
    up = _upstream(proxy.address, token=bao.token, timeout=0.2)
    try:
        with trio.fail_after(10), pytest.raises(TransientError, match="timed out"):
            await read_kv(up, "kv2", f"secret/data/{path}")
    finally:
        await up.aclose()


async def test_concurrency_is_capped(bao: DevServer, proxy: FaultProxy) -> None:
    path = _path()
    bao.kv_put(path, {"k": "v"})
    proxy.mode = "delay"
    proxy.delay = 0.1
    up = _upstream(proxy.address, token=bao.token, max_concurrency=2)
    results: list[SecretValue] = []

    async def read() -> None:
        results.append(await read_kv(up, "kv2", f"secret/data/{path}"))

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(read)
    finally:
        await up.aclose()
    assert len(results) == 6
    stats = up.statistics()
    assert stats.in_flight_peak == 2 and stats.in_flight == 0
    assert stats.requests == 6 and stats.errors == 0


async def test_host_proxy_settings_are_ignored(
    bao: DevServer, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy.mode = "blackhole"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy.address)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    up = _upstream(bao.address, token=bao.token, timeout=2.0)
    try:
        with trio.fail_after(10):
            await up.request("GET", "sys/health", authenticated=False)
    finally:
        await up.aclose()
    assert proxy.connections == 0


async def test_sealed_server_is_transient_and_failed_over(
    bao: DevServer, tmp_path: Path
) -> None:
    path = _path()
    bao.kv_put(path, {"k": "v"})
    sealed = await trio.to_thread.run_sync(DevServer.start, tmp_path / "sealed")
    try:
        sealed.api("PUT", "sys/seal")
        alone = _upstream(sealed.address, token=sealed.token)
        both = _upstream(sealed.address, bao.address, token=bao.token)
        try:
            with trio.fail_after(10):
                with pytest.raises(TransientError, match="sealed") as info:
                    await read_kv(alone, "kv2", f"secret/data/{path}")
                assert info.value.status == 503
                value = await read_kv(both, "kv2", f"secret/data/{path}")
        finally:
            await alone.aclose()
            await both.aclose()
    finally:
        await trio.to_thread.run_sync(sealed.stop)
    assert value.data == {"k": "v"}
    assert both.statistics().address == bao.address


async def test_logs_hold_no_token_or_secret(
    bao: DevServer, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = _path()
    bao.kv_put(path, {"password": SECRET_MARKER})
    token = bao.create_token(policies=["agentd-read"])
    proxy.mode = "reset"
    up = _upstream(proxy.address, bao.address, token=token)
    bad = _upstream(bao.address, token=TOKEN_MARKER)
    errors: list[str] = []
    try:
        with trio.fail_after(10):
            value = await read_kv(up, "kv2", f"secret/data/{path}")
            try:
                await read_kv(bad, "kv2", f"secret/data/{path}")
            except AuthError as exc:
                errors.append(str(exc))
    finally:
        await up.aclose()
        await bad.aclose()
    assert value.data["password"] == SECRET_MARKER
    assert errors
    assert "upstream attempt failed" in caplog.text
    for marker in (SECRET_MARKER, TOKEN_MARKER, token):
        assert marker not in caplog.text
        assert all(marker not in e for e in errors)
        assert marker not in str(up.statistics())


async def test_a_404_that_is_not_openbaos_answer_is_transient_and_fails_over(
    bao: DevServer,
) -> None:
    """Issue 13 item 5: a proxy's HTML 404 in front of OpenBao is no evidence of deletion."""
    path = _path()
    bao.kv_put(path, {"password": SECRET_MARKER})
    html = (b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 22\r\n"
            b"Connection: close\r\n\r\n<h1>404 Not Found</h1>")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_canned_http, html)
            hostile = f"http://127.0.0.1:{port}"
            alone = _upstream(hostile, token=bao.token, timeout=5.0)
            with pytest.raises(TransientError, match="not OpenBao's answer") as info:
                await read_kv(alone, "kv2", f"secret/data/{path}")
            assert not isinstance(info.value, UpstreamNotFound)
            await alone.aclose()
            # the next address is asked, and it has the secret
            both = _upstream(hostile, bao.address, token=bao.token, timeout=5.0)
            value = await read_kv(both, "kv2", f"secret/data/{path}")
            assert value.data["password"] == SECRET_MARKER
            await both.aclose()
            nursery.cancel_scope.cancel()


async def test_openbaos_own_404_is_still_evidence(upstream: Upstream) -> None:
    with trio.fail_after(10), pytest.raises(UpstreamNotFound):
        await read_kv(upstream, "kv2", f"secret/data/{_path()}")
