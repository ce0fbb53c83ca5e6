"""Schedule state across restarts (issue 16), without an upstream: each kind's state through
the snapshot, the first step computed from it, and how ``agentd status`` shows both."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from types import MappingProxyType
from typing import Any

import msgpack
import pytest

from agentd.cache import Cache
from agentd.cli import format_status
from agentd.config import SecretConfig
from agentd.crypto import KEY_BYTES, Sealer
from agentd.kinds import Kinds, LeaseRecord, PkiState
from agentd.kinds.runtime import config_digest
from agentd.snapshot import FILE_NAME, MAGIC, Snapshot
from tests.test_kinds import OLD_SNAPSHOT

HOST = "0123456789abcdef0123456789abcdef"
KEY = b"k" * KEY_BYTES
NOW = 1_000_000.0
WEB = SecretConfig(name="web", kind="pki", path="pki/issue/web",
                   params=MappingProxyType({"common_name": "a.example.test"}))
DB = SecretConfig(name="db", kind="kv2", path="secret/data/db", refresh=300.0)
PG = SecretConfig(name="pg", kind="leased", path="database/creds/app")


def snap(tmp_path: Path) -> Snapshot:
    return Snapshot(tmp_path / FILE_NAME, Sealer(KEY), host=HOST)


def kinds(now: float = NOW) -> Kinds:
    return Kinds(None, Cache(), clock=lambda: now, rng=random.Random(7))  # type: ignore[arg-type]


def pki_saved(secret: SecretConfig = WEB, **state: Any) -> dict[str, Any]:
    return {"kind": "pki", "config": config_digest(secret),
            "state": {"serial": "11:22", "issued_at": NOW - 600, "not_after": NOW + 3000,
                      **state}}


async def test_states_round_trip_sealed_and_only_beside_their_value(tmp_path: Path) -> None:
    cache = Cache()
    cache.put("web", {"certificate": "PEM"}, version=None, fetched_at=NOW - 600)
    writer = snap(tmp_path)
    saved = pki_saved(serial="SERIAL-MARKER-5f0c")
    writer.states_source = lambda: {"web": saved, "gone": saved}   # "gone" has no value
    assert await writer.write(cache)
    assert b"SERIAL-MARKER-5f0c" not in (tmp_path / FILE_NAME).read_bytes()
    reader = snap(tmp_path)
    assert reader.load_into(Cache()) == ["web"]
    assert reader.restored_states == {"web": saved}
    # only declared secrets' states come back
    reader = snap(tmp_path)
    reader.load_into(Cache(), names={"db"})
    assert reader.restored_states == {}


async def test_revoked_names_round_trip_and_never_beside_a_value(tmp_path: Path) -> None:
    cache = Cache()
    cache.put("db", {"password": "p"}, version=3)
    writer = snap(tmp_path)
    writer.revoked_source = lambda: ["gone", "db", "other"]
    assert await writer.write(cache)
    reader = snap(tmp_path)
    assert reader.load_into(Cache(), names={"db", "gone"}) == ["db"]
    assert reader.restored_revoked == ["gone"]      # declared, and not restored with a value


async def test_a_state_moved_to_another_entry_is_refused(tmp_path: Path) -> None:
    cache = Cache()
    cache.put("web", {"certificate": "A"}, version=None)
    cache.put("api", {"certificate": "B"}, version=None)
    writer = snap(tmp_path)
    writer.states_source = lambda: {"web": pki_saved()}
    assert await writer.write(cache)
    raw = (tmp_path / FILE_NAME).read_bytes()
    outer = Sealer(KEY)
    body = msgpack.unpackb(outer.open(raw[len(MAGIC):], MAGIC + msgpack.packb([HOST])))
    body["states"] = {"api": body["states"]["web"]}     # web's state under api's name
    forged = MAGIC + outer.seal(msgpack.packb(body), MAGIC + msgpack.packb([HOST]))
    (tmp_path / FILE_NAME).write_bytes(forged)
    reader = snap(tmp_path)
    assert reader.load_into(Cache()) == []               # fails authentication: not served
    assert reader.statistics().rejected == 1


async def test_a_snapshot_from_before_states_loads_without_them(tmp_path: Path) -> None:
    shutil.copy(OLD_SNAPSHOT, tmp_path / FILE_NAME)
    reader = Snapshot(tmp_path / FILE_NAME, Sealer(KEY), host="fixture-host")
    assert sorted(reader.load_into(Cache(), names={"pg", "db"})) == ["db", "pg"]
    assert reader.restored_states == {} and reader.restored_revoked == []
    assert reader.restored_session is not None and "pg" in reader.restored_session.leases


def test_a_state_is_taken_back_only_under_the_config_it_was_obtained_under() -> None:
    other_params = SecretConfig(name="web", kind="pki", path="pki/issue/web",
                                params=MappingProxyType({"common_name": "b.example.test"}))
    k = kinds()
    assert k.restore_states({"web": pki_saved()}, {"web": other_params}) == []
    assert k.restore_states({"web": {**pki_saved(), "kind": "kv2"}}, {"web": WEB}) == []
    assert k.restore_states({"web": pki_saved(serial=None)}, {"web": WEB}) == []  # malformed
    assert k.restore_states({"web": pki_saved()}, {}) == []                       # undeclared
    assert k.restore_states({"web": pki_saved()}, {"web": WEB}) == ["web"]
    state = k.state("web")
    assert isinstance(state, PkiState)
    assert (state.serial, state.issued_at, state.not_after) == ("11:22", NOW - 600, NOW + 3000)
    # ...and goes into the next snapshot as it came, without a fetch in between
    assert k.export_states() == {"web": pki_saved()}


@pytest.mark.parametrize(("issued_ago", "current"), [(600.0, True), (3000.0, False)])
def test_a_restored_certificate_is_reissued_at_its_own_point(issued_ago: float,
                                                             current: bool) -> None:
    k = kinds()
    k.restore_states({"web": pki_saved(issued_at=NOW - issued_ago,
                                       not_after=NOW - issued_ago + 3600)}, {"web": WEB})
    delay = k.restored_delay(WEB, fetched_at=NOW - issued_ago, default=300.0, spread=7.0)
    if current:     # re-issue at 2/3 of the hour (+-5%), counted from its issue
        assert 2400 - 180 - 600 <= delay <= 2400 + 180 - 600
    else:           # already due: this host's phase
        assert delay == 7.0
    assert k.restored_current(WEB, fetched_at=NOW - issued_ago) is current
    # without a state (a snapshot from before issue 16): as before, at the phase
    assert kinds().restored_delay(WEB, fetched_at=NOW, default=300.0, spread=7.0) == 7.0


def test_a_restored_kv_secret_is_polled_one_refresh_after_it_was_fetched() -> None:
    k = kinds()
    assert k.restored_delay(DB, fetched_at=NOW - 10, default=300.0, spread=7.0) == 290.0
    assert k.restored_delay(DB, fetched_at=NOW - 1000, default=300.0, spread=7.0) == 7.0
    # current while younger than its refresh, as without the restart; stale once older
    assert k.restored_current(DB, fetched_at=NOW - 10)
    assert not k.restored_current(DB, fetched_at=NOW - 301)


def test_a_restored_lease_is_renewed_at_its_renewal_point() -> None:
    k = kinds()
    record = LeaseRecord(lease_id="database/creds/app/x", lease_duration=60.0,
                         expires_at=NOW + 50, renewed_at=NOW - 10, renewable=True)
    k.restore_leases({"pg": record}, {"pg": PG}, token="t")
    assert k.restored_delay(PG, fetched_at=NOW - 10, default=300.0, spread=7.0) == (
        pytest.approx(30.0))
    assert k.status(PG)["next_step"] == "renew"
    # past its renewal point with 6 s left: within the first third of what is left
    k = kinds()
    k.restore_leases({"pg": LeaseRecord(lease_id="database/creds/app/x", lease_duration=60.0,
                                        expires_at=NOW + 6, renewed_at=NOW - 54,
                                        renewable=True)}, {"pg": PG}, token="t")
    assert k.restored_delay(PG, fetched_at=NOW - 54, default=300.0, spread=7.0) == 2.0


def test_mark_current_clears_a_restored_stale_mark_and_keeps_fetched_at() -> None:
    cache = Cache()
    cache.put("web", {"certificate": "PEM"}, version=None, fetched_at=NOW - 600)
    records = cache.export_sealed(Sealer(KEY), lambda n, v: b"ad")
    restored = Cache()
    restored.import_sealed(records, Sealer(KEY), lambda n, v: b"ad")
    info = restored.info("web")
    assert info is not None and info.stale
    restored.mark_current("web")
    info = restored.info("web")
    assert info is not None and not info.stale and info.fetched_at == NOW - 600


def test_status_shows_where_each_value_came_from_and_its_next_step() -> None:
    secrets = {
        "web": {"kind": "pki", "version": 1, "fetched_at": NOW - 600, "stale": False,
                "from_snapshot": True, "next_step": "re-issue", "next_step_at": NOW + 1800},
        "db": {"kind": "kv2", "version": 4, "fetched_at": NOW - 5, "stale": False,
               "from_snapshot": False, "next_step": "poll", "next_step_at": NOW + 295},
        "gone": {"kind": "kv2", "version": None, "revoked": True, "from_snapshot": False,
                 "next_step": "poll", "next_step_at": None},
    }
    text = format_status({"secrets": secrets, "uptime": 1, "server": {
        "connections": 3, "refused_connections": 1200, "connect_guard": 1, "blocked_uids": 1}},
        now=NOW)
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert lines["socket"].split() == [
        "socket", "connections", "3", "refused", "1200", "connect", "guard", "ready", "1", "uid",
        "shut", "out", "(storming;", "see", "the", "log)"]
    assert "FROM" in lines["SECRET"]
    assert "snapshot" in lines["web"] and "re-issue 30.0m from now" in lines["web"]
    assert "upstream" in lines["db"] and "poll 4.9m from now" in lines["db"]
    assert "revoked" in lines["gone"] and lines["gone"].rstrip().endswith("-")
