"""``leased``: a read that returns a lease (dynamic database users and the like).

Later steps renew it (``sys/leases/renew/ID``) at ``renew_at`` of the lease; when a renewal is
refused, comes back capped (the max TTL is near) or the lease is not renewable, the next step
reads a new credential and the old lease is revoked ``grace`` after the new one went live. A
lease OpenBao says is gone ("lease not found") is treated as revoked: the cached value is dropped
at once, the secret answers ``not_found`` (``Runtime.revoke``) until a new credential is read,
and one is read in the same step. OpenBao revokes a lease with the token that created it, so
a lease created under an earlier login token is replaced by one under the current token, and the
next step is due before the token's end.

At a clean shutdown leases are revoked only for ``revoke_on_shutdown = true``; the others go into
the snapshot as ``LeaseRecord`` (``Kinds.export_leases``) and a restarted agent takes them over
(``Kinds.restore_leases``) with the login token that created them, so they are renewed, not
re-read, at their own renewal point (``restored_delay``; decision 12), served stale until then.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from agentd.errors import CheckFailed, PermanentError, UpstreamError, UpstreamNotFound
from agentd.kinds.base import MIN_DELAY, Grant, Kind, KindState, Runtime, human_duration
from agentd.upstream import SecretValue

if TYPE_CHECKING:
    from agentd.config import SecretConfig

log = logging.getLogger("agentd.kinds")

RENEW_CAPPED_SLACK = 2.0     # a renewal this much shorter than asked for hit the max TTL
_GONE = ("lease not found", "invalid lease", "lease expired")


@dataclass(frozen=True)
class LeaseRecord:
    """A leased secret's lease as the snapshot keeps it (sealed; ``repr()`` hides the id)."""

    lease_id: str = field(repr=False)
    lease_duration: float
    expires_at: float
    renewed_at: float | None
    renewable: bool


@dataclass
class LeaseState(KindState):
    """The lease being served, and the login token it was created under."""

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

    def record(self, now: float) -> LeaseRecord | None:
        """The lease for the snapshot, if one is live at ``now``."""
        if not self.lease_id or self.lease_expires_at is None or self.lease_expires_at <= now:
            return None
        return LeaseRecord(lease_id=self.lease_id, lease_duration=self.lease_duration,
                           expires_at=self.lease_expires_at,
                           renewed_at=self.lease_renewed_at, renewable=self.renewable)

    def take_over(self, record: LeaseRecord, owner: bytes | None) -> None:
        """Hold the lease ``record`` from the snapshot, created under the token ``owner``."""
        self.lease_id = record.lease_id
        self.lease_duration = record.lease_duration
        self.lease_expires_at = record.expires_at
        self.lease_renewed_at = record.renewed_at
        self.renewable = record.renewable
        self.lease_token = owner

    def under_other_token(self, owner: bytes | None) -> bool:
        """True while a lease is held under a known token other than ``owner``."""
        return self.lease_id is not None and self.lease_token not in (None, owner)


class Leased(Kind[LeaseState]):
    name: ClassVar[str] = "leased"
    config_keys: ClassVar[tuple[str, ...]] = ("renew_at", "grace", "revoke_on_shutdown")
    State = LeaseState

    async def fetch(self, rt: Runtime, secret: SecretConfig, state: LeaseState, *,
                    token: str | None, token_expires_at: float | None) -> SecretValue:
        state.token_expires_at = token_expires_at
        owner = rt.owner(token)
        moved = state.lease_token is not None and state.lease_token != owner
        if state.lease_id is not None and owner is not None and moved:
            log.info("the login token changed; moving the lease to the new token",
                     extra={"secret": secret.name})
            state.reissue = True
        state.lease_token = owner
        leased = await self._renew_or_read(rt, secret, state)
        if leased is not None:
            return leased
        # Renewed: the same data with the lease's new expiry.
        entry = rt.cache.get(secret.name)
        if entry is None:
            return await self._read(rt, secret, state)
        return SecretValue(data=entry.data, version=None, expires_at=state.lease_expires_at)

    def next_delay(self, rt: Runtime, secret: SecretConfig, state: LeaseState,
                   default: float) -> float:
        if state.lease_expires_at is None:
            return default
        now = rt.now()
        start = state.lease_renewed_at if state.lease_renewed_at is not None else now
        left = max(0.0, state.lease_expires_at - start)
        due = start + left * secret.renew_at
        if state.token_expires_at is not None and state.token_expires_at > now:
            # The lease dies with its token: look again before the token's end.
            due = min(due, now + (state.token_expires_at - now) * secret.renew_at)
        return max(MIN_DELAY if left > 3 * MIN_DELAY else 0.2, due - now)

    def restored_delay(self, rt: Runtime, secret: SecretConfig, state: LeaseState, *,
                       fetched_at: float, default: float, spread: float) -> float:
        """A restored lease is renewed at its own renewal point (decision 12); one already due
        at this host's phase, but within the first third of the time it has left."""
        if state.lease_id is None or state.lease_expires_at is None:
            return spread                # no lease taken over: a new credential is read
        due = self.next_delay(rt, secret, state, default)
        left = state.lease_expires_at - rt.now()
        return max(due, min(spread, left / 3))

    def next_step(self, state: LeaseState) -> str:
        return "renew" if state.lease_id and state.renewable and not state.reissue else "read"

    def status(self, secret: SecretConfig, state: LeaseState) -> dict[str, Any]:
        return {"lease_expires_at": state.lease_expires_at, "renewals": state.renewals,
                "reissues": state.reissues, "renewable": state.renewable}

    def schedule(self, secret: SecretConfig) -> str:
        return (
            f"renew at {secret.renew_at:.0%} of the lease; new credential near max TTL, "
            f"old lease revoked after {human_duration(secret.grace)}"
        )

    def grants(self, secret: SecretConfig) -> Iterable[Grant]:
        name, path = secret.name, secret.path
        return [
            Grant(path, ("read",), f"secret {name} (leased)"),
            Grant(f"sys/leases/renew/{path}/*", ("update",), f"renew {name}'s leases"),
            Grant(f"sys/leases/revoke/{path}/*", ("update",), f"revoke {name}'s leases"),
        ]

    async def _renew_or_read(self, rt: Runtime, secret: SecretConfig,
                             state: LeaseState) -> SecretValue | None:
        """A renewal (None: same data) or a new credential."""
        have = rt.cache.info(secret.name) is not None
        if state.lease_id is None or state.reissue or not state.renewable or not have:
            return await self._read(rt, secret, state)
        increment = max(1.0, state.lease_duration)
        try:
            # The lease id in the path (not the body) lets the upstream policy grant renewals
            # of this secret's leases only (catalog.upstream_policy).
            reply = await rt.upstream.request(
                "PUT", f"sys/leases/renew/{state.lease_id}", json={"increment": int(increment)}
            )
        except PermanentError as exc:
            if isinstance(exc, UpstreamNotFound) or any(g in str(exc) for g in _GONE):
                # OpenBao says the lease is gone: the credential no longer works (decision 5).
                log.warning("lease is gone upstream; dropping the credential and reading anew",
                            extra={"secret": secret.name, "error": str(exc)})
                state.lease_id = None
                rt.revoke(secret.name)      # not_found until a new credential is read
            else:
                log.info("lease renewal refused; reading a new credential",
                         extra={"secret": secret.name, "error": str(exc)})
            return await self._read(rt, secret, state)
        now = rt.now()
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

    async def _read(self, rt: Runtime, secret: SecretConfig, state: LeaseState) -> SecretValue:
        reply = await rt.upstream.request("GET", secret.path)
        data = reply.get("data")
        lease_id = reply.get("lease_id")
        if not isinstance(data, dict):
            raise PermanentError(f"GET {secret.path}: reply has no data object")
        if not isinstance(lease_id, str) or not lease_id:
            raise PermanentError(f"GET {secret.path}: reply holds no lease (use kind kv1?)")
        now = rt.now()
        duration = _number(reply.get("lease_duration"))
        try:
            await rt.check(secret, data)
        except CheckFailed:
            await revoke_lease(rt, secret.name, lease_id)   # never leave a refused user behind
            raise
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
            rt.later(secret.grace, revoke_lease, rt, secret.name, previous)
        return SecretValue(data=data, version=None, expires_at=now + duration,
                           lease_id=lease_id, lease_duration=duration,
                           renewable=state.renewable)


async def revoke_lease(rt: Runtime, name: str, lease_id: str) -> None:
    """Revoke ``lease_id`` of secret ``name`` (errors logged, never raised)."""
    try:
        await rt.upstream.request("PUT", f"sys/leases/revoke/{lease_id}", json={})
    except UpstreamError as exc:
        log.warning("lease revoke failed", extra={"secret": name, "error": str(exc)})
    else:
        log.info("previous lease revoked", extra={"secret": name})


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value)
