"""What a secret kind is: the small interface every kind implements (decision 4).

Adding a kind is one new module here with a ``Kind`` subclass, plus one line in
``registry.KINDS``; the refresher, the catalog, the status and the config's key check all look
the kind up in that table and need no change.

A kind implements:

- ``name`` (the ``kind = "..."`` value) and ``config_keys``: the ``[secrets.NAME]`` keys that only
  some kinds use and this one accepts (``version``, ``renew_at``, ...);
- ``State``: its per-secret state, a ``KindState`` subclass (the common part: anomaly and check
  counters, kept by ``Kinds``) holding what the kind remembers between steps, never a value;
- ``fetch``: one refresh step (the upstream calls: read, issue, renew or re-read) returning the
  ``SecretValue`` to store;
- ``next_delay``: when the next step is due after a successful one (default: poll);
- ``export_state``/``restore_state``: what of its state the snapshot keeps, so that after a
  restart ``restored_delay`` computes the next step from it (decision 12: a certificate is
  re-issued at its own re-issue point, not at start), and ``restored_current``: whether a value
  restored with that state may be served as current rather than stale;
- ``status``: its fields in ``agentd status``;
- ``schedule`` and ``grants``: its line in ``agentd catalog`` and what its upstream policy
  allows (``catalog.upstream_policy``).

A kind's steps get the agent's services (upstream, cache, clock, check hook, delayed tasks)
through ``Runtime``, which ``runtime.Kinds`` implements.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, NamedTuple, Protocol, TypeVar

if TYPE_CHECKING:
    import random

    from agentd.cache import Cache
    from agentd.config import SecretConfig
    from agentd.upstream import SecretValue, Upstream

REUSE_HISTORY = 8            # fingerprints of previous values kept per secret
MIN_DELAY = 1.0              # never schedule a step sooner than this


@dataclass
class KindState:
    """What one secret remembers between steps whatever its kind (never a secret value)."""

    fingerprints: deque[bytes] = field(default_factory=lambda: deque(maxlen=REUSE_HISTORY))
    last_change: float | None = None
    reuse_alarms: int = 0
    rotation_alarms: int = 0
    check_failures: int = 0


S = TypeVar("S", bound=KindState)


class Grant(NamedTuple):
    """One line of the upstream policy: capabilities on a path, and why."""

    path: str
    capabilities: tuple[str, ...]
    why: str


class Runtime(Protocol):
    """The agent's services a kind's steps use (``runtime.Kinds``)."""

    @property
    def upstream(self) -> Upstream: ...
    @property
    def cache(self) -> Cache: ...
    @property
    def rng(self) -> random.Random: ...

    def now(self) -> float:
        """Wall-clock time (expiry math)."""
        ...

    def owner(self, token: str | None) -> bytes | None:
        """A keyed fingerprint of a login token (None for None), never the token."""
        ...

    def fingerprint(self, data: Mapping[str, Any]) -> bytes:
        """A keyed fingerprint of a value, never the value."""
        ...

    async def check(self, secret: SecretConfig, data: Mapping[str, Any]) -> None:
        """Run the secret's ``check`` program on a new value; raises CheckFailed."""
        ...

    def later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``await fn(*args)`` after ``delay`` seconds (dropped at shutdown)."""
        ...

    def revoke(self, name: str) -> None:
        """The upstream says ``name``'s value is gone (decision 5's evidence, e.g. a lease
        OpenBao says is revoked): stop serving it at once and answer ``not_found`` until a new
        value is stored."""
        ...


class Kind(ABC, Generic[S]):
    """One secret kind. Stateless: what a secret remembers lives in its ``State``."""

    name: ClassVar[str]
    config_keys: ClassVar[tuple[str, ...]] = ()
    State: type[S]

    @abstractmethod
    async def fetch(self, rt: Runtime, secret: SecretConfig, state: S, *,
                    token: str | None, token_expires_at: float | None) -> SecretValue:
        """One refresh step. Raises UpstreamError subclasses; the served value stays."""

    def next_delay(self, rt: Runtime, secret: SecretConfig, state: S, default: float) -> float:
        """Seconds until the next step after a successful one (``default``: polling)."""
        return default

    def export_state(self, state: S) -> dict[str, Any] | None:
        """What the snapshot keeps of ``state`` (plain msgpack types; None: nothing, the entry's
        own ``fetched_at`` and version are enough to schedule it)."""
        return None

    def restore_state(self, saved: Mapping[str, Any]) -> S:
        """The state ``export_state`` saved. Raises ValueError when ``saved`` is malformed."""
        return self.State()

    def restored_delay(self, rt: Runtime, secret: SecretConfig, state: S, *,
                       fetched_at: float, default: float, spread: float) -> float:
        """Seconds until the first step of a value restored from the snapshot.

        The step is due where it would have been without the restart (``fetched_at`` plus
        ``default``, the jittered poll interval); one already due waits ``spread``, this
        secret's per-host phase, so that a restart makes no burst.
        """
        return max(fetched_at + default - rt.now(), spread)

    def restored_current(self, secret: SecretConfig, state: S, now: float, *,
                         fetched_at: float) -> bool:
        """True when ``state`` (restored) and ``fetched_at`` show the value needs nothing from
        the upstream before its next step, so it is served as current, not stale (default: a
        restored value is stale until refreshed, decision 6)."""
        return False

    def status(self, secret: SecretConfig, state: S) -> dict[str, Any]:
        """This kind's fields in a secret's status."""
        return {}

    def next_step(self, state: S) -> str:
        """What the next upstream step does, for ``agentd status``."""
        return "poll"

    @abstractmethod
    def schedule(self, secret: SecretConfig) -> str:
        """A human description of when ``secret`` is fetched again."""

    @abstractmethod
    def grants(self, secret: SecretConfig) -> Iterable[Grant]:
        """What the agent's upstream policy must allow for ``secret``."""


def human_duration(seconds: float) -> str:
    """``90`` -> ``90s``, ``3600`` -> ``1h`` (for schedules)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
