"""Sans-IO framing and messages of the agentd wire protocol (v1).

Theory of operation
-------------------

This module never touches a socket and never imports trio: like h11, it is a pair of pure state
machines that turn bytes into events and events into bytes. The I/O shells (``server.py``,
``client.py``) are thin loops around them::

    bytes in ──► receive_data(data) ──► buffer ──► next_event() ──► Request / Rejected / ...
    reply    ◄── send_result() / send_error() / send_event() ◄── the shell's decision

A frame is a 4-byte unsigned big-endian length N followed by N bytes holding one msgpack map with
string keys. ``receive_data(b"")`` means end of file. ``next_event()`` is called in a loop until
it returns ``NEED_DATA`` (feed more bytes) or ``CLOSED`` (stop reading); several pipelined frames
fed at once come out one by one, in order.

Errors come in two weights, and the type says which (see ``errors.py``):

- A *request* error (a well-formed map with a bad id, version, op or argument) becomes
  ``Rejected(id, error)``; the shell sends ``send_error(id, error)`` and the connection goes on.
- A *framing* error (a length over ``max_request_bytes``, seen as soon as the 4-byte header is in,
  without waiting for the body; a zero length; a body that is not exactly one msgpack map with
  string keys) becomes ``Rejected(None, FramingError)``. The byte stream can no longer be trusted:
  the connection is ``broken``, every later ``next_event()`` returns ``CLOSED``, and the shell
  sends the error reply and closes.

Decoding never raises anything but our own errors: whatever msgpack or the validation throws on
hostile input is turned into a ``Rejected``. Messages in those errors name keys (cut to a bounded
length) but never echo argument values, which might be secret-ish.

``ClientConnection`` is the mirror image for clients: ``send_request()`` assigns increasing ids,
``next_event()`` yields ``Response`` and ``Event`` objects, error replies arrive as the matching
``RequestError`` subclass (unknown codes as ``InternalError``), and a server that sends garbage
raises ``ClientError``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal, NoReturn

import msgpack

from agentd import jsonnum
from agentd.errors import (
    ERROR_CODES,
    BadRequest,
    ClientError,
    FrameTooLarge,
    InternalError,
    MalformedFrame,
    RequestError,
    UnknownOp,
    UnsupportedVersion,
)

__all__ = [
    "CLOSED",
    "HEADER_SIZE",
    "MAX_NAME_LENGTH",
    "MAX_WATCH_NAMES",
    "NEED_DATA",
    "OPS",
    "PROTOCOL_VERSION",
    "Arg",
    "ArgKind",
    "ClientConnection",
    "Closed",
    "Event",
    "NeedData",
    "Rejected",
    "Request",
    "Response",
    "ServerConnection",
]

PROTOCOL_VERSION: Final = 1
HEADER_SIZE: Final = 4
MAX_FRAME_LENGTH: Final = 2**32 - 1
MAX_NAME_LENGTH: Final = 256
MAX_WATCH_NAMES: Final = 256
_MAX_KEY_IN_MESSAGE: Final = 64


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = _Sentinel.NEED_DATA
"""``next_event()`` needs more bytes: call ``receive_data()`` first."""
CLOSED: Final = _Sentinel.CLOSED
"""No more events will come: the peer sent EOF, or the stream is broken."""
NeedData = Literal[_Sentinel.NEED_DATA]
Closed = Literal[_Sentinel.CLOSED]


# --- argument schemas ---------------------------------------------------------------------------


class ArgKind(enum.Enum):
    """What an argument must hold."""

    NAME = "a string of 1 to 256 characters"
    NAMES = "a non-empty list of at most 256 strings of 1 to 256 characters"
    FLAG = "true or false"


@dataclass(frozen=True)
class Arg:
    """One argument of an op: its kind, and whether the request must carry it."""

    kind: ArgKind
    required: bool = True


OPS: Final[dict[str, Mapping[str, Arg]]] = {
    "ping": {},
    "get": {"name": Arg(ArgKind.NAME), "field": Arg(ArgKind.NAME, required=False),
            "exact": Arg(ArgKind.FLAG, required=False)},
    "list": {},
    "watch": {"names": Arg(ArgKind.NAMES)},
    "status": {},
    "refresh": {"name": Arg(ArgKind.NAME)},
}
"""Every op of protocol v1 and its arguments. Anything not listed is refused."""

_ENVELOPE_KEYS: Final = frozenset({"v", "id", "op"})
_REPLY_KEYS: Final = _ENVELOPE_KEYS | {"ok", "error"}     # never in a reply's result
_ABSENT: Final = object()


def _is_name(value: object) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= MAX_NAME_LENGTH


def _check_arg(kind: ArgKind, value: object) -> Any | None:
    """The validated (and frozen) value, or None if it does not fit ``kind``."""
    if kind is ArgKind.NAME:
        return value if _is_name(value) else None
    if kind is ArgKind.FLAG:
        return value if type(value) is bool else None
    if (
        isinstance(value, list)
        and 1 <= len(value) <= MAX_WATCH_NAMES
        and all(_is_name(item) for item in value)
    ):
        return tuple(value)
    return None


def _key(key: str) -> str:
    """A key for an error message: quoted, and cut so that a hostile key cannot flood a log."""
    if len(key) > _MAX_KEY_IN_MESSAGE:
        return repr(key[:_MAX_KEY_IN_MESSAGE]) + "..."
    return repr(key)


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but true is not a request id.
    return type(value) is int


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A valid request. ``args`` holds exactly the op's arguments (no v, id or op), validated:
    names are ``str``, ``watch``'s ``names`` is a ``tuple[str, ...]``; absent optional arguments
    are absent (use ``args.get("field")``)."""

    id: int
    op: str
    args: Mapping[str, Any]


@dataclass(frozen=True)
class Rejected:
    """A request that must be answered with ``error``. ``id`` is None when it could not be read.
    If ``error`` is a ``FramingError``, the connection is broken: reply, then close."""

    id: int | None
    error: RequestError


@dataclass(frozen=True)
class Response:
    """The reply to one request (client side). ``result`` holds the reply without id and ok;
    ``error`` is set (and ``ok`` false) for an error reply."""

    id: int | None
    ok: bool
    result: Mapping[str, Any]
    error: RequestError | None


@dataclass(frozen=True)
class Event:
    """A ``watch`` event (client side): ``event`` is "changed" or "revoked"; ``fields`` holds the
    rest (``name``, ``version``). ``id`` is the id of the watch request."""

    id: int
    event: str
    fields: Mapping[str, Any]


# --- framing ------------------------------------------------------------------------------------


def _frame(message: Mapping[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return _header(len(body)) + body


def _header(length: int) -> bytes:
    if length > MAX_FRAME_LENGTH:
        raise ValueError("message too large for one frame")
    return length.to_bytes(HEADER_SIZE, "big")


_ID_KEY: Final = msgpack.packb("id")
_OK_TRUE: Final = msgpack.packb("ok") + msgpack.packb(True)


def _map_header_size(entries: int) -> int:
    """Bytes of the msgpack header of a map with ``entries`` entries (fixmap, map16, map32)."""
    return 1 if entries < 16 else 3 if entries < 2**16 else 5


def _decode_map(body: bytes, *, strict_map_key: bool,
                ext_hook: Callable[[int, bytes], Any] = jsonnum.plain_ext_hook,
                ) -> dict[str, Any] | None:
    """The msgpack map in ``body`` (one object, nothing after it, string keys), or None."""
    try:
        # ext type 1: a JSON number as its text (protocol.md): an integer beyond msgpack's 64
        # bits, or with ``get``'s ``exact`` any number whose text Python would not write back
        value = msgpack.unpackb(body, raw=False, strict_map_key=strict_map_key, use_list=True,
                                ext_hook=ext_hook)
    except Exception:  # hostile input: ExtraData, ValueError, UnicodeDecodeError, RecursionError..
        return None
    if type(value) is not dict:
        return None
    for key in value:
        if type(key) is not str:
            return None
    return value


class _FrameBuffer:
    """Bytes received and not yet consumed, cut into frames."""

    def __init__(self) -> None:
        self._data = bytearray()
        self.eof = False

    def feed(self, data: bytes) -> None:
        if self.eof:
            if data:
                raise RuntimeError("receive_data() called with data after EOF")
            return
        if data:
            self._data += data
        else:
            self.eof = True

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def length(self) -> int | None:
        """The length announced by the next frame's header, or None if it is not all in yet."""
        data = self._data
        if len(data) < HEADER_SIZE:
            return None
        return (data[0] << 24) | (data[1] << 16) | (data[2] << 8) | data[3]

    def has_frame(self) -> bool:
        length = self.length()
        return length is not None and len(self._data) >= HEADER_SIZE + length

    def complete(self, length: int) -> bool:
        """True if a frame whose header announced ``length`` is all in."""
        return len(self._data) >= HEADER_SIZE + length

    def take(self, length: int) -> bytes:
        """Remove one frame whose body is ``length`` bytes (it must be complete) and return
        its body."""
        end = HEADER_SIZE + length
        body = bytes(self._data[HEADER_SIZE:end])
        del self._data[:end]
        return body


# --- server side --------------------------------------------------------------------------------


class ServerConnection:
    """The server's half of one connection. Pure state: no I/O, no clock, no locks.

    Args:
        max_request_bytes: the largest frame body accepted; a larger length is answered with
            ``too_large`` and breaks the connection.
    """

    def __init__(self, *, max_request_bytes: int = 65536) -> None:
        if max_request_bytes < 1:
            raise ValueError("max_request_bytes must be positive")
        self.max_request_bytes = max_request_bytes
        self._buffer = _FrameBuffer()
        self._broken = False
        # One packer per connection: msgpack.packb would build (and free) one per reply.
        self._packer = msgpack.Packer(use_bin_type=True)
        self._pack: Callable[[Any], bytes] = self._packer.pack

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the peer; ``b""`` means EOF. Bytes after a framing error are
        dropped.

        Raises:
            RuntimeError: data after EOF (a bug in the caller).
        """
        if self._broken:
            return
        self._buffer.feed(data)

    @property
    def broken(self) -> bool:
        """True once a framing error was returned: send its reply, then close."""
        return self._broken

    @property
    def has_partial_frame(self) -> bool:
        """True if bytes of a frame are buffered but the frame is not complete yet."""
        return not self._broken and len(self._buffer) > 0 and not self._buffer.has_frame()

    @property
    def event_ready(self) -> bool:
        """True if ``next_event()`` would return a ``Request`` or ``Rejected`` (a whole frame,
        or a header that is a framing error, is buffered): the shell takes the peer's rate
        token before it lets the frame be parsed."""
        if self._broken:
            return False
        buffer = self._buffer
        length = buffer.length()
        if length is None:
            return False
        return length > self.max_request_bytes or length == 0 or buffer.complete(length)

    def next_event(self) -> Request | Rejected | NeedData | Closed:
        """The next event from the buffered bytes. Never raises."""
        if self._broken:
            return CLOSED
        buffer = self._buffer
        length = buffer.length()
        if length is None:
            return CLOSED if buffer.eof else NEED_DATA
        if length > self.max_request_bytes:
            return self._break(
                FrameTooLarge(f"request of {length} bytes is over the limit of "
                              f"{self.max_request_bytes} bytes")
            )
        if length == 0:
            return self._break(MalformedFrame("empty frame"))
        if not buffer.complete(length):
            # EOF in the middle of a frame: nothing to answer, just close.
            return CLOSED if buffer.eof else NEED_DATA
        message = _decode_map(buffer.take(length), strict_map_key=True)
        if message is None:
            return self._break(MalformedFrame("frame body is not a msgpack map with string keys"))
        return _validate(message)

    def _break(self, error: MalformedFrame | FrameTooLarge) -> Rejected:
        self._broken = True
        self._buffer.clear()
        return Rejected(None, error)

    def send_result(
        self, id: int, result: Mapping[str, Any], /, *, packed: Mapping[str, bytes] | None = None
    ) -> bytes:
        """The frame of a success reply ``{"id": id, "ok": true, **packed, **result}``.

        ``packed`` holds fields whose values are already msgpack-encoded (one object each, as
        ``msgpack.packb(value, use_bin_type=True)`` gives it): their bytes are spliced into the
        reply as they are, so a value that is stored packed need not be unpacked to be sent.
        The bytes on the wire are the same as for ``send_result(id, {**unpacked, **result})``.
        """
        if not _REPLY_KEYS.isdisjoint(result):
            raise ValueError("result must not contain the keys v, id, op, ok or error")
        pack = self._pack
        if not packed:
            body = pack({"id": id, "ok": True, **result})
            return _header(len(body)) + body
        if not _REPLY_KEYS.isdisjoint(packed):
            raise ValueError("packed must not contain the keys v, id, op, ok or error")
        if not packed.keys().isdisjoint(result):
            raise ValueError("a key is both in packed and in result")
        # One map header for the whole reply, then its entries: the envelope's, the packed
        # fields', and ``result``'s (packed as a map, its header cut off).
        parts = [self._packer.pack_map_header(2 + len(packed) + len(result)),
                 _ID_KEY, pack(id), _OK_TRUE]
        for key, value in packed.items():
            parts.append(pack(key))
            parts.append(value)
        if result:
            parts.append(pack(result)[_map_header_size(len(result)):])
        body = b"".join(parts)
        return _header(len(body)) + body

    def send_error(self, id: int | None, error: RequestError) -> bytes:
        """The frame of an error reply ``{"id": id, "ok": false, "error": {code, message}}``."""
        body = self._pack(
            {"id": id, "ok": False, "error": {"code": error.code, "message": error.message}}
        )
        return _header(len(body)) + body

    def send_event(self, id: int, event: str, /, **fields: Any) -> bytes:
        """The frame of a watch event ``{"id": id, "event": event, **fields}``."""
        if "ok" in fields:
            raise ValueError("an event must not contain the key ok")
        body = self._pack({"id": id, "event": event, **fields})
        return _header(len(body)) + body


def _validate(message: dict[str, Any]) -> Request | Rejected:
    """Check a decoded request map against the envelope and the op's schema."""
    id_ = message.get("id", _ABSENT)
    if id_ is _ABSENT:
        return Rejected(None, BadRequest("request has no 'id'"))
    if not _is_int(id_):
        return Rejected(None, BadRequest("'id' must be an integer"))
    version = message.get("v", _ABSENT)
    if version is _ABSENT:
        return Rejected(id_, BadRequest("request has no 'v'"))
    if not (_is_int(version) and version == PROTOCOL_VERSION):
        return Rejected(id_, UnsupportedVersion(f"only protocol version {PROTOCOL_VERSION} "
                                                "is supported"))
    op = message.get("op", _ABSENT)
    if op is _ABSENT:
        return Rejected(id_, BadRequest("request has no 'op'"))
    if not isinstance(op, str):
        return Rejected(id_, UnknownOp("'op' must be a string"))
    schema = OPS.get(op)
    if schema is None:
        return Rejected(id_, UnknownOp(f"unknown op {_key(op)}"))
    if op == "get" and len(message) == 4:
        # The common request, checked in one go: {"v", "id", "op", "name"} and a valid name.
        name = message.get("name", _ABSENT)
        if isinstance(name, str) and 1 <= len(name) <= MAX_NAME_LENGTH:
            return Request(id_, op, MappingProxyType({"name": name}))
    if len(message) > len(_ENVELOPE_KEYS) + len(schema):
        extra = min(k for k in message if k not in _ENVELOPE_KEYS and k not in schema)
        return Rejected(id_, BadRequest(f"{op}: unknown argument {_key(extra)}"))
    for key in message:
        if key not in schema and key not in _ENVELOPE_KEYS:
            extra = min(k for k in message if k not in _ENVELOPE_KEYS and k not in schema)
            return Rejected(id_, BadRequest(f"{op}: unknown argument {_key(extra)}"))
    args: dict[str, Any] = {}
    for key, arg in schema.items():
        value = message.get(key, _ABSENT)
        if value is _ABSENT:
            if arg.required:
                return Rejected(id_, BadRequest(f"{op}: missing argument {_key(key)}"))
            continue
        value = _check_arg(arg.kind, value)
        if value is None:
            return Rejected(id_, BadRequest(f"{op}: argument {_key(key)} must be "
                                            f"{arg.kind.value}"))
        args[key] = value
    return Request(id_, op, MappingProxyType(args))


# --- client side --------------------------------------------------------------------------------


class ClientConnection:
    """The client's half of one connection. Pure state: no I/O.

    Args:
        max_response_bytes: the largest reply frame accepted; a larger one raises ClientError.
    """

    def __init__(self, *, max_response_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_response_bytes = max_response_bytes
        self._buffer = _FrameBuffer()
        self._next_id = 1
        self._broken = False

    def send_request(self, op: str, /, **args: Any) -> tuple[int, bytes]:
        """The id assigned (1, 2, ...) and the frame of the request ``op`` with ``args``."""
        clash = _ENVELOPE_KEYS.intersection(args)
        if clash:
            raise ValueError(f"argument names {sorted(clash)} are reserved")
        id_ = self._next_id
        self._next_id += 1
        return id_, _frame({"v": PROTOCOL_VERSION, "id": id_, "op": op, **args})

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the server; ``b""`` means EOF."""
        if self._broken:
            return
        self._buffer.feed(data)

    @property
    def has_partial_frame(self) -> bool:
        """True if bytes of a reply are buffered but the reply is not complete yet."""
        return not self._broken and len(self._buffer) > 0 and not self._buffer.has_frame()

    def next_event(self) -> Response | Event | NeedData | Closed:
        """The next reply or watch event.

        Raises:
            ClientError: the server sent something that is not a valid reply, or closed the
                connection in the middle of one. The connection is unusable afterwards.
        """
        if self._broken:
            raise ClientError("the connection to agentd is broken")
        buffer = self._buffer
        length = buffer.length()
        if length is not None and length > self.max_response_bytes:
            self._fail(f"reply of {length} bytes is over the limit of "
                       f"{self.max_response_bytes} bytes")
        if length is None or not buffer.has_frame():
            if not buffer.eof:
                return NEED_DATA
            if len(buffer):
                self._fail("agentd closed the connection in the middle of a reply")
            return CLOSED
        # numbers sent as text keep it (jsonnum.LiteralFloat, LiteralInt: float and int)
        message = _decode_map(buffer.take(length), strict_map_key=False,
                              ext_hook=jsonnum.exact_ext_hook)
        if message is None:
            self._fail("agentd sent a reply that is not a msgpack map")
        return self._parse(message)

    def _fail(self, message: str) -> NoReturn:
        self._broken = True
        self._buffer.clear()
        raise ClientError(message)

    def _parse(self, message: dict[str, Any]) -> Response | Event:
        id_ = message.pop("id", None)
        if id_ is not None and not _is_int(id_):
            self._fail("agentd sent a reply with a bad 'id'")
        if "ok" not in message and "event" in message:
            event = message.pop("event")
            if id_ is None or not isinstance(event, str):
                self._fail("agentd sent a malformed watch event")
            return Event(id_, event, MappingProxyType(message))
        ok = message.pop("ok", None)
        if ok is True:
            if id_ is None:
                self._fail("agentd sent a success reply without an 'id'")
            return Response(id_, True, MappingProxyType(message), None)
        if ok is not False:
            self._fail("agentd sent a reply without a boolean 'ok'")
        detail = message.pop("error", None)
        if not isinstance(detail, dict):
            self._fail("agentd sent an error reply without an 'error' map")
        code = detail.get("code")
        text = detail.get("message")
        if not isinstance(code, str) or not isinstance(text, str):
            self._fail("agentd sent an error reply without a code and message")
        cls = ERROR_CODES.get(code)
        error = cls(text) if cls is not None else InternalError(
            f"{text} (unknown error code {_key(code)})"
        )
        return Response(id_, False, MappingProxyType(message), error)
