"""Floods of the socket by another uid (issue 13, items 2, 3, 8 and 10), against a running agent.

The attacker is always nobody, in a forked child (``tests.peers.run_as``) using plain blocking
sockets; root, a uid with its own budget, reads meanwhile in the trio loop and counts failures.
Every loop is bounded in count, every wait by a timeout. Nothing here asserts a duration: timings
are ``bench/flood_bench.py``'s business.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

import agentd.daemon
from agentd.access import Peer
from agentd.client import AsyncClient, Client, open_client
from agentd.errors import ClientError
from agentd.listen import STORM_BACKLOG
from tests.agentfixture import (
    NOBODY,
    RunningAgent,
    Seeded,
    agent_fixture,
    seed,
)
from tests.openbao import DevServer
from tests.peers import run_as
from tests.support import until
from tests.test_backlog import fill_queue, queue_room
from tests.test_limits import code, frame, read_reply

PING = frame({"v": 1, "id": 1, "op": "ping"})


@pytest.fixture
def seeded(bao: DevServer) -> Seeded:
    return seed(bao)


def read_until_eof(sock: socket.socket, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """Replies on ``sock`` until EOF (True) or ``limit`` replies or a timeout (False)."""
    replies: list[dict[str, Any]] = []
    try:
        while len(replies) < limit:
            replies.append(read_reply(sock))
    except ConnectionError:
        return replies, True
    except OSError:
        return replies, False
    return replies, False


async def root_reads(path: Path, count: int) -> int:
    """``count`` reads by root, half on one kept connection, half on fresh ones; the failures."""
    failures = 0
    async with AsyncClient.connect(path) as kept:
        for i in range(count):
            try:
                if i % 2:
                    assert (await kept.get("db", "username"))["data"] == "app"
                else:
                    async with AsyncClient.connect(path) as fresh:
                        assert (await fresh.get("db", "username"))["data"] == "app"
            except (ClientError, AssertionError):
                failures += 1
    return failures


# --- item 2: a pipeline over the rate is not read, and closed if it keeps going ---------------

flooded = agent_fixture('requests_per_second_per_uid = 20\nrequest_burst_per_uid = 80\n'
                        'frame_timeout = "1s"')


async def test_connections_flooding_over_the_rate_are_closed_and_others_served(
    flooded: RunningAgent,
) -> None:
    """64 connections of nobody pipeline 500 pings each without reading; root reads meanwhile."""
    path = str(flooded.socket)

    def flood() -> dict[str, Any]:
        socks = []
        for _ in range(64):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(30)
            sock.connect(path)
            socks.append(sock)
        for sock in socks:
            sock.sendall(PING * 500)         # 10 KB: fits in the socket buffer
        tally = {"closed": 0, "ok": 0, "rate_limited-id": 0, "rate_limited-nil": 0}
        for sock in socks:
            replies, eof = read_until_eof(sock, 501)
            tally["closed"] += eof
            if not eof:             # still open after every answer: no point waiting for more
                sock.close()
                break
            for reply in replies:
                key = code(reply)
                if key == "rate_limited":
                    key += "-nil" if reply["id"] is None else "-id"
                tally[key] = tally.get(key, 0) + 1
            sock.close()
        return tally

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            result: dict[str, Any] = {}

            async def run_flood() -> None:
                result.update(await run_as(NOBODY, NOBODY, flood))

            nursery.start_soon(run_flood)
            failures = await root_reads(flooded.socket, 40)
    assert failures == 0
    assert result["ok"], result
    tally = result["value"]
    # Every flooding connection was closed by the agent with rate_limited (id nil)...
    assert tally["closed"] == 64 and tally["rate_limited-nil"] == 64, tally
    # ... after answering only what its uid's budget paid for, and no over-rate request.
    assert tally["rate_limited-id"] == 0
    assert 0 < tally["ok"] < 64 * 500
    stats = flooded.agent.server.statistics()
    assert stats.flood_closed >= 64 and stats.rate_limited > 0
    # The agent still answers nobody once its bucket refills.
    with trio.fail_after(30):
        after = await run_as(NOBODY, NOBODY, lambda: _ping(path))
        assert after == {"ok": True, "value": "pong"}


def _ping(path: str, *, private: bool = True) -> str:
    with Client.connect(path, timeout=20, private=private) as client:
        client.ping()
    return "pong"


async def test_a_client_that_waits_for_its_answers_is_slowed_not_closed(
    flooded: RunningAgent,
) -> None:
    # One request at a time, twice the burst: every one answered, none refused, none dropped.
    path = str(flooded.socket)

    def steady() -> list[str]:
        out = []
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(path)
            for i in range(80):
                sock.sendall(frame({"v": 1, "id": i, "op": "ping"}))
                out.append(code(read_reply(sock)))
        return out

    with trio.fail_after(60):
        result = await run_as(NOBODY, NOBODY, steady)
    assert result == {"ok": True, "value": ["ok"] * 80}
    assert flooded.agent.server.statistics().flood_closed == 0


# --- item 3: over-cap connections closed at accept; the backlog; clients retry EAGAIN --------

identified: list[int] = []


def counting_identify(agent: agentd.daemon.Agent) -> None:
    identified.clear()

    def identify(sock: socket.socket) -> Peer:
        peer = Peer.from_socket(sock)
        identified.append(peer.uid)
        return peer

    agent.server.identify = identify


capped = agent_fixture("max_connections_per_uid = 2", configure=counting_identify)


async def test_a_connection_over_the_cap_is_closed_at_accept_without_identity_work(
    capped: RunningAgent,
) -> None:
    path = str(capped.socket)

    def over_the_cap() -> dict[str, Any]:
        held = []
        for i in range(2):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(20)
            sock.connect(path)
            sock.sendall(frame({"v": 1, "id": i, "op": "ping"}))
            assert read_reply(sock) == {"id": i, "ok": True}      # admitted and served
            held.append(sock)
        third = socket.socket(socket.AF_UNIX)
        third.settimeout(20)
        third.connect(path)
        replies, eof = read_until_eof(third, 2)       # sends nothing: the agent speaks first
        for sock in [*held, third]:
            sock.close()
        return {"replies": replies, "eof": eof}

    with trio.fail_after(30):
        result = await run_as(NOBODY, NOBODY, over_the_cap)
    assert result["ok"], result
    replies = result["value"]["replies"]
    assert result["value"]["eof"] and len(replies) == 1
    assert (replies[0]["id"], code(replies[0])) == (None, "rate_limited")
    # The refused connection never cost a /proc identity: only the two admitted ones did.
    assert identified.count(NOBODY) == 2
    assert capped.agent.server.statistics().refused_connections == 1


connect_limited = agent_fixture("connects_per_second_per_uid = 1\nconnect_burst_per_uid = 3")


async def test_new_connections_draw_from_their_own_bucket_not_the_request_budget(
    connect_limited: RunningAgent,
) -> None:
    """A uid's connects over ``connect_burst_per_uid`` are refused at accept, while the same
    uid's requests on a connection it has go on at the (much larger) request rate."""
    path = str(connect_limited.socket)

    def connect_five_then_ping() -> dict[str, Any]:
        held, refused = [], 0
        socks = []
        for _ in range(5):              # all five queued first: admitted or refused together
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(20)
            sock.connect(path)
            socks.append(sock)
        for sock in socks:
            # a refused one was answered and closed at accept: its reply is there to read
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(frame({"v": 1, "id": 1, "op": "ping"}))
            reply = read_reply(sock)
            if reply.get("id") is None and code(reply) == "rate_limited":
                refused += 1
                sock.close()
            else:
                held.append(sock)
        answered = 0
        for i in range(50):
            held[0].sendall(frame({"v": 1, "id": 10 + i, "op": "ping"}))
            answered += read_reply(held[0]) == {"id": 10 + i, "ok": True}
        for sock in held:
            sock.close()
        return {"held": len(held), "refused": refused, "answered": answered}

    with trio.fail_after(30):
        result = await run_as(NOBODY, NOBODY, connect_five_then_ping)
    assert result["ok"], result
    # the bucket holds 3 and refills one a second: the 4th and 5th connects come too soon
    # (a refill in between lets at most one more in)
    assert result["value"]["held"] in (3, 4)
    assert result["value"]["refused"] == 5 - result["value"]["held"]
    assert result["value"]["answered"] == 50


def quick_storm(agent: agentd.daemon.Agent) -> None:
    # a storm this test's machine can make whatever its load (a loaded CI runner accepts far
    # fewer than STORM_REFUSALS a second), and over soon
    agent.server.storm.threshold = 100
    agent.server.storm.hold = 5.0


async def settled(count: Callable[[], int], quiet: float = 0.3) -> None:
    """Wait until ``count()`` has not changed for ``quiet`` seconds (bounded by the caller)."""
    last, since = count(), trio.current_time()
    while trio.current_time() - since < quiet:
        await trio.sleep(0.02)
        now = count()
        if now != last:
            last, since = now, trio.current_time()


storm_sized = agent_fixture("listen_backlog = 300\nconnects_per_second_per_uid = 1\n"
                            "connect_burst_per_uid = 10", configure=quick_storm)


async def test_a_connect_storm_shortens_the_listen_queue_until_it_is_over(
    storm_sized: RunningAgent,
) -> None:
    """Refusals at a storm's rate (lowered here) cut the queue to STORM_BACKLOG places; the
    first turn after
    the storm is over restores ``listen_backlog``. Measured with the agent's loop held (this
    test's code runs on it, and nothing in between awaits): nobody accepts, and a non-blocking
    connect fails with EAGAIN once the queue is full (AF_UNIX takes backlog + 1)."""
    path = str(storm_sized.socket)
    server = storm_sized.agent.server
    assert server.statistics().listen_backlog == 300

    def storm() -> int:
        connected = 0
        for _ in range(20_000):
            sock = socket.socket(socket.AF_UNIX)
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.connect(path)
                connected += 1
            sock.close()
        return connected

    def refused_reply() -> dict[str, Any]:
        """Five connects in a row (accepted in order): the bucket refills 1 a second, so the
        last one is refused; what it gets."""
        socks = []
        for _ in range(5):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)          # blocking: waits while the queue drains
            sock.settimeout(20)
            socks.append(sock)
        replies, eof = read_until_eof(socks[-1], 1)
        for sock in socks:
            sock.close()
        return {"replies": replies, "eof": eof}

    with trio.fail_after(120):
        result = await run_as(NOBODY, NOBODY, storm)
        assert result["ok"], result
        await until(lambda: server.statistics().connect_storms == 1, "a storm seen")
        # the storm's last connects are accepted a turn (STORM_BATCH) at a time: let them go
        await settled(lambda: server.statistics().refused_connections)
        during = queue_room(storm_sized.socket)         # no checkpoint: nothing accepts
        assert server.statistics().listen_backlog == STORM_BACKLOG
        # nobody's connect bucket is (nearly) empty: refused, and in a storm with no reply
        refused = await run_as(NOBODY, NOBODY, refused_reply)
        assert refused == {"ok": True, "value": {"replies": [], "eof": True}}
        await trio.sleep(server.storm.hold + 0.5)       # the storm is over...
        # ...and a connection makes a turn (on the main socket, not root's private one)
        await trio.to_thread.run_sync(partial(_ping, path, private=False))
        after = queue_room(storm_sized.socket)
    assert during in (STORM_BACKLOG, STORM_BACKLOG + 1)
    assert after in (300, 301)
    assert server.statistics().listen_backlog == 300
    assert server.statistics().connect_storms == 1
    assert server.statistics().refused_connections >= server.storm.threshold


async def test_a_reload_resizes_the_listen_queue_at_the_next_turn(
    storm_sized: RunningAgent,
) -> None:
    server = storm_sized.agent.server
    text = storm_sized.config_path.read_text()
    storm_sized.config_path.write_text(text.replace("listen_backlog = 300", "listen_backlog = 40"))
    assert storm_sized.agent.reload() is True
    with trio.fail_after(30):
        await trio.to_thread.run_sync(partial(_ping, str(storm_sized.socket), private=False))
        room = queue_room(storm_sized.socket)                              # nothing accepts
    assert room in (40, 41)
    assert server.statistics().listen_backlog == 40
    assert server.statistics().connect_storms == 0


stormed = agent_fixture("")


async def test_a_connect_storm_does_not_make_other_uids_connects_fail(
    stormed: RunningAgent,
) -> None:
    path = str(stormed.socket)
    stop = threading.Event()

    def storm() -> dict[str, int]:
        tally = {"connects": 0, "eagain": 0}
        for _ in range(20_000):
            if stop.is_set():       # never set in the child (fork copies memory): count bounds
                break
            sock = socket.socket(socket.AF_UNIX)
            sock.setblocking(False)
            try:
                sock.connect(path)
                tally["connects"] += 1
            except BlockingIOError:
                tally["eagain"] += 1
            except OSError:
                pass
            sock.close()
        return tally

    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            result: dict[str, Any] = {}

            async def run_storm() -> None:
                result.update(await run_as(NOBODY, NOBODY, storm))

            nursery.start_soon(run_storm)
            failures = 0
            for n in range(100):
                # root's clients, through root's private socket, and (every other turn) on
                # the main socket, as a uid no policy names connects
                private = n % 2 == 0
                try:
                    async with AsyncClient.connect(stormed.socket, private=private) as client:
                        await client.ping()
                except ClientError:
                    failures += 1
                blocking = await trio.to_thread.run_sync(
                    partial(_ping_or_fail, path, private=private))
                failures += blocking
    assert result["ok"], result
    assert result["value"]["connects"] > 0
    assert failures == 0


def _ping_or_fail(path: str, *, private: bool = True) -> int:
    try:
        _ping(path, private=private)
    except ClientError:
        return 1
    return 0


def full_listener(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket with backlog 1 that never accepts, its queue filled: a connect to it
    fails with EAGAIN until something is accepted."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    queued, filled = fill_queue(path, 16)
    assert filled, "the listen queue never filled"
    return listener, queued


def reached(listener: socket.socket, send: Callable[[bytes], object]) -> bool:
    """True if a byte sent with ``send`` arrives on one of the connections queued on
    ``listener`` (all of which are accepted and closed)."""
    send(b"x")
    listener.setblocking(False)
    found = False
    for _ in range(64):
        try:
            server, _ = listener.accept()
        except BlockingIOError:
            break
        with server, contextlib.suppress(BlockingIOError):
            found = found or server.recv(1, socket.MSG_DONTWAIT) == b"x"
    return found


CONNECT_SYSCALL = {"x86_64": 42, "aarch64": 203}.get(platform.machine())


def blocked_in_connect() -> bool:
    """True if a thread of this process is asleep in ``connect()`` (waiting in the kernel for a
    place in a full listen queue), from /proc/self/task/*/syscall."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/self/task/{tid}/syscall").read_text().split()
            if fields and fields[0] == str(CONNECT_SYSCALL):
                return True
    return False


needs_syscall_number = pytest.mark.skipif(CONNECT_SYSCALL is None,
                                          reason="connect's syscall number on this machine")


@needs_syscall_number
async def test_the_blocking_client_waits_in_the_kernel_for_a_place_in_a_full_queue(
    tmp_path: Path,
) -> None:
    """A connect to a full queue sleeps in ``connect()`` (the kernel wakes one waiter per
    accept, in order) instead of retrying EAGAIN, a race a storm wins (decision 13)."""
    path = tmp_path / "full.sock"
    listener, queued = full_listener(path)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                connected: list[Client] = []

                async def connect() -> None:
                    connected.append(await trio.to_thread.run_sync(
                        partial(Client.connect, path, timeout=20)))

                nursery.start_soon(connect)
                while not blocked_in_connect():
                    await trio.sleep(0.001)
                assert not connected
                listener.accept()[0].close()        # one place: the waiter gets it
        with connected[0]:
            assert reached(listener, connected[0]._sock.sendall)     # really connected
        # A queue that stays full: the wait is bounded, then ClientError.
        listener2, queued2 = full_listener(tmp_path / "full2.sock")
        try:
            with pytest.raises(ClientError, match="connection queue stayed full"):
                await trio.to_thread.run_sync(partial(Client.connect, tmp_path / "full2.sock",
                                                      timeout=0.2))
        finally:
            for sock in [listener2, *queued2]:
                sock.close()
    finally:
        for sock in [listener, *queued]:
            sock.close()


@needs_syscall_number
async def test_the_async_client_waits_in_the_kernel_for_a_place_in_a_full_queue(
    tmp_path: Path,
) -> None:
    path = tmp_path / "full.sock"
    listener, queued = full_listener(path)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                connected: list[AsyncClient] = []

                async def connect() -> None:
                    connected.append(await open_client(path))

                nursery.start_soon(connect)
                while not blocked_in_connect():
                    await trio.sleep(0.001)
                assert not connected
                listener.accept()[0].close()
            fd = connected[0]._stream.socket.fileno()
            assert reached(listener, lambda data: os.write(fd, data))
            await connected[0].aclose()
    finally:
        for sock in [listener, *queued]:
            sock.close()


# --- item 8: refusals cost bounded log and audit lines --------------------------------------

quick_exit = agent_fixture("requests_per_second_per_uid = 1000\nrequest_burst_per_uid = 1000",
                           audit_flush="1h")


async def test_a_fork_connect_exit_loop_costs_one_audit_line(quick_exit: RunningAgent) -> None:
    """200 times, a process of nobody connects, is answered once and exits; the connection it
    leaves behind then asks again: each is refused (pid gone), one audit line for them all."""
    path = str(quick_exit.socket)

    def loop() -> int:
        unanswered = 0
        for _ in range(200):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(20)
            pid = os.fork()
            if pid == 0:
                try:
                    sock.connect(path)
                    sock.sendall(PING)
                    read_reply(sock)       # identified and answered while alive
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            with contextlib.suppress(OSError):
                sock.sendall(PING)          # from the connection of a process that is gone
            replies, eof = read_until_eof(sock, 1)
            unanswered += eof and not replies
            sock.close()
        return unanswered

    with trio.fail_after(120):
        result = await run_as(NOBODY, NOBODY, loop)
        assert result == {"ok": True, "value": 200}
    stats = quick_exit.agent.server.statistics()
    assert stats.pid_reused == 200
    lines = [json.loads(line) for line in quick_exit.audit_text().splitlines()]
    about_nobody = [line for line in lines if line["uid"] == NOBODY]
    # One line per (op, decision) for the uid, however many pids: not one per process.
    assert len(about_nobody) == len({(line["op"], line["decision"]) for line in about_nobody})
    reused = [line for line in about_nobody if line["decision"] == "pid_reused"]
    assert len(reused) == 1 and reused[0]["count"] == 200
    warnings = [line for line in quick_exit.log_text().splitlines()
                if "names another process" in line or "no peer" in line]
    assert 1 <= len(warnings) < 50
    assert stats.warnings_suppressed >= 150


# --- item 10: deadlines per frame and per connection, not per byte --------------------------

trickled = agent_fixture('frame_timeout = "1s"\nidle_timeout = "2s"')


async def test_a_frame_trickled_a_byte_at_a_time_is_closed(trickled: RunningAgent) -> None:
    path = str(trickled.socket)

    def trickle() -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(20)
            sock.connect(path)
            sent = 0
            try:
                for byte in PING:           # one byte every 0.3 s: each gap < frame_timeout
                    sock.sendall(bytes([byte]))
                    sent += 1
                    time.sleep(0.3)
            except OSError:
                pass
            replies, eof = read_until_eof(sock, 1)
            return {"sent": sent, "replies": replies, "eof": eof}

    with trio.fail_after(60):
        result = await run_as(NOBODY, NOBODY, trickle)
    assert result["ok"], result
    value = result["value"]
    assert value["eof"] and value["replies"] == []      # closed, never answered
    assert value["sent"] < len(PING)                    # before the frame was complete


def test_a_signal_during_the_wait_for_a_place_does_not_end_it(tmp_path: Path) -> None:
    """A signal whose handler returns interrupts the blocking connect (EINTR), after which
    Python reports an AF_UNIX connect as done although it is not: the client must wait on, and
    hand back a socket that is really connected once a place is free."""
    path = tmp_path / "full.sock"
    listener, queued = full_listener(path)
    interrupts = threading.Semaphore(0)
    old = signal.signal(signal.SIGALRM, lambda *_: interrupts.release())

    def free_a_place() -> None:
        for _ in range(3):                      # the wait was interrupted three times
            interrupts.acquire()
        listener.accept()[0].close()

    freer = threading.Thread(target=free_a_place, daemon=True)
    freer.start()
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    try:
        with Client.connect(path, timeout=20) as client:
            signal.setitimer(signal.ITIMER_REAL, 0)
            assert reached(listener, client._sock.sendall)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        for _ in range(3):
            interrupts.release()                # never leave the thread waiting
        freer.join(10)
        for sock in [listener, *queued]:
            sock.close()
