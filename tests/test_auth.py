"""agentd.auth against a real OpenBao dev server: logins, renewals, re-logins, revocation."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.error
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from agentd.auth import (
    LOGIN_METHODS,
    AppRoleLogin,
    Authenticator,
    AuthStatistics,
    Token,
    TokenFileLogin,
)
from agentd.config import AuthConfig, UpstreamConfig
from agentd.errors import AuthError
from agentd.upstream import Upstream
from tests.faultproxy import FaultProxy
from tests.openbao import DevServer
from tests.test_upstream import read_kv

SECRET_MARKER = "SECRET-MARKER-c41d"


def _config(bao: DevServer, auth: AuthConfig, *addresses: str) -> UpstreamConfig:
    return UpstreamConfig(
        addresses=addresses or (bao.address,),
        timeout=5.0,
        backoff_min=0.05,
        backoff_max=0.3,
        login_backoff_max=0.2,
        auth=auth,
    )


def _approle(role_file: Path, secret_file: Path) -> AuthConfig:
    return AuthConfig(method="approle", role_id_file=role_file, secret_id_file=secret_file)


@pytest.fixture
def secret_path(bao: DevServer) -> str:
    path = f"agentd-test/{uuid.uuid4().hex[:12]}"
    bao.kv_put(path, {"password": SECRET_MARKER})
    return f"secret/data/{path}"


@pytest.fixture
def short_approle_files(bao: DevServer, tmp_path: Path) -> tuple[Path, Path]:
    """An approle whose tokens live 3 s, renewable up to 6 s."""
    role_id, secret_id = bao.approle(
        "agentd-short", policies=["agentd-read"], token_ttl="3s", token_max_ttl="6s"
    )
    role_file, secret_file = tmp_path / "short_role_id", tmp_path / "short_secret_id"
    role_file.write_text(role_id)
    secret_file.write_text(secret_id)
    secret_file.chmod(0o600)
    return role_file, secret_file


@pytest.fixture
async def upstream(bao: DevServer) -> AsyncIterator[Upstream]:
    up = Upstream(UpstreamConfig(addresses=(bao.address,), timeout=5.0))
    yield up
    await up.aclose()


async def _wait_stats(auth: Authenticator, done: Callable[[AuthStatistics], bool]) -> None:
    seen = 0
    while not done(auth.statistics()):
        seen, _ = await auth.wait_statistics_changed(seen)


def _credentials(*files: Path) -> list[str]:
    return [f.read_text().strip() for f in files]


def _assert_hidden(markers: list[str], *texts: str) -> None:
    for marker in markers:
        for text in texts:
            assert marker not in text


def _token_accepted(bao: DevServer, token: str) -> bool:
    try:
        bao.api("GET", "auth/token/lookup-self", token=token)
    except urllib.error.HTTPError as exc:
        assert exc.code == 403
        return False
    return True


# --- login methods ------------------------------------------------------------------------


def test_login_methods_registry() -> None:
    assert set(LOGIN_METHODS) == {"approle", "token_file", "cert", "jwt"}
    token = Token(value="s.hidden", ttl=10, renewable=True, obtained_at=100.0, from_login=True)
    assert "s.hidden" not in repr(token)
    assert token.expires_at == 110.0
    root = Token(value="x", ttl=0, renewable=False, obtained_at=1, from_login=False)
    assert root.expires_at is None


async def test_approle_login_token_reads(
    bao: DevServer,
    upstream: Upstream,
    approle_files: tuple[Path, Path],
    secret_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    auth = Authenticator(_config(bao, _approle(*approle_files)), upstream)
    assert auth.token() is None
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(auth.run)
            token = auth.token()
            assert token is not None and token == await auth.wait_for_token()
            value = await read_kv(upstream, "kv2", secret_path)  # via token_source
            nursery.cancel_scope.cancel()
    assert value.data["password"] == SECRET_MARKER
    stats = auth.statistics()
    assert (stats.state, stats.method, stats.logins, stats.failures) == ("ok", "approle", 1, 0)
    assert stats.expires_at is not None
    _assert_hidden([token, *_credentials(*approle_files)], caplog.text, str(stats))


async def test_approle_login_method_directly(
    bao: DevServer, upstream: Upstream, approle_files: tuple[Path, Path]
) -> None:
    with trio.fail_after(10):
        token = await AppRoleLogin(_approle(*approle_files)).login(upstream)
    assert token.from_login and token.renewable and token.ttl == 3600
    assert _token_accepted(bao, token.value)


async def test_token_file_login(
    bao: DevServer, upstream: Upstream, tmp_path: Path, secret_path: str
) -> None:
    value = bao.create_token(policies=["agentd-read"], ttl="1h")
    token_file = tmp_path / "token"
    token_file.write_text(value + "\n")
    token_file.chmod(0o600)
    cfg = _config(bao, AuthConfig(method="token_file", token_file=token_file))
    auth = Authenticator(cfg, upstream)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(auth.run)
            assert auth.token() == value
            secret = await read_kv(upstream, "kv2", secret_path)
            nursery.cancel_scope.cancel()
        await auth.revoke()  # a token file's token is not ours to revoke
    assert secret.data["password"] == SECRET_MARKER
    assert auth.statistics().method == "token_file"
    assert auth.token() is None
    assert _token_accepted(bao, value)


async def test_token_file_root_token_never_expires(
    bao: DevServer, upstream: Upstream, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(bao.token)
    token_file.chmod(0o600)
    with trio.fail_after(10):
        token = await TokenFileLogin(AuthConfig(method="token_file", token_file=token_file)).login(
            upstream
        )
    assert (token.ttl, token.expires_at) == (0, None)
    assert not token.renewable and not token.from_login


async def test_token_file_refused_token_is_auth_error(upstream: Upstream, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s.NOT-A-REAL-TOKEN-5e1f")
    token_file.chmod(0o600)
    login = TokenFileLogin(AuthConfig(method="token_file", token_file=token_file))
    with trio.fail_after(10), pytest.raises(AuthError) as info:
        await login.login(upstream)
    assert "NOT-A-REAL-TOKEN" not in str(info.value)


# --- the renew / re-login loop ------------------------------------------------------------


@pytest.mark.slow
async def test_short_ttl_token_is_renewed_then_replaced(
    bao: DevServer,
    upstream: Upstream,
    short_approle_files: tuple[Path, Path],
    secret_path: str,
) -> None:
    auth = Authenticator(_config(bao, _approle(*short_approle_files)), upstream)
    tokens: list[str] = []
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(auth.run)
            seen = auth.token_generation
            token = auth.token()
            while True:
                # every token the authenticator hands out reads the secret
                assert token is not None
                tokens.append(token)
                value = await read_kv(upstream, "kv2", secret_path)
                assert value.data["password"] == SECRET_MARKER
                stats = auth.statistics()
                if stats.logins >= 2 and stats.renewals >= 1:
                    break
                seen, token = await auth.wait_token_changed(seen)
            nursery.cancel_scope.cancel()
    assert stats.state == "ok" and stats.failures == 0
    assert len(set(tokens)) == 2  # a renewal keeps the token, the re-login at max TTL replaces it


async def test_invalidate_checks_then_logs_in_again(
    bao: DevServer, upstream: Upstream, approle_files: tuple[Path, Path], secret_path: str
) -> None:
    auth = Authenticator(_config(bao, _approle(*approle_files)), upstream)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(auth.run)
            first = await auth.wait_for_token()

            # a token that still works (a 403 from a policy) is checked, not replaced
            auth.invalidate(first)
            await _wait_stats(auth, lambda s: s.checks == 1)
            assert auth.token() == first and auth.statistics().logins == 1

            # a stale token is ignored
            auth.invalidate("s.some-older-token")

            # a token the upstream refuses is replaced at once
            bao.api("POST", "auth/token/revoke", {"token": first})
            with pytest.raises(AuthError):
                await read_kv(upstream, "kv2", secret_path)
            seen = auth.token_generation
            auth.invalidate(first)
            _, second = await auth.wait_token_changed(seen)
            assert second is not None and second != first
            value = await read_kv(upstream, "kv2", secret_path)
            nursery.cancel_scope.cancel()
    assert value.data["password"] == SECRET_MARKER
    assert auth.statistics().logins == 2


async def test_wrong_secret_id_backs_off_until_fixed(
    bao: DevServer,
    upstream: Upstream,
    approle_files: tuple[Path, Path],
    secret_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    role_file, secret_file = approle_files
    good_secret_id = secret_file.read_text()
    wrong_secret_id = str(uuid.uuid4())
    secret_file.write_text(wrong_secret_id)
    secret_file.chmod(0o600)
    auth = Authenticator(_config(bao, _approle(role_file, secret_file)), upstream)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(auth.run)
            await _wait_stats(auth, lambda s: s.failures >= 3)
            stats = auth.statistics()
            assert stats.state == "failing" and stats.logins == 0
            assert stats.last_error is not None and "invalid role or secret ID" in stats.last_error
            assert auth.token() is None

            secret_file.write_text(good_secret_id)  # re-read at the next login
            token = await auth.wait_for_token()
            value = await read_kv(upstream, "kv2", secret_path)
            nursery.cancel_scope.cancel()
    assert value.data["password"] == SECRET_MARKER
    assert auth.statistics().state == "ok"
    assert "login failed" in caplog.text
    markers = [token, wrong_secret_id, *_credentials(role_file, secret_file)]
    _assert_hidden(markers, caplog.text, str(auth.statistics()))


async def test_missing_secret_id_file_is_a_login_failure(
    bao: DevServer, upstream: Upstream, approle_files: tuple[Path, Path]
) -> None:
    role_file, secret_file = approle_files
    secret_file.unlink()
    with trio.fail_after(10), pytest.raises(AuthError, match="cannot read secret_id_file"):
        await AppRoleLogin(_approle(role_file, secret_file)).login(upstream)


async def test_renewal_outage_keeps_token_then_recovers(
    bao: DevServer, short_approle_files: tuple[Path, Path], secret_path: str
) -> None:
    fault = FaultProxy(bao.port)
    async with trio.open_nursery() as outer:
        await outer.start(fault.run)
        cfg = _config(bao, _approle(*short_approle_files), fault.address)
        up = Upstream(cfg)
        auth = Authenticator(cfg, up)
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                await nursery.start(auth.run)
                first = auth.token()
                fault.mode = "reset"
                # renewals fail; the token stays in use while it is valid, then logins fail too
                await _wait_stats(auth, lambda s: s.state == "failing")
                assert auth.statistics().logins == 1
                fault.mode = "pass"
                await _wait_stats(auth, lambda s: s.state == "ok")
                second = await auth.wait_for_token()
                value = await read_kv(up, "kv2", secret_path)
                nursery.cancel_scope.cancel()
        await up.aclose()
        outer.cancel_scope.cancel()
    assert first != second
    assert value.data["password"] == SECRET_MARKER
    stats = auth.statistics()
    assert stats.logins == 2 and stats.failures >= 2
    assert stats.last_error is not None and "connection failed" in stats.last_error


async def test_revoke_makes_token_unusable(
    bao: DevServer,
    upstream: Upstream,
    approle_files: tuple[Path, Path],
    secret_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    auth = Authenticator(_config(bao, _approle(*approle_files)), upstream)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(auth.run)
            token = await auth.wait_for_token()
            nursery.cancel_scope.cancel()
        assert _token_accepted(bao, token)
        await auth.revoke()
        assert auth.token() is None
        with pytest.raises(AuthError) as info:
            await read_kv(upstream, "kv2", secret_path)
        with pytest.raises(AuthError):
            await upstream.request("GET", "auth/token/lookup-self", token=token)
        await auth.revoke()  # nothing left: a no-op
    assert not _token_accepted(bao, token)
    _assert_hidden([token], caplog.text, str(info.value))


def test_unknown_method_is_refused(bao: DevServer) -> None:
    up = Upstream(UpstreamConfig(addresses=(bao.address,)))
    with pytest.raises(ValueError, match="unknown auth method"):
        Authenticator(_config(bao, AuthConfig(method="kerberos")), up)


async def test_a_token_file_swapped_by_another_user_after_start_is_refused(
    bao: DevServer, upstream: Upstream
) -> None:
    """Issue 13 item 7: a token file in a directory another user owns is never used, at any read.

    The file passed once (root's, 0600); the directory above it belongs to nobody, who can put
    their own token file in its place at any time. The login refuses it instead of logging in
    with whatever token is there.
    """
    base = Path(tempfile.mkdtemp(prefix="agentd-auth-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        drop = base / "creds"
        drop.mkdir()
        token_file = drop / "token"
        token_file.write_text(bao.create_token(policies=["agentd-read"], ttl="1h"))
        token_file.chmod(0o600)
        login = TokenFileLogin(AuthConfig(method="token_file", token_file=token_file))
        with trio.fail_after(10):
            assert (await login.login(upstream)).value      # trusted: used
        os.chown(drop, 65534, 65534)                         # now nobody can swap the file
        with trio.fail_after(10), pytest.raises(AuthError, match="owned by uid 65534"):
            await login.login(upstream)
        os.chown(drop, 0, 0)
        os.chmod(drop, 0o777)
        with trio.fail_after(10), pytest.raises(AuthError, match="writable by others"):
            await login.login(upstream)
        os.chmod(drop, 0o755)
        token_file.chmod(0o644)                              # a credential readable by anyone
        with trio.fail_after(10), pytest.raises(AuthError, match="readable by others"):
            await login.login(upstream)
    finally:
        shutil.rmtree(base)
