"""The sans-IO protocol core: plain sync tests, plus hypothesis fuzz targets."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd import errors, jsonnum, protocol
from agentd.protocol import (
    CLOSED,
    NEED_DATA,
    ClientConnection,
    Event,
    Rejected,
    Request,
    Response,
    ServerConnection,
)


def frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def req(op: str = "ping", id: Any = 1, **args: Any) -> dict[str, Any]:
    return {"v": 1, "id": id, "op": op, **args}


def events(conn: ServerConnection) -> list[Any]:
    """Every event up to and including NEED_DATA or CLOSED."""
    out: list[Any] = []
    while True:
        event = conn.next_event()
        out.append(event)
        if event is NEED_DATA or event is CLOSED:
            return out


def one(data: bytes, **kwargs: Any) -> Any:
    conn = ServerConnection(**kwargs)
    conn.receive_data(data)
    return conn.next_event()


def rejected(data: bytes) -> Rejected:
    event = one(data)
    assert isinstance(event, Rejected), event
    return event


# --- valid requests ---------------------------------------------------------------------------


def test_ping() -> None:
    assert one(frame(req("ping", 7))) == Request(7, "ping", {})


def test_get_with_and_without_field() -> None:
    event = one(frame(req("get", name="db")))
    assert event == Request(1, "get", {"name": "db"})
    assert "field" not in event.args
    assert one(frame(req("get", name="db", field="password"))).args == {
        "name": "db", "field": "password"}


def test_every_op_is_accepted() -> None:
    good: dict[str, dict[str, Any]] = {
        "ping": {}, "get": {"name": "db"}, "list": {}, "watch": {"names": ["a", "b"]},
        "status": {}, "refresh": {"name": "db"},
    }
    assert set(good) == set(protocol.OPS)
    for op, args in good.items():
        event = one(frame(req(op, **args)))
        assert isinstance(event, Request)
        assert event.op == op


def test_watch_names_are_a_tuple() -> None:
    assert one(frame(req("watch", names=["a", "b"]))).args["names"] == ("a", "b")


def test_request_args_are_read_only() -> None:
    event = one(frame(req("get", name="db")))
    with pytest.raises(TypeError):
        event.args["name"] = "other"


def test_negative_and_large_ids_are_echoed() -> None:
    assert one(frame(req(id=-5))).id == -5
    assert one(frame(req(id=2**64 - 1))).id == 2**64 - 1


def test_pipelined_requests_come_out_in_order() -> None:
    conn = ServerConnection()
    conn.receive_data(b"".join(frame(req("ping", i)) for i in range(1, 6)))
    got = events(conn)
    assert [e.id for e in got[:-1]] == [1, 2, 3, 4, 5]
    assert got[-1] is NEED_DATA
    assert not conn.has_partial_frame


def test_byte_at_a_time() -> None:
    first = frame(req("get", 3, name="db"))
    data = first + frame(req("list", 4))
    conn = ServerConnection()
    got: list[Any] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        got.extend(e for e in events(conn) if e is not NEED_DATA)
        at_boundary = i + 1 in (len(first), len(data))
        assert conn.has_partial_frame is not at_boundary
    assert got == [Request(3, "get", {"name": "db"}), Request(4, "list", {})]


def test_has_partial_frame() -> None:
    conn = ServerConnection()
    assert not conn.has_partial_frame
    data = frame(req())
    conn.receive_data(data[:2])
    assert conn.next_event() is NEED_DATA
    assert conn.has_partial_frame
    conn.receive_data(data[2:-1])
    assert conn.next_event() is NEED_DATA
    assert conn.has_partial_frame
    conn.receive_data(data[-1:])
    assert isinstance(conn.next_event(), Request)
    assert not conn.has_partial_frame


# --- framing errors -----------------------------------------------------------------------------


def test_too_large_is_rejected_before_the_body_arrives() -> None:
    conn = ServerConnection(max_request_bytes=100)
    conn.receive_data(struct.pack(">I", 101))
    event = conn.next_event()
    assert isinstance(event, Rejected)
    assert event.id is None
    assert isinstance(event.error, errors.FrameTooLarge)
    assert event.error.code == "too_large"
    assert conn.broken
    assert not conn.has_partial_frame
    conn.receive_data(b"x" * 101)
    assert conn.next_event() is CLOSED
    assert conn.next_event() is CLOSED


def test_limit_is_inclusive() -> None:
    body = msgpack.packb(req())
    event = one(frame(req()), max_request_bytes=len(body))
    assert isinstance(event, Request)


def test_default_limit_is_64k() -> None:
    assert isinstance(rejected(struct.pack(">I", 65537)).error, errors.FrameTooLarge)
    conn = ServerConnection()
    conn.receive_data(struct.pack(">I", 65536))
    assert conn.next_event() is NEED_DATA


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb([1, 2, 3]),
        msgpack.packb("ping"),
        msgpack.packb(None),
        msgpack.packb(req()) + b"\x00",  # trailing garbage
        msgpack.packb(req()) + msgpack.packb(req()),  # two objects in one frame
        msgpack.packb({1: "x", "id": 1}, use_bin_type=True),  # non-str key
        msgpack.packb({b"id": 1}, use_bin_type=True),  # bin key
        msgpack.packb({"id": 1, "v": 1, "op": "ping", "x": {1: 2}}),  # nested int key
        b"\xc1",  # never used
        b"\x81",  # truncated map
        b"\x81\xa2i",  # truncated string
        b"\x81\xa2\xff\xfe\x01",  # invalid utf-8 key
        b"\x91" * 5000 + b"\xc0",  # deep nesting
        b"\xdf\xff\xff\xff\xff",  # map claiming 4G entries
    ],
)
def test_body_that_is_not_one_map_is_malformed(body: bytes) -> None:
    conn = ServerConnection()
    conn.receive_data(struct.pack(">I", len(body)) + body + frame(req()))
    event = conn.next_event()
    assert isinstance(event, Rejected)
    assert event.id is None
    assert isinstance(event.error, errors.MalformedFrame)
    assert event.error.code == "bad_request"
    assert conn.broken
    # the valid request after it is never read
    assert conn.next_event() is CLOSED


def test_zero_length_frame_is_malformed() -> None:
    event = rejected(struct.pack(">I", 0) + frame(req()))
    assert isinstance(event.error, errors.MalformedFrame)


def test_data_after_framing_error_is_ignored() -> None:
    conn = ServerConnection()
    conn.receive_data(frame([1]))
    assert isinstance(conn.next_event(), Rejected)
    conn.receive_data(frame(req()))
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED


# --- request errors: the connection stays open --------------------------------------------------


def still_open(data: bytes) -> Rejected:
    conn = ServerConnection()
    conn.receive_data(data + frame(req("ping", 99)))
    event = conn.next_event()
    assert isinstance(event, Rejected), event
    assert not isinstance(event.error, errors.FramingError)
    assert not conn.broken
    assert conn.next_event() == Request(99, "ping", {})
    return event


@pytest.mark.parametrize("bad_id", [None, "1", 1.0, True, False, [1], {"a": 1}, b"\x01"])
def test_bad_id(bad_id: Any) -> None:
    event = still_open(frame(req(id=bad_id)))
    assert event.id is None
    assert isinstance(event.error, errors.BadRequest)
    assert "'id'" in event.error.message


def test_missing_id() -> None:
    event = still_open(frame({"v": 1, "op": "ping"}))
    assert event.id is None
    assert isinstance(event.error, errors.BadRequest)


@pytest.mark.parametrize("v", [0, 2, "1", 1.0, True, None])
def test_wrong_version(v: Any) -> None:
    event = still_open(frame({"v": v, "id": 5, "op": "ping"}))
    assert event.id == 5
    assert isinstance(event.error, errors.UnsupportedVersion)
    assert event.error.code == "unsupported_version"


def test_version_is_checked_before_op() -> None:
    event = still_open(frame({"v": 2, "id": 5, "op": "teleport"}))
    assert isinstance(event.error, errors.UnsupportedVersion)


def test_missing_version() -> None:
    event = still_open(frame({"id": 5, "op": "ping"}))
    assert event.id == 5
    assert isinstance(event.error, errors.BadRequest)
    assert "'v'" in event.error.message


def test_unknown_op() -> None:
    event = still_open(frame(req("teleport", 6)))
    assert event.id == 6
    assert isinstance(event.error, errors.UnknownOp)
    assert "teleport" in event.error.message


@pytest.mark.parametrize("op", [1, None, ["get"], b"ping"])
def test_op_not_a_string(op: Any) -> None:
    event = still_open(frame({"v": 1, "id": 6, "op": op}))
    assert isinstance(event.error, errors.UnknownOp)


def test_missing_op() -> None:
    event = still_open(frame({"v": 1, "id": 6}))
    assert isinstance(event.error, errors.BadRequest)
    assert "'op'" in event.error.message


def test_unknown_op_name_is_bounded_in_message() -> None:
    event = still_open(frame(req("x" * 10000)))
    assert len(event.error.message) < 200


def test_missing_name() -> None:
    event = still_open(frame(req("get", 8)))
    assert event.id == 8
    assert isinstance(event.error, errors.BadRequest)
    assert event.error.message == "get: missing argument 'name'"


def test_extra_argument() -> None:
    event = still_open(frame(req("ping", 8, name="db")))
    assert isinstance(event.error, errors.BadRequest)
    assert event.error.message == "ping: unknown argument 'name'"


def test_extra_argument_name_is_bounded_and_values_never_echoed() -> None:
    secret = "hunter2-very-secret"
    event = still_open(frame(req("get", 8, name="db", **{"k" * 5000: secret})))
    assert len(event.error.message) < 200
    assert secret not in event.error.message


@pytest.mark.parametrize("field", [1, None, b"password", ["a"], "", "f" * 257])
def test_field_must_be_a_short_string(field: Any) -> None:
    event = still_open(frame(req("get", 9, name="db", field=field)))
    assert isinstance(event.error, errors.BadRequest)
    assert "'field'" in event.error.message


@pytest.mark.parametrize("exact", [1, 0, None, "true", b"", [True]])
def test_exact_must_be_true_or_false(exact: Any) -> None:
    event = still_open(frame(req("get", 9, name="db", exact=exact)))
    assert isinstance(event.error, errors.BadRequest)
    assert event.error.message == "get: argument 'exact' must be true or false"


@pytest.mark.parametrize("exact", [True, False])
def test_exact_is_an_optional_flag_of_get(exact: bool) -> None:
    request = one(frame(req("get", 9, name="db", field="n", exact=exact)))
    assert isinstance(request, Request)
    assert dict(request.args) == {"name": "db", "field": "n", "exact": exact}


@pytest.mark.parametrize("name", [1, None, b"db", "", "n" * 257, {"a": "b"}])
def test_name_must_be_a_short_string(name: Any) -> None:
    event = still_open(frame(req("refresh", 9, name=name)))
    assert isinstance(event.error, errors.BadRequest)
    assert "'name'" in event.error.message


def test_name_of_256_characters_is_fine() -> None:
    assert isinstance(one(frame(req("get", name="n" * 256))), Request)


@pytest.mark.parametrize(
    "names", [[], "db", ["db", 1], ["db", ""], ["x" * 257], ["n"] * 257, None, {"db": 1}]
)
def test_watch_names(names: Any) -> None:
    event = still_open(frame(req("watch", 9, names=names)))
    assert isinstance(event.error, errors.BadRequest)
    assert "'names'" in event.error.message


def test_watch_256_names_is_fine() -> None:
    assert isinstance(one(frame(req("watch", names=[f"n{i}" for i in range(256)]))), Request)


def test_secret_values_never_echoed() -> None:
    secret = "s3cr3t-value"
    for bad in (
        req("get", name=[secret]),
        req("get", name="db", field=[secret]),
        req("teleport", name=secret),
        req("ping", extra=secret),
        req("watch", names=[secret, 5]),
    ):
        event = still_open(frame(bad))
        assert secret not in event.error.message


# --- EOF ----------------------------------------------------------------------------------------


def test_eof_on_a_frame_boundary() -> None:
    conn = ServerConnection()
    conn.receive_data(frame(req()))
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), Request)
    assert conn.next_event() is CLOSED
    assert conn.next_event() is CLOSED


@pytest.mark.parametrize("cut", [1, 3, 4, 6])
def test_eof_mid_frame_just_closes(cut: int) -> None:
    conn = ServerConnection()
    conn.receive_data(frame(req())[:cut])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED
    assert not conn.broken


def test_data_after_eof_is_a_caller_bug() -> None:
    conn = ServerConnection()
    conn.receive_data(b"")
    conn.receive_data(b"")  # repeated EOF is fine
    with pytest.raises(RuntimeError):
        conn.receive_data(b"x")


# --- replies ------------------------------------------------------------------------------------


def decode(data: bytes) -> Any:
    (length,) = struct.unpack(">I", data[:4])
    assert len(data) == 4 + length
    return msgpack.unpackb(data[4:], raw=False)


def test_send_result() -> None:
    conn = ServerConnection()
    assert decode(conn.send_result(3, {"data": {"u": "x"}, "version": 2})) == {
        "id": 3, "ok": True, "data": {"u": "x"}, "version": 2}


def test_send_result_refuses_envelope_keys() -> None:
    with pytest.raises(ValueError):
        ServerConnection().send_result(3, {"ok": False})


def test_send_result_with_packed_fields_is_the_same_frame_as_unpacked() -> None:
    conn = ServerConnection()
    value = {"username": "app", "password": "p" * 300, "n": [1, -2, 2**40, 1.5, None, True],
             "nested": {"bin": b"\x00\xff", "empty": {}}}
    meta = {"version": 7, "fetched_at": 1700000000.25, "expires_at": None, "stale": False}
    packed = msgpack.packb(value, use_bin_type=True)
    spliced = conn.send_result(12, meta, packed={"data": packed})
    assert spliced == conn.send_result(12, {"data": value, **meta})
    assert decode(spliced) == {"id": 12, "ok": True, "data": value, **meta}
    # Only packed fields, and a result of 16 fields or more (its map header is 3 bytes long).
    assert conn.send_result(1, {}, packed={"data": packed}) == conn.send_result(1, {"data": value})
    wide = {f"k{i:02d}": i for i in range(20)}
    assert (conn.send_result(2 ** 33, wide, packed={"data": packed})
            == conn.send_result(2 ** 33, {"data": value, **wide}))


def test_send_result_with_packed_fields_refuses_clashing_keys() -> None:
    conn = ServerConnection()
    nil = msgpack.packb(None)
    for packed, result in [({"ok": nil}, {}), ({"id": nil}, {}), ({"error": nil}, {}),
                           ({"data": nil}, {"data": 1})]:
        with pytest.raises(ValueError):
            conn.send_result(1, result, packed=packed)


def test_a_cached_value_goes_on_the_wire_as_stored() -> None:
    # The server's get splices the opened seal's bytes into the reply: the same frame as the
    # value read back from the cache and packed again.
    from agentd.cache import Cache, thaw

    cache = Cache()
    cache.put("db", {"username": "app", "password": "s3cret", "ports": [1, 2], "x": {"y": 1.0}},
              version=3)
    opened = cache.get_packed("db")
    entry = cache.get("db")
    assert opened is not None and entry is not None
    packed, version, fetched_at, expires_at, stale = opened
    assert (version, fetched_at, expires_at, stale) == (
        entry.version, entry.fetched_at, entry.expires_at, entry.stale)
    meta = {"version": version, "fetched_at": fetched_at, "expires_at": expires_at,
            "stale": stale}
    conn = ServerConnection()
    assert (conn.send_result(5, meta, packed={"data": packed})
            == conn.send_result(5, {"data": thaw(entry.data), **meta}))
    assert cache.get_packed("nope") is None


def test_send_error() -> None:
    conn = ServerConnection()
    assert decode(conn.send_error(None, errors.FrameTooLarge("too big"))) == {
        "id": None, "ok": False, "error": {"code": "too_large", "message": "too big"}}
    assert decode(conn.send_error(4, errors.Forbidden("no"))) == {
        "id": 4, "ok": False, "error": {"code": "forbidden", "message": "no"}}


def test_send_event() -> None:
    conn = ServerConnection()
    assert decode(conn.send_event(5, "changed", name="db", version=3)) == {
        "id": 5, "event": "changed", "name": "db", "version": 3}


# --- client side --------------------------------------------------------------------------------


def test_client_ids_increase_from_one() -> None:
    client = ClientConnection()
    ids = [client.send_request("ping")[0] for _ in range(3)]
    assert ids == [1, 2, 3]


def test_client_request_shape() -> None:
    _, data = ClientConnection().send_request("get", name="db", field="f")
    assert decode(data) == {"v": 1, "id": 1, "op": "get", "name": "db", "field": "f"}


def test_an_integer_beyond_64_bits_reaches_the_client_as_an_int() -> None:
    """The cache's v1 form sends it as msgpack ext type 1 with its digits (protocol.md)."""
    big = 2**70
    packed = jsonnum.plain_packed(jsonnum.packb({"big": big, "f": jsonnum.number("1e3")}))
    server = ServerConnection()
    server.receive_data(frame(req("get", 5, name="db")))
    request = server.next_event()
    reply = server.send_result(request.id, {"stale": False}, packed={"data": packed})
    client = ClientConnection()
    client.receive_data(reply)
    event = client.next_event()
    assert event.result["data"] == {"big": big, "f": 1000.0}
    assert type(event.result["data"]["f"]) is float


def test_client_refuses_reserved_argument_names() -> None:
    with pytest.raises(ValueError):
        ClientConnection().send_request("get", id=3)


def round_trip(server_reply: bytes) -> Any:
    client = ClientConnection()
    client.receive_data(server_reply)
    return client.next_event()


def test_round_trip_success() -> None:
    client = ClientConnection()
    server = ServerConnection()
    id_, data = client.send_request("get", name="db")
    server.receive_data(data)
    request = server.next_event()
    assert request == Request(id_, "get", {"name": "db"})
    client.receive_data(server.send_result(request.id, {"data": b"\x00raw", "stale": False}))
    assert client.next_event() == Response(id_, True, {"data": b"\x00raw", "stale": False}, None)
    assert client.next_event() is NEED_DATA


@pytest.mark.parametrize("cls", [*errors.ERROR_CODES.values(), errors.MalformedFrame])
def test_round_trip_error_codes(cls: type[errors.RequestError]) -> None:
    response = round_trip(ServerConnection().send_error(7, cls("why")))
    assert isinstance(response, Response)
    assert response.id == 7
    assert not response.ok
    assert response.error is not None
    assert type(response.error) is errors.ERROR_CODES[cls.code]
    assert response.error.message == "why"


def test_round_trip_server_rejections() -> None:
    client = ClientConnection()
    server = ServerConnection()
    id_, data = client.send_request("teleport")
    server.receive_data(data)
    event = server.next_event()
    assert isinstance(event, Rejected)
    client.receive_data(server.send_error(event.id, event.error))
    response = client.next_event()
    assert isinstance(response, Response)
    assert response.id == id_
    assert isinstance(response.error, errors.UnknownOp)


def test_unknown_error_code_is_internal() -> None:
    reply = frame({"id": 1, "ok": False, "error": {"code": "quantum", "message": "m"}})
    response = round_trip(reply)
    assert type(response.error) is errors.InternalError
    assert "quantum" in response.error.message


def test_client_event() -> None:
    event = round_trip(ServerConnection().send_event(2, "revoked", name="db", version=4))
    assert event == Event(2, "revoked", {"name": "db", "version": 4})


def test_client_pipelined_and_split_replies() -> None:
    server = ServerConnection()
    data = server.send_result(1, {}) + server.send_event(1, "changed", name="a", version=1)
    client = ClientConnection()
    got = []
    for i in range(len(data)):
        client.receive_data(data[i : i + 1])
        while (event := client.next_event()) is not NEED_DATA:
            got.append(event)
    assert got == [Response(1, True, {}, None), Event(1, "changed", {"name": "a", "version": 1})]


def test_client_clean_eof() -> None:
    client = ClientConnection()
    client.receive_data(b"")
    assert client.next_event() is CLOSED


def test_client_eof_mid_reply() -> None:
    client = ClientConnection()
    client.receive_data(ServerConnection().send_result(1, {})[:-1])
    assert client.next_event() is NEED_DATA
    client.receive_data(b"")
    with pytest.raises(errors.ClientError, match="middle of a reply"):
        client.next_event()


@pytest.mark.parametrize(
    "reply",
    [
        frame([1]),
        frame({"id": 1}),
        frame({"id": 1, "ok": "yes"}),
        frame({"id": True, "ok": True}),
        frame({"id": None, "ok": True}),
        frame({"id": 1, "ok": False}),
        frame({"id": 1, "ok": False, "error": "boom"}),
        frame({"id": 1, "ok": False, "error": {"code": 1, "message": "m"}}),
        frame({"id": None, "event": "changed"}),
        frame({"id": 1, "event": 5}),
        struct.pack(">I", 0),
        b"\x00\x00\x00\x01\xc1",
    ],
)
def test_client_malformed_server_data(reply: bytes) -> None:
    client = ClientConnection()
    client.receive_data(reply)
    with pytest.raises(errors.ClientError):
        client.next_event()
    with pytest.raises(errors.ClientError):
        client.next_event()


def test_client_reply_too_large() -> None:
    client = ClientConnection(max_response_bytes=10)
    client.receive_data(struct.pack(">I", 11))
    with pytest.raises(errors.ClientError, match="over the limit"):
        client.next_event()


# --- fuzz ---------------------------------------------------------------------------------------


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


_frames = st.one_of(
    st.binary(max_size=64).map(lambda b: struct.pack(">I", len(b)) + b),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8)
        | st.binary(max_size=8) | st.floats(allow_nan=False),
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["v", "id", "op", "name", "field", "names", "x"])
                          | st.text(max_size=4), inner, max_size=6),
        max_leaves=12,
    ).map(frame),
    st.binary(max_size=16),
)


@settings(max_examples=7000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    pieces=st.lists(_frames, max_size=6),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
    eof=st.booleans(),
    limit=st.sampled_from([1, 16, 65536]),
)
def test_fuzz_server_never_raises(
    pieces: list[bytes], cuts: list[int], eof: bool, limit: int
) -> None:
    conn = ServerConnection(max_request_bytes=limit)
    seen_closed = False
    for chunk in [*chunked(b"".join(pieces), cuts), *([b""] if eof else [])]:
        conn.receive_data(chunk)
        for event in events(conn):
            assert isinstance(event, (Request, Rejected)) or event in (NEED_DATA, CLOSED)
            if seen_closed:
                assert event is CLOSED
            if event is CLOSED:
                seen_closed = True
            if isinstance(event, Rejected):
                assert isinstance(event.error, errors.RequestError)
                if isinstance(event.error, errors.FramingError):
                    assert event.id is None
                    assert conn.broken
                # every rejection can be answered
                assert conn.send_error(event.id, event.error)
            if isinstance(event, Request):
                assert event.op in protocol.OPS
    if eof:
        assert conn.next_event() is CLOSED


_name = st.text(min_size=1, max_size=256)
_requests = st.one_of(
    st.just(("ping", {})),
    st.just(("list", {})),
    st.just(("status", {})),
    st.builds(lambda n: ("get", {"name": n}), _name),
    st.builds(lambda n, f: ("get", {"name": n, "field": f}), _name, _name),
    st.builds(lambda n: ("refresh", {"name": n}), _name),
    st.builds(lambda ns: ("watch", {"names": ns}), st.lists(_name, min_size=1, max_size=256)),
)


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(requests=st.lists(_requests, min_size=1, max_size=5), cuts=st.lists(st.integers(0)))
def test_fuzz_valid_requests_survive_any_split(
    requests: list[tuple[str, dict[str, Any]]], cuts: list[int]
) -> None:
    client = ClientConnection()
    sent = []
    data = b""
    for op, args in requests:
        id_, frame_ = client.send_request(op, **args)
        sent.append((id_, op, args))
        data += frame_
    server = ServerConnection(max_request_bytes=2**20)
    got: list[Any] = []
    for chunk in chunked(data, cuts):
        server.receive_data(chunk)
        got.extend(e for e in events(server) if e is not NEED_DATA)
    assert [(e.id, e.op, {k: list(v) if k == "names" else v for k, v in e.args.items()})
            for e in got] == sent
