"""``pki``: a certificate issued by a write to ``path`` (``pki/issue/ROLE``) with ``params``.

The reply must pass ``crypto.check_certificate`` (key matches the certificate, chain verifies up
to the issuing CA, validity covers now give or take the clock skew) and the ``check`` program
before it may replace the served pair; otherwise the step fails and the old pair stays served
until it expires. Re-issue is due at ``renew_at`` of the lifetime (issue time to not_after), +-5%
of the lifetime as jitter. With ``revoke_previous`` the replaced serial is revoked ``grace``
after the new pair was stored.

The state (serial, issue time, not_after) goes into the snapshot, so after a restart a
certificate is re-issued at its own re-issue point (with this host's jitter), not at start
(decision 12), and a restored certificate still within its validity is served as current.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from agentd.crypto import CertificateInfo, check_certificate
from agentd.errors import CertificateRejected, CryptoError, PermanentError, UpstreamError
from agentd.kinds.base import MIN_DELAY, Grant, Kind, KindState, Runtime, human_duration
from agentd.upstream import SecretValue

if TYPE_CHECKING:
    from agentd.config import SecretConfig

log = logging.getLogger("agentd.kinds")

PKI_JITTER = 0.05            # +- this fraction of a certificate's lifetime
KEPT_FIELDS = ("certificate", "private_key", "private_key_type", "issuing_ca", "ca_chain",
               "serial_number", "expiration")


@dataclass
class PkiState(KindState):
    """The certificate being served: its serial and lifetime."""

    serial: str | None = None
    issued_at: float | None = None
    not_after: float | None = None


def mount_of(path: str) -> str:
    """``pki/issue/web`` -> ``pki`` (the PKI mount a revoke goes to)."""
    for verb in ("/issue/", "/sign/"):
        if verb in path:
            return path.rsplit(verb, 1)[0]
    return path.split("/", 1)[0]


class Pki(Kind[PkiState]):
    name: ClassVar[str] = "pki"
    config_keys: ClassVar[tuple[str, ...]] = ("params", "renew_at", "revoke_previous", "grace")
    State = PkiState

    async def fetch(self, rt: Runtime, secret: SecretConfig, state: PkiState, *,
                    token: str | None, token_expires_at: float | None) -> SecretValue:
        reply = await rt.upstream.request("POST", secret.path, json=dict(secret.params))
        data = reply.get("data")
        if not isinstance(data, dict):
            raise PermanentError(f"POST {secret.path}: reply has no data object")
        now = rt.now()
        info = _verify(secret, data, now)
        await rt.check(secret, data)
        previous = state.serial
        state.serial, state.issued_at, state.not_after = info.serial, now, info.not_after
        log.info("certificate issued", extra={"secret": secret.name, "serial": info.serial,
                                               "not_after": info.not_after})
        if secret.revoke_previous and previous and previous != info.serial:
            rt.later(secret.grace, _revoke_serial, rt, secret, previous)
        kept = {k: data[k] for k in KEPT_FIELDS if k in data}
        return SecretValue(data=kept, version=None, expires_at=info.not_after)

    def next_delay(self, rt: Runtime, secret: SecretConfig, state: PkiState,
                   default: float) -> float:
        if state.not_after is None or state.issued_at is None:
            return default
        life = max(0.0, state.not_after - state.issued_at)
        jitter = rt.rng.uniform(-PKI_JITTER, PKI_JITTER)
        fraction = min(max(secret.renew_at + jitter, 0.05), 0.95)
        due = state.issued_at + life * fraction
        return max(MIN_DELAY, due - rt.now())

    def export_state(self, state: PkiState) -> dict[str, Any] | None:
        if state.serial is None or state.issued_at is None or state.not_after is None:
            return None
        return {"serial": state.serial, "issued_at": state.issued_at,
                "not_after": state.not_after}

    def restore_state(self, saved: Mapping[str, Any]) -> PkiState:
        serial, issued_at, not_after = (saved.get(k) for k in ("serial", "issued_at",
                                                               "not_after"))
        if not (isinstance(serial, str) and isinstance(issued_at, (int, float))
                and isinstance(not_after, (int, float))):
            raise ValueError("malformed pki state")
        return PkiState(serial=serial, issued_at=float(issued_at), not_after=float(not_after))

    def restored_delay(self, rt: Runtime, secret: SecretConfig, state: PkiState, *,
                       fetched_at: float, default: float, spread: float) -> float:
        if state.not_after is None:      # nothing known (a snapshot from before issue 16)
            return spread
        return max(self.next_delay(rt, secret, state, default), spread)

    def restored_current(self, secret: SecretConfig, state: PkiState, now: float, *,
                         fetched_at: float) -> bool:
        """Valid and not yet at its re-issue point (one past it is stale until re-issued)."""
        if state.not_after is None or state.issued_at is None:
            return False
        reissue_at = state.issued_at + (state.not_after - state.issued_at) * secret.renew_at
        return now < min(reissue_at, state.not_after)

    def status(self, secret: SecretConfig, state: PkiState) -> dict[str, Any]:
        return {"serial": state.serial, "expires_at": state.not_after}

    def next_step(self, state: PkiState) -> str:
        return "issue" if state.serial is None else "re-issue"

    def schedule(self, secret: SecretConfig) -> str:
        text = f"re-issue at {secret.renew_at:.0%} of the certificate lifetime (+-5%)"
        if secret.revoke_previous:
            text += f"; previous serial revoked after {human_duration(secret.grace)}"
        return text

    def grants(self, secret: SecretConfig) -> Iterable[Grant]:
        yield Grant(secret.path, ("create", "update"), f"secret {secret.name} (pki issue)")
        if secret.revoke_previous:
            yield Grant(f"{mount_of(secret.path)}/revoke", ("update",),
                        f"revoke {secret.name}'s replaced certificates")


def _verify(secret: SecretConfig, data: Mapping[str, Any], now: float) -> CertificateInfo:
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


async def _revoke_serial(rt: Runtime, secret: SecretConfig, serial: str) -> None:
    path = f"{mount_of(secret.path)}/revoke"
    try:
        reply = await rt.upstream.request("POST", path, json={"serial_number": serial})
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
