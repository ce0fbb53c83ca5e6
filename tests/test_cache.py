from __future__ import annotations

from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from agentd.cache import Cache, EntryInfo, _Flight
from agentd.crypto import Sealer
from agentd.errors import TransientError, Unavailable

MARKER = "s3cr3t-MARKER-4f1d"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock: FakeClock) -> Cache:
    return Cache(clock=clock)


def test_put_get(cache: Cache, clock: FakeClock) -> None:
    data = {"password": MARKER, "port": 5432, "tags": ["a", {"b": None}], "ok": True, "f": 1.5}
    assert cache.put("db", data, version=3, expires_at=2000.0) is True
    got = cache.get("db")
    assert got is not None
    assert (got.name, got.version, got.fetched_at, got.expires_at, got.stale) == (
        "db", 3, 1000.0, 2000.0, False)
    assert dict(got.data)["password"] == MARKER
    assert got.data["port"] == 5432
    assert got.data["tags"][1]["b"] is None
    assert MARKER not in repr(got)
    assert cache.get("nope") is None
    assert cache.names() == ["db"]


def test_data_is_deeply_read_only(cache: Cache) -> None:
    source: dict[str, Any] = {"m": {"k": "v"}, "l": [1, 2]}
    cache.put("db", source, version=1)
    source["m"]["k"] = "changed"  # the cache holds its own copy
    got = cache.get("db")
    assert got is not None
    assert got.data["m"]["k"] == "v"
    with pytest.raises(TypeError):
        got.data["x"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        got.data["m"]["k"] = "w"
    assert got.data["l"] == (1, 2)


def test_put_accepts_read_only_mappings(cache: Cache) -> None:
    cache.put("a", {"k": {"n": 1}}, version=1)
    frozen = cache.get("a")
    assert frozen is not None
    assert cache.put("b", frozen.data, version=1) is True
    b = cache.get("b")
    assert b is not None and b.data["k"]["n"] == 1


def test_newer_version_replaces(cache: Cache, clock: FakeClock) -> None:
    cache.put("db", {"v": "one"}, version=1)
    clock.now = 1100.0
    assert cache.put("db", {"v": "two"}, version=2) is True
    got = cache.get("db")
    assert got is not None
    assert (got.data["v"], got.version, got.fetched_at) == ("two", 2, 1100.0)


def test_same_version_refreshes_only(cache: Cache, clock: FakeClock) -> None:
    cache.put("db", {"v": "one"}, version=5)
    cache.mark_stale("db")
    generation = cache.changes.generation
    clock.now = 1200.0
    assert cache.put("db", {"v": "one"}, version=5) is False
    info = cache.info("db")
    assert info == EntryInfo(name="db", version=5, fetched_at=1200.0, expires_at=None,
                             stale=False, stale_since=None)
    assert cache.changes.generation == generation


def test_same_version_with_other_data_replaces(cache: Cache) -> None:
    # e.g. the secret's upstream path changed on a reload and both paths are at version 1
    cache.put("db", {"v": "one"}, version=1)
    assert cache.put("db", {"v": "other"}, version=1) is True
    got = cache.get("db")
    assert got is not None and got.data["v"] == "other"


def test_older_version_ignored(cache: Cache, clock: FakeClock) -> None:
    cache.put("db", {"v": "seven"}, version=7)
    generation = cache.changes.generation
    clock.now = 1300.0
    assert cache.put("db", {"v": "six"}, version=6) is False
    got = cache.get("db")
    assert got is not None
    assert (got.data["v"], got.version, got.fetched_at) == ("seven", 7, 1000.0)
    assert cache.changes.generation == generation


def test_unversioned_counter_grows_only_on_change(cache: Cache) -> None:
    assert cache.put("app", {"k": "a"}, version=None) is True
    assert cache.info("app") is not None and cache.info("app").version == 1  # type: ignore[union-attr]
    assert cache.put("app", {"k": "a"}, version=None) is False
    assert cache.put("app", {"k": "b"}, version=None) is True
    assert cache.put("app", {"k": "b"}, version=None) is False
    assert cache.put("app", {"k": "a"}, version=None) is True
    got = cache.get("app")
    assert got is not None and (got.version, got.data["k"]) == (3, "a")


def test_unversioned_after_versioned_continues_counting(cache: Cache) -> None:
    cache.put("app", {"k": "a"}, version=9)  # e.g. restored from a snapshot
    assert cache.put("app", {"k": "a"}, version=None) is False
    assert cache.put("app", {"k": "b"}, version=None) is True
    assert cache.info("app").version == 10  # type: ignore[union-attr]


def test_explicit_fetched_at(cache: Cache) -> None:
    cache.put("db", {"k": 1}, version=1, fetched_at=42.0)
    assert cache.info("db").fetched_at == 42.0  # type: ignore[union-attr]


def test_stale_marking_and_clearing(cache: Cache, clock: FakeClock) -> None:
    cache.mark_stale("absent")  # no-op
    assert cache.info("absent") is None
    cache.put("db", {"k": 1}, version=1)
    clock.now = 1500.0
    cache.mark_stale("db")
    clock.now = 1600.0
    cache.mark_stale("db", since=1550.0)  # a later failure keeps the first one's time
    info = cache.info("db")
    assert info is not None and (info.stale, info.stale_since) == (True, 1500.0)
    got = cache.get("db")
    assert got is not None and got.stale
    assert cache.statistics().stale == 1
    assert cache.put("db", {"k": 2}, version=2) is True
    info = cache.info("db")
    assert info is not None and (info.stale, info.stale_since, info.fetched_at) == (
        False, None, 1600.0)
    assert cache.statistics().stale == 0


def test_mark_stale_with_since(cache: Cache) -> None:
    cache.put("db", {"k": 1}, version=1)
    cache.mark_stale("db", since=7.0)
    assert cache.info("db").stale_since == 7.0  # type: ignore[union-attr]


def test_remove(cache: Cache) -> None:
    cache.put("db", {"k": 1}, version=1)
    assert cache.remove("db") is True
    assert cache.remove("db") is False
    assert cache.get("db") is None
    assert cache.info("db") is None
    assert cache.names() == []


def test_changes_cell(cache: Cache) -> None:
    assert cache.changes.value is None
    cache.put("db", {"k": 1}, version=1)
    assert cache.changes.value == ("db", 1)
    g = cache.changes.generation
    cache.put("db", {"k": 1}, version=1)
    cache.put("db", {"k": 0}, version=0)
    assert cache.changes.generation == g
    cache.put("app", {"k": 1}, version=None)
    assert cache.changes.value == ("app", 1)
    cache.remove("db")
    assert cache.changes.value == ("db", -1)
    g = cache.changes.generation
    cache.remove("db")
    assert cache.changes.generation == g


async def test_changes_wakes_watcher(cache: Cache) -> None:
    seen: list[tuple[str, int] | None] = []

    async def watch() -> None:
        _, value = await cache.changes.wait_changed(cache.changes.generation)
        seen.append(value)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.testing.wait_all_tasks_blocked()
            cache.put("db", {"k": 1}, version=4)
    assert seen == [("db", 4)]


def test_blob_holds_no_plaintext(cache: Cache) -> None:
    cache.put("db", {"password": MARKER, MARKER: 1}, version=1)
    cache.put("kv1", {"password": MARKER}, version=None)
    for entry in cache._entries.values():
        for value in vars(entry).values():
            if isinstance(value, bytes):
                assert MARKER.encode() not in value
                assert msgpack.packb(MARKER) not in value
            else:
                assert MARKER not in repr(value)


def test_entry_bound_to_name_and_version(clock: FakeClock) -> None:
    sealer = Sealer.generate()
    cache = Cache(sealer, clock=clock)
    cache.put("a", {"k": "A"}, version=1)
    cache.put("b", {"k": "B"}, version=1)
    # Swapping blobs between entries must not let one name's value be served under another.
    cache._entries["a"].blob, cache._entries["b"].blob = (cache._entries["b"].blob,
                                                          cache._entries["a"].blob)
    assert cache.get("a") is None
    assert cache.get("b") is None


def test_tampered_blob_drops_entry(cache: Cache) -> None:
    cache.put("db", {"k": MARKER}, version=1)
    cache.put("other", {"k": 1}, version=1)
    entry = cache._entries["db"]
    blob = bytearray(entry.blob)
    blob[-1] ^= 0xFF
    entry.blob = bytes(blob)
    g = cache.changes.generation
    assert cache.get("db") is None
    assert cache.names() == ["other"]
    assert cache.statistics().seal_failures == 1
    assert cache.statistics().entries == 1
    assert cache.changes.generation == g  # a seal failure is not evidence of revocation
    assert cache.get("other") is not None


def test_statistics(cache: Cache) -> None:
    cache.put("a", {"k": 1}, version=1)
    cache.put("b", {"k": 1}, version=1)
    cache.mark_stale("b")
    stats = cache.statistics()
    assert (stats.entries, stats.stale, stats.seal_failures) == (2, 1, 0)


async def test_single_flight_shares_one_fetch(cache: Cache) -> None:
    calls = 0
    release = trio.Event()
    results: list[int] = []

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 42

    async def caller() -> None:
        results.append(await cache.single_flight("db", fetch))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
    assert calls == 1
    assert results == [42] * 10
    # the flight is over: the next call fetches again
    assert await cache.single_flight("db", fetch) == 42
    assert calls == 2


async def test_single_flight_exception_reaches_all(cache: Cache) -> None:
    calls = 0
    release = trio.Event()
    errors: list[BaseException] = []

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        raise TransientError("upstream down", status=503)

    async def caller() -> None:
        try:
            await cache.single_flight("db", fetch)
        except TransientError as exc:
            errors.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
    assert calls == 1
    assert len(errors) == 5
    assert all(isinstance(e, TransientError) and e.status == 503 for e in errors)


async def test_single_flight_names_are_independent(cache: Cache) -> None:
    started: list[str] = []
    release = {"a": trio.Event(), "b": trio.Event()}
    results: dict[str, str] = {}

    def fetcher(name: str) -> Any:
        async def fetch() -> str:
            started.append(name)
            await release[name].wait()
            return name.upper()
        return fetch

    async def caller(name: str) -> None:
        results[name] = await cache.single_flight(name, fetcher(name))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, "a")
            nursery.start_soon(caller, "b")
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(started) == ["a", "b"]  # both running at once
            release["b"].set()
            await trio.testing.wait_all_tasks_blocked()
            assert results == {"b": "B"}  # b finished while a is still in flight
            release["a"].set()
    assert results == {"a": "A", "b": "B"}


async def test_single_flight_runner_cancelled_waiter_retries(cache: Cache) -> None:
    calls: list[str] = []
    gate = trio.Event()

    def fetcher(who: str) -> Any:
        async def fetch() -> str:
            calls.append(who)
            await gate.wait()
            return who
        return fetch

    results: list[str] = []

    async def waiter() -> None:
        results.append(await cache.single_flight("db", fetcher("waiter")))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            runner_scope = trio.CancelScope()

            async def runner() -> None:
                with runner_scope:
                    await cache.single_flight("db", fetcher("runner"))

            nursery.start_soon(runner)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert calls == ["runner"]
            runner_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert calls == ["runner", "waiter"]  # the waiter took over with its own fetch
            gate.set()
    assert results == ["waiter"]


async def test_single_flight_cancelled_waiter_leaves_runner_alone(
    cache: Cache, autojump_clock: trio.testing.MockClock
) -> None:
    gate = trio.Event()

    async def fetch() -> int:
        await gate.wait()
        return 7

    results: list[int] = []

    async def runner() -> None:
        results.append(await cache.single_flight("db", fetch))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner)
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(1) as scope:
                await cache.single_flight("db", fetch)
            assert scope.cancelled_caught
            gate.set()
    assert results == [7]


async def test_single_flight_gives_up_after_repeated_abandons(cache: Cache) -> None:
    # A flight whose runner was cancelled, and which (white-box) stays registered: the waiter
    # retries a bounded number of times and then reports Unavailable instead of spinning.
    async def fetch() -> int:
        raise AssertionError("never runs: a flight is always registered")

    flight = _Flight()
    flight.abandoned = True
    flight.done.set()
    cache._flights["db"] = flight
    with trio.fail_after(5), pytest.raises(Unavailable, match="refresh cancelled"):
        await cache.single_flight("db", fetch)


def test_listeners_hear_every_change_that_the_changes_cell_coalesces(cache: Cache) -> None:
    heard: list[tuple[str, int]] = []
    cache.listeners.append(lambda name, version: heard.append((name, version)))
    before = cache.changes.generation
    cache.put("a", {"v": 1}, version=1)
    cache.put("b", {"v": 1}, version=4)
    cache.put("a", {"v": 1}, version=1)            # the same value: no change
    cache.put("a", {"v": 2}, version=2)
    cache.remove("b")
    assert heard == [("a", 1), ("b", 4), ("a", 2), ("b", -1)]
    # the cell keeps only the last one for a consumer that was not looking
    assert cache.changes.generation == before + 4 and cache.changes.value == ("b", -1)


def test_export_with_a_memo_reseals_only_what_changed(cache: Cache) -> None:
    outer = Sealer.generate()

    def ad(name: str, version: int) -> bytes:
        return f"outer:{name}:{version}".encode()

    for name in ("a", "b", "c"):
        cache.put(name, {"v": MARKER + name}, version=1)
    memo: dict[str, tuple[bytes, bytes]] = {}
    first = {r.name: r.blob for r in cache.export_sealed(outer, ad, memo=memo)}
    cache.put("b", {"v": "new"}, version=2)
    cache.remove("c")
    second = {r.name: r.blob for r in cache.export_sealed(outer, ad, memo=memo)}
    assert second["a"] is first["a"]                   # unchanged: not opened and sealed again
    assert second["b"] != first["b"] and set(second) == {"a", "b"} == set(memo)
    restored = Cache()
    records = cache.export_sealed(outer, ad, memo=memo)
    assert restored.import_sealed(records, outer, ad) == ["a", "b"]
    got_a, got_b = restored.get("a"), restored.get("b")
    assert got_a is not None and got_a.data == {"v": MARKER + "a"}
    assert got_b is not None and got_b.data == {"v": "new"} and got_b.version == 2
