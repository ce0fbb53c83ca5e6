"""Per-kind fetch, renew, validate and schedule logic (decision 4); the refresher calls in here.

Theory of operation: ``Kinds.fetch(secret)`` is one refresh step for any kind and returns the
``SecretValue`` the refresher stores; ``Kinds.next_delay(secret, default)`` says when the next
step is due. The refresher keeps its single-flight, backoff and staleness rules for every kind;
what differs per kind lives here:

- ``kv2``/``kv1``: a read. A kv2 ``version = N`` pin reads ``?version=N`` (the refresher drops
  the cached value when a pin is added or removed, so the cache's "never go back a version"
  rule does not hide the pinned one).
- ``pki``: a write to ``path`` (``pki/issue/ROLE``) with ``params``. The reply must pass
  ``crypto.check_certificate`` (key matches the certificate, chain verifies up to the issuing CA,
  validity covers now give or take the clock skew) before it may replace the served pair;
  otherwise the step fails and the old pair stays served until it expires. Re-issue is due at
  ``renew_at`` of the lifetime (issue time to not_after), +-5% of the lifetime as jitter. With
  ``revoke_previous`` the replaced serial is revoked ``grace`` after the new pair was stored.
- ``leased``: a read that returns a lease. Later steps renew it (``sys/leases/renew/ID``) at
  ``renew_at`` of the lease; when a renewal is refused, comes back capped (the max TTL is near)
  or the lease is not renewable, the next step reads a new credential and the old lease is
  revoked ``grace`` after the new one went live. A lease OpenBao says is gone ("lease not found")
  is treated as revoked: the cached value is dropped at once and a new credential is read. At a
  clean shutdown leases are revoked only for ``revoke_on_shutdown = true``; the others go into
  the snapshot (``export_leases``) and a restarted agent takes them over (``restore_leases``)
  with the login token that created them, so they are renewed, not re-read.
- every kind: an optional ``check`` program validates a new value before it goes live (the value
  as JSON in a 0600 temp file named by ``$AGENTD_SECRET_FILE``); a failing check keeps the old one.

Anomaly signals (``observe``): each new value's keyed HMAC fingerprint (under a per-process key,
never the plaintext) is compared with the last few; a match is a reuse alarm. A change sooner than
``expect_rotation_every`` after the previous change is a rotation-frequency alarm. Both are a
warning log and a counter in ``status``.

Delayed revocations run in ``run()``'s nursery (started by the refresher); cancelling it drops
the pending ones (OpenBao expires the leases on its own).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from agentd.cache import Cache, thaw
from agentd.config import SecretConfig
from agentd.crypto import CertificateInfo, Sealer, check_certificate
from agentd.errors import (
    CertificateRejected,
    CheckFailed,
    CryptoError,
    PermanentError,
    UpstreamError,
    UpstreamNotFound,
)
from agentd.upstream import SecretValue, Upstream

if TYPE_CHECKING:
    from agentd.auth import Authenticator

log = logging.getLogger("agentd.kinds")

PKI_JITTER = 0.05            # +- this fraction of a certificate's lifetime
RENEW_CAPPED_SLACK = 2.0     # a renewal this much shorter than asked for hit the max TTL
MIN_DELAY = 1.0              # never schedule a step sooner than this
REUSE_HISTORY = 8            # fingerprints of previous values kept per secret
CHECK_TIMEOUT = 30.0
SHUTDOWN_REVOKE_TIMEOUT = 5.0
_GONE = ("lease not found", "invalid lease", "lease expired")


@dataclass
class KindState:
    """What one secret's kind remembers between steps (never a secret value)."""

    # pki
    serial: str | None = None
    issued_at: float | None = None
    not_after: float | None = None
    # leased
    lease_id: str | None = field(default=None, repr=False)
    lease_duration: float = 0.0      # of the first read: the increment asked for on renewals
    lease_expires_at: float | None = None
    lease_renewed_at: float | None = None
    renewable: bool = False
    reissue: bool = False            # the next step reads a new credential
    lease_token: bytes | None = field(default=None, repr=False)  # fingerprint of its token
    token_expires_at: float | None = None    # the login token's expiry at the last step
    renewals: int = 0
    reissues: int = 0
    # anomalies
    fingerprints: deque[bytes] = field(default_factory=lambda: deque(maxlen=REUSE_HISTORY))
    last_change: float | None = None
    reuse_alarms: int = 0
    rotation_alarms: int = 0
    check_failures: int = 0

    def as_status(self, secret: SecretConfig) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if secret.kind == "kv2" and secret.version is not None:
            out["pinned"] = secret.version
        if secret.kind == "pki":
            out.update(serial=self.serial, expires_at=self.not_after)
        if secret.kind == "leased":
            out.update(lease_expires_at=self.lease_expires_at, renewals=self.renewals,
                       reissues=self.reissues, renewable=self.renewable)
        out["anomalies"] = {"reuse": self.reuse_alarms, "rotation": self.rotation_alarms}
        if secret.check:
            out["check_failures"] = self.check_failures
        return out


@dataclass(frozen=True)
class LeaseRecord:
    """A leased secret's lease as the snapshot keeps it (sealed; ``repr()`` hides the id)."""

    lease_id: str = field(repr=False)
    lease_duration: float
    expires_at: float
    renewed_at: float | None
    renewable: bool


def mount_of(path: str) -> str:
    """``pki/issue/web`` -> ``pki`` (the PKI mount a revoke goes to)."""
    for verb in ("/issue/", "/sign/"):
        if verb in path:
            return path.rsplit(verb, 1)[0]
    return path.split("/", 1)[0]


class Kinds:
    """Kind-specific refresh steps for one agent. Lifetime: ``run()`` in the refresher's nursery.

    Args:
        upstream: the OpenBao client.
        cache: the secret store (leased renewals re-store the cached data with a new expiry).
        clock: wall clock (expiry math); scheduling uses trio's clock through the refresher.
    """

    def __init__(
        self,
        upstream: Upstream,
        cache: Cache,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._upstream = upstream
        self._cache = cache
        self._clock = clock
        self._rng = rng or random.Random()
        self._fingerprinter = Sealer.generate()
        self._states: dict[str, KindState] = {}
        self._secrets: dict[str, SecretConfig] = {}
        self._nursery: trio.Nursery | None = None

    def state(self, name: str) -> KindState:
        return self._states.setdefault(name, KindState())

    def forget(self, name: str) -> None:
        """Drop what is known about ``name`` (removed from the config or moved upstream)."""
        self._states.pop(name, None)
        self._secrets.pop(name, None)

    def holds_leases(self) -> bool:
        """True while some leased secret holds a lease (the login token must then live on)."""
        return any(s.lease_id for s in self._states.values())

    def export_leases(self) -> dict[str, LeaseRecord]:
        """The live leases, for the snapshot: they must outlive a restart with their token."""
        now = self._clock()
        return {
            name: LeaseRecord(lease_id=state.lease_id, lease_duration=state.lease_duration,
                              expires_at=state.lease_expires_at,
                              renewed_at=state.lease_renewed_at, renewable=state.renewable)
            for name, state in self._states.items()
            if state.lease_id and state.lease_expires_at is not None
            and state.lease_expires_at > now
        }

    def restore_leases(self, leases: Mapping[str, LeaseRecord],
                       secrets: Mapping[str, SecretConfig], *, token: str | None) -> list[str]:
        """Take over leases from the snapshot (created under ``token``, the sealed login token)
        so they are renewed, moved to a new token or revoked like any other, never orphaned.
        Only declared leased secrets; returns their names."""
        owner = None if token is None else self._fingerprinter.fingerprint(token.encode())
        taken: list[str] = []
        for name, record in leases.items():
            secret = secrets.get(name)
            if secret is None or secret.kind != "leased":
                continue
            state = self.state(name)
            state.lease_id = record.lease_id
            state.lease_duration = record.lease_duration
            state.lease_expires_at = record.expires_at
            state.lease_renewed_at = record.renewed_at
            state.renewable = record.renewable
            state.lease_token = owner
            self._secrets[name] = secret
            taken.append(name)
        return taken

    def status(self, secret: SecretConfig) -> dict[str, Any]:
        return self.state(secret.name).as_status(secret)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery for delayed revocations; at the end revoke ``revoke_on_shutdown``
        leases (bounded, errors logged)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_REVOKE_TIMEOUT):
                for name, secret in list(self._secrets.items()):
                    state = self._states.get(name)
                    if secret.revoke_on_shutdown and state is not None and state.lease_id:
                        await self._revoke_lease(name, state.lease_id)
                        state.lease_id = None

    async def follow_token(
        self, auth: Authenticator, refresh: Callable[[str], Awaitable[int]]
    ) -> None:
        """On every new login token, move leases created under an earlier token to it at once
        (``refresh(name)`` runs the secret's step, which reads a new credential): OpenBao revokes
        a lease when the token that created it expires. Runs until cancelled."""
        seen = auth.token_generation
        while True:
            seen, token = await auth.wait_token_changed(seen)
            if token is None:
                continue
            owner = self._fingerprinter.fingerprint(token.encode())
            for name, secret in list(self._secrets.items()):
                # A step already in flight (with the old token) is joined by refresh(): look
                # again after it and run one more if the lease is still under the old token.
                for _ in range(3):
                    state = self._states.get(name)
                    if (secret.kind != "leased" or state is None or state.lease_id is None
                            or state.lease_token in (None, owner)):
                        break
                    try:
                        await refresh(name)
                    except UpstreamError as exc:
                        log.warning("moving the lease to the new token failed; retried later",
                                    extra={"secret": name, "error": str(exc)})
                        break

    # --- the refresh step ---------------------------------------------------------------------

    async def fetch(
        self, secret: SecretConfig, *, token: str | None = None,
        token_expires_at: float | None = None,
    ) -> SecretValue:
        """One refresh step for ``secret``: read, issue, renew or re-read as its kind needs.

        ``token`` is the login token this step runs with and ``token_expires_at`` its expiry:
        OpenBao revokes a lease with the token that created it, so a lease created under an
        earlier token is replaced by one under the current token, and the next step is due
        before the token's end (see ``next_delay``).

        Raises UpstreamError subclasses (CheckFailed, CertificateRejected for values refused
        here); the value being served is not touched except when a lease is known to be gone.
        """
        self._secrets[secret.name] = secret
        if secret.kind == "leased":
            state = self.state(secret.name)
            state.token_expires_at = token_expires_at
            owner = None if token is None else self._fingerprinter.fingerprint(token.encode())
            moved = state.lease_token is not None and state.lease_token != owner
            if state.lease_id is not None and owner is not None and moved:
                log.info("the login token changed; moving the lease to the new token",
                         extra={"secret": secret.name})
                state.reissue = True
            state.lease_token = owner
        if secret.kind == "pki":
            return await self._issue(secret)
        if secret.kind == "leased":
            leased = await self._leased(secret)
            if leased is not None:
                return leased
            # Renewed: the same data with the lease's new expiry.
            entry = self._cache.get(secret.name)
            if entry is None:
                return await self._read_lease(secret)
            return SecretValue(data=entry.data, version=None,
                               expires_at=self.state(secret.name).lease_expires_at)
        if secret.kind == "kv2" and secret.version is not None:
            sep = "&" if "?" in secret.path else "?"
            value = await self._upstream.read_secret(
                "kv2", f"{secret.path}{sep}version={secret.version}"
            )
        else:
            value = await self._upstream.read_secret(secret.kind, secret.path)
        if secret.check:
            history = self.state(secret.name).fingerprints
            if not history or history[-1] != self._fingerprint(value.data):
                await self._check(secret, value.data)     # only a value not yet live
        return value

    def next_delay(self, secret: SecretConfig, default: float) -> float:
        """Seconds until the next step after a successful one (``default``: kv polling)."""
        state = self.state(secret.name)
        now = self._clock()
        if secret.kind == "pki" and state.not_after is not None and state.issued_at is not None:
            life = max(0.0, state.not_after - state.issued_at)
            jitter = self._rng.uniform(-PKI_JITTER, PKI_JITTER)
            fraction = min(max(secret.renew_at + jitter, 0.05), 0.95)
            due = state.issued_at + life * fraction
            return max(MIN_DELAY, due - now)
        if secret.kind == "leased" and state.lease_expires_at is not None:
            start = state.lease_renewed_at if state.lease_renewed_at is not None else now
            left = max(0.0, state.lease_expires_at - start)
            due = start + left * secret.renew_at
            if state.token_expires_at is not None and state.token_expires_at > now:
                # The lease dies with its token: look again before the token's end.
                due = min(due, now + (state.token_expires_at - now) * secret.renew_at)
            return max(MIN_DELAY if left > 3 * MIN_DELAY else 0.2, due - now)
        return default

    def observe(self, secret: SecretConfig, data: Mapping[str, Any]) -> None:
        """Anomaly signals for a new value just stored (see the module docstring)."""
        state = self.state(secret.name)
        digest = self._fingerprint(data)
        now = self._clock()
        if digest in state.fingerprints:
            state.reuse_alarms += 1
            log.warning(
                "secret changed back to a recent previous value (reuse)",
                extra={"secret": secret.name, "anomaly": "reuse"},
            )
        if (
            secret.expect_rotation_every is not None
            and state.last_change is not None
            and now - state.last_change < secret.expect_rotation_every
        ):
            state.rotation_alarms += 1
            log.warning(
                "secret rotates more often than expect_rotation_every allows",
                extra={"secret": secret.name, "anomaly": "rotation",
                       "interval": round(now - state.last_change, 3),
                       "expect_rotation_every": secret.expect_rotation_every},
            )
        state.fingerprints.append(digest)
        state.last_change = now

    def _fingerprint(self, data: Mapping[str, Any]) -> bytes:
        packed: bytes = msgpack.packb(thaw(data))
        return self._fingerprinter.fingerprint(packed)

    # --- pki ------------------------------------------------------------------------------------

    async def _issue(self, secret: SecretConfig) -> SecretValue:
        reply = await self._upstream.request("POST", secret.path, json=dict(secret.params))
        data = reply.get("data")
        if not isinstance(data, dict):
            raise PermanentError(f"POST {secret.path}: reply has no data object")
        now = self._clock()
        info = self._verify(secret, data, now)
        await self._check(secret, data)
        state = self.state(secret.name)
        previous = state.serial
        state.serial, state.issued_at, state.not_after = info.serial, now, info.not_after
        log.info("certificate issued", extra={"secret": secret.name, "serial": info.serial,
                                               "not_after": info.not_after})
        if secret.revoke_previous and previous and previous != info.serial:
            self._later(secret.grace, self._revoke_serial, secret, previous)
        kept = {k: data[k] for k in (
            "certificate", "private_key", "private_key_type", "issuing_ca", "ca_chain",
            "serial_number", "expiration",
        ) if k in data}
        return SecretValue(data=kept, version=None, expires_at=info.not_after)

    def _verify(self, secret: SecretConfig, data: Mapping[str, Any], now: float) -> CertificateInfo:
        fields = ("certificate", "private_key", "issuing_ca")
        if not all(isinstance(data.get(k), str) for k in fields):
            raise CertificateRejected(
                f"{secret.name}: issue reply lacks certificate, private_key or issuing_ca"
            )
        chain = data.get("ca_chain") or []
        if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
            raise CertificateRejected(f"{secret.name}: ca_chain is not a list of PEM strings")
        try:
            return check_certificate(
                data["certificate"], data["private_key"], data["issuing_ca"], chain, now=now
            )
        except CryptoError as exc:
            raise CertificateRejected(f"{secret.name}: new certificate refused: {exc}") from exc

    async def _revoke_serial(self, secret: SecretConfig, serial: str) -> None:
        path = f"{mount_of(secret.path)}/revoke"
        try:
            reply = await self._upstream.request("POST", path, json={"serial_number": serial})
        except UpstreamError as exc:
            log.warning("revoking the previous certificate failed",
                        extra={"secret": secret.name, "serial": serial, "error": str(exc)})
        else:
            warnings = reply.get("warnings") or []
            log.log(logging.WARNING if warnings else logging.INFO,
                    "previous certificate revoked" if not warnings
                    else "previous certificate revoke: upstream warned",
                    extra={"secret": secret.name, "serial": serial,
                           "warnings": [str(w)[:200] for w in warnings]})

    # --- leased ---------------------------------------------------------------------------------

    async def _leased(self, secret: SecretConfig) -> SecretValue | None:
        """A renewal (None: same data) or a new credential."""
        state = self.state(secret.name)
        have = self._cache.info(secret.name) is not None
        if state.lease_id is None or state.reissue or not state.renewable or not have:
            return await self._read_lease(secret)
        increment = max(1.0, state.lease_duration)
        try:
            # The lease id in the path (not the body) lets the upstream policy grant renewals
            # of this secret's leases only (catalog.upstream_policy).
            reply = await self._upstream.request(
                "PUT", f"sys/leases/renew/{state.lease_id}", json={"increment": int(increment)}
            )
        except PermanentError as exc:
            if isinstance(exc, UpstreamNotFound) or any(g in str(exc) for g in _GONE):
                # OpenBao says the lease is gone: the credential no longer works (decision 5).
                log.warning("lease is gone upstream; dropping the credential and reading anew",
                            extra={"secret": secret.name, "error": str(exc)})
                state.lease_id = None
                self._cache.remove(secret.name)
            else:
                log.info("lease renewal refused; reading a new credential",
                         extra={"secret": secret.name, "error": str(exc)})
            return await self._read_lease(secret)
        now = self._clock()
        duration = _number(reply.get("lease_duration"))
        state.renewals += 1
        state.lease_renewed_at = now
        state.lease_expires_at = now + duration
        state.renewable = bool(reply.get("renewable", state.renewable))
        if duration + RENEW_CAPPED_SLACK < increment or not state.renewable:
            state.reissue = True      # max TTL near: the next step reads a new credential
            log.info("lease renewal capped (max TTL near); a new credential follows",
                     extra={"secret": secret.name, "lease_duration": duration})
        return None

    async def _read_lease(self, secret: SecretConfig) -> SecretValue:
        reply = await self._upstream.request("GET", secret.path)
        data = reply.get("data")
        lease_id = reply.get("lease_id")
        if not isinstance(data, dict):
            raise PermanentError(f"GET {secret.path}: reply has no data object")
        if not isinstance(lease_id, str) or not lease_id:
            raise PermanentError(f"GET {secret.path}: reply holds no lease (use kind kv1?)")
        now = self._clock()
        duration = _number(reply.get("lease_duration"))
        try:
            await self._check(secret, data)
        except CheckFailed:
            await self._revoke_lease(secret.name, lease_id)   # never leave a refused user behind
            raise
        state = self.state(secret.name)
        previous = state.lease_id
        state.lease_id = lease_id
        state.lease_duration = duration
        state.lease_renewed_at = now
        state.lease_expires_at = now + duration
        state.renewable = bool(reply.get("renewable"))
        state.reissue = False
        state.reissues += 1
        log.info("new leased credential", extra={"secret": secret.name,
                                                 "lease_duration": duration})
        if previous and previous != lease_id:
            self._later(secret.grace, self._revoke_lease, secret.name, previous)
        return SecretValue(data=data, version=None, expires_at=now + duration,
                           lease_id=lease_id, lease_duration=duration,
                           renewable=state.renewable)

    async def _revoke_lease(self, name: str, lease_id: str) -> None:
        try:
            await self._upstream.request("PUT", f"sys/leases/revoke/{lease_id}", json={})
        except UpstreamError as exc:
            log.warning("lease revoke failed", extra={"secret": name, "error": str(exc)})
        else:
            log.info("previous lease revoked", extra={"secret": name})

    # --- check hook -----------------------------------------------------------------------------

    async def _check(self, secret: SecretConfig, data: Mapping[str, Any]) -> None:
        if not secret.check:
            await trio.lowlevel.checkpoint()
            return
        state = self.state(secret.name)
        fd, path = tempfile.mkstemp(prefix="agentd-check-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(thaw(data), handle)
            env = dict(os.environ, AGENTD_SECRET_FILE=path, AGENTD_SECRET_NAME=secret.name)
            try:
                with trio.fail_after(CHECK_TIMEOUT):
                    result = await trio.run_process(
                        list(secret.check), env=env, check=False,
                        stdin=b"", capture_stdout=True, capture_stderr=True,
                    )
            except trio.TooSlowError:
                state.check_failures += 1
                raise CheckFailed(f"{secret.name}: check timed out") from None
            except OSError as exc:
                state.check_failures += 1
                raise CheckFailed(f"{secret.name}: check cannot run: {exc.strerror}") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if result.returncode != 0:
            state.check_failures += 1
            raise CheckFailed(f"{secret.name}: check exited with status {result.returncode}; "
                              "keeping the previous value")

    # --- helpers --------------------------------------------------------------------------------

    def _later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is None:
            return

        async def task() -> None:
            await trio.sleep(delay)
            await fn(*args)

        self._nursery.start_soon(task)


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value)

