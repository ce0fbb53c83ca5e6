"""Sans-IO HTTP/1.1 face of the main socket: OpenBao/Vault-compatible reads and agentd's JSON API.

Theory of operation
-------------------

Like ``protocol.py`` this module never touches a socket and never imports trio: an
``HttpConnection`` turns the bytes a client sent into the bytes to answer, and asks a ``Reader``
(the server's per-connection view: peer identity, grants, cache, audit, rate limit) for every
decision, so the HTTP face and the v1 ``get`` share one decision path::

    bytes in ──► receive_data(data) ──► next_reply(): head ──► route ──► Reader ──► bytes out

``receive_data(b"")`` means end of file. The shell calls ``next_reply()`` in a loop: each call
returns the bytes of one complete response, ``NEED_DATA`` (feed more bytes) or ``CLOSED`` (send
what was returned so far, then close the connection). Pipelined requests come out one by one,
in order; a keep-alive connection goes on after each response. ``looks_like_http(first)`` tells
the shell, from a connection's first byte, which protocol the client speaks.

What it answers (routes are tables, ``_EXACT`` and ``_PREFIXES``; the contract is "HTTP on the
socket" in DESIGN.md):

- ``GET /v1/<path>``: the declared ``kv2``, ``kv1`` or ``leased`` secret whose ``path`` is
  ``<path>`` (the upstream path is only a key into the catalog, decision 3), in OpenBao's
  response envelope (``request_id``, ``lease_id``, ``renewable``, ``lease_duration``, ``data``,
  ``wrap_info``, ``warnings``, ``auth``; OpenBao 2.x sends no ``mount_type``). kv2 answers carry
  ``data.data`` and ``data.metadata`` (``created_time`` is when agentd fetched the version: the
  upstream's creation time is not cached; ``custom_metadata`` null, ``deletion_time`` "",
  ``destroyed`` false, ``version``). ``?version=N`` is served only when N is the version agentd
  holds (or 0, OpenBao's "latest"); any other version is refused like an undeclared path (403):
  agentd never fetches on a client's behalf. kv1's ``lease_duration`` is the secret's
  ``refresh`` interval (OpenBao sends the mount's TTL hint there); a leased secret's is the
  time its lease has left, with ``lease_id`` "" and ``renewable`` false, so a client can neither
  renew nor revoke the agent's lease.
- ``GET /v1/sys/internal/ui/mounts/<path>``: the KV-version lookup that ``bao kv get`` and
  consul-template make first, answered for the mount (longest prefix of ``<path>``) of a kv
  secret this peer may read: ``type`` "kv", ``options.version`` "1" or "2", ``path`` "mount/";
  fields OpenBao would fill from its mount table that agentd does not know are empty strings.
- ``GET /agentd/v1/secret/<name>[/<field>]`` (``?format=raw``: a field's bare bytes),
  ``GET /agentd/v1/list``, ``GET /agentd/v1/health``, ``GET /agentd/v1/status`` (admin only):
  the v1 ops ``get``, ``list``, ``ping`` and ``status`` as JSON.

Parsing: agentd never accepts a request body, so HTTP/1.1 here is a sequence of request heads
(a request line and headers up to an empty line), each answered before the next is read. The
head is parsed by hand with the grammar of RFC 9112 (the regexes h11 uses), strictly: no
obs-fold, no bare CR, one Host for HTTP/1.1, one Content-Length value; anything else is a 400.
h11 served here first and cost about 100 µs of CPU a request, five times a v1 ``get``; the
only headers that matter are Host, Content-Length, Transfer-Encoding and Connection.

Per request, a keep-alive client of this face (``bao``, consul-template, an SDK) sends the same
head again and again: a connection keeps its last head (by its length and keyed hash, so no
token a client sends is kept), target and ``/v1/`` path with what they parsed or looked up to
(for the catalog in force), and the bytes of a kv2 answer's metadata are
cached by version and fetch time. Nothing that holds a secret value is kept: each reply's
``data`` is encoded from the value the ``Reader`` opened for it, then dropped (DESIGN.md,
decision 6); the decisions, the audit line and the pid re-check are made for every request.

Refusals: a path no declared secret has, a secret the peer may not read, and every method but GET
and HEAD all get ``403 {"errors":["permission denied"]}`` (no existence oracle). A request with
a body (any ``Content-Length`` above 0 or any ``Transfer-Encoding``) is answered (403 for a
write method, 413 for a read) and the connection closed, its body never read. A malformed
request (400), a request line and headers over ``max_head_bytes`` (431) or another HTTP version
than 1.0 and 1.1 (505) gets its answer and a close.
No header is ever used for a decision: ``X-Vault-Token`` and every other credential a client
sends are ignored, never forwarded (nothing is proxied) and never logged. A stale value carries
a ``warnings`` entry (native API: ``"stale": true``) and the header ``X-Agentd-Stale: true``.
Messages in errors never hold a secret value.
"""

from __future__ import annotations

import datetime
import functools
import http
import json
import math
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol
from urllib.parse import parse_qs, unquote

from agentd import jsonnum
from agentd.config import SecretConfig
from agentd.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    RateLimited,
    RequestError,
    Unavailable,
)
from agentd.protocol import CLOSED, NEED_DATA, Closed, NeedData

__all__ = [
    "CLOSED",
    "MAX_HEAD_BYTES",
    "NEED_DATA",
    "HttpConnection",
    "Reader",
    "Value",
    "error_response",
    "looks_like_http",
]

MAX_HEAD_BYTES: Final = 16384       # request line + headers; the shell passes max_request_bytes
_METHOD_LETTERS: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_READ_METHODS: Final = frozenset({b"GET", b"HEAD"})
# The grammar of RFC 9110/9112, as h11's _abnf.py spells it.
_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_REQUEST_LINE: Final = re.compile(
    rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])")
_FIELD_NAME: Final = re.compile(_TOKEN)
# a field value holds HTAB, SP, VCHAR and obs-text only
_NOT_IN_FIELD_VALUE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEAD_END: Final = re.compile(rb"\r?\n\r?\n")    # the empty line that ends a request's head
_FRAMING: Final = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})
_HTTP_VERSIONS: Final = frozenset({b"1.0", b"1.1"})
_DENIED: Final = b'{"errors":["permission denied"]}'
_STALE_WARNING: Final = ("agentd: this value is served from cache and is stale: the upstream "
                         "could not be reached to refresh it")


# The v1 core's sentinels, with the same meaning here: ``next_reply()`` needs more bytes
# (``NEED_DATA``), or nothing more will be answered (``CLOSED``: send what came before, close).


def looks_like_http(first: bytes) -> bool:
    """Whether a connection whose first bytes are ``first`` speaks HTTP (a method's capital
    letter) rather than v1 frames (whose 4-byte length starts with 0x00 below 16 MiB)."""
    return bool(first) and first[0] in _METHOD_LETTERS


@dataclass(frozen=True)
class Value:
    """One answer of ``Reader.get``. ``data`` is plaintext (the whole map, or the field's value
    when a field was asked for): drop it once the reply is built. ``repr()`` never shows it.
    ``texts``: ``data`` holds a number with the upstream's JSON text (``jsonnum``), which the
    reply writes as that text (``1e-7``), as OpenBao answers it (decision 14)."""

    data: Any
    version: int
    fetched_at: float
    expires_at: float | None
    stale: bool
    texts: bool = False

    def __repr__(self) -> str:
        return f"Value(version={self.version}, stale={self.stale})"


class Reader(Protocol):
    """The server's decisions for one connection's peer. Every method is sync and never blocks;
    the ones that decide on a secret also write its audit line."""

    @property
    def secrets(self) -> Mapping[str, SecretConfig]:
        """The catalog of the config in force (its identity changes on a reload)."""
        ...

    def admit(self) -> None:
        """Called once per request before anything else. Raises RateLimited."""
        ...

    def may_read(self, name: str) -> bool:
        """Whether the peer's grants cover ``name`` (no audit: for the mounts lookup)."""
        ...

    def get(self, name: str, field: str | None, *, version: int | None = None) -> Value:
        """The value of ``name`` (its ``field``), decided and audited as the v1 ``get``.
        ``version`` (kv2's ``?version=N``; 0 is "latest") is served only when it is the
        version held; another is refused as Forbidden (agentd never fetches for a client).

        Raises:
            Forbidden: undeclared, not granted, or not the version held. NotFound: revoked
            upstream, or no such field. Unavailable: not fetched yet, or past its stale
            deadline.
        """
        ...

    def refuse(self, op: str) -> None:
        """Audit a refusal that names no declared secret (an undeclared path, a write)."""
        ...

    def readable(self) -> list[str]:
        """The names the peer may read, sorted (audited as a ``list``)."""
        ...

    def health(self) -> Mapping[str, Any]:
        """What ``/agentd/v1/health`` answers (any peer that may connect)."""
        ...

    def status(self) -> Mapping[str, Any]:
        """The ``status`` op's result. Raises Forbidden unless the peer is an admin."""
        ...


# --- the catalog seen by upstream path ----------------------------------------------------------


@dataclass(frozen=True)
class _Mount:
    path: str                   # without a trailing slash
    version: str                # KV version: "1" or "2"
    names: tuple[str, ...]      # the kv secrets under it


@dataclass(frozen=True)
class _Index:
    """The declared secrets by upstream path, built once per catalog."""

    paths: Mapping[str, tuple[str, ...]]    # kv2/kv1/leased path -> names (declared order)
    mounts: tuple[_Mount, ...]              # longest path first

    @classmethod
    def build(cls, secrets: Mapping[str, SecretConfig]) -> _Index:
        paths: dict[str, list[str]] = {}
        mounts: dict[tuple[str, str], list[str]] = {}
        for name, secret in secrets.items():
            if secret.kind not in ("kv2", "kv1", "leased"):
                continue
            path = secret.path.strip("/")
            paths.setdefault(path, []).append(name)
            mount = _kv_mount(secret.kind, path)
            if mount is not None:
                mounts.setdefault((mount, secret.kind[-1]), []).append(name)
        ordered = sorted(mounts.items(), key=lambda item: -len(item[0][0]))
        return cls(
            paths={path: tuple(names) for path, names in paths.items()},
            mounts=tuple(_Mount(m, v, tuple(names)) for (m, v), names in ordered),
        )


def _kv_mount(kind: str, path: str) -> str | None:
    """The mount of a kv secret's API path: before the first ``/data/`` for kv2, the first
    segment for kv1 (whose API paths carry no marker; the CLI reads ``/v1/<path>`` as given
    for a version 1 mount, so only the version matters to it). None for other kinds."""
    if kind == "kv2":
        mount, sep, _ = path.partition("/data/")
        return mount if sep and mount else None
    if kind == "kv1":
        mount, sep, _ = path.partition("/")
        return mount if sep else None
    return None


# --- the connection -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    method: bytes
    path: str                               # percent-decoded, without the query
    query: Mapping[str, list[str]]


class _Reply(NamedTuple):          # a tuple: made once per request, cheaper than a dataclass
    status: int
    body: bytes
    content_type: bytes = b"application/json"
    stale: bool = False


class HttpConnection:
    """One HTTP/1.1 connection's server side (see the module docstring).

    Error handling: ``receive_data`` and ``next_reply`` never raise on anything a client sends;
    protocol errors become a 4xx reply and ``CLOSED``. Exceptions other than ``RequestError``
    raised by the ``Reader`` propagate: the shell's own signals (the server's ``_PidReused``:
    close without an answer) or its bugs, never the client's doing.
    """

    def __init__(
        self,
        reader: Reader,
        *,
        max_head_bytes: int = MAX_HEAD_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._reader = reader
        self._clock = clock
        self._max_head = max_head_bytes
        self._buffer = bytearray()
        self._head: tuple[int, int] | None = None     # see _find_head
        self._scanned = 0               # bytes of the buffer searched for a head's end in vain
        self._closing = False           # the last reply said Connection: close
        self._eof = False
        self._index: tuple[Mapping[str, SecretConfig], _Index] | None = None
        # The last request's head and what it parsed to: a keep-alive client sends the same
        # head again and again (parsing is a pure function of its bytes). Held no longer than
        # the connection, like the buffer it came from.
        # the last head by its length and (keyed, per-process) hash, not its bytes: a head can
        # carry a client's X-Vault-Token, which agentd has no reason to keep
        self._last_head: tuple[tuple[int, int], _Head] | None = None
        self._last_target: tuple[bytes, _Request] | None = None
        self._last_path: tuple[Mapping[str, SecretConfig], str, tuple[str, ...]] | None = None

    @property
    def has_partial_request(self) -> bool:
        """A request has begun but is not complete (the shell times it out sooner)."""
        return bool(self._buffer) and not self._closing

    @property
    def request_ready(self) -> bool:
        """A complete request line and headers are buffered: the next ``next_reply()`` answers
        a request. The shell takes its uid's token before that, as before a v1 frame is parsed,
        so a flood costs no parsing past the uid's rate."""
        return not self._closing and self._find_head() is not None

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the client; ``b""`` means end of file."""
        if self._closing:
            return
        if not data:
            self._eof = True
        self._buffer += data

    def _find_head(self) -> tuple[int, int] | None:
        """Where the buffered request's head ends: (end of the headers, start of what follows);
        None until it is complete. Empty lines before a request are dropped (RFC 9112)."""
        if self._head is None:
            buffer = self._buffer
            if not buffer:
                return None
            while buffer[:2] == b"\r\n" or buffer[:1] == b"\n":
                del buffer[:2 if buffer[:1] == b"\r" else 1]
                self._scanned = 0
            # Resume where the last search stopped (less the 3 bytes an end may straddle):
            # a head trickled a byte at a time costs linear time, not quadratic.
            end = _HEAD_END.search(buffer, max(0, self._scanned - 3), self._max_head + 3)
            if end is None:
                self._scanned = len(buffer)
            else:
                self._head = (end.start(), end.end())
        return self._head

    def next_reply(self) -> bytes | NeedData | Closed:
        """The next response to send, or ``NEED_DATA``, or ``CLOSED`` (close after sending)."""
        if self._closing:
            return CLOSED
        head_end = self._find_head()
        buffer = self._buffer
        if head_end is None:
            if len(buffer) > self._max_head:
                return self._fail(431, "request line and headers are too long")
            if self._eof:
                self._closing = True    # the client went away mid-request: nobody to answer
                return CLOSED
            return NEED_DATA
        self._head = None
        self._scanned = 0
        head = bytes(buffer[:head_end[0]])
        del buffer[:head_end[1]]
        seen = (len(head), hash(head))
        last = self._last_head
        if last is not None and last[0] == seen:
            return self._answer(last[1])
        try:
            request = _parse_head(head)
        except _BadHead as exc:
            return self._fail(exc.status, exc.message)
        self._last_head = (seen, request)
        return self._answer(request)

    # --- framing ---------------------------------------------------------------------------

    def _answer(self, head: _Head) -> bytes:
        method = head.method
        close = head.close
        try:
            self._reader.admit()
        except RateLimited as exc:
            return self._send(_error(429, exc.message), method, close=close or head.has_body)
        if method not in _READ_METHODS:
            self._reader.refuse(method.decode("ascii", "replace").lower()[:16])
            return self._send(_Reply(403, _DENIED), method, close=close or head.has_body)
        if head.has_body:
            return self._send(_error(413, "request bodies are not accepted"), method, close=True)
        last = self._last_target
        if last is not None and last[0] == head.target and last[1].method == method:
            request = last[1]
        else:
            try:
                request = _parse_target(method, head.target)
            except ValueError:
                return self._send(_error(400, "malformed request target"), method, close=close)
            self._last_target = (head.target, request)
        try:
            reply = self._route(request)
        except RequestError as exc:
            reply = _refusal(exc, native=request.path.startswith("/agentd/"))
        return self._send(reply, method, close=close)

    def _send(self, reply: _Reply, method: bytes, *, close: bool) -> bytes:
        """The bytes of one response; after one with ``close``, ``next_reply`` says CLOSED."""
        if close:
            self._closing = True
        return _response(reply, head=method == b"HEAD", close=close)

    def _fail(self, status: int, message: str) -> bytes:
        """Answer a malformed or oversized request, and close."""
        return self._send(_error(status, message), b"GET", close=True)

    # --- routes ----------------------------------------------------------------------------

    def _route(self, request: _Request) -> _Reply:
        path = request.path
        exact = _EXACT.get(path)
        if exact is not None:
            return exact(self, request)
        for prefix, handler in _PREFIXES:
            if path.startswith(prefix):
                return handler(self, request, path[len(prefix):])
        return self._deny()

    def _deny(self) -> _Reply:
        self._reader.refuse("get")
        return _Reply(403, _DENIED)

    def _catalog(self) -> _Index:
        secrets = self._reader.secrets
        if self._index is None or self._index[0] is not secrets:
            self._index = (secrets, _Index.build(secrets))
        return self._index[1]

    def _bao_read(self, request: _Request, path: str) -> _Reply:
        """``GET /v1/<path>``: a declared kv2, kv1 or leased secret, in OpenBao's envelope."""
        reader = self._reader
        secrets = reader.secrets
        last = self._last_path
        if last is not None and last[0] is secrets and last[1] == path:
            names = last[2]
        else:
            names = self._catalog().paths.get(path.strip("/"), ())
            self._last_path = (secrets, path, names)
        if not names:
            return self._deny()
        # Several names may share a path: the first this peer may read answers.
        name = names[0] if len(names) == 1 else next(
            (n for n in names if reader.may_read(n)), names[0])
        secret = secrets[name]
        version: int | None = None
        wanted = request.query.get("version")
        if secret.kind == "kv2" and wanted is not None:
            version = _version(wanted[-1])
            if version == 0:
                version = None          # OpenBao's "latest": what agentd holds
        value = reader.get(name, None, version=version)
        if secret.kind == "kv2":
            # {"data": <value>, "metadata": {...}}, the metadata's bytes cached by version
            data = b"".join((b'{"data":', _json(value.data, texts=value.texts), b',"metadata":',
                             _kv2_metadata(value.version, value.fetched_at), b"}"))
            duration = 0
        elif secret.kind == "kv1":
            data, duration = _json(value.data, texts=value.texts), int(secret.refresh)
        else:
            left = 0.0 if value.expires_at is None else value.expires_at - self._clock()
            data, duration = _json(value.data, texts=value.texts), max(0, math.floor(left))
        return _Reply(200, _envelope(data, duration, value.stale), stale=value.stale)

    def _mounts(self, request: _Request, path: str) -> _Reply:
        """``GET /v1/sys/internal/ui/mounts/<path>``: the kv mount of a readable secret."""
        path = path.strip("/")
        reader = self._reader
        for mount in self._catalog().mounts:
            if (path == mount.path or path.startswith(mount.path + "/")) and any(
                reader.may_read(name) for name in mount.names
            ):
                return _Reply(200, _envelope(_json(_mount_info(mount)), 0, False))
        return self._deny()

    def _native_secret(self, request: _Request, rest: str) -> _Reply:
        """``GET /agentd/v1/secret/<name>[/<field>]``, ``?format=raw`` for a field's bytes."""
        name, sep, field = rest.partition("/")
        if not name:
            return self._deny()
        value = self._reader.get(name, field if sep else None)
        fmt = request.query.get("format", ["json"])[-1]
        if fmt == "raw":
            if not sep:
                raise BadRequest("format=raw needs a field: /agentd/v1/secret/<name>/<field>")
            return _Reply(200, _raw(value.data, texts=value.texts),
                          content_type=b"application/octet-stream",
                          stale=value.stale)
        if fmt != "json":
            raise BadRequest("format must be json or raw")
        result: dict[str, Any] = {"name": name}
        if sep:
            result["field"] = field
        result.update(data=value.data, version=value.version, fetched_at=value.fetched_at,
                      expires_at=value.expires_at, stale=value.stale)
        return _Reply(200, _json(result, texts=value.texts), stale=value.stale)

    def _native_list(self, request: _Request) -> _Reply:
        return _Reply(200, _json({"names": self._reader.readable()}))

    def _native_health(self, request: _Request) -> _Reply:
        return _Reply(200, _json(self._reader.health()))

    def _native_status(self, request: _Request) -> _Reply:
        return _Reply(200, _json(self._reader.status()))


_EXACT: Final[Mapping[str, Callable[[HttpConnection, _Request], _Reply]]] = {
    "/agentd/v1/list": HttpConnection._native_list,
    "/agentd/v1/health": HttpConnection._native_health,
    "/agentd/v1/status": HttpConnection._native_status,
}
"""Routes by exact path."""

_PREFIXES: Final[tuple[tuple[str, Callable[[HttpConnection, _Request, str], _Reply]], ...]] = (
    ("/v1/sys/internal/ui/mounts/", HttpConnection._mounts),
    ("/v1/", HttpConnection._bao_read),
    ("/agentd/v1/secret/", HttpConnection._native_secret),
)
"""Routes by path prefix, tried in order (the handler gets the rest of the path)."""

_NO_QUERY: Final[Mapping[str, list[str]]] = {}
_STALE_WARNINGS: Final = json.dumps([_STALE_WARNING]).encode()
_UUID_CLEAR: Final = ~((0xF000 << 64) | (0xC000 << 48)) & (2**128 - 1)
_UUID_V4: Final = (0x4000 << 64) | (0x8000 << 48)
_random_bits: Final = random.Random().getrandbits     # request ids only: unique, not secret
_STATUS_LINES: Final = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode())
    for status in http.HTTPStatus
}


# --- helpers ------------------------------------------------------------------------------------


class _BadHead(Exception):
    """A request line or header that is not HTTP/1.x: answer ``status`` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class _Head:
    method: bytes
    target: bytes
    close: bool             # the connection closes after the reply
    has_body: bool          # Content-Length above 0, or any Transfer-Encoding


def _parse_head(head: bytes) -> _Head:
    """Parse and validate a request line and its headers (RFC 9112; the grammar h11 uses,
    with its regexes). Nothing but framing is taken from headers: Host (required by HTTP/1.1),
    Content-Length and Transfer-Encoding (any body is refused) and Connection. Raises _BadHead.
    """
    lines = head.split(b"\n")
    line = lines[0].removesuffix(b"\r")
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise _BadHead(400, "malformed request line")
    method, target, version = match.group(1, 2, 3)
    if version not in _HTTP_VERSIONS:
        raise _BadHead(505, "HTTP/1.0 or HTTP/1.1 only")
    hosts = 0
    lengths: set[bytes] = set()
    chunked = False
    connection: list[bytes] = []
    for raw in lines[1:]:
        # name ":" OWS value OWS, checked without a regex over the whole line: one with
        # optional whitespace on both sides of an optional value backtracks quadratically.
        raw = raw.removesuffix(b"\r")
        colon = raw.find(b":")
        if colon <= 0 or _FIELD_NAME.fullmatch(raw, 0, colon) is None:
            raise _BadHead(400, "malformed header line")
        if _NOT_IN_FIELD_VALUE.search(raw, colon + 1) is not None:
            raise _BadHead(400, "malformed header value")
        name = raw[:colon].lower()
        if name in _FRAMING:
            value = raw[colon + 1:].strip(b" \t")
            if name == b"host":
                hosts += 1
            elif name == b"content-length":
                for item in value.split(b","):
                    item = item.strip(b" \t")
                    if not item.isdigit() or len(item) > 18:
                        raise _BadHead(400, "bad Content-Length")
                    lengths.add(item.lstrip(b"0") or b"0")
            elif name == b"transfer-encoding":
                chunked = True
            else:
                connection.extend(t.strip(b" \t").lower() for t in value.split(b","))
    if len(lengths) > 1:
        raise _BadHead(400, "conflicting Content-Length")
    if version == b"1.1" and hosts != 1:
        raise _BadHead(400, "an HTTP/1.1 request needs exactly one Host header")
    close = b"close" in connection or (version == b"1.0" and b"keep-alive" not in connection)
    has_body = chunked or (bool(lengths) and lengths != {b"0"})
    return _Head(method, target, close, has_body)


def _parse_target(method: bytes, target: bytes) -> _Request:
    """Split a request target into its percent-decoded path and query. Raises ValueError."""
    text = target.decode("ascii")           # _REQUEST_LINE allows nothing else
    if not text.startswith("/"):
        raise ValueError("not an origin-form target")
    raw_path, _, raw_query = text.partition("?")
    path = unquote(raw_path, errors="strict")
    query = parse_qs(raw_query, keep_blank_values=True, errors="strict",
                     max_num_fields=32) if raw_query else _NO_QUERY
    return _Request(method, path, query)


def _version(text: str) -> int:
    """kv2's ``?version=N``; anything that is not a plain number names no version agentd
    holds: -1, refused like any other."""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else -1


def _request_id() -> str:
    """A random (version 4) UUID, as ``str(uuid.uuid4())`` makes, without its system call: a
    request id names a reply in logs and must be unique, not unpredictable."""
    h = (_random_bits(128) & _UUID_CLEAR | _UUID_V4).to_bytes(16, "big").hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _envelope(data: bytes, lease_duration: int, stale: bool) -> bytes:
    """OpenBao's response envelope around ``data`` (already JSON), field for field and in its
    order: what ``_json`` makes of the same dict, with only ``data`` encoded per reply (the
    envelope is a hot path)."""
    return b"".join((
        b'{"request_id":"', _request_id().encode(),
        b'","lease_id":"","renewable":false,"lease_duration":%d,"data":' % lease_duration,
        data,
        b',"wrap_info":null,"warnings":', _STALE_WARNINGS if stale else b"null",
        b',"auth":null}',
    ))


@functools.lru_cache(maxsize=256)
def _kv2_metadata(version: int, fetched_at: float) -> bytes:
    """kv2's ``data.metadata`` as JSON, as ``_json`` encodes it (cached: it holds nothing
    secret and changes only with the version a secret is read at)."""
    return _json({
        "created_time": _rfc3339(fetched_at),
        "custom_metadata": None,
        "deletion_time": "",
        "destroyed": False,
        "version": version,
    })


def _mount_info(mount: _Mount) -> dict[str, Any]:
    """The fields of OpenBao's ``sys/internal/ui/mounts`` answer for a kv mount."""
    return {
        "accessor": "",
        "config": {"default_lease_ttl": 0, "force_no_cache": False, "max_lease_ttl": 0},
        "deprecation_status": "supported",
        "description": "served by agentd",
        "external_entropy_access": False,
        "local": False,
        "options": {"version": mount.version},
        "path": mount.path + "/",
        "plugin_version": "",
        "running_plugin_version": "",
        "running_sha256": "",
        "seal_wrap": False,
        "type": "kv",
        "uuid": "",
    }


def _refusal(exc: RequestError, *, native: bool) -> _Reply:
    """The reply to a refused request. Forbidden is always the same bytes (no oracle)."""
    if isinstance(exc, Forbidden):
        return _Reply(403, _DENIED)
    if isinstance(exc, NotFound):
        # OpenBao answers a missing secret with an empty error list.
        return _error(404, exc.message) if native else _Reply(404, b'{"errors":[]}')
    if isinstance(exc, Unavailable):
        return _error(503, exc.message)
    if isinstance(exc, RateLimited):
        return _error(429, exc.message)
    if isinstance(exc, BadRequest):
        return _error(400, exc.message)
    return _error(500, "internal error")


def error_response(status: int, message: str) -> bytes:
    """A whole response with ``{"errors":[message]}`` and ``Connection: close``, for the shell
    to write before it closes a connection on its own account (a flooding client)."""
    return _response(_error(status, message), head=False, close=True)


def _response(reply: _Reply, *, head: bool, close: bool) -> bytes:
    """The bytes of one response (no body after the headers for a HEAD request)."""
    parts = [
        _STATUS_LINES.get(reply.status) or b"HTTP/1.1 %d \r\n" % reply.status,
        b"Content-Type: ", reply.content_type,
        b"\r\nContent-Length: %d\r\nCache-Control: no-store\r\n" % len(reply.body),
    ]
    if reply.stale:
        parts.append(b"X-Agentd-Stale: true\r\n")
    if reply.status == 429:
        parts.append(b"Retry-After: 1\r\n")         # tokens come back within a second
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    if not head:
        parts.append(reply.body)
    return b"".join(parts)


def _error(status: int, message: str) -> _Reply:
    return _Reply(status, _json({"errors": [message]}))


def _json(obj: Any, *, texts: bool = False) -> bytes:
    """Compact JSON; with ``texts`` (``obj`` holds numbers with their JSON text) each such
    number is written as its text (``jsonnum.dumps``, the slower path taken only then)."""
    if texts:
        return jsonnum.dumps(obj, default=_plain).encode()
    if _encode_c is not None:
        return "".join(_encode_c(obj, 0)).encode()
    return _ENCODER.encode(obj).encode()


def _plain(obj: Any) -> Any:
    """JSON for what msgpack may hold beyond JSON's types (values read from OpenBao are JSON)."""
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, tuple | list | set | frozenset):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=_plain)
"""What ``json.dumps(obj, separators=..., ensure_ascii=False, default=_plain)`` does, without
making a new encoder for each reply."""
# ``_ENCODER.encode`` still makes its C encoder anew on every call (half the cost of encoding a
# secret's few fields); CPython's, made once with the same settings (``check_circular`` off:
# values come from msgpack and JSON, which hold no cycles). None without the C accelerator.
_make_c_encoder = getattr(json.encoder, "c_make_encoder", None)
_encode_c: Final[Callable[[Any, int], Any] | None] = None if _make_c_encoder is None else \
    _make_c_encoder(None, _plain, json.encoder.encode_basestring, None, ":", ",", False, False,
                    True)


def _raw(value: Any, *, texts: bool = False) -> bytes:
    """A field's bare bytes: strings as UTF-8, bytes as they are, anything else as JSON."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value
    return _json(value, texts=texts)


@functools.lru_cache(maxsize=256)
def _rfc3339(when: float) -> str:
    """``when`` as OpenBao writes times (cached: a secret's fetch time is asked for often)."""
    moment = datetime.datetime.fromtimestamp(when, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
