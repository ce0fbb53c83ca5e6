"""The encrypted snapshot: round trip, no plaintext on disk, tampering, keys, hosts, full disk.

Real files in tmp_path, a real tmpfs for the full disk where this machine lets us mount one.
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import uuid
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import trio

from agentd.auth import Token
from agentd.cache import Cache, stale_deadline
from agentd.config import AgentConfig, AuditConfig, CacheConfig, Config, UpstreamConfig
from agentd.crypto import KEY_BYTES, Sealer
from agentd.errors import CryptoError
from agentd.kinds import LeaseRecord
from agentd.snapshot import FILE_NAME, MAGIC, Session, Snapshot, host_id, load_key
from agentd.upstream import spread_addresses

HOST = "0123456789abcdef0123456789abcdef"


def marker(label: str) -> str:
    return f"MARKER-{label}-{uuid.uuid4().hex}"


def filled_cache() -> tuple[Cache, dict[str, str]]:
    cache = Cache()
    markers = {"db": marker("db"), "api": marker("api")}
    cache.put("db", {"password": markers["db"]}, version=3, fetched_at=1000.0)
    cache.put("api", {"token": markers["api"]}, version=None, fetched_at=2000.0,
              expires_at=9000.0)
    return cache, markers


def make_config(state_dir: Path, cache: CacheConfig | None = None) -> Config:
    return Config(agent=AgentConfig(state_dir=state_dir), upstream=UpstreamConfig(),
                  cache=cache or CacheConfig(), audit=AuditConfig(path=None), secrets={},
                  policies=())


def snap(tmp_path: Path, key: bytes | None = None, host: str = HOST) -> Snapshot:
    return Snapshot(tmp_path / FILE_NAME, Sealer(key or b"k" * KEY_BYTES), host=host)


async def test_round_trip_restores_stale_values_and_fetched_at(tmp_path: Path) -> None:
    cache, markers = filled_cache()
    assert await snap(tmp_path).write(cache)
    restored = Cache(clock=lambda: 5000.0)
    names = snap(tmp_path).load_into(restored)
    assert sorted(names) == ["api", "db"]
    db = restored.get("db")
    api = restored.get("api")
    assert db is not None and api is not None
    assert db.data["password"] == markers["db"]
    assert (db.version, db.fetched_at, db.stale) == (3, 1000.0, True)
    assert (api.version, api.fetched_at, api.expires_at, api.stale) == (1, 2000.0, 9000.0, True)
    info = restored.info("db")
    assert info is not None and info.stale_since == 5000.0


async def test_snapshot_file_holds_no_plaintext(tmp_path: Path) -> None:
    cache, markers = filled_cache()
    assert await snap(tmp_path).write(cache)
    raw = (tmp_path / FILE_NAME).read_bytes()
    assert raw.startswith(MAGIC)
    for value in markers.values():
        assert value.encode() not in raw
    assert b"password" not in raw and b"db" not in raw[len(MAGIC):]
    assert (tmp_path / FILE_NAME).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]   # no temp file left


@pytest.mark.parametrize("offset", [0, len(MAGIC) + 3, -1, -20])
async def test_flipped_byte_is_never_served_and_moved_aside(tmp_path: Path, offset: int) -> None:
    cache, _ = filled_cache()
    assert await snap(tmp_path).write(cache)
    path = tmp_path / FILE_NAME
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    restored = Cache()
    s = snap(tmp_path)
    assert s.load_into(restored) == []
    assert restored.names() == []
    assert not path.exists()
    aside = [p.name for p in tmp_path.iterdir()]
    assert len(aside) == 1 and aside[0].startswith(f"{FILE_NAME}.bad-")
    assert s.statistics().rejected == 1


async def test_other_key_or_other_host_is_never_served(tmp_path: Path) -> None:
    cache, _ = filled_cache()
    assert await snap(tmp_path).write(cache)
    other_key = snap(tmp_path, key=b"x" * KEY_BYTES)
    assert other_key.load_into(Cache()) == []
    assert other_key.statistics().rejected == 1
    assert await snap(tmp_path).write(cache)
    other_host = snap(tmp_path, host="another-host")
    restored = Cache()
    assert other_host.load_into(restored) == []
    assert restored.names() == []
    assert len(list(tmp_path.glob(f"{FILE_NAME}.bad-*"))) >= 1


async def test_garbage_and_truncated_files_are_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    for content in (b"", b"not a snapshot", MAGIC, MAGIC + b"\x00" * 40):
        path.write_bytes(content)
        s = snap(tmp_path)
        assert s.load_into(Cache()) == []
        assert s.statistics().rejected == 1
        assert not path.exists()


async def test_missing_snapshot_restores_nothing(tmp_path: Path) -> None:
    s = snap(tmp_path)
    assert s.load_into(Cache()) == []
    assert s.statistics().rejected == 0


async def test_only_declared_names_are_restored_and_fetched_values_win(tmp_path: Path) -> None:
    cache, _ = filled_cache()
    assert await snap(tmp_path).write(cache)
    restored = Cache()
    restored.put("api", {"token": "fresh"}, version=None, fetched_at=7000.0)
    assert snap(tmp_path).load_into(restored, names={"api"}) == []
    assert restored.names() == ["api"]
    entry = restored.get("api")
    assert entry is not None and entry.data["token"] == "fresh" and not entry.stale


async def test_removed_secret_leaves_the_snapshot(tmp_path: Path) -> None:
    cache, _ = filled_cache()
    assert cache.remove("db")
    assert await snap(tmp_path).write(cache)
    restored = Cache()
    assert snap(tmp_path).load_into(restored) == ["api"]


async def test_writer_writes_within_a_batch_after_a_change(tmp_path: Path) -> None:
    cache = Cache()
    s = snap(tmp_path)
    path = tmp_path / FILE_NAME
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(s.run, cache)
            cache.put("db", {"password": marker("db")}, version=1)
            while not path.exists():
                await trio.sleep(0.05)
            assert snap(tmp_path).load_into(Cache()) == ["db"]
            cache.put("db", {"password": marker("db")}, version=2)
            while s.statistics().writes < 2:
                await trio.sleep(0.05)
            restored = Cache()
            snap(tmp_path).load_into(restored)
            assert restored.info("db") is not None
            assert restored.info("db").version == 2  # type: ignore[union-attr]
            nursery.cancel_scope.cancel()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> object:
    mount = tmp_path / "full"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)],
                            capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


async def test_full_disk_keeps_the_previous_snapshot(tiny_tmpfs: Path) -> None:
    cache, markers = filled_cache()
    s = snap(tiny_tmpfs)
    assert await s.write(cache)
    before = (tiny_tmpfs / FILE_NAME).read_bytes()
    # a value larger than the whole file system
    cache.put("big", {"blob": os.urandom(64 * 1024).hex()}, version=1)
    assert not await s.write(cache)
    stats = s.statistics()
    assert stats.write_failures == 1 and stats.writes == 1 and stats.last_error
    assert (tiny_tmpfs / FILE_NAME).read_bytes() == before
    assert [p.name for p in tiny_tmpfs.iterdir()] == [FILE_NAME]
    restored = Cache()
    assert sorted(snap(tiny_tmpfs).load_into(restored)) == ["api", "db"]
    entry = restored.get("db")
    assert entry is not None and entry.data["password"] == markers["db"]


def test_disabled_snapshot_does_nothing(tmp_path: Path) -> None:
    s = Snapshot(tmp_path / FILE_NAME, None, host=HOST)
    (tmp_path / FILE_NAME).write_bytes(b"anything")
    assert not s.enabled
    assert s.load_into(Cache()) == []
    assert (tmp_path / FILE_NAME).exists()


def test_key_file_default_is_created_0600_in_state_dir(tmp_path: Path) -> None:
    config = make_config(tmp_path / "state")
    key = load_key(config)
    assert len(key) == KEY_BYTES
    path = tmp_path / "state" / "cache.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_key(config) == key


def test_key_credential_from_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path, CacheConfig(key_credential="agentd-cache-key"))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(CryptoError, match=r"\$CREDENTIALS_DIRECTORY is not"):
        load_key(config)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(CryptoError, match="cannot read the key credential"):
        load_key(config)
    (tmp_path / "agentd-cache-key").write_bytes(b"short")
    with pytest.raises(CryptoError, match="holds 5 bytes"):
        load_key(config)
    (tmp_path / "agentd-cache-key").write_bytes(b"c" * KEY_BYTES)
    assert load_key(config) == b"c" * KEY_BYTES
    assert not (tmp_path / "cache.key").exists()


def test_unusable_key_disables_the_snapshot(tmp_path: Path) -> None:
    key = tmp_path / "cache.key"
    key.write_bytes(b"k" * KEY_BYTES)
    key.chmod(0o644)
    config = make_config(tmp_path, CacheConfig(key_file=key))
    assert not Snapshot.from_config(config, host=HOST).enabled


def test_host_id_reads_machine_id_with_a_fallback(tmp_path: Path) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text(HOST + "\n")
    assert host_id(machine_id) == HOST
    fallback = host_id(tmp_path / "missing")
    assert fallback.startswith("host-") and fallback == host_id(tmp_path / "missing")


def test_host_id_override_comes_before_the_environment_and_the_machine_id(
        tmp_path: Path) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text(HOST + "\n")
    env = {"AGENTD_HOST_ID": "from-env"}
    assert host_id(machine_id, override="web-042", environ=env) == "web-042"
    assert host_id(machine_id, environ=env) == "from-env"
    assert host_id(machine_id, environ={"AGENTD_HOST_ID": " "}) == HOST
    assert host_id(machine_id, environ={}) == HOST


async def test_config_host_id_is_the_identity_the_snapshot_is_bound_to(tmp_path: Path) -> None:
    def with_host(host: str) -> Snapshot:
        config = make_config(tmp_path)
        config = dataclasses.replace(config, agent=dataclasses.replace(config.agent,
                                                                         host_id=host))
        return Snapshot.from_config(config)

    cache, _ = filled_cache()
    assert await with_host("web-042").write(cache)
    assert sorted(with_host("web-042").load_into(Cache())) == ["api", "db"]
    assert with_host("web-043").load_into(Cache()) == []


def test_address_order_is_spread_per_host_and_stable() -> None:
    addresses = tuple(f"http://bao-{i}:8200" for i in range(5))
    assert spread_addresses(addresses, None) == addresses
    orders = {spread_addresses(addresses, f"host-{i}") for i in range(50)}
    assert all(sorted(o) == sorted(addresses) for o in orders)
    assert len({o[0] for o in orders}) == 5          # every node is somebody's first
    assert spread_addresses(addresses, "host-7") == spread_addresses(addresses, "host-7")


def test_address_order_per_host_and_path_spreads_a_small_fleet_evenly() -> None:
    """Rendezvous hashing on (host id, path): 50 hosts with 20 secrets each put every node's
    share of first choices within 20% of even, where 50 per-host choices alone would miss it
    about half the time (a node's share of 50 hosts has a standard deviation of 20%)."""
    addresses = ("http://bao-1:8200", "http://bao-2:8200", "http://bao-3:8200")
    hosts = [uuid.UUID(int=random.Random(i).getrandbits(128)).hex for i in range(50)]
    firsts = Counter(spread_addresses(addresses, host, f"secret/data/fleet/s{n:02d}")[0]
                     for host in hosts for n in range(20))
    assert set(firsts) == set(addresses)
    assert all(abs(count / (1000 / 3) - 1) <= 0.2 for count in firsts.values())
    # removing a node moves only the keys that had it first (rendezvous)
    for host in hosts[:10]:
        for n in range(20):
            key = f"secret/data/fleet/s{n:02d}"
            full = spread_addresses(addresses, host, key)
            assert spread_addresses(addresses[:2], host, key) == tuple(
                a for a in full if a != addresses[2])


def test_stale_deadline_is_the_earlier_of_max_stale_and_expiry() -> None:
    assert stale_deadline(100.0, None, False, 10.0) == float("inf")
    assert stale_deadline(100.0, None, True, 10.0) == 110.0
    assert stale_deadline(100.0, 105.0, True, 10.0) == 105.0
    assert stale_deadline(100.0, 500.0, True, 10.0) == 110.0
    assert stale_deadline(100.0, 105.0, False, 10.0) == 105.0


async def test_session_token_and_leases_round_trip_sealed(tmp_path: Path) -> None:
    cache, markers = filled_cache()
    token_value = marker("token")
    lease_id = marker("lease")
    session = Session(
        token=Token(value=token_value, ttl=3600.0, renewable=True, obtained_at=1500.0,
                    from_login=True),
        leases={"api": LeaseRecord(lease_id=lease_id, lease_duration=60.0, expires_at=9000.0,
                                   renewed_at=8940.0, renewable=True),
                "gone": LeaseRecord(lease_id=marker("gone"), lease_duration=60.0,
                                    expires_at=9000.0, renewed_at=None, renewable=False)},
    )
    writer = snap(tmp_path)
    writer.session_source = lambda: session
    assert await writer.write(cache)
    raw = (tmp_path / FILE_NAME).read_bytes()
    for plain in (token_value, lease_id, *markers.values()):
        assert plain.encode() not in raw
    assert token_value not in repr(session) and lease_id not in repr(session)
    reader = snap(tmp_path)
    assert sorted(reader.load_into(Cache(), names={"api", "db"})) == ["api", "db"]
    restored = reader.restored_session
    assert restored is not None and restored.token == session.token
    assert dict(restored.leases) == {"api": session.leases["api"]}   # only declared names
    # No leases: no session, no token in the file.
    assert await snap(tmp_path).write(cache)
    reader = snap(tmp_path)
    reader.load_into(Cache())
    assert reader.restored_session is None


async def test_session_is_bound_to_the_host(tmp_path: Path) -> None:
    cache, _ = filled_cache()
    writer = snap(tmp_path)
    data = writer.encode(cache, session=Session(token=None, leases={}))
    # The session blob sealed for another host does not open inside this host's file.
    other = snap(tmp_path, host="another-host")
    body = msgpack.unpackb(Sealer(b"k" * KEY_BYTES).open(data[len(MAGIC):],
                                                         MAGIC + msgpack.packb([HOST])))
    forged = dict(body, token=other.encode(cache, session=Session(token=None, leases={})))
    forged["token"] = msgpack.unpackb(Sealer(b"k" * KEY_BYTES).open(
        forged["token"][len(MAGIC):], MAGIC + msgpack.packb(["another-host"])))["token"]
    (tmp_path / FILE_NAME).write_bytes(
        MAGIC + Sealer(b"k" * KEY_BYTES).seal(msgpack.packb(forged), MAGIC + msgpack.packb([HOST])))
    reader = snap(tmp_path)
    assert reader.load_into(Cache()) == []
    assert reader.restored_session is None and reader.statistics().rejected == 1


def snap_with_generation(tmp_path: Path) -> Snapshot:
    return Snapshot(tmp_path / FILE_NAME, Sealer(b"k" * KEY_BYTES), host=HOST,
                    generation_path=tmp_path / "cache.key.generation")


async def test_an_older_snapshot_copied_back_is_refused(tmp_path: Path) -> None:
    """Issue 13 item 12: a snapshot put back after a rotation would serve the rotated value."""
    cache, _ = filled_cache()
    old_value = marker("old")
    cache.put("db", {"password": old_value}, version=3, fetched_at=1000.0)
    writer = snap_with_generation(tmp_path)
    assert await writer.write(cache)
    old_copy = (tmp_path / FILE_NAME).read_bytes()
    cache.put("db", {"password": marker("rotated")}, version=4, fetched_at=2000.0)
    assert await writer.write(cache)
    assert writer.statistics().generation == 2

    (tmp_path / FILE_NAME).write_bytes(old_copy)            # the attack: an older copy put back
    reader = snap_with_generation(tmp_path)
    restored = Cache()
    assert reader.load_into(restored) == []
    assert restored.get("db") is None
    assert reader.statistics().rejected == 1
    assert not (tmp_path / FILE_NAME).exists()              # moved aside, never served
    assert any(p.name.startswith(f"{FILE_NAME}.bad-") for p in tmp_path.iterdir())
    # the next write goes on from the recorded generation, never back
    assert await reader.write(cache)
    assert reader.statistics().generation == 3


async def test_the_current_snapshot_and_one_from_before_generations_load(tmp_path: Path) -> None:
    cache, markers = filled_cache()
    writer = snap_with_generation(tmp_path)
    assert await writer.write(cache)
    assert await writer.write(cache)
    reader = snap_with_generation(tmp_path)
    assert sorted(reader.load_into(Cache())) == ["api", "db"]
    assert reader.statistics().generation == 2
    # a snapshot written before generations existed (no generation, no second file) loads
    (tmp_path / "cache.key.generation").unlink()
    plain = snap(tmp_path)
    assert await plain.write(cache)
    restored = Cache()
    assert sorted(snap_with_generation(tmp_path).load_into(restored)) == ["api", "db"]
    db = restored.get("db")
    assert db is not None and db.data["password"] == markers["db"]


def test_from_config_keeps_the_generation_beside_the_key(tmp_path: Path) -> None:
    snapshot = Snapshot.from_config(make_config(tmp_path), host=HOST)
    assert snapshot.generation_path == tmp_path / "cache.key.generation"
