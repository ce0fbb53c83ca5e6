"""The sandboxed render worker: a child process that renders one template at a time.

Theory of operation (decision 8): render happens here (``python -m agentd.render.worker``),
never on the trio thread and never in a thread: Jinja2's ``SandboxedEnvironment`` bounds neither
time nor memory (``'x' * 10**8`` renders), and a thread cannot be killed. The worker gets one
request at a time over stdin (4-byte length + msgpack map: the template text, the data of the
secrets it names packed on its own by ``jsonnum.packb``, the output limit), renders with
``StrictUndefined`` and ``keep_trailing_newline`` (byte-exact output) and answers on stdout with
the bytes or an error message scrubbed of secret values. It runs under ``RLIMIT_AS``
(``WORKER_MEMORY``), stops producing output past the request's limit and is made non-dumpable
like the agent, since it sees plaintext. The parent side is ``agentd.render.pool.RenderWorker``.

A number that keeps its JSON text (``1e-7``, decision 14) reaches a Go template as its
json.Number (``1e-7``) and a Jinja2 template as the plain Python number (``1e-07``).

Import closure: msgpack, Jinja2 (inside ``worker_main``), the standard library and the pure
``agentd.errors``, ``agentd.frozen``, ``agentd.hardening`` and ``agentd.jsonnum``; never trio,
the config, the cache or ``cryptography`` (``tests/test_render_package.py`` holds this).
"""

from __future__ import annotations

import contextlib
import re
import struct
import sys
from collections.abc import Mapping
from typing import Any

import msgpack

from agentd import jsonnum
from agentd.errors import RenderError
from agentd.frozen import freeze, thaw
from agentd.hardening import harden_process

WORKER_MEMORY = 1 << 30         # RLIMIT_AS of the worker


def _frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


_TOKEN = re.compile(r"[A-Za-z0-9_]+|[^\sA-Za-z0-9_]")
MAX_ERROR = 300                 # characters of an error message kept


def _scrub(message: str, data: Mapping[str, Any]) -> str:
    """Remove every value of the template's secrets from an error message (and keep it short).

    Every scalar counts, of any type and length: strings, bytes, and numbers and booleans as
    Python prints them (Jinja names an index it could not find: "no element 987654321"). A
    value of three characters or more is replaced wherever it appears; a shorter one wherever
    it appears as a whole word or symbol (replacing every "a" inside words would leave nothing
    readable, and a 1-character value inside a longer word reveals nothing).
    """
    values: set[str] = set()

    def collect(v: Any) -> None:
        if isinstance(v, Mapping):
            for x in v.values():
                collect(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                collect(x)
        elif isinstance(v, bytes):
            values.add(v.decode("utf-8", "replace"))
        elif v is not None:
            values.add(str(v))

    collect(data)
    values.discard("")
    for v in sorted((v for v in values if len(v) >= 3), key=len, reverse=True):
        message = message.replace(v, "***")
    short = {v for v in values if len(v) < 3}
    if short:
        message = _TOKEN.sub(lambda m: "***" if m.group(0) in short else m.group(0), message)
    return message[:MAX_ERROR]


def _secrets(request: Mapping[str, Any]) -> dict[str, Any]:
    """The request's secrets as its engine reads numbers: Go each number kept as text as a
    json.Number of that text (``gotemplate.JsonNumber``), Jinja2 the plain number."""
    packed: bytes = request["secrets"]
    if "go" in request:
        from agentd.gotemplate.values import JsonNumber

        go: dict[str, Any] = jsonnum.unpackb_with(packed, JsonNumber)
        return go
    plain: dict[str, Any] = jsonnum.unpackb_plain(packed)
    return plain


def _render_go(cache: dict[Any, Any], request: Mapping[str, Any],
               replies: Mapping[str, Any]) -> bytes:
    """consul-template's Go dialect (``agentd.gotemplate``, standard library only): the same
    output cap, and the engine's own step budget bounds the time a template can spin."""
    from agentd import gotemplate

    options: Mapping[str, Any] = request["go"]
    text: str = request["template"]
    key = (text, options["name"], options["left"], options["right"], options["missing_key"],
           tuple(options["env_allow"]))
    template = cache.get(key)
    if template is None:
        if len(cache) > 4096:
            cache.clear()
        template = cache[key] = gotemplate.parse(
            text, name=options["name"], left_delim=options["left"],
            right_delim=options["right"], env_allow=options["env_allow"],
            missing_key=options["missing_key"])

    def lookup(path: str, kv_args: Mapping[str, str]) -> Any:
        # k=v arguments (a pki/issue write) are the declared secret's params: the agent
        # issued it already; the template reads that value.
        return replies.get(path.partition("?")[0])     # ?version=N: the catalog pins versions

    limit: int = request["max_bytes"]
    out = template.execute(lookup, max_output=limit).encode("utf-8", "surrogateescape")
    if len(out) > limit:
        raise RenderError(f"output larger than {limit} bytes")
    return out


def _render_in_worker(env: Any, cache: dict[Any, Any], request: Mapping[str, Any],
                      data: Mapping[str, Any]) -> bytes:
    if "go" in request:
        return _render_go(cache, request, data)
    frozen = {name: freeze(value) for name, value in data.items()}

    def secret(name: str) -> Any:
        if name not in frozen:
            raise RenderError(f"secret({name!r}): not available to this template "
                              "(undeclared, not fetched, or not named literally)")
        return frozen[name]

    text: str = request["template"]
    template = cache.get(text)
    if template is None:
        if len(cache) > 4096:
            cache.clear()
        template = cache[text] = env.from_string(text)
    limit: int = request["max_bytes"]
    out: list[bytes] = []
    size = 0
    for chunk in template.generate(secret=secret):
        piece = chunk.encode("utf-8", "surrogateescape")
        size += len(piece)
        if size > limit:
            raise RenderError(f"output larger than {limit} bytes")
        out.append(piece)
    return b"".join(out)


def worker_main() -> None:
    """The worker loop: read a request from stdin, write the answer to stdout, until EOF."""
    import base64
    import json
    import resource

    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    harden_process()
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))

    def b64encode(value: Any) -> str:
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
        return base64.b64encode(raw).decode("ascii")

    def b64decode(value: Any) -> str:
        return base64.b64decode(str(value), validate=True).decode("utf-8", "surrogateescape")

    def tojson(value: Any) -> str:
        return json.dumps(thaw(value), sort_keys=True)

    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True,
                               autoescape=False)
    env.filters.update(b64encode=b64encode, b64decode=b64decode, tojson=tojson)
    compiled: dict[str, Any] = {}
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return
        (n,) = struct.unpack(">I", head)
        request = msgpack.unpackb(stdin.read(n), raw=False)
        data: dict[str, Any] = {}
        try:
            data = _secrets(request)
            reply: dict[str, Any] = {"ok": True,
                                     "output": _render_in_worker(env, compiled, request, data)}
        except MemoryError:
            reply = {"ok": False, "error": "out of memory while rendering"}
        except Exception as exc:  # any template error becomes a message
            name = type(exc).__name__
            reply = {"ok": False, "error": f"{name}: {_scrub(str(exc), data)}"}
        stdout.write(_frame(reply))
        stdout.flush()


if __name__ == "__main__":
    worker_main()
