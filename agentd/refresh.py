"""Per-secret schedules: fetch at start, poll every ``refresh`` with jitter, back off on failure.

Theory of operation: ``Refresher.run`` starts one task per declared secret. What one step does
and when the next is due differ per kind (poll, issue a certificate, renew or re-read a lease):
that lives in ``agentd.kinds`` (``Kinds``); this module keeps the schedule, single-flight and
failure rules.
Each task waits for a token, fetches its secret through ``Cache.single_flight`` (so an admin
``refresh`` racing the poll makes one upstream request, not two), stores it, and sleeps
``refresh`` +-10% (or what its kind says). Failures never
remove a value on their own (decision 5):

- TransientError (connection, timeout, 5xx, 429, sealed): the cached value is marked stale and the
  task retries with full-jitter backoff, honouring Retry-After;
- AuthError: the token is handed back to the authenticator (``invalidate``) to log in again; the
  value is kept (stale); a second 403 in a row (after a fresh login or a token check) is a policy
  refusal upstream: logged as an error and raised as an alert (``policy_denied``), never a
  revocation;
- UpstreamNotFound: positive evidence that the secret was deleted upstream: the entry is dropped and
  ``get`` answers ``not_found`` until the secret comes back. A KV v2 deletion or destroy marker
  (``UpstreamDeleted``) is evidence at once; a plain 404 on a value being served is evidence only
  once a second request ``NOT_FOUND_CONFIRM`` later says 404 too (one stray 404, say from a
  node that has not loaded the mount yet after a restart, does not wipe a secret; decision 5);
- any other PermanentError: kept stale, logged, retried with backoff at the cap.

Schedules are spread per host (decision 9): the daemon seeds ``rng`` with the host id. A secret
that already has a value when its task starts (restored from the snapshot, or kept over a reload)
takes its first step where its kind's restored state puts it (``Kinds.restored_delay``, decision
12): a certificate at its own re-issue point, a lease at its renewal point, a KV secret one
``refresh`` after its ``fetched_at``; a step already due waits a random phase within
``RESTORED_SPREAD`` (or its ``refresh``), so a restart makes no burst. ``restore`` takes the
snapshot's states back at start; a value whose restored state vouches for it (a certificate
within its validity, a KV value younger than its ``refresh``) is served as current, not stale,
until its step.

After an outage (decision 9) the fleet must not come back in step. Each poll tells the upstream
how far it may be spread after a recovery (``spread_recovery``): one ``refresh``, or less when the
value would otherwise pass its ``max_stale`` or expiry (half the time left), and nothing for a
secret with no value to serve, which is fetched first. A poll held over the outage then goes out
at a random phase within that window after the recovery; one whose request was in flight and
completed with the recovery (all of them at once) takes its next step at a fresh random phase,
``uniform(0, refresh)``, instead of ``refresh`` +-10%, so the phases the outage lined up are
spread again. A secret sleeping in its backoff after a transient failure (or failing just after
the recovery, while the cluster settles) is woken by the recovery and polled at its own random
phase within that window too, instead of at the end of a backoff that may have grown to
``backoff_max``. So every secret is polled about once within a ``refresh`` of the recovery, at a
random phase, and is fresh again by then.

``wait_all_fetched()`` returns once every secret has a value (the readiness condition of
decision 10; the daemon bounds it by ``ready_timeout``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from agentd.auth import Authenticator
from agentd.backoff import Backoff, jittered
from agentd.cache import Cache, stale_deadline
from agentd.config import Config, SecretConfig
from agentd.errors import (
    AuthError,
    PermanentError,
    TransientError,
    UpstreamDeleted,
    UpstreamError,
    UpstreamNotFound,
)
from agentd.kinds import Kinds
from agentd.upstream import Upstream, spread_recovery

log = logging.getLogger("agentd.refresh")

RESTORED_SPREAD = 30.0   # restored secrets first refresh within this long (or their `refresh`)
NOT_FOUND_CONFIRM = 1.0  # a plain 404 on a served value is asked again after 1-2x this long
WAKE_SLOT = 0.02         # refresh wake-ups are rounded to a multiple of this (seconds)


def wake_slot(when: float) -> float:
    """``when`` (trio clock) rounded to the nearest ``WAKE_SLOT`` boundary (to the nearest, not
    up: the mean interval, and so the request rate and the time to see a change, stay as set).

    A thousand secrets on a 1 s refresh, each with its own jitter, would wake the loop a
    thousand separate times a second, each for one request and its reply. Sharing 20 ms slots
    lets one wake-up send the requests that fall in it together (and take their replies
    together), which costs far less CPU; 20 ms is nothing next to the jitter, whose point is to
    spread a fleet over seconds, not milliseconds.
    """
    return round(when / WAKE_SLOT) * WAKE_SLOT


@dataclass
class SecretState:
    """Mutable bookkeeping of one secret's schedule (not the value: that lives sealed in Cache)."""

    name: str
    revoked: bool = False
    failures: int = 0
    last_error: str | None = None
    last_attempt: float | None = None
    next_attempt: float | None = None     # trio clock
    fetched: trio.Event | None = None
    denials: int = 0                      # consecutive 403s
    policy_denied: bool = False           # alert: 403s survived a fresh login / token check
    from_snapshot: bool = False           # the value served came from the snapshot at start
    unconfirmed_404: bool = False         # a plain 404 on a served value, to be asked again

    def as_status(self) -> dict[str, Any]:
        return {
            "revoked": self.revoked,
            "from_snapshot": self.from_snapshot,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_attempt": self.last_attempt,
            "policy_denied": self.policy_denied,
        }


class Refresher:
    """Keeps the cache filled with the declared secrets; ``run`` lives in a nursery."""

    def __init__(
        self,
        config: Config,
        upstream: Upstream,
        auth: Authenticator,
        cache: Cache,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        # schedule phases and backoff jitter; the daemon seeds it with the host id (decision 9)
        self._rng = rng or random.Random()
        self._upstream = upstream
        self._auth = auth
        self._cache = cache
        self._clock = clock
        # per-kind steps (agentd/kinds/); their jitter is spread per host too
        self.kinds = Kinds(upstream, cache, clock=clock, rng=self._rng)
        self.kinds.on_revoked = self._revoked
        self.states: dict[str, SecretState] = {
            name: SecretState(name=name, fetched=trio.Event()) for name in config.secrets
        }
        self._scopes: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None   # lives exactly as long as run()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Poll every declared secret until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await nursery.start(self.kinds.run)
                nursery.start_soon(self.kinds.follow_token, self._auth, self.refresh)
                for secret in self._config.secrets.values():
                    self._start(secret)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def _start(self, secret: SecretConfig) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._scopes[secret.name] = scope

        async def poll() -> None:
            with scope:
                await self._poll(secret)

        self._nursery.start_soon(poll, name=f"refresh:{secret.name}")

    def apply_config(self, config: Config) -> None:
        """Switch to a new config: start new secrets, stop removed ones, restart changed ones.

        A secret whose kind or path changed is dropped from the cache first (its old value
        belongs to another upstream object); one whose schedule changed keeps its value.
        """
        old = self._config
        self._config = config
        for name, secret in old.secrets.items():
            new = config.secrets.get(name)
            if new == secret:
                continue
            self._scopes.pop(name).cancel()
            if new is None or (new.kind, new.path, new.version) != (
                secret.kind, secret.path, secret.version
            ):
                self._cache.remove(name)
                self.states.pop(name, None)
                self.kinds.forget(name)
        for name, secret in config.secrets.items():
            if old.secrets.get(name) == secret:
                continue
            self.states.setdefault(name, SecretState(name=name, fetched=trio.Event()))
            if self._nursery is not None:
                self._start(secret)

    async def wait_all_fetched(self) -> None:
        """Return once every declared secret has been fetched at least once."""
        for state in list(self.states.values()):
            assert state.fetched is not None
            await state.fetched.wait()

    def mark_restored(self, names: list[str]) -> None:
        """Names restored from the snapshot count as fetched for readiness (decision 10)."""
        for name in names:
            state = self.states.get(name)
            if state is not None and state.fetched is not None:
                state.fetched.set()
                state.from_snapshot = True

    def restore(self, names: list[str], states: Mapping[str, Mapping[str, Any]],
                revoked: Iterable[str] = ()) -> None:
        """At start, before ``run``: ``names`` were restored from the snapshot with the schedule
        ``states`` (``Snapshot.restored_states``). Their kinds take the states back, so each
        first step is computed from them, and a value its state vouches for is served as
        current (not stale) until that step. ``revoked`` were revoked on evidence before the
        restart: they answer ``not_found`` until the upstream gives them a value again."""
        self.mark_restored(names)
        self.kinds.restore_states(states, self._config.secrets)
        for name in names:
            secret = self._config.secrets.get(name)
            info = self._cache.info(name)
            if secret is not None and info is not None and self.kinds.restored_current(
                    secret, fetched_at=info.fetched_at):
                self._cache.mark_current(name)
        for name in revoked:
            state = self.states.get(name)
            if state is not None and state.fetched is not None and \
                    self._cache.info(name) is None:
                state.revoked = True
                state.fetched.set()          # a known answer (not_found) counts for readiness

    def revoked_names(self) -> list[str]:
        """The secrets revoked on evidence (for the snapshot)."""
        return sorted(name for name, state in self.states.items() if state.revoked)

    def _revoked(self, name: str) -> None:
        """A kind saw evidence that ``name``'s value is gone upstream (and dropped it)."""
        state = self.states.get(name)
        if state is not None:
            state.revoked = True
            state.from_snapshot = False

    @property
    def policy_denied(self) -> list[str]:
        """Secrets whose reads are refused (403) with a token the upstream accepts: an alert."""
        return sorted(name for name, state in self.states.items() if state.policy_denied)

    def is_revoked(self, name: str) -> bool:
        state = self.states.get(name)
        return state is not None and state.revoked

    async def refresh(self, name: str) -> int:
        """Fetch ``name`` from the upstream now and store it; return the cached version.

        Raises UpstreamError subclasses (the caller decides what to tell its client).
        """
        secret = self._config.secrets[name]
        return await self._cache.single_flight(name, lambda: self._fetch(secret))

    async def _fetch(self, secret: SecretConfig) -> int:
        state = self.states[secret.name]
        with trio.move_on_after(self._config.upstream.timeout) as waited:
            token = await self._auth.wait_for_token()
        if waited.cancelled_caught:
            # Due, and no token to ask with (a restart with the upstream down: the restored
            # token cannot be checked): a value served as current stops being so.
            self._cache.mark_stale(secret.name, since=self._clock())
            token = await self._auth.wait_for_token()
        state.last_attempt = self._clock()
        try:
            value = await self.kinds.fetch(
                secret, token=token, token_expires_at=self._auth.statistics().expires_at
            )
        except AuthError:
            self._auth.invalidate(token)
            raise
        first = self._cache.info(secret.name) is None
        try:
            changed = self._cache.put(
                secret.name,
                value.data,
                version=value.version,
                fetched_at=self._clock(),
                expires_at=value.expires_at,
            )
        except (TypeError, ValueError, OverflowError) as exc:
            # A value the cache cannot pack is this secret's error, not the agent's end
            # (jsonnum keeps what the upstream sends within bounds; this is the net under it).
            # The exception's text may quote the value: only its type is kept.
            raise PermanentError(f"{secret.path}: the upstream's value cannot be stored "
                                 f"({type(exc).__name__})") from None
        info = self._cache.info(secret.name)
        assert info is not None
        if changed:
            self.kinds.observe(secret, value.data)
            # The first value of each secret at a start is not news (a thousand lines for a
            # thousand secrets; "agentd ready" sums them up); a change is.
            log.log(logging.DEBUG if first else logging.INFO,
                    "secret fetched" if first else "secret updated",
                    extra={"secret": secret.name, "version": info.version})
        if state.revoked:
            log.info("secret is back upstream", extra={"secret": secret.name})
        state.revoked = False
        state.from_snapshot = False
        state.unconfirmed_404 = False
        state.failures = 0
        state.last_error = None
        state.denials = 0
        state.policy_denied = False
        assert state.fetched is not None
        state.fetched.set()
        return info.version

    async def _poll(self, secret: SecretConfig) -> None:
        cfg = self._config.upstream
        backoff = Backoff(cfg.backoff_min, cfg.backoff_max, rng=self._rng)
        state = self.states[secret.name]
        info = self._cache.info(secret.name)
        if info is not None:
            # restored from the snapshot (or kept over a reload): the first step where the
            # kind's state puts it, or at this secret's own phase when already due, not all
            # at once with the others
            first = self.kinds.restored_delay(
                secret, fetched_at=info.fetched_at,
                default=jittered(secret.refresh, rng=self._rng),
                spread=self._rng.uniform(0.0, min(secret.refresh, RESTORED_SPREAD)))
            state.next_attempt = wake_slot(trio.current_time() + first)
            await trio.sleep_until(state.next_attempt)
        while True:
            recoveries = self._upstream.recoveries
            try:
                with spread_recovery(self._recovery_spread(secret), self._rng) as hold:
                    await self.refresh(secret.name)
            except TransientError as exc:
                delay = backoff.next_delay(at_least=exc.retry_after or 0.0)
                self._failed(state, exc, delay)
                now = trio.current_time()
                await self._sleep_or_recovery(secret, state, wake_slot(now + delay), recoveries,
                                              not_before=now + (exc.retry_after or 0.0))
                continue
            except UpstreamNotFound as exc:
                if self._to_confirm(state, exc):
                    delay = self._rng.uniform(NOT_FOUND_CONFIRM, 2 * NOT_FOUND_CONFIRM)
                    state.next_attempt = wake_slot(trio.current_time() + delay)
                    await trio.sleep_until(state.next_attempt)
                    continue
                # Positive evidence of deletion (decision 5): stop serving it at once.
                state.from_snapshot = False
                if self._cache.remove(secret.name) or not state.revoked:
                    log.warning(
                        "secret deleted upstream, no longer served",
                        extra={"secret": secret.name, "error": str(exc)},
                    )
                state.revoked = True
                assert state.fetched is not None
                state.fetched.set()      # a known answer (not_found) counts for readiness
                delay = jittered(secret.refresh, rng=self._rng)
                state.last_error = str(exc)
            except AuthError as exc:
                delay = backoff.next_delay()
                self._denied(state, exc)
                self._failed(state, exc, delay)
            except (PermanentError, UpstreamError) as exc:
                delay = backoff.next_delay()
                self._failed(state, exc, delay)
            else:
                backoff.reset()
                default = jittered(secret.refresh, rng=self._rng)
                if hold.failed_over or (not hold.held
                                        and self._upstream.recoveries != recoveries):
                    # answered with the recovery, with everything else held over it, or after
                    # a failover (a hung node's timeout ends every host's attempt at once):
                    # a new phase
                    default = self._rng.uniform(0.0, secret.refresh)
                delay = self.kinds.next_delay(secret, default)
            state.next_attempt = wake_slot(trio.current_time() + delay)
            await trio.sleep_until(state.next_attempt)

    async def _sleep_or_recovery(self, secret: SecretConfig, state: SecretState,
                                 until: float, seen: int, *, not_before: float) -> None:
        """Sleep until ``until`` (a backoff after a transient failure), unless the
        upstream recovers (its ``seen``-th recovery, counted before the failed request): then
        the next attempt is at a random phase within this secret's spread after the recovery,
        the backoff it replaces notwithstanding, but never before ``not_before`` (the
        upstream's Retry-After)."""
        state.next_attempt = until
        with trio.move_on_at(until):
            _, recovered_at = await self._upstream.recovered.wait_changed(seen)
            phase = recovered_at + self._rng.uniform(0.0, self._recovery_spread(secret))
            until = state.next_attempt = wake_slot(max(trio.current_time(), phase, not_before))
        await trio.sleep_until(until)

    def _recovery_spread(self, secret: SecretConfig) -> float:
        """How far this secret's poll may be spread after an upstream recovery: one
        ``refresh``, at most half the time its value may still be served, 0 with nothing to
        serve (fetched first)."""
        info = self._cache.info(secret.name)
        if info is None:
            return 0.0
        deadline = stale_deadline(info.fetched_at, info.expires_at, True,
                                  self._config.max_stale_for(secret.name))
        return max(0.0, min(secret.refresh, (deadline - self._clock()) / 2))

    def _to_confirm(self, state: SecretState, exc: UpstreamNotFound) -> bool:
        """True when ``exc`` is a plain 404 on a value being served that no earlier request
        confirmed: it is asked again before the value is dropped (the value stays served)."""
        if isinstance(exc, UpstreamDeleted) or self._cache.info(state.name) is None:
            state.unconfirmed_404 = False
            return False
        if state.unconfirmed_404:
            state.unconfirmed_404 = False
            return False
        state.unconfirmed_404 = True
        state.last_error = str(exc)
        log.warning("404 on a secret being served; asking again before dropping it",
                    extra={"secret": state.name, "error": str(exc)})
        return True

    def _denied(self, state: SecretState, exc: AuthError) -> None:
        """A 403 on a read. The first one hands the token back for a check or a new login; a
        second in a row (the token was confirmed or replaced meanwhile) is a policy refusal:
        the value stays served stale, never revoked (decision 5), and an alert is raised."""
        if exc.status != 403:
            state.denials = 0
            return
        state.denials += 1
        if state.denials >= 2 and not state.policy_denied:
            state.policy_denied = True
            log.error(
                "upstream policy denies this secret to a valid token; serving it stale",
                extra={"secret": state.name, "error": str(exc)},
            )

    def _failed(self, state: SecretState, exc: UpstreamError, delay: float) -> None:
        state.failures += 1
        state.last_error = str(exc)
        had_value = self._cache.info(state.name) is not None
        self._cache.mark_stale(state.name, since=self._clock())
        log.warning(
            "refresh failed",
            extra={
                "secret": state.name,
                "error": str(exc),
                "error_type": type(exc).__name__,
                "serving": "stale" if had_value else "nothing",
                "retry_in": round(delay, 2),
            },
        )

    def status(self) -> dict[str, dict[str, Any]]:
        return {
            name: {**state.as_status(), **self.kinds.status(self._config.secrets[name]),
                   "next_rotation": self._wall(state.next_attempt),
                   "next_step_at": self._wall(state.next_attempt)}
            for name, state in sorted(self.states.items())
            if name in self._config.secrets
        }

    def _wall(self, when: float | None) -> float | None:
        """A trio-clock time as unix time (for status and catalog)."""
        if when is None:
            return None
        try:
            return self._clock() + (when - trio.current_time())
        except RuntimeError:     # not inside trio
            return None
