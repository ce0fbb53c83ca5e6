"""The encrypted on-disk snapshot of the cache (decision 6), and the host's identity.

Theory of operation: ``Snapshot`` owns one file, ``state_dir/cache.snapshot``. Its layout is
``MAGIC`` followed by one AES-256-GCM blob (``crypto.Sealer`` under the snapshot key) whose
associated data is ``MAGIC`` plus the host id, so a file copied to another host, or sealed under
another key, fails authentication. Inside is a msgpack map: the format version, when it was
written, and one record per cache entry (name, version, fetched_at, expires_at, stale_since and
the entry's value sealed again with ``[host id, name, version]`` as associated data, so a record
cannot be replayed under another name or version). ``fetched_at`` is kept, so a restart does not
reset a value's stale deadline.

- ``load_into(cache)`` runs at start, before the upstream is asked anything: every record goes into
  the cache marked stale. A file that fails authentication or parsing is renamed aside
  (``cache.snapshot.bad-<unix time>``), logged, counted, and never served.
- ``run()`` is the writer task: a new value or a removal is written within ``WRITE_DELAY`` (1 s,
  batched); a change of metadata only (``fetched_at`` moved by a refresh, a stale mark) within
  ``METADATA_DELAY``. ``flush()`` writes at a clean shutdown.
- A write goes to a temp file (O_EXCL|O_NOFOLLOW, 0600), is fsynced, renamed over the snapshot and
  the directory fsynced, off the trio thread. If it fails (a full disk), the temp file is removed,
  the previous snapshot stays, and ``statistics().write_failures`` counts it.

The key comes from ``[cache] key_credential`` (``$CREDENTIALS_DIRECTORY/<name>``, 32 raw bytes) or
``key_file`` (default ``state_dir/cache.key``, created 0600 on first start).

The agent's login token is sealed in, with the leases that depend on it (OpenBao revokes leases
with their token): ``session_source`` (set by the daemon) returns a ``Session`` (the login token
with its lifetime, and each live lease: id, duration, expiry, renewability) or None; it goes into
the ``token`` field sealed once more with ``["agentd-snapshot-session", host id]`` as associated
data. At start ``restored_session`` holds it: the daemon hands the token to the authenticator
(used if ``lookup-self`` accepts it) and the leases to ``kinds``, which renews them, so a restart
neither logs in nor re-reads a lease (decision 12).

Each secret's schedule state (``Kinds.export_states``: a certificate's serial, issue time and
not_after, tagged with its kind and config; issue 16) goes, when ``states_source`` (set by the
daemon) gives one, into the optional ``states`` map, each sealed with ``["agentd-snapshot-state",
host id, name, version]`` as associated data: bound to the value it schedules, so it cannot be
moved to another entry or outlive the value. At start ``restored_states`` holds them for the
daemon to hand to the kinds. Likewise ``revoked`` (from ``revoked_source``) lists the secrets
revoked on evidence, so that after a restart they answer ``not_found`` at once, also while the
upstream is down, instead of ``unavailable`` (``restored_revoked``). Both are optional and the
format number unchanged: a snapshot written before them loads (its secrets are then refreshed at
their start phase, as before), and an older agent reading a newer snapshot ignores them.

Rollback (issue 13 item 12): every write carries a ``generation`` one higher than the last,
sealed inside the file, and the same number goes, sealed under the same key, into a second file
(``generation_path``: beside the key file, ``cache.key.generation``, or ``state_dir/
cache.generation`` with a key credential). A snapshot whose generation is below the recorded one
is an older copy put back: it is moved aside and never served, since it may hold values rotated
since. The snapshot is written before the generation file, so a crash between the two leaves a
snapshot one ahead, which is accepted. Someone who can put back both files can roll back; that
needs root or the agent's user, against whom the snapshot is not a defence (docs/security.md).

Nothing here logs a value, a key or a token.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio

from agentd.auth import Token
from agentd.cache import Cache, SealedRecord
from agentd.config import Config
from agentd.crypto import KEY_BYTES, Sealer, load_or_create_key
from agentd.errors import CryptoError
from agentd.kinds import LeaseRecord
from agentd.readmodel import COUNTER, metric
from agentd.render.files import replace_file

log = logging.getLogger("agentd.snapshot")

MAGIC = b"AGENTD-SNAPSHOT-1\n"
# 2: an entry's value may hold msgpack extension type 1, a number with its JSON text
# (``jsonnum``, decision 14), which an agent that writes format 1 would serve as garbage: it
# moves a format 2 file aside instead. Format 1 (plain numbers) still loads.
FORMAT = 2
READ_FORMATS = (1, 2)
FILE_NAME = "cache.snapshot"
GENERATION_SUFFIX = ".generation"
WRITE_DELAY = 1.0          # a new value is on disk within this long
METADATA_DELAY = 60.0      # a refresh that only moved fetched_at, within this long
MACHINE_ID = Path("/etc/machine-id")


HOST_ID_ENV = "AGENTD_HOST_ID"


def host_id(path: Path = MACHINE_ID, *, override: str | None = None,
            environ: Mapping[str, str] | None = None) -> str:
    """This host's identity, the seed of every per-host spread (decision 9): ``override`` (the
    config's ``[agent] host_id``), else ``$AGENTD_HOST_ID`` when set and not empty, else
    ``/etc/machine-id``, else a digest of the host name.

    The override is for hosts that share a machine id (a golden image that ships one, containers
    that see the host's): without it they would all take the same address order and the same
    schedule phases.
    """
    if override:
        return override
    from_env = (os.environ if environ is None else environ).get(HOST_ID_ENV, "").strip()
    if from_env:
        return from_env
    try:
        value = path.read_text().strip()
    except OSError:
        value = ""
    if value:
        return value
    return "host-" + hashlib.sha256(socket.gethostname().encode()).hexdigest()[:32]


def load_key(config: Config) -> bytes:
    """The snapshot key: the systemd credential if configured, else the key file.

    Raises:
        CryptoError: naming the credential or the file (never the key) when it is unusable.
    """
    name = config.cache.key_credential
    if name is None:
        return load_or_create_key(config.key_file)
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise CryptoError(
            f"key_credential {name!r} is set but $CREDENTIALS_DIRECTORY is not"
            " (LoadCredential= missing in the unit?)"
        )
    path = Path(directory) / name
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise CryptoError(f"{path}: cannot read the key credential: {exc.strerror}") from None
    if len(key) != KEY_BYTES:
        raise CryptoError(f"{path}: the key credential holds {len(key)} bytes, not {KEY_BYTES}")
    return key


@dataclass(frozen=True)
class Session:
    """What the leased secrets depend on: the login token (None: not one agentd logged in for)
    and the live leases by secret name. Sealed; ``repr()`` shows neither."""

    token: Token | None = field(repr=False)
    leases: Mapping[str, LeaseRecord] = field(repr=False)


@dataclass(frozen=True)
class SnapshotStatistics:
    path: str
    enabled: bool = metric("1 when a snapshot key is usable", name="agentd_snapshot_enabled")
    loaded: int = metric("Entries restored from the snapshot at start",
                       name="agentd_snapshot_loaded")
    rejected: int = metric("Snapshot files moved aside (failed authentication or parsing, or an "
                         "older copy put back)", COUNTER, name="agentd_snapshot_rejected")
    writes: int = metric("Snapshot writes", COUNTER, name="agentd_snapshot_writes")
    generation: int = metric("Generation of the last snapshot written or loaded",
                           name="agentd_snapshot_generation")
    write_failures: int = metric("Failed snapshot writes (the previous snapshot stayed)", COUNTER,
                               name="agentd_snapshot_write_failures")
    last_write: float | None = metric("When the snapshot was last written",
                                    name="agentd_snapshot_last_write_timestamp_seconds")
    last_error: str | None = None


class Snapshot:
    """The cache's sealed copy in ``state_dir``.

    Args:
        path: the snapshot file.
        sealer: seals under the snapshot key; None disables the snapshot (no usable key).
        host: the host id bound into the associated data.
        generation_path: where the second copy of the generation lives (None: only inside the
            snapshot, so a copy put back is not detected).
    """

    def __init__(self, path: Path, sealer: Sealer | None, *, host: str,
                 generation_path: Path | None = None) -> None:
        self.path = path
        self.generation_path = generation_path
        self._generation = 0
        self._sealer = sealer
        self._host = host
        self._outer_ad = MAGIC + msgpack.packb([host])
        self._loaded = 0
        self._rejected = 0
        self._writes = 0
        self._write_failures = 0
        self._last_write: float | None = None
        self._last_error: str | None = None
        self._write_lock = trio.Lock()
        self._memo: dict[str, tuple[bytes, bytes]] = {}     # see Cache.export_sealed
        self.session_source: Callable[[], Session | None] | None = None
        self.restored_session: Session | None = None
        self.states_source: Callable[[], Mapping[str, Any]] | None = None
        self.restored_states: dict[str, Any] = {}
        self.revoked_source: Callable[[], Iterable[str]] | None = None
        self.restored_revoked: list[str] = []

    @classmethod
    def from_config(cls, config: Config, *, host: str | None = None) -> Snapshot:
        """Build from ``[agent] state_dir`` and ``[cache]``; an unusable key is logged and the
        snapshot disabled (the agent still runs, without surviving restarts)."""
        path = config.agent.state_dir / FILE_NAME
        if config.cache.key_credential is None:
            key_file = config.key_file
            generation = key_file.with_name(key_file.name + GENERATION_SUFFIX)
        else:
            generation = config.agent.state_dir / ("cache" + GENERATION_SUFFIX)
        try:
            sealer: Sealer | None = Sealer(load_key(config))
        except CryptoError as exc:
            log.error("snapshot disabled: no usable key", extra={"error": str(exc)})
            sealer = None
        if host is None:
            host = host_id(override=config.agent.host_id)
        return cls(path, sealer, host=host, generation_path=generation)

    @property
    def enabled(self) -> bool:
        return self._sealer is not None

    def statistics(self) -> SnapshotStatistics:
        return SnapshotStatistics(
            path=str(self.path), enabled=self.enabled, loaded=self._loaded,
            rejected=self._rejected, writes=self._writes, generation=self._generation,
            write_failures=self._write_failures,
            last_write=self._last_write, last_error=self._last_error,
        )

    def _inner_ad(self, name: str, version: int) -> bytes:
        packed: bytes = msgpack.packb(["agentd-snapshot-entry", self._host, name, version])
        return packed

    def _state_ad(self, name: str, version: int) -> bytes:
        packed: bytes = msgpack.packb(["agentd-snapshot-state", self._host, name, version])
        return packed

    def _session_ad(self) -> bytes:
        packed: bytes = msgpack.packb(["agentd-snapshot-session", self._host])
        return packed

    def _generation_ad(self) -> bytes:
        packed: bytes = msgpack.packb(["agentd-snapshot-generation", self._host])
        return packed

    def _recorded_generation(self) -> int:
        """The generation in ``generation_path`` (0: none, or unreadable: logged)."""
        assert self._sealer is not None
        if self.generation_path is None:
            return 0
        try:
            blob = self.generation_path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.error("cannot read the snapshot generation", extra={
                "path": str(self.generation_path), "error": exc.strerror})
            return 0
        try:
            value = msgpack.unpackb(self._sealer.open(blob, self._generation_ad()))
        except (CryptoError, ValueError, msgpack.UnpackException):
            log.error("snapshot generation file fails authentication; ignored",
                      extra={"path": str(self.generation_path)})
            return 0
        return value if isinstance(value, int) and value >= 0 else 0

    # --- loading ------------------------------------------------------------------------------

    def load_into(self, cache: Cache, *, names: set[str] | None = None) -> list[str]:
        """Restore the snapshot into ``cache`` (entries marked stale); return the names restored.

        Only ``names`` (the declared secrets) are restored when given. A missing file restores
        nothing; a bad one is moved aside and restores nothing. Sync: a small local file.
        """
        if self._sealer is None:
            return []
        recorded = self._recorded_generation()
        self._generation = recorded
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error("cannot read the snapshot", extra={"path": str(self.path),
                                                           "error": exc.strerror})
            return []
        try:
            records, session, generation, states, revoked = self._decode(raw)
            if generation < recorded:
                raise ValueError(f"generation {generation} is older than the last one written "
                                 f"({recorded}): an earlier copy put back")
            self._generation = generation
            if names is not None:
                records = [r for r in records if r.name in names]
            restored = cache.import_sealed(records, self._sealer, self._inner_ad)
        except (CryptoError, ValueError, TypeError, KeyError,
                msgpack.UnpackException) as exc:
            self._reject(f"{type(exc).__name__}: {exc}")
            return []
        self._loaded = len(restored)
        if session is not None and names is not None:
            session = Session(token=session.token, leases={
                n: lease for n, lease in session.leases.items() if n in names
            })
        self.restored_session = session
        self.restored_states = {n: state for n, state in states.items() if n in restored}
        self.restored_revoked = [n for n in revoked
                                 if (names is None or n in names) and n not in restored]
        log.info("snapshot restored", extra={
            "path": str(self.path), "secrets": len(restored),
            "states": len(self.restored_states), "revoked": len(self.restored_revoked),
            "leases": 0 if session is None else len(session.leases),
            "token": session is not None and session.token is not None,
        })
        return restored

    def _decode(self, raw: bytes) -> tuple[
            list[SealedRecord], Session | None, int, dict[str, Any], list[str]]:
        assert self._sealer is not None
        if not raw.startswith(MAGIC):
            raise ValueError("not an agentd snapshot")
        plain = self._sealer.open(raw[len(MAGIC):], self._outer_ad)
        body = msgpack.unpackb(plain, raw=False, strict_map_key=True)
        if not isinstance(body, dict) or body.get("format") not in READ_FORMATS:
            raise ValueError("unknown snapshot format")
        generation = body.get("generation", 0)      # absent: written before generations
        if not isinstance(generation, int) or generation < 0:
            raise ValueError("malformed snapshot generation")
        records: list[SealedRecord] = []
        for item in body["entries"]:
            name, version, fetched_at, expires_at, stale_since, blob = item
            if not (isinstance(name, str) and isinstance(version, int)
                    and isinstance(fetched_at, (int, float)) and isinstance(blob, bytes)):
                raise ValueError("malformed snapshot record")
            records.append(SealedRecord(
                name=name, version=version, fetched_at=float(fetched_at),
                expires_at=None if expires_at is None else float(expires_at),
                stale_since=None if stale_since is None else float(stale_since), blob=blob,
            ))
        states = self._decode_states(body.get("states") or {}, records)
        revoked = body.get("revoked") or []         # absent before issue 16
        if not isinstance(revoked, list) or not all(isinstance(n, str) for n in revoked):
            raise ValueError("malformed snapshot revoked list")
        sealed = body.get("token")
        if sealed is None:
            return records, None, generation, states, revoked
        if not isinstance(sealed, bytes):
            raise ValueError("malformed snapshot session")
        session = self._decode_session(self._sealer.open(sealed, self._session_ad()))
        return records, session, generation, states, revoked

    def _decode_states(self, sealed: object, records: list[SealedRecord]) -> dict[str, Any]:
        """The schedule states (absent before issue 16), each opened against its entry."""
        assert self._sealer is not None
        if not isinstance(sealed, dict):
            raise ValueError("malformed snapshot states")
        versions = {r.name: r.version for r in records}
        states: dict[str, Any] = {}
        for name, blob in sealed.items():
            if not isinstance(name, str) or not isinstance(blob, bytes) or name not in versions:
                raise ValueError("malformed snapshot state")
            plain = self._sealer.open(blob, self._state_ad(name, versions[name]))
            state = msgpack.unpackb(plain, raw=False, strict_map_key=True)
            if not isinstance(state, dict):
                raise ValueError("malformed snapshot state")
            states[name] = state
        return states

    def _decode_session(self, plain: bytes) -> Session:
        body = msgpack.unpackb(plain, raw=False, strict_map_key=True)
        if not isinstance(body, dict) or not isinstance(body.get("leases"), dict):
            raise ValueError("malformed snapshot session")
        token: Token | None = None
        if body.get("token") is not None:
            value, ttl, renewable, obtained_at, from_login = body["token"]
            if not (isinstance(value, str) and isinstance(ttl, (int, float))
                    and isinstance(obtained_at, (int, float))):
                raise ValueError("malformed snapshot token")
            token = Token(value=value, ttl=float(ttl), renewable=bool(renewable),
                          obtained_at=float(obtained_at), from_login=bool(from_login))
        leases: dict[str, LeaseRecord] = {}
        for name, item in body["leases"].items():
            lease_id, duration, expires_at, renewed_at, renewable = item
            if not (isinstance(name, str) and isinstance(lease_id, str)
                    and isinstance(duration, (int, float))
                    and isinstance(expires_at, (int, float))):
                raise ValueError("malformed snapshot lease")
            leases[name] = LeaseRecord(
                lease_id=lease_id, lease_duration=float(duration), expires_at=float(expires_at),
                renewed_at=None if renewed_at is None else float(renewed_at),
                renewable=bool(renewable),
            )
        return Session(token=token, leases=leases)

    def _encode_session(self, session: Session) -> bytes:
        assert self._sealer is not None
        token = session.token
        body = {
            "token": None if token is None else [
                token.value, token.ttl, token.renewable, token.obtained_at, token.from_login],
            "leases": {name: [r.lease_id, r.lease_duration, r.expires_at, r.renewed_at,
                              r.renewable] for name, r in session.leases.items()},
        }
        return self._sealer.seal(msgpack.packb(body), self._session_ad())

    def _reject(self, why: str) -> None:
        self._rejected += 1
        aside = self.path.with_name(f"{self.path.name}.bad-{int(time.time())}")
        try:
            os.replace(self.path, aside)
        except OSError as exc:
            log.error("snapshot rejected and could not be moved aside; not served",
                      extra={"path": str(self.path), "why": why, "error": exc.strerror})
            return
        log.error("snapshot rejected, moved aside, not served",
                  extra={"path": str(self.path), "moved_to": str(aside), "why": why})

    # --- writing ------------------------------------------------------------------------------

    def encode(self, cache: Cache, *, session: Session | None = None,
               generation: int = 0, states: Mapping[str, Any] | None = None,
               revoked: Iterable[str] = ()) -> bytes:
        """The sealed file contents for ``cache`` now, with ``session`` (token and leases), the
        schedule ``states`` of its entries (by name; one without an entry is left out) and the
        names ``revoked`` on evidence."""
        assert self._sealer is not None
        records = cache.export_sealed(self._sealer, self._inner_ad, memo=self._memo)
        states = states or {}
        sealed_states = {
            r.name: self._sealer.seal(msgpack.packb(states[r.name]),
                                      self._state_ad(r.name, r.version))
            for r in records if r.name in states
        }
        body: dict[str, Any] = {
            "format": FORMAT,
            "generation": generation,
            "written_at": time.time(),
            "entries": [[r.name, r.version, r.fetched_at, r.expires_at, r.stale_since, r.blob]
                        for r in records],
            "token": None if session is None else self._encode_session(session),
        }
        if sealed_states:
            body["states"] = sealed_states
        revoked = sorted(revoked)
        if revoked:
            body["revoked"] = revoked
        return MAGIC + self._sealer.seal(msgpack.packb(body), self._outer_ad)

    async def write(self, cache: Cache) -> bool:
        """Write the snapshot of ``cache`` now; False (logged, counted) when it failed."""
        if self._sealer is None:
            await trio.lowlevel.checkpoint()
            return False
        async with self._write_lock:
            session = self.session_source() if self.session_source is not None else None
            states = self.states_source() if self.states_source is not None else None
            revoked = self.revoked_source() if self.revoked_source is not None else ()
            generation = self._generation + 1
            data = self.encode(cache, session=session, generation=generation, states=states,
                               revoked=revoked)
            try:
                await trio.to_thread.run_sync(_write_atomic, self.path, data)
                self._generation = generation
                if self.generation_path is not None:
                    mark = self._sealer.seal(msgpack.packb(generation), self._generation_ad())
                    await trio.to_thread.run_sync(_write_atomic, self.generation_path, mark)
            except OSError as exc:
                self._write_failures += 1
                self._last_error = f"{type(exc).__name__}: {exc.strerror}"
                log.error("snapshot write failed; the previous snapshot stays",
                          extra={"path": str(self.path), "error": exc.strerror})
                return False
            self._writes += 1
            self._last_write = time.time()
            self._last_error = None
            return True

    async def flush(self, cache: Cache) -> bool:
        """Write at a clean shutdown."""
        return await self.write(cache)

    async def run(self, cache: Cache, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write after every change (batched) until cancelled."""
        updates_seen = cache.updates.generation
        changes_seen = cache.changes.generation
        task_status.started()
        if self._sealer is None:
            await trio.sleep_forever()
        while True:
            updates_seen, _ = await cache.updates.wait_changed(updates_seen)
            if cache.changes.generation == changes_seen:
                # metadata only: wait longer, unless a value changes meanwhile
                with trio.move_on_after(METADATA_DELAY):
                    await cache.changes.wait_changed(changes_seen)
            await trio.sleep(WRITE_DELAY)
            updates_seen = cache.updates.generation
            changes_seen = cache.changes.generation
            await self.write(cache)


def _write_atomic(path: Path, data: bytes) -> None:
    """Create the directory (0700) if missing, then ``files.replace_file`` (0600 temp with
    O_EXCL|O_NOFOLLOW, fsync, rename, fsync the directory). Raises OSError."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
    replace_file(path, data, mode=0o600)
