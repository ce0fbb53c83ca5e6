"""Login methods and the token's renew / re-login loop.

Theory of operation: a ``LoginMethod`` turns configuration into a ``Token`` (``AppRoleLogin`` reads
its role_id and secret_id files at *each* login, so a rotated secret_id is picked up;
``TokenFileLogin`` reads a token file and looks the token up). Adding ``cert`` or ``jwt`` is one
more class and one more ``LOGIN_METHODS`` entry.

``Authenticator.run()`` owns the token. It logs in, retrying with full-jitter backoff
(``backoff_min`` .. ``login_backoff_max``: each login is a storage write upstream), reports
readiness after the first success, and then keeps the token alive: at 2/3 of its TTL it renews it
(``auth/token/renew-self``); once a renewal comes back shorter than the token's normal TTL (its
max TTL is near), or the token is not renewable, it logs in again at 2/3 of what is left. A renewal
that fails transiently is retried with backoff while the token has time left, then a login is
tried; a renewal refused outright leads straight to a login. The old token stays in use until a
new one is there, and is never revoked on re-login (OpenBao would revoke its leases with it).

``restore(token)`` (the token sealed into the snapshot while leases depend on it) makes run()
start from that token instead of a login, once ``auth/token/lookup-self`` accepts it (retried with
backoff while the upstream is unreachable and the token has time left); a refused or expired one
leads to a normal login.

A request that got 401/403 calls ``invalidate(token)``. A 403 may be a policy mistake rather than
a dead token, so run() first asks ``auth/token/lookup-self``; only a refused lookup leads to a new
login. This keeps a policy typo upstream from turning every host's refresh into a login.

The token lives in a ``Cell`` (``wait_token_changed``), and so do the statistics
(``wait_statistics_changed``). Scheduling uses trio's clock (``trio.sleep``), expiry math the
injected wall clock. Nothing here logs or raises with a token, a role_id or a secret_id in it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from agentd import fsafe
from agentd.backoff import Backoff
from agentd.cell import Cell
from agentd.config import AuthConfig, UpstreamConfig
from agentd.errors import AuthError, PermanentError, TransientError, UnsafePath, UpstreamError
from agentd.readmodel import COUNTER, metric
from agentd.upstream import Upstream

log = logging.getLogger("agentd.auth")

RENEW_FRACTION = 2.0 / 3.0    # renew (or re-login) when this much of the TTL has passed
GIVE_UP_FRACTION = 0.1        # stop retrying a renewal when less than this much TTL would be left


@dataclass(frozen=True)
class Token:
    """A token and what is known about its lifetime. ``repr()`` never shows the value."""

    value: str = field(repr=False)
    ttl: float             # seconds at ``obtained_at``; 0 = never expires (root)
    renewable: bool
    obtained_at: float     # wall clock (unix time)
    from_login: bool       # True when agentd logged in (kept in the snapshot across restarts)

    @property
    def expires_at(self) -> float | None:
        return None if self.ttl <= 0 else self.obtained_at + self.ttl


class LoginMethod(Protocol):
    """One way to obtain a token. ``login()`` raises AuthError when refused, TransientError when
    the upstream could not be reached (both retried by the Authenticator)."""

    name: str

    async def login(self, upstream: Upstream) -> Token: ...


def _token_from_auth(
    reply: dict[str, Any], what: str, *, obtained_at: float, from_login: bool
) -> Token:
    """A Token from an ``auth`` block (login and renew-self replies)."""
    auth = reply.get("auth")
    if not isinstance(auth, dict):
        raise PermanentError(f"{what}: reply has no auth block")
    value = auth.get("client_token")
    ttl = auth.get("lease_duration")
    renewable = auth.get("renewable")
    if not isinstance(value, str) or not value:
        raise PermanentError(f"{what}: reply has no client_token")
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl < 0:
        raise PermanentError(f"{what}: reply has no valid lease_duration")
    return Token(
        value=value,
        ttl=float(ttl),
        renewable=bool(renewable),
        obtained_at=obtained_at,
        from_login=from_login,
    )


async def _read_credential(path: Path, what: str, *, secret: bool = True) -> str:
    """The stripped contents of a credential file; AuthError (path only) when unusable.

    Read through ``fsafe`` at every login: a file (or a directory above it) that another user
    could have swapped since the config was loaded is refused, not used (issue 13 item 7).
    """
    try:
        text = await trio.to_thread.run_sync(
            functools.partial(fsafe.read_text, path, secret=secret)
        )
    except UnsafePath as exc:
        raise AuthError(f"cannot read {what} {exc}") from exc
    value = text.strip()
    if not value:
        raise AuthError(f"{what} {path} is empty")
    return value


class AppRoleLogin:
    """``POST auth/<mount>/login`` with role_id and secret_id, both re-read at each login.

    Without ``secret_id_file`` only the role_id is sent (a role with ``bind_secret_id=false``).
    """

    name = "approle"

    def __init__(self, cfg: AuthConfig, *, clock: Callable[[], float] = time.time) -> None:
        if cfg.role_id_file is None:
            raise ValueError("approle login needs role_id_file")
        self._role_id_file = cfg.role_id_file
        self._secret_id_file = cfg.secret_id_file
        self._mount = (cfg.mount or "approle").strip("/")
        self._clock = clock

    async def login(self, upstream: Upstream) -> Token:
        body = {"role_id": await _read_credential(
            self._role_id_file, "role_id_file", secret=False
        )}
        if self._secret_id_file is not None:
            body["secret_id"] = await _read_credential(self._secret_id_file, "secret_id_file")
        obtained_at = self._clock()
        path = f"auth/{self._mount}/login"
        try:
            reply = await upstream.request("POST", path, json=body, authenticated=False)
        except PermanentError as exc:  # OpenBao answers a wrong role/secret ID with 400
            raise AuthError(f"approle login failed: {exc}", status=exc.status) from exc
        return _token_from_auth(reply, path, obtained_at=obtained_at, from_login=True)


class TokenFileLogin:
    """A token from a file (re-read at each login), looked up for its TTL and renewability."""

    name = "token_file"

    def __init__(self, cfg: AuthConfig, *, clock: Callable[[], float] = time.time) -> None:
        if cfg.token_file is None:
            raise ValueError("token_file login needs token_file")
        self._token_file = cfg.token_file
        self._clock = clock

    async def login(self, upstream: Upstream) -> Token:
        value = await _read_credential(self._token_file, "token_file")
        obtained_at = self._clock()
        try:
            reply = await upstream.request("GET", "auth/token/lookup-self", token=value)
        except PermanentError as exc:
            raise AuthError(f"token_file token refused: {exc}", status=exc.status) from exc
        data = reply.get("data")
        ttl = data.get("ttl") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(ttl, (int, float)) or ttl < 0:
            raise PermanentError("auth/token/lookup-self: reply has no valid ttl")
        if ttl == 0 and data.get("expire_time"):  # ttl 0 with an expiry: expires right now
            raise AuthError("token_file token has expired")
        return Token(
            value=value,
            ttl=float(ttl),
            renewable=bool(data.get("renewable")),
            obtained_at=obtained_at,
            from_login=False,
        )


class CertLogin:
    """``POST auth/<mount>/login`` over TLS with a client certificate (``cert_file``/``key_file``,
    re-read before each login, so a certificate renewed on disk is the one that logs in).

    The certificate can be the host's machine identity: a ``pki`` secret rendered to those files.
    """

    name = "cert"

    def __init__(self, cfg: AuthConfig, *, clock: Callable[[], float] = time.time) -> None:
        if cfg.cert_file is None or cfg.key_file is None:
            raise ValueError("cert login needs cert_file and key_file")
        self._role = cfg.role
        self._mount = (cfg.mount or "cert").strip("/")
        self._clock = clock

    async def login(self, upstream: Upstream) -> Token:
        try:
            await upstream.renew_client_identity()
        except PermanentError as exc:
            raise AuthError(f"cert login: {exc}") from exc
        body = {"name": self._role} if self._role else {}
        obtained_at = self._clock()
        path = f"auth/{self._mount}/login"
        try:
            reply = await upstream.request("POST", path, json=body, authenticated=False)
        except PermanentError as exc:
            raise AuthError(f"cert login failed: {exc}", status=exc.status) from exc
        return _token_from_auth(reply, path, obtained_at=obtained_at, from_login=True)


class JwtLogin:
    """``POST auth/<mount>/login`` with ``role`` and the JWT in ``jwt_file`` (re-read at each
    login: whatever refreshes that file, e.g. a workload identity issuer, is picked up)."""

    name = "jwt"

    def __init__(self, cfg: AuthConfig, *, clock: Callable[[], float] = time.time) -> None:
        if cfg.jwt_file is None or not cfg.role:
            raise ValueError("jwt login needs jwt_file and role")
        self._jwt_file = cfg.jwt_file
        self._role = cfg.role
        self._mount = (cfg.mount or "jwt").strip("/")
        self._clock = clock

    async def login(self, upstream: Upstream) -> Token:
        body = {"role": self._role, "jwt": await _read_credential(self._jwt_file, "jwt_file")}
        obtained_at = self._clock()
        path = f"auth/{self._mount}/login"
        try:
            reply = await upstream.request("POST", path, json=body, authenticated=False)
        except PermanentError as exc:
            raise AuthError(f"jwt login failed: {exc}", status=exc.status) from exc
        return _token_from_auth(reply, path, obtained_at=obtained_at, from_login=True)


LOGIN_METHODS: dict[str, Callable[[AuthConfig], LoginMethod]] = {
    AppRoleLogin.name: AppRoleLogin,
    TokenFileLogin.name: TokenFileLogin,
    CertLogin.name: CertLogin,
    JwtLogin.name: JwtLogin,
}


@dataclass(frozen=True)
class AuthStatistics:
    """The authenticator's state; each ``metric`` field is a series (``readmodel``); the
    state (one-hot by method) and the token's expiry and TTL are made in ``metrics``."""

    state: str                   # "logging_in" | "ok" | "failing"
    method: str
    expires_at: float | None     # of the current token; None: none, or never expires
    logins: int = metric("Successful logins", COUNTER, name="agentd_auth_logins")
    renewals: int = metric("Successful token renewals", COUNTER, name="agentd_auth_renewals")
    failures: int = metric("Failed logins and renewals", COUNTER, name="agentd_auth_failures")
    last_error: str | None = None
    checks: int = metric("Token lookups after a refused request that found it still valid",
                         COUNTER, name="agentd_auth_checks", default=0)


class Authenticator:
    """Keeps one valid token for ``upstream`` (it sets ``upstream.token_source``).

    Lifetime: ``await nursery.start(auth.run)`` returns after the first login; cancel the nursery
    to stop, then ``await auth.revoke()`` (shielded, if it runs during cancellation) to revoke a
    token agentd logged in for.
    """

    def __init__(
        self,
        cfg: UpstreamConfig,
        upstream: Upstream,
        *,
        clock: Callable[[], float] = time.time,
        method: LoginMethod | None = None,
    ) -> None:
        if method is None:
            factory = LOGIN_METHODS.get(cfg.auth.method)
            if factory is None:
                raise ValueError(f"unknown auth method {cfg.auth.method!r}")
            method = factory(cfg.auth)
        self._cfg = cfg
        self._upstream = upstream
        self._clock = clock
        self._method = method
        self._token: Cell[Token | None] = Cell(None)
        self._wake = trio.Event()
        self._last_login = -math.inf  # trio clock
        self._restored: Token | None = None
        self._stats = Cell(
            AuthStatistics(
                state="logging_in",
                method=method.name,
                expires_at=None,
                logins=0,
                renewals=0,
                failures=0,
                last_error=None,
            )
        )
        upstream.token_source = self.token

    # --- public API -------------------------------------------------------------------------

    def token(self) -> str | None:
        """The current token, or None when there is none or it has expired."""
        current = self._token.value
        if current is None:
            return None
        expires_at = current.expires_at
        if expires_at is not None and self._clock() >= expires_at:
            return None
        return current.value

    @property
    def token_generation(self) -> int:
        return self._token.generation

    async def wait_token_changed(self, seen: int) -> tuple[int, str | None]:
        """Wait for a token change (login, renewal, revoke) after generation ``seen``."""
        generation, _ = await self._token.wait_changed(seen)
        return generation, self.token()

    async def wait_for_token(self) -> str:
        """Wait until there is a usable token and return it."""
        while True:
            seen = self._token.generation
            value = self.token()
            if value is not None:
                await trio.lowlevel.checkpoint()
                return value
            await self._token.wait_changed(seen)

    def invalidate(self, token: str) -> None:
        """A request with ``token`` got 401/403: if it is still current, have run() check it
        now and log in again if it is refused. Sync, never blocks."""
        current = self._token.value
        if current is not None and current.value == token:
            self._wake.set()

    def statistics(self) -> AuthStatistics:
        return self._stats.value

    def current(self) -> Token | None:
        """The current token with its lifetime (for the snapshot when leases depend on it)."""
        return self._token.value

    def restore(self, token: Token) -> None:
        """Start ``run()`` from ``token`` (sealed in the snapshot) instead of a new login, if
        the upstream still accepts it: the leases created under it live on."""
        self._restored = token

    async def wait_statistics_changed(self, seen: int) -> tuple[int, AuthStatistics]:
        """Wait for a statistics change after generation ``seen`` (0 = the initial snapshot)."""
        return await self._stats.wait_changed(seen)

    async def revoke(self) -> None:
        """Revoke the token if agentd logged in for it (``revoke-self``), then forget it.

        A token from a token file is only forgotten. Errors are logged, never raised.
        """
        current = self._token.value
        if current is None:
            await trio.lowlevel.checkpoint()
            return
        if current.from_login:
            try:
                await self._upstream.request(
                    "POST", "auth/token/revoke-self", json={}, token=current.value
                )
            except UpstreamError as exc:
                log.warning("token revoke failed", extra={"error": str(exc)})
            else:
                log.info("token revoked")
        else:
            await trio.lowlevel.checkpoint()
        self._token.set(None)
        self._update(expires_at=None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Log in, then keep the token valid forever. Returns only by cancellation."""
        started = False
        restored, self._restored = self._restored, None
        if restored is not None:
            adopted = await self._adopt(restored)
            if adopted is not None:
                task_status.started()
                started = True
                await self._keep(adopted)
        while True:
            token = await self._login_until_ok()
            if not started:
                task_status.started()
                started = True
            await self._keep(token)

    # --- internals --------------------------------------------------------------------------

    def _update(self, **changes: Any) -> None:
        self._stats.set(dataclasses.replace(self._stats.value, **changes))

    def _set_token(self, token: Token) -> None:
        self._wake = trio.Event()  # an invalidation of the previous token is moot now
        self._token.set(token)

    async def _login_until_ok(self) -> Token:
        backoff = Backoff(self._cfg.backoff_min, self._cfg.login_backoff_max)
        if self._stats.value.state != "failing":
            self._update(state="logging_in")
        while True:
            # never more than one login per backoff_min, whatever the token's TTL says
            await trio.sleep_until(self._last_login + self._cfg.backoff_min)
            self._last_login = trio.current_time()
            obtained_at = self._clock()
            try:
                token = await self._method.login(self._upstream)
            except UpstreamError as exc:
                retry_after = exc.retry_after if isinstance(exc, TransientError) else None
                delay = backoff.next_delay(at_least=retry_after or 0.0)
                stats = self._stats.value
                self._update(state="failing", failures=stats.failures + 1, last_error=str(exc))
                log.warning(
                    "login failed",
                    extra={"method": self._method.name, "error": str(exc), "retry_in": delay},
                )
                await trio.sleep(delay)
                continue
            token = dataclasses.replace(token, obtained_at=obtained_at)
            self._set_token(token)
            self._update(
                state="ok", logins=self._stats.value.logins + 1, expires_at=token.expires_at
            )
            log.info(
                "login ok",
                extra={"method": self._method.name, "ttl": token.ttl,
                       "renewable": token.renewable},
            )
            return token

    async def _adopt(self, token: Token) -> Token | None:
        """Use the restored ``token`` if ``lookup-self`` accepts it (retried with backoff while
        the upstream is unreachable and the token has time left); None: log in instead."""
        backoff = Backoff(self._cfg.backoff_min, self._cfg.backoff_max)
        while True:
            expires_at = token.expires_at
            if expires_at is not None and self._clock() >= expires_at:
                log.info("restored token has expired, logging in")
                return None
            obtained_at = self._clock()
            try:
                reply = await self._upstream.request(
                    "GET", "auth/token/lookup-self", token=token.value
                )
            except TransientError as exc:
                delay = backoff.next_delay(at_least=exc.retry_after or 0.0)
                log.warning("cannot check the restored token yet",
                            extra={"error": str(exc), "retry_in": delay})
                await trio.sleep(delay)
                continue
            except UpstreamError as exc:
                log.info("restored token refused, logging in", extra={"error": str(exc)})
                return None
            data = reply.get("data")
            ttl = data.get("ttl") if isinstance(data, dict) else None
            if (not isinstance(data, dict) or not isinstance(ttl, (int, float))
                    or isinstance(ttl, bool) or ttl < 0 or (ttl == 0 and data.get("expire_time"))):
                log.info("restored token has no usable ttl, logging in")
                return None
            adopted = Token(value=token.value, ttl=float(ttl),
                            renewable=bool(data.get("renewable", token.renewable)),
                            obtained_at=obtained_at, from_login=token.from_login)
            self._set_token(adopted)
            self._update(state="ok", expires_at=adopted.expires_at)
            log.info("restored token still valid; no new login",
                     extra={"ttl": adopted.ttl, "renewable": adopted.renewable})
            return adopted

    async def _sleep_until(self, deadline: float) -> bool:
        """Sleep until wall-clock ``deadline``; True if invalidate() woke us first."""
        wake = self._wake
        delay = deadline - self._clock()
        if math.isinf(delay):
            await wake.wait()
            return True
        with trio.move_on_after(max(0.0, delay)):
            await wake.wait()
            return True
        return False

    async def _still_valid(self, token: Token) -> bool:
        """After invalidate(): does the upstream still accept ``token``?"""
        self._wake = trio.Event()
        try:
            await self._upstream.request("GET", "auth/token/lookup-self", token=token.value)
        except UpstreamError as exc:
            log.info("token refused, logging in again", extra={"error": str(exc)})
            return False
        self._update(checks=self._stats.value.checks + 1)
        log.info("token still valid after a refusal (a policy denies that path?)")
        return True

    async def _keep(self, token: Token) -> None:
        """Renew ``token`` until a new login is needed; then return."""
        backoff = Backoff(self._cfg.backoff_min, self._cfg.backoff_max)
        normal_ttl = token.ttl
        exhausted = not token.renewable
        next_at = (
            math.inf if token.expires_at is None else token.obtained_at + token.ttl * RENEW_FRACTION
        )
        while True:
            if await self._sleep_until(next_at):
                if await self._still_valid(token):
                    continue
                return
            if exhausted:
                log.info("token near its max TTL, logging in again")
                return
            obtained_at = self._clock()
            try:
                reply = await self._upstream.request(
                    "POST", "auth/token/renew-self", json={}, token=token.value
                )
                renewed = _token_from_auth(
                    reply, "auth/token/renew-self", obtained_at=obtained_at,
                    from_login=token.from_login,
                )
            except TransientError as exc:
                delay = backoff.next_delay(at_least=exc.retry_after or 0.0)
                stats = self._stats.value
                self._update(failures=stats.failures + 1, last_error=str(exc))
                expires_at = token.expires_at
                assert expires_at is not None
                if self._clock() + delay > expires_at - token.ttl * GIVE_UP_FRACTION:
                    log.warning("token renewal failed, logging in", extra={"error": str(exc)})
                    return
                log.warning("token renewal failed", extra={"error": str(exc), "retry_in": delay})
                next_at = self._clock() + delay
                continue
            except UpstreamError as exc:
                stats = self._stats.value
                self._update(failures=stats.failures + 1, last_error=str(exc))
                log.warning("token renewal refused, logging in", extra={"error": str(exc)})
                return
            backoff.reset()
            token = dataclasses.replace(renewed, value=token.value)
            if token.ttl < normal_ttl or not token.renewable:
                exhausted = True  # max TTL reached: log in at 2/3 of what is left
            normal_ttl = max(normal_ttl, token.ttl)
            self._token.set(token)
            self._update(renewals=self._stats.value.renewals + 1, expires_at=token.expires_at)
            log.info("token renewed", extra={"ttl": token.ttl, "at_max_ttl": exhausted})
            next_at = token.obtained_at + token.ttl * RENEW_FRACTION
