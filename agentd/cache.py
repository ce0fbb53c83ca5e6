"""The sealed secret store: versions, staleness, single-flight fetches (decisions 5 and 6).

Theory of operation: each entry holds its value as an AES-256-GCM blob (``crypto.Sealer``, by
default under a per-process random key) of the msgpack-packed data (``jsonnum.packb``: a number
that keeps its JSON text, ``1e-7``, is an extension type, decision 14), with ``msgpack([name,
version])`` as associated data, so a blob only opens under the name and version it was stored
with. Beside the blob the entry keeps metadata (version, fetched_at, expires_at, stale,
stale_since) and a keyed fingerprint of the packed data; ``info()`` and ``names()`` never open a
seal, ``get()`` opens it and hands out a deep read-only copy, numbers with their text
(``jsonnum.LiteralFloat``); ``get_packed()`` hands out the packed bytes, by default in v1
``get``'s plain form (``1e-7`` as the float ``1e-07``).

Versions: for KV v2 the upstream's version decides (newer replaces, same refreshes, older is a
lagging standby and is ignored). For kinds without one (``version=None``: kv1, leased) the cache
keeps a local counter that grows only when the fingerprint of the data changes.

``changes`` is a latest-value cell set to ``(name, version)`` whenever a put stores a new value,
and ``(name, -1)`` when an entry is removed (revocation on evidence, or an admin op). An entry
dropped because its seal failed to open is not announced there (that is not evidence of
revocation); it is counted in ``statistics().seal_failures`` and refetched on schedule.

``updates`` is a cell set on every mutation, metadata included (a refresh that only moves
``fetched_at``, a stale mark): the snapshot writer uses it to persist ``fetched_at``. For the
snapshot, ``export_sealed`` re-seals every entry under another sealer (the snapshot key) and
``import_sealed`` opens such records back into the cache, marked stale (decision 6).

Everything here is sync and never blocks, except ``single_flight``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import trio

from agentd import jsonnum
from agentd.cell import Cell
from agentd.crypto import Sealer
from agentd.errors import CryptoError, Unavailable
from agentd.frozen import freeze
from agentd.frozen import thaw as thaw  # re-exported: the cache hands out frozen values
from agentd.readmodel import COUNTER, metric

log = logging.getLogger(__name__)

T = TypeVar("T")

REMOVED = -1  # the version announced in ``changes`` when an entry goes away


@dataclass(frozen=True)
class CachedSecret:
    """An opened entry. ``data`` is plaintext and deeply read-only: drop it once used."""

    name: str
    data: Mapping[str, Any] = field(repr=False)
    version: int
    fetched_at: float
    expires_at: float | None
    stale: bool

    def serve_until(self, max_stale: float) -> float:
        """The stale deadline (decision 5); see ``stale_deadline``."""
        return stale_deadline(self.fetched_at, self.expires_at, self.stale, max_stale)


def stale_deadline(fetched_at: float, expires_at: float | None, stale: bool,
                   max_stale: float) -> float:
    """Until when a value may be served: the earlier of ``fetched_at + max_stale`` (once it is
    stale) and the value's own expiry (a lease or a certificate), in unix seconds."""
    deadline = fetched_at + max_stale if stale else math.inf
    if expires_at is not None:
        deadline = min(deadline, expires_at)
    return deadline


@dataclass(frozen=True)
class SealedRecord:
    """One entry as it goes into the snapshot: ``blob`` sealed under the snapshot's sealer."""

    name: str
    version: int
    fetched_at: float
    expires_at: float | None
    stale_since: float | None
    blob: bytes = field(repr=False)


@dataclass(frozen=True)
class EntryInfo:
    """An entry's metadata; reading it never opens the seal."""

    name: str
    version: int
    fetched_at: float
    expires_at: float | None
    stale: bool
    stale_since: float | None

    def serve_until(self, max_stale: float) -> float:
        """The stale deadline (decision 5); see ``stale_deadline``."""
        return stale_deadline(self.fetched_at, self.expires_at, self.stale, max_stale)


@dataclass(frozen=True)
class CacheStatistics:
    entries: int = metric("Secrets held in the sealed cache", name="agentd_cache_entries")
    stale: int = metric("Cached secrets served stale", name="agentd_cache_stale")
    seal_failures: int = metric("Sealed entries that failed to open (never served)", COUNTER,
                                name="agentd_cache_seal_failures")


@dataclass
class _Entry:
    blob: bytes
    fingerprint: bytes
    version: int
    fetched_at: float
    expires_at: float | None
    stale: bool = False
    stale_since: float | None = None
    texts: bool = False         # holds a number as its JSON text (its plain form differs)


class _Flight:
    """One fetch in progress, shared by every caller for the same name."""

    __slots__ = ("abandoned", "done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False


def _associated_data(name: str, version: int) -> bytes:
    packed: bytes = msgpack.packb([name, version])
    return packed


class Cache:
    """Sealed secret entries by local name.

    Args:
        sealer: seals the entries; default a fresh per-process random key.
        clock: wall-clock seconds (``fetched_at``, ``stale_since`` defaults).
    """

    def __init__(self, sealer: Sealer | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._sealer = sealer if sealer is not None else Sealer.generate()
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._flights: dict[str, _Flight] = {}
        self._seal_failures = 0
        self.changes: Cell[tuple[str, int] | None] = Cell(None)
        self.updates: Cell[None] = Cell(None)
        # called with (name, version) for every change, synchronously (they must not block):
        # for consumers that must not miss one, where ``changes`` coalesces
        self.listeners: list[Callable[[str, int], None]] = []

    def _announce(self, name: str, version: int) -> None:
        self.changes.set((name, version))
        for listener in self.listeners:
            listener(name, version)

    def put(self, name: str, data: Mapping[str, Any], *, version: int | None,
            fetched_at: float | None = None, expires_at: float | None = None) -> bool:
        """Store a freshly fetched value; return True when it is a new value.

        ``version`` is the upstream's (KV v2) or None (the cache counts). A stored value with the
        same version is only refreshed (fetched_at, expires_at, stale cleared) and False is
        returned; an older version is ignored (a lagging standby) and False is returned. The same
        version with different data (the secret's path changed on a reload) replaces the value.

        Raises:
            TypeError: ``data`` holds something msgpack cannot pack.
        """
        when = self._clock() if fetched_at is None else fetched_at
        packed = jsonnum.packb(data)
        fingerprint = self._sealer.fingerprint(packed)
        old = self._entries.get(name)
        if old is not None:
            if version is None:
                if old.fingerprint == fingerprint:
                    self._refresh(old, when, expires_at)
                    return False
                version = old.version + 1
            elif version < old.version:
                log.debug("ignoring %s version %d older than cached %d (lagging standby?)",
                          name, version, old.version)
                return False
            elif version == old.version:
                if old.fingerprint == fingerprint:
                    self._refresh(old, when, expires_at)
                    return False
                log.warning("%s version %d changed its data; replacing the cached value",
                            name, version)
        elif version is None:
            version = 1
        blob = self._sealer.seal(packed, _associated_data(name, version))
        self._entries[name] = _Entry(blob, fingerprint, version, when, expires_at,
                                     texts=jsonnum.holds_text(packed))
        self._announce(name, version)
        self.updates.set(None)
        return True

    def _refresh(self, entry: _Entry, when: float, expires_at: float | None) -> None:
        entry.fetched_at = when
        entry.expires_at = expires_at
        entry.stale = False
        entry.stale_since = None
        self.updates.set(None)

    def get(self, name: str) -> CachedSecret | None:
        """Open the entry for ``name``; None if absent or its seal fails (the entry is dropped)."""
        opened = self.get_packed(name, exact=True)
        if opened is None:
            return None
        packed, version, fetched_at, expires_at, stale = opened
        data = freeze(jsonnum.unpackb(packed))
        return CachedSecret(name=name, data=data, version=version, fetched_at=fetched_at,
                            expires_at=expires_at, stale=stale)

    def get_packed(
        self, name: str, *, exact: bool = False
    ) -> tuple[bytes, int, float, float | None, bool] | None:
        """Open the entry for ``name``: ``(packed, version, fetched_at, expires_at, stale)``
        where ``packed`` is the msgpack bytes of its data (a map), for a caller that sends the
        value on as msgpack (the server's ``get``: no unpack, copy and repack, and a plain tuple
        on that hot path); None if absent or its seal fails (the entry is dropped). ``packed``
        is plaintext: drop it once used.

        ``packed`` is v1 ``get``'s plain form (``jsonnum.plain_packed``: ``1e-7`` as the float
        ``1e-07``; only a value holding such a number is unpacked and packed again), or with
        ``exact`` as stored (``jsonnum.unpackb`` reads each number with its text).
        """
        entry = self._entries.get(name)
        if entry is None:
            return None
        try:
            packed = self._sealer.open(entry.blob, _associated_data(name, entry.version))
        except CryptoError as exc:
            self._seal_failures += 1
            if self._entries.get(name) is entry:
                del self._entries[name]
            log.error("dropped cached %s: %s", name, exc)
            return None
        if entry.texts and not exact:
            packed = jsonnum.plain_packed(packed)
        return packed, entry.version, entry.fetched_at, entry.expires_at, entry.stale

    def info(self, name: str) -> EntryInfo | None:
        """Metadata of the entry for ``name`` (None if absent), without opening it."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        return EntryInfo(name=name, version=entry.version, fetched_at=entry.fetched_at,
                         expires_at=entry.expires_at, stale=entry.stale,
                         stale_since=entry.stale_since)

    def mark_stale(self, name: str, *, since: float | None = None) -> None:
        """Mark ``name`` stale (a refresh failed); keeps the time of the first failure."""
        entry = self._entries.get(name)
        if entry is None or entry.stale:
            return
        entry.stale = True
        entry.stale_since = self._clock() if since is None else since
        self.updates.set(None)

    def mark_current(self, name: str) -> None:
        """Clear ``name``'s stale mark without a fetch (``fetched_at`` kept): a restored value
        whose kind state vouches for it until its next step (a certificate within its
        validity, decision 12)."""
        entry = self._entries.get(name)
        if entry is None or not entry.stale:
            return
        entry.stale = False
        entry.stale_since = None
        self.updates.set(None)

    def remove(self, name: str) -> bool:
        """Drop ``name`` (revoked or deleted); announce ``(name, -1)``. False if absent."""
        if self._entries.pop(name, None) is None:
            return False
        self._announce(name, REMOVED)
        self.updates.set(None)
        return True

    def export_sealed(
        self, sealer: Sealer, associated_data: Callable[[str, int], bytes], *,
        memo: dict[str, tuple[bytes, bytes]] | None = None,
    ) -> list[SealedRecord]:
        """Every entry re-sealed under ``sealer`` with ``associated_data(name, version)``.

        Each plaintext exists only while it is re-sealed. An entry whose own seal fails is left
        out (and dropped, as ``get`` would). ``memo`` (kept by the caller between exports with
        the same ``sealer`` and ``associated_data``) maps a name to (its sealed blob here, its
        blob under ``sealer``): an entry whose value has not changed since is not opened and
        sealed again, which makes a snapshot of a thousand unchanged secrets cheap.
        """
        records: list[SealedRecord] = []
        for name in sorted(self._entries):
            entry = self._entries[name]
            hit = memo.get(name) if memo is not None else None
            if hit is not None and hit[0] is entry.blob:
                blob = hit[1]
            else:
                try:
                    packed = self._sealer.open(entry.blob, _associated_data(name, entry.version))
                except CryptoError as exc:
                    self._seal_failures += 1
                    del self._entries[name]
                    log.error("dropped cached %s: %s", name, exc)
                    continue
                blob = sealer.seal(packed, associated_data(name, entry.version))
                if memo is not None:
                    memo[name] = (entry.blob, blob)
            records.append(SealedRecord(
                name=name, version=entry.version, fetched_at=entry.fetched_at,
                expires_at=entry.expires_at,
                stale_since=entry.stale_since if entry.stale else None,
                blob=blob,
            ))
        if memo is not None and len(memo) > len(records):
            for name in set(memo) - {r.name for r in records}:
                del memo[name]
        return records

    def import_sealed(
        self, records: list[SealedRecord], sealer: Sealer,
        associated_data: Callable[[str, int], bytes], *, since: float | None = None,
    ) -> list[str]:
        """Open ``records`` (from ``export_sealed``) into the cache, each marked stale.

        A name already cached is skipped (a fetched value beats a restored one). Announces each
        restored value in ``changes``. Returns the restored names.

        Raises:
            CryptoError: a record fails to open; nothing is imported then.
        """
        opened: list[tuple[SealedRecord, bytes]] = []
        for record in records:
            opened.append((record, sealer.open(record.blob,
                                               associated_data(record.name, record.version))))
        now = self._clock() if since is None else since
        restored: list[str] = []
        for record, packed in opened:
            if record.name in self._entries:
                continue
            blob = self._sealer.seal(packed, _associated_data(record.name, record.version))
            self._entries[record.name] = _Entry(
                blob, self._sealer.fingerprint(packed), record.version, record.fetched_at,
                record.expires_at, stale=True,
                stale_since=record.stale_since if record.stale_since is not None else now,
                texts=jsonnum.holds_text(packed),
            )
            restored.append(record.name)
            self._announce(record.name, record.version)
        if restored:
            self.updates.set(None)
        return restored

    def names(self) -> list[str]:
        """The cached names, sorted."""
        return sorted(self._entries)

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            entries=len(self._entries),
            stale=sum(1 for e in self._entries.values() if e.stale),
            seal_failures=self._seal_failures,
        )

    async def single_flight(self, name: str, fetch: Callable[[], Awaitable[T]]) -> T:
        """Run ``fetch()`` for ``name`` unless one is already running; share its outcome.

        The first caller runs its ``fetch`` in its own task; callers arriving meanwhile wait and
        get the same result, or the same exception object raised again. Different names never
        wait for each other.

        Cancellation: a cancelled waiter just stops waiting. If the runner is cancelled (or its
        fetch raises a BaseException that is not an Exception), the flight is abandoned and
        each waiter retries: one of them becomes the new runner with its own ``fetch``. So one
        client going away never fails the others. ``Unavailable("refresh cancelled")`` is raised
        only to a waiter whose retries keep being abandoned (more than a few times in a row).
        """
        for _ in range(8):
            flight = self._flights.get(name)
            if flight is None:
                return await self._run_flight(name, fetch)
            await flight.done.wait()
            if flight.abandoned:
                continue
            if flight.error is not None:
                raise flight.error
            result: T = flight.result
            return result
        raise Unavailable("refresh cancelled")

    async def _run_flight(self, name: str, fetch: Callable[[], Awaitable[T]]) -> T:
        flight = _Flight()
        self._flights[name] = flight
        try:
            result = await fetch()
        except Exception as exc:
            flight.error = exc
            raise
        except BaseException:
            flight.abandoned = True
            raise
        else:
            flight.result = result
            return result
        finally:
            if self._flights.get(name) is flight:
                del self._flights[name]
            flight.done.set()
