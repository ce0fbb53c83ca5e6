"""The sans-IO HTTP face: plain sync tests over ``HttpConnection`` with a stand-in ``Reader``,
plus a hypothesis fuzz (arbitrary bytes give responses or a close, never an exception)."""

from __future__ import annotations

import itertools
import json
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd import jsonnum, protocol
from agentd.config import SecretConfig
from agentd.errors import Forbidden, NotFound, RateLimited, Unavailable
from agentd.httpface import (
    CLOSED,
    NEED_DATA,
    HttpConnection,
    Value,
    error_response,
    looks_like_http,
)

NOW = 1_800_000_000.0
DENIED = b'{"errors":["permission denied"]}'

SECRETS = {
    "db": SecretConfig(name="db", kind="kv2", path="secret/data/app/db"),
    "other": SecretConfig(name="other", kind="kv2", path="secret/data/other"),
    "legacy": SecretConfig(name="legacy", kind="kv1", path="kv/app/legacy", refresh=60.0),
    "dbcreds": SecretConfig(name="dbcreds", kind="leased", path="database/creds/app"),
    "tls": SecretConfig(name="tls", kind="pki", path="pki/issue/web"),
    "team": SecretConfig(name="team", kind="kv2", path="team/kv/data/x"),
    "pinned": SecretConfig(name="pinned", kind="kv2", path="secret/data/pinned", version=3),
}
VALUES: dict[str, Value] = {
    "db": Value({"password": "hunter2", "user": "app"}, 4, NOW - 10, None, False),
    "other": Value({"k": "v"}, 1, NOW - 10, None, False),
    "legacy": Value({"password": "old"}, 2, NOW - 10, None, True),
    "dbcreds": Value({"username": "u", "password": "p"}, 1, NOW - 10, NOW + 99.6, False),
    "tls": Value({"certificate": "CERT", "private_key": "KEY"}, 1, NOW, NOW + 3600, False),
    "team": Value({"a": 1}, 1, NOW, None, False),
    "pinned": Value({"p": "three"}, 3, NOW, None, False),
}


@dataclass
class FakeReader:
    """Decides like the server: grants by name, the cache in VALUES, an audit list."""

    granted: set[str] = field(default_factory=lambda: {"db", "legacy", "dbcreds", "tls",
                                                       "team", "pinned"})
    admin: bool = False
    tokens: int = 10**9
    audit: list[tuple[str, str, str | None]] = field(default_factory=list)
    secrets: Mapping[str, SecretConfig] = field(default_factory=lambda: SECRETS)

    def admit(self) -> None:
        if self.tokens <= 0:
            raise RateLimited("over the rate")
        self.tokens -= 1

    def may_read(self, name: str) -> bool:
        return name in self.granted

    def get(self, name: str, field: str | None, *, version: int | None = None) -> Value:
        if name not in self.secrets or name not in self.granted:
            self.audit.append(("get", "deny", name))
            raise Forbidden(f"not allowed to read {name!r}")
        if name == "gone":
            raise NotFound("revoked")
        value = VALUES.get(name)
        if value is None:
            self.audit.append(("get", "unavailable", name))
            raise Unavailable(f"secret {name!r} has not been fetched yet")
        if version is not None and version != value.version:
            self.audit.append(("get", "deny", name))
            raise Forbidden("not that version")
        self.audit.append(("get", "allow", name))
        if field is None:
            return value
        if field not in value.data:
            raise NotFound(f"secret {name!r} has no field {field!r}")
        return Value(value.data[field], value.version, value.fetched_at, value.expires_at,
                     value.stale)

    def refuse(self, op: str) -> None:
        self.audit.append((op, "deny", None))

    def readable(self) -> list[str]:
        self.audit.append(("list", "allow", None))
        return sorted(self.granted & set(self.secrets))

    def health(self) -> Mapping[str, Any]:
        return {"ok": True}

    def status(self) -> Mapping[str, Any]:
        if not self.admin:
            raise Forbidden("status needs a policy with admin = true")
        return {"secrets": len(self.secrets)}


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse(data: bytes, *, head: bool = False) -> list[Resp]:
    """Split the bytes a connection sent into responses (Content-Length framing only)."""
    out = []
    while data:
        top, sep, data = data.partition(b"\r\n\r\n")
        assert sep, top
        lines = top.decode().split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head else int(headers["content-length"])
        out.append(Resp(status, headers, data[:length]))
        data = data[length:]
    return out


def run(data: bytes, reader: FakeReader | None = None, *, eof: bool = False,
        **kwargs: Any) -> tuple[bytes, bool]:
    """Feed ``data`` (and EOF); return what the connection sent and whether it closed."""
    conn = HttpConnection(reader or FakeReader(), clock=lambda: NOW, **kwargs)
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    out = b""
    while True:
        reply = conn.next_reply()
        if reply is NEED_DATA:
            return out, False
        if reply is CLOSED:
            return out, True
        out += reply


def get(target: str, *, method: str = "GET", headers: str = "", reader: FakeReader | None = None
        ) -> Resp:
    raw = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode()
    out, _ = run(raw, reader)
    (resp,) = parse(out, head=method == "HEAD")
    return resp


# --- OpenBao-compatible reads -----------------------------------------------------------------


def test_kv2_read_has_openbao_envelope_field_for_field() -> None:
    resp = get("/v1/secret/data/app/db")
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["cache-control"] == "no-store"
    body = resp.json()
    assert list(body) == ["request_id", "lease_id", "renewable", "lease_duration", "data",
                          "wrap_info", "warnings", "auth"]
    uuid.UUID(body["request_id"])
    assert body["lease_id"] == "" and body["renewable"] is False and body["lease_duration"] == 0
    assert body["wrap_info"] is None and body["warnings"] is None and body["auth"] is None
    assert body["data"]["data"] == {"password": "hunter2", "user": "app"}
    meta = body["data"]["metadata"]
    assert list(meta) == ["created_time", "custom_metadata", "deletion_time", "destroyed",
                          "version"]
    assert meta["created_time"] == "2027-01-15T07:59:50.000000Z"     # NOW - 10 s: fetched
    assert meta["custom_metadata"] is None and meta["deletion_time"] == ""
    assert meta["destroyed"] is False and meta["version"] == 4
    assert "x-agentd-stale" not in resp.headers


def test_numbers_are_answered_with_the_upstreams_text() -> None:
    """Decision 14: a number read as 1e3 is answered as 1e3, as OpenBao answers it."""
    data = jsonnum.loads(b'{"a": 1e3, "b": 0.10, "c": -0, "d": 2, "e": "1e3", "big": '
                         b'123456789012345678901234567890}')
    reader = FakeReader()
    value = Value(data, 4, NOW - 10, None, False, texts=True)
    old, VALUES["db"] = VALUES["db"], value
    try:
        bao = get("/v1/secret/data/app/db", reader=reader)
        native = get("/agentd/v1/secret/db", reader=reader)
    finally:
        VALUES["db"] = old
    texts = (b'{"a":1e3,"b":0.10,"c":-0,"d":2,"e":"1e3",'
             b'"big":123456789012345678901234567890}')
    assert b'"data":{"data":' + texts + b',"metadata":' in bao.body
    assert b'"data":' + texts + b',"version":4' in native.body
    assert bao.json()["data"]["data"]["a"] == 1000.0


def test_kv1_read_is_stale_with_warning_and_header() -> None:
    resp = get("/v1/kv/app/legacy")
    body = resp.json()
    assert resp.status == 200 and body["data"] == {"password": "old"}
    assert body["lease_duration"] == 60                  # the secret's refresh interval
    assert resp.headers["x-agentd-stale"] == "true"
    assert len(body["warnings"]) == 1 and "stale" in body["warnings"][0]


def test_leased_read_has_time_left_and_no_lease_id() -> None:
    body = get("/v1/database/creds/app").json()
    assert body["data"] == {"username": "u", "password": "p"}
    assert body["lease_id"] == "" and body["renewable"] is False
    assert body["lease_duration"] == 99


def test_kv2_version_only_the_one_held() -> None:
    assert get("/v1/secret/data/app/db?version=4").status == 200
    assert get("/v1/secret/data/app/db?version=0").status == 200      # OpenBao's "latest"
    for bad in ("3", "5", "x", "-1", "", "99999999999999999999999"):
        resp = get(f"/v1/secret/data/app/db?version={bad}")
        assert (resp.status, resp.body) == (403, DENIED), bad
    assert get("/v1/secret/data/pinned?version=3").json()["data"]["data"] == {"p": "three"}
    assert get("/v1/secret/data/pinned?version=4").status == 403


def test_head_has_headers_and_no_body() -> None:
    resp = get("/v1/secret/data/app/db", method="HEAD")
    assert resp.status == 200 and resp.body == b""
    assert int(resp.headers["content-length"]) > 0


def test_percent_encoded_path_is_decoded() -> None:
    assert get("/v1/secret/data/app%2Fdb").status == 200


# --- refusals: one answer, no oracle ------------------------------------------------------------


def test_undeclared_ungranted_and_writes_get_the_same_403() -> None:
    reader = FakeReader()
    answers = [
        get("/v1/secret/data/nothere", reader=reader),         # undeclared path
        get("/v1/secret/data/other", reader=reader),           # declared, not granted
        get("/v1/secret/metadata/app/db", reader=reader),      # not a declared read path
        get("/v1/pki/issue/web", reader=reader),               # pki: never by upstream path
        get("/", reader=reader),
        get("/v1/sys/health", reader=reader),
        get("/agentd/v1/secret/other", reader=reader),
        get("/agentd/v1/secret/nothere/field", reader=reader),
        get("/agentd/v1/status", reader=reader),               # not an admin
    ]
    for method in ("POST", "PUT", "DELETE", "LIST", "PATCH", "OPTIONS"):
        answers.append(get("/v1/secret/data/app/db", method=method, reader=reader,
                           headers="X-Vault-Token: root\r\n"))
    for resp in answers:
        assert (resp.status, resp.body) == (403, DENIED)
        assert resp.headers["content-type"] == "application/json"
    assert ("get", "deny", "other") in reader.audit
    assert ("post", "deny", None) in reader.audit
    assert not any(entry[1] == "allow" for entry in reader.audit)


def test_write_with_body_is_refused_and_closed_unread() -> None:
    raw = (b"POST /v1/secret/data/app/db HTTP/1.1\r\nHost: x\r\nX-Vault-Token: root\r\n"
           b"Content-Length: 20\r\n\r\n{\"data\":{\"a\":\"b\"}}\r\n"
           b"GET /v1/secret/data/app/db HTTP/1.1\r\nHost: x\r\n\r\n")
    out, closed = run(raw)
    assert closed
    (resp,) = parse(out)
    assert (resp.status, resp.body) == (403, DENIED)
    assert resp.headers["connection"] == "close"


def test_read_with_body_gets_413_and_close() -> None:
    for framing in ("Content-Length: 3\r\n", "Transfer-Encoding: chunked\r\n"):
        raw = f"GET /v1/secret/data/app/db HTTP/1.1\r\nHost: x\r\n{framing}\r\nabc".encode()
        out, closed = run(raw)
        (resp,) = parse(out)
        assert closed and resp.status == 413, framing
        assert b"hunter2" not in out


def test_tokens_and_credentials_are_ignored() -> None:
    reader = FakeReader(granted=set())
    for headers in ("X-Vault-Token: root\r\n", "Authorization: Bearer root\r\n",
                    "X-Vault-Namespace: admin\r\nX-Vault-Wrap-TTL: 60\r\n"):
        resp = get("/v1/secret/data/app/db", headers=headers, reader=reader)
        assert (resp.status, resp.body) == (403, DENIED)
    # and a granted read is the same with or without one
    plain = get("/v1/secret/data/app/db").json()["data"]
    assert get("/v1/secret/data/app/db", headers="X-Vault-Token: x\r\n").json()["data"] == plain


def test_rate_limited_is_429() -> None:
    resp = get("/v1/secret/data/app/db", reader=FakeReader(tokens=0))
    assert resp.status == 429 and b"hunter2" not in resp.body
    assert resp.headers["retry-after"] == "1"


def test_not_found_and_unavailable() -> None:
    reader = FakeReader(granted={"db", "nofetch"},
                        secrets={**SECRETS, "nofetch": SecretConfig("nofetch", "kv2",
                                                                    "secret/data/nofetch")})
    resp = get("/v1/secret/data/nofetch", reader=reader)
    assert resp.status == 503 and "not been fetched" in resp.json()["errors"][0]
    resp = get("/agentd/v1/secret/db/nofield", reader=reader)
    assert resp.status == 404 and resp.json()["errors"]


# --- the mounts lookup --------------------------------------------------------------------------


def test_mounts_lookup_for_kv2_and_kv1() -> None:
    body = get("/v1/sys/internal/ui/mounts/secret/app/db").json()
    assert body["data"]["type"] == "kv"
    assert body["data"]["options"] == {"version": "2"}
    assert body["data"]["path"] == "secret/"
    assert list(body["data"]) == [
        "accessor", "config", "deprecation_status", "description", "external_entropy_access",
        "local", "options", "path", "plugin_version", "running_plugin_version",
        "running_sha256", "seal_wrap", "type", "uuid"]
    assert get("/v1/sys/internal/ui/mounts/secret").json()["data"]["path"] == "secret/"
    kv1 = get("/v1/sys/internal/ui/mounts/kv/app/legacy").json()["data"]
    assert kv1["options"] == {"version": "1"} and kv1["path"] == "kv/"
    assert get("/v1/sys/internal/ui/mounts/team/kv/x").json()["data"]["path"] == "team/kv/"


def test_mounts_lookup_refused_without_a_readable_secret_there() -> None:
    for target in ("/v1/sys/internal/ui/mounts/nothere", "/v1/sys/internal/ui/mounts/database",
                   "/v1/sys/internal/ui/mounts/secre", "/v1/sys/internal/ui/mounts/"):
        assert get(target).body == DENIED, target
    only_other = FakeReader(granted={"other"})
    assert get("/v1/sys/internal/ui/mounts/secret", reader=only_other).status == 200
    assert get("/v1/sys/internal/ui/mounts/secret", reader=FakeReader(granted=set())
               ).body == DENIED


# --- the native API -----------------------------------------------------------------------------


def test_native_secret_field_raw_list_health_status() -> None:
    body = get("/agentd/v1/secret/db").json()
    assert body == {"name": "db", "data": {"password": "hunter2", "user": "app"}, "version": 4,
                    "fetched_at": NOW - 10, "expires_at": None, "stale": False}
    body = get("/agentd/v1/secret/db/password").json()
    assert body["field"] == "password" and body["data"] == "hunter2"
    raw = get("/agentd/v1/secret/db/password?format=raw")
    assert raw.body == b"hunter2"
    assert raw.headers["content-type"] == "application/octet-stream"
    assert get("/agentd/v1/secret/tls/certificate?format=raw").body == b"CERT"
    assert get("/agentd/v1/secret/db?format=raw").status == 400
    assert get("/agentd/v1/secret/db?format=xml").status == 400
    stale = get("/agentd/v1/secret/legacy")
    assert stale.json()["stale"] is True and stale.headers["x-agentd-stale"] == "true"
    assert get("/agentd/v1/list").json() == {
        "names": ["db", "dbcreds", "legacy", "pinned", "team", "tls"]}
    assert get("/agentd/v1/health").json() == {"ok": True}
    assert get("/agentd/v1/status", reader=FakeReader(admin=True)).json() == {"secrets": 7}


# --- framing: keep-alive, pipelining, malformed and oversized requests -------------------------


def test_keep_alive_and_pipelining_answer_in_order() -> None:
    one = b"GET /agentd/v1/secret/db/user?format=raw HTTP/1.1\r\nHost: x\r\n\r\n"
    two = b"GET /agentd/v1/secret/db/password?format=raw HTTP/1.1\r\nHost: x\r\n\r\n"
    bad = b"GET /v1/secret/data/other HTTP/1.1\r\nHost: x\r\n\r\n"
    out, closed = run(one + two + bad + one)
    assert not closed
    assert [r.body for r in parse(out)] == [b"app", b"hunter2", DENIED, b"app"]



def test_a_repeated_head_is_answered_anew_and_a_changed_one_reparsed() -> None:
    """The connection remembers its last head and target: the same bytes again are decided
    and audited again, and a head that differs in its method, target or a header is parsed
    afresh."""
    reader = FakeReader()
    conn = HttpConnection(reader, clock=lambda: NOW)
    kv = b"GET /v1/secret/data/app/db HTTP/1.1\r\nHost: x\r\n\r\n"
    replies = []
    for data, head in [(kv, False), (kv, False), (kv.replace(b"GET", b"HEAD"), True),
                       (kv.replace(b"app/db", b"other"), False),
                       (kv.replace(b"Host: x", b"Host: x\r\nConnection: close"), False)]:
        conn.receive_data(data)
        reply = conn.next_reply()
        assert isinstance(reply, bytes)
        (resp,) = parse(reply, head=head)
        replies.append(resp)
    assert conn.next_reply() is CLOSED
    assert [r.status for r in replies] == [200, 200, 200, 403, 200]
    first, second = replies[0].json(), replies[1].json()
    assert first["data"] == second["data"] and first["request_id"] != second["request_id"]
    assert replies[2].body == b"" and "connection" not in replies[2].headers
    assert replies[4].headers["connection"] == "close"
    assert reader.audit == [("get", "allow", "db")] * 3 + [("get", "deny", "other"),
                                                           ("get", "allow", "db")]


def test_a_connection_keeps_no_token_a_client_sent() -> None:
    """What a connection remembers of its last head holds none of its bytes: no X-Vault-Token
    stays in agentd's memory after the request is answered."""
    marker = b"hvs.MARKER" + uuid.uuid4().hex.encode()
    conn = HttpConnection(FakeReader(), clock=lambda: NOW)
    kv = b"GET /v1/secret/data/app/db HTTP/1.1\r\nHost: x\r\nX-Vault-Token: " + marker + b"\r\n\r\n"
    for _ in range(2):
        conn.receive_data(kv)
        assert isinstance(conn.next_reply(), bytes)
    seen: set[int] = set()
    found = []

    def walk(obj: object, depth: int) -> None:
        if id(obj) in seen or depth > 6:
            return
        seen.add(id(obj))
        if isinstance(obj, (bytes, bytearray, memoryview)):
            found.extend([obj] if marker in bytes(obj) else [])
        elif isinstance(obj, str):
            found.extend([obj] if marker.decode() in obj else [])
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(k, depth + 1)
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for item in obj:
                walk(item, depth + 1)
        elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
            for name in [*getattr(obj, "__dict__", {}), *getattr(obj, "__slots__", ())]:
                walk(getattr(obj, name, None), depth + 1)

    walk(conn, 0)
    assert len(seen) > 10           # the walk reached the connection's state
    assert not found


def test_a_reload_is_seen_by_the_next_request_on_a_kept_connection() -> None:
    """A path looked up once is looked up again in the catalog of a reload (another object)."""
    reader = FakeReader()
    conn = HttpConnection(reader, clock=lambda: NOW)
    kv = b"GET /v1/secret/data/app/db HTTP/1.1\r\nHost: x\r\n\r\n"
    statuses = []
    for secrets in (SECRETS, {k: v for k, v in SECRETS.items() if k != "db"}, SECRETS):
        reader.secrets = secrets
        conn.receive_data(kv)
        reply = conn.next_reply()
        assert isinstance(reply, bytes)
        statuses.append(parse(reply)[0].status)
    assert statuses == [200, 403, 200]

def test_requests_split_anywhere() -> None:
    data = b"GET /agentd/v1/secret/db/user?format=raw HTTP/1.1\r\nHost: x\r\n\r\n" * 3
    conn = HttpConnection(FakeReader())
    out = b""
    for i in range(len(data)):
        conn.receive_data(data[i:i + 1])
        while (reply := conn.next_reply()) is not NEED_DATA:
            assert reply is not CLOSED
            out += reply
        if 0 < i < len(data) - 1 and data[i:i + 1] != b"\n":
            assert conn.has_partial_request or data[:i + 1].endswith(b"\r\n\r\n")
    assert [r.body for r in parse(out)] == [b"app"] * 3
    assert not conn.has_partial_request


def test_connection_close_and_http10() -> None:
    out, closed = run(b"GET /agentd/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                      b"GET /agentd/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed and len(parse(out)) == 1
    out, closed = run(b"GET /agentd/v1/health HTTP/1.0\r\n\r\n")
    assert closed and parse(out)[0].status == 200


def test_eof_ends_the_connection() -> None:
    out, closed = run(b"GET /agentd/v1/health HTTP/1.1\r\nHost: x\r\n\r\n", eof=True)
    assert closed and parse(out)[0].status == 200
    out, closed = run(b"GET /agentd/v1/hea", eof=True)
    assert closed and out == b""


def test_malformed_requests_get_4xx_and_close() -> None:
    cases = [
        b"GET /v1/secret/data/app/db HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /v1/secret/data/app/db HTTP/1.1\r\n\r\n",                     # no Host
        b"GET /v1/secret/data/app/db HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /v1 HTTP/9.9\r\nHost: x\r\n\r\n",
    ]
    for raw in cases:
        out, closed = run(raw)
        (resp,) = parse(out)
        assert closed and 400 <= resp.status < 600, raw
        assert resp.headers["connection"] == "close"


def test_header_grammar_is_strict() -> None:
    bad = [
        b"Host: x\r\n folded: on\r\n",                 # obs-fold
        b"Host: x\rX-Smuggle: y\r\n",                   # a bare CR
        b"Host: x\r\nBad Name: y\r\n",
        b"Host: x\r\n: no name\r\n",
        b"Host: x\r\nX: a\x00b\r\n",
        b"Host: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n",
        b"Host: x\r\nContent-Length: +1\r\n",
        b"Host: x\r\nHost: y\r\n",
        b"X-Flood:" + b" \t" * 7000 + b"\x01\r\nHost: x\r\n",     # no quadratic backtracking
    ]
    for headers in bad:
        out, closed = run(b"GET /agentd/v1/health HTTP/1.1\r\n" + headers + b"\r\n")
        assert closed and parse(out)[0].status == 400, headers
    good = [
        b"Host: x\r\nContent-Length: 0\r\n",
        b"Host: x\r\nContent-Length: 00, 0\r\n",
        b"Host:x\r\nX-Empty:\r\nX-Obs: caf\xc3\xa9 \t\r\n",
    ]
    for headers in good:
        out, closed = run(b"\r\nGET /agentd/v1/health HTTP/1.1\r\n" + headers + b"\r\n")
        assert not closed and parse(out)[0].status == 200, headers
    out, closed = run(b"GET /agentd/v1/health HTTP/1.1\nHost: x\n\n")        # bare LF lines
    assert not closed and parse(out)[0].status == 200


def test_bad_targets_get_400_and_keep_alive() -> None:
    for target in (b"*", b"http://x/v1/secret/data/app/db", b"/v1/%ff", b"/x?" + b"a&" * 40):
        out, closed = run(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        (resp,) = parse(out)
        assert resp.status == 400 and not closed, target


def test_oversized_head_gets_431_and_close() -> None:
    line = b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    out, closed = run(line, max_head_bytes=65536)
    assert closed and parse(out)[0].status == 431
    flood = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 20000 + b"\r\n"
    out, closed = run(flood, max_head_bytes=65536)
    assert closed and parse(out)[0].status == 431


def test_looks_like_http() -> None:
    assert looks_like_http(b"GET / HTTP/1.1")
    assert looks_like_http(b"P")
    assert not looks_like_http(b"\x00\x00\x00\x10")
    assert not looks_like_http(b"")
    assert not looks_like_http(b"get")


# --- fuzz ---------------------------------------------------------------------------------------

_pieces = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([
        b"GET ", b"HEAD ", b"POST ", b"/v1/secret/data/app/db", b"/agentd/v1/secret/db/password",
        b"?format=raw", b"?version=4", b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", b"Host: x\r\n",
        b"Content-Length: 5\r\n", b"Content-Length: -1\r\n", b"Transfer-Encoding: chunked\r\n",
        b"Connection: close\r\n", b"X-Vault-Token: root\r\n", b"\r\n", b"\r\n\r\n", b"\n",
        b"/v1/sys/internal/ui/mounts/secret", b"%", b"%2F", b"\x00\x00\x00\x05",
    ]),
)


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(pieces=st.lists(_pieces, max_size=12), cuts=st.lists(st.integers(0, 400), max_size=6),
       eof=st.booleans(), limit=st.sampled_from([64, 16384]))
def test_fuzz_never_raises(pieces: list[bytes], cuts: list[int], eof: bool, limit: int) -> None:
    data = b"".join(pieces)
    conn = HttpConnection(FakeReader(), max_head_bytes=limit, clock=lambda: NOW)
    bounds = [0, *sorted(cuts), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    closed = False
    for chunk in [*chunks, *([b""] if eof else [])]:
        conn.receive_data(chunk)
        while True:
            reply = conn.next_reply()
            if reply is NEED_DATA:
                assert not closed
                break
            if reply is CLOSED:
                closed = True
                break
            assert isinstance(reply, bytes) and reply.startswith(b"HTTP/1.")
            assert not closed
    assert closed or not eof


@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.one_of(st.binary(max_size=200),
                      st.lists(_pieces, max_size=10).map(b"".join)),
       frame=st.booleans())
def test_fuzz_sniffing_picks_one_protocol_and_never_raises(data: bytes, frame: bool) -> None:
    """What the server does with a connection's bytes: the first byte picks the protocol,
    and either core turns anything into replies or a close."""
    if frame:       # a v1 frame, or half of one, possibly followed by HTTP
        body = msgpack.packb({"v": 1, "id": 1, "op": "get", "name": "db"})
        data = (struct.pack(">I", len(body)) + body)[: 1 + len(data) % (len(body) + 4)] + data
    if not data:
        return
    if looks_like_http(data[:1]):
        conn = HttpConnection(FakeReader(), clock=lambda: NOW)
        conn.receive_data(data)
        conn.receive_data(b"")
        while (reply := conn.next_reply()) is not CLOSED:
            assert reply is not NEED_DATA
            assert isinstance(reply, bytes) and reply.startswith(b"HTTP/1.1 ")
    else:
        assert data[0] not in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        server = protocol.ServerConnection()
        server.receive_data(data)
        server.receive_data(b"")
        while (event := server.next_event()) is not protocol.CLOSED:
            assert event is not protocol.NEED_DATA
            assert isinstance(event, protocol.Request | protocol.Rejected)


def test_request_ready_says_when_the_next_reply_answers_a_request() -> None:
    conn = HttpConnection(FakeReader(), clock=lambda: NOW)
    assert not conn.request_ready
    conn.receive_data(b"\r\nGET /agentd/v1/health HTTP/1.1\r\nHost: x\r\n")
    assert not conn.request_ready and conn.has_partial_request
    conn.receive_data(b"\r\nGET /agentd/v1/list HTTP/1.1\r\n")
    assert conn.request_ready
    first = conn.next_reply()
    assert isinstance(first, bytes) and parse(first)[0].json() == {"ok": True}
    assert not conn.request_ready and conn.has_partial_request
    conn.receive_data(b"Host: x\r\n\r\n")
    assert conn.request_ready
    assert isinstance(conn.next_reply(), bytes)
    assert not conn.request_ready and conn.next_reply() is NEED_DATA


def test_error_response_is_a_whole_response_that_closes() -> None:
    (resp,) = parse(error_response(429, "slow down"))
    assert resp.status == 429 and resp.json() == {"errors": ["slow down"]}
    assert resp.headers["connection"] == "close" and resp.headers["retry-after"] == "1"
