"""One agent's secret kinds at work (decision 4): the refresher calls in here.

Theory of operation: ``Kinds.fetch(secret)`` is one refresh step for any kind and returns the
``SecretValue`` the refresher stores; ``Kinds.next_delay(secret, default)`` says when the next
step is due. Both look the secret's kind up in ``registry.KINDS`` and hand it the secret's state
(``Kind.State``, created on first use) and this object as its ``base.Runtime``. The refresher
keeps its single-flight, backoff and staleness rules for every kind; what differs per kind lives
in the kind's module (``kv``, ``pki``, ``leased``).

For every kind, here:

- the ``check`` hook (``check.run_check``), counted in the status as ``check_failures``;
- anomaly signals (``observe``): each new value's keyed HMAC fingerprint (under a per-process key,
  never the plaintext) is compared with the last few; a match is a reuse alarm. A change sooner
  than ``expect_rotation_every`` after the previous change is a rotation-frequency alarm. Both
  are a warning log and a counter in ``status``;
- the leases' life across tokens and restarts: ``follow_token`` moves leases to a new login
  token, ``export_leases``/``restore_leases`` carry them through the snapshot, and at a clean
  shutdown ``revoke_on_shutdown`` leases are revoked;
- every kind's schedule state across restarts (decision 12): ``export_states`` gives each
  secret's ``Kind.export_state`` tagged with its kind and a digest of the config it was obtained
  under (kind, path, version pin, params), and ``restore_states`` takes back only those whose
  tag still matches the config (a changed ``params`` or path is fetched anew, at its phase).
  ``restored_delay`` is then the first step of a restored value.

Delayed revocations run in ``run()``'s nursery (started by the refresher); cancelling it drops
the pending ones (OpenBao expires the leases on its own).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import trio

from agentd import jsonnum
from agentd.cache import Cache
from agentd.config import SecretConfig
from agentd.crypto import Sealer
from agentd.errors import CheckFailed, UpstreamError
from agentd.kinds.base import Kind, KindState
from agentd.kinds.check import run_check
from agentd.kinds.leased import LeaseRecord, LeaseState, revoke_lease
from agentd.kinds.registry import KINDS
from agentd.upstream import SecretValue, Upstream

if TYPE_CHECKING:
    from agentd.auth import Authenticator

log = logging.getLogger("agentd.kinds")

SHUTDOWN_REVOKE_TIMEOUT = 5.0


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
        # the refresher's: marks a secret revoked (answered not_found); see revoke()
        self.on_revoked: Callable[[str], None] | None = None

    # --- base.Runtime -------------------------------------------------------------------------

    @property
    def upstream(self) -> Upstream:
        return self._upstream

    @property
    def cache(self) -> Cache:
        return self._cache

    @property
    def rng(self) -> random.Random:
        return self._rng

    def now(self) -> float:
        return self._clock()

    def owner(self, token: str | None) -> bytes | None:
        return None if token is None else self._fingerprinter.fingerprint(token.encode())

    def fingerprint(self, data: Mapping[str, Any]) -> bytes:
        # the cache's packing: a number's kept text (-0 vs 0) is part of the value
        return self._fingerprinter.fingerprint(jsonnum.packb(data))

    async def check(self, secret: SecretConfig, data: Mapping[str, Any]) -> None:
        try:
            await run_check(secret, data)
        except CheckFailed:
            self._state(secret).check_failures += 1
            raise

    def later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is None:
            return

        async def task() -> None:
            await trio.sleep(delay)
            await fn(*args)

        self._nursery.start_soon(task)

    def revoke(self, name: str) -> None:
        self._cache.remove(name)
        if self.on_revoked is not None:
            self.on_revoked(name)

    # --- states -------------------------------------------------------------------------------

    def state(self, name: str) -> KindState:
        """What ``name``'s kind remembers (a fresh common part if nothing yet)."""
        return self._states.get(name) or KindState()

    def _state(self, secret: SecretConfig) -> Any:
        """``secret``'s state, of its kind's ``State`` type (Any: the kind's own type)."""
        state = self._states.get(secret.name)
        if state is None:
            state = self._states[secret.name] = _kind(secret).State()
        return state

    def forget(self, name: str) -> None:
        """Drop what is known about ``name`` (removed from the config or moved upstream)."""
        self._states.pop(name, None)
        self._secrets.pop(name, None)

    def status(self, secret: SecretConfig) -> dict[str, Any]:
        state = self._state(secret)
        kind = _kind(secret)
        out = kind.status(secret, state)
        out["next_step"] = kind.next_step(state)
        out["anomalies"] = {"reuse": state.reuse_alarms, "rotation": state.rotation_alarms}
        if secret.check:
            out["check_failures"] = state.check_failures
        return out

    # --- schedule state across restarts -------------------------------------------------------

    def export_states(self) -> dict[str, dict[str, Any]]:
        """Each secret's schedule state for the snapshot (plain msgpack types, never a value):
        ``{"kind", "config", "state"}`` by secret name, for secrets whose kind keeps one."""
        out: dict[str, dict[str, Any]] = {}
        for name, state in self._states.items():
            secret = self._secrets.get(name)
            if secret is None:
                continue
            saved = _kind(secret).export_state(state)
            if saved is not None:
                out[name] = {"kind": secret.kind, "config": config_digest(secret),
                             "state": saved}
        return out

    def restore_states(self, saved: Mapping[str, Mapping[str, Any]],
                       secrets: Mapping[str, SecretConfig]) -> list[str]:
        """Take back states from the snapshot for the declared ``secrets`` they were obtained
        under; a state for another kind or config, or a malformed one, is dropped (logged).
        Returns the names restored."""
        restored: list[str] = []
        for name, item in saved.items():
            secret = secrets.get(name)
            if secret is None:
                continue
            if item.get("kind") != secret.kind or item.get("config") != config_digest(secret):
                log.info("the snapshot's schedule state is for another config; fetched anew",
                         extra={"secret": name})
                continue
            state = item.get("state")
            try:
                if not isinstance(state, Mapping):
                    raise ValueError("not a map")
                kept = _kind(secret).restore_state(state)
            except ValueError as exc:
                log.warning("malformed schedule state in the snapshot; ignored",
                            extra={"secret": name, "error": str(exc)})
                continue
            old = self._states.get(name)
            if old is not None:      # keep what the common part counted
                for common in fields(KindState):
                    setattr(kept, common.name, getattr(old, common.name))
            self._states[name] = kept
            self._secrets[name] = secret
            restored.append(name)
        return restored

    def restored_delay(self, secret: SecretConfig, *, fetched_at: float, default: float,
                       spread: float) -> float:
        """Seconds until the first step of ``secret``'s value restored from the snapshot
        (``Kind.restored_delay``): its own due point, or ``spread`` when already due."""
        return _kind(secret).restored_delay(self, secret, self._state(secret),
                                            fetched_at=fetched_at, default=default,
                                            spread=spread)

    def restored_current(self, secret: SecretConfig, *, fetched_at: float) -> bool:
        """True when ``secret``'s restored state (and ``fetched_at``) vouch for its value until
        the next step."""
        return _kind(secret).restored_current(secret, self._state(secret), self._clock(),
                                              fetched_at=fetched_at)

    # --- leases -------------------------------------------------------------------------------

    def _leases(self) -> list[tuple[str, LeaseState]]:
        return [(n, s) for n, s in self._states.items() if isinstance(s, LeaseState)]

    def holds_leases(self) -> bool:
        """True while some leased secret holds a lease (the login token must then live on)."""
        return any(state.lease_id for _, state in self._leases())

    def export_leases(self) -> dict[str, LeaseRecord]:
        """The live leases, for the snapshot: they must outlive a restart with their token."""
        now = self._clock()
        records = {name: state.record(now) for name, state in self._leases()}
        return {name: record for name, record in records.items() if record is not None}

    def restore_leases(self, leases: Mapping[str, LeaseRecord],
                       secrets: Mapping[str, SecretConfig], *, token: str | None) -> list[str]:
        """Take over leases from the snapshot (created under ``token``, the sealed login token)
        so they are renewed, moved to a new token or revoked like any other, never orphaned.
        Only declared leased secrets; returns their names."""
        owner = self.owner(token)
        taken: list[str] = []
        for name, record in leases.items():
            secret = secrets.get(name)
            if secret is None or not issubclass(_kind(secret).State, LeaseState):
                continue
            self._state(secret).take_over(record, owner)
            self._secrets[name] = secret
            taken.append(name)
        return taken

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
                for name, state in self._leases():
                    secret = self._secrets.get(name)
                    if secret is not None and secret.revoke_on_shutdown and state.lease_id:
                        await revoke_lease(self, name, state.lease_id)
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
            owner = self.owner(token)
            for name in list(self._secrets):
                # A step already in flight (with the old token) is joined by refresh(): look
                # again after it and run one more if the lease is still under the old token.
                for _ in range(3):
                    state = self._states.get(name)
                    if not isinstance(state, LeaseState) or not state.under_other_token(owner):
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

        ``token`` is the login token this step runs with and ``token_expires_at`` its expiry
        (a lease lives only as long as the token that created it: see ``leased``).

        Raises UpstreamError subclasses (CheckFailed, CertificateRejected for values refused
        here); the value being served is not touched except when a lease is known to be gone.
        """
        self._secrets[secret.name] = secret
        return await _kind(secret).fetch(self, secret, self._state(secret), token=token,
                                         token_expires_at=token_expires_at)

    def next_delay(self, secret: SecretConfig, default: float) -> float:
        """Seconds until the next step after a successful one (``default``: kv polling)."""
        return _kind(secret).next_delay(self, secret, self._state(secret), default)

    def observe(self, secret: SecretConfig, data: Mapping[str, Any]) -> None:
        """Anomaly signals for a new value just stored (see the module docstring)."""
        state = self._state(secret)
        digest = self.fingerprint(data)
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


def _kind(secret: SecretConfig) -> Kind[Any]:
    return KINDS[secret.kind]


def config_digest(secret: SecretConfig) -> str:
    """What a secret's state was obtained under: its kind, path, version pin and params."""
    what = [secret.kind, secret.path, secret.version, dict(secret.params)]
    text = json.dumps(what, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]
