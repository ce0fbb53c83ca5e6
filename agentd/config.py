"""TOML configuration -> frozen, validated dataclasses.

Theory of operation: ``load(path)`` reads the main file and then ``conf.d/*.toml`` beside it
(sorted), parses each with tomllib, and validates in two phases (as OpenBao's agent config does):
phase one turns raw tables into typed values key by key, collecting *every* problem instead of
stopping at the first; phase two checks cross-references (a policy granting a pattern, a template
naming a secret) and, unless ``check_permissions=False``, the filesystem (files exist, and nobody
but root or the agent's user can change them). If anything is wrong, one ``ConfigError`` carries
all problems, each formatted as ``file:line: key.path: message`` (line is where the key, or its
table header, can be located in that file; 0 if nowhere). A small locator over the raw text finds
lines, since tomllib does not keep them.

The dataclasses below are the contract the rest of agentd codes against. All are frozen; mappings
are read-only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import grp
import json
import pwd
import re
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar
from urllib.parse import urlsplit

from agentd.errors import ConfigError
from agentd.refs import secret_refs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

DEFAULT_CONFIG_PATH = Path("/etc/agentd/agentd.toml")
DEFAULT_SOCKET = Path("/run/agentd/agentd.sock")
ON_REVOKE = ("keep", "remove")      # what a template does with its file when an input is revoked
SECRET_NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"  # noqa: S105 (a name, not a password)
SECRET_KINDS: tuple[str, ...] = ("kv2", "kv1", "leased", "pki")
AUTH_METHODS: tuple[str, ...] = ("approle", "token_file", "cert", "jwt")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
UNIT_SUFFIXES: tuple[str, ...] = (
    ".service", ".socket", ".timer", ".scope", ".slice", ".target", ".path",
    ".mount", ".automount", ".swap", ".device",
)


@dataclass(frozen=True)
class AgentConfig:
    socket: Path = DEFAULT_SOCKET
    socket_mode: int = 0o666
    socket_group: int | None = None          # gid, resolved from a name or number
    state_dir: Path = Path("/var/lib/agentd")
    log_level: str = "info"                  # debug | info | warning | error
    ready_timeout: float = 30.0              # seconds
    credentials_socket: Path | None = None
    user: str | None = None                  # the agent's own user, if not root (file checks)
    max_connections: int = 1024              # open connections on the socket, all peers
    max_connections_per_uid: int = 64
    requests_per_second_per_uid: int = 100       # token bucket refill rate, per uid
    request_burst_per_uid: int = 200             # token bucket size, per uid
    max_watchers_per_uid: int = 16               # open watch streams, per uid
    max_request_bytes: int = 65536
    idle_timeout: float = 300.0              # close a connection idle this long
    frame_timeout: float = 5.0               # close a connection whose frame is not complete


@dataclass(frozen=True)
class AuthConfig:
    method: str = "approle"                  # approle | token_file | cert | jwt
    mount: str | None = None                 # auth mount path; default: the method's name
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    token_file: Path | None = None
    cert_file: Path | None = None            # cert: client certificate (PEM), read at each login
    key_file: Path | None = None             # cert: its private key (PEM)
    jwt_file: Path | None = None             # jwt: the token, re-read at each login
    role: str | None = None                  # cert (optional), jwt (required): the auth role


@dataclass(frozen=True)
class UpstreamConfig:
    addresses: tuple[str, ...] = ()
    ca_file: Path | None = None
    tls_server_name: str | None = None       # verify the server's certificate for this name
    namespace: str | None = None
    timeout: float = 10.0                    # per request
    max_concurrency: int = 8                 # requests in flight to the upstream
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    login_backoff_max: float = 300.0
    auth: AuthConfig = field(default_factory=AuthConfig)


@dataclass(frozen=True)
class CacheConfig:
    max_stale: float = 86400.0
    key_file: Path | None = None             # default: state_dir / "cache.key"
    key_credential: str | None = None


@dataclass(frozen=True)
class AuditConfig:
    path: str | None = "/var/log/agentd/audit.jsonl"   # a file path, "journal", or None (off)
    max_bytes: int = 100 * 1024 * 1024       # rotate the file past this size
    backups: int = 5                         # rotated files kept
    flush_interval: float = 1.0              # coalesced counts written at least this often


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, int] | None = None    # (host, port) of the /metrics HTTP endpoint
    textfile: Path | None = None             # node_exporter textfile, rewritten atomically
    textfile_interval: float = 15.0


@dataclass(frozen=True)
class SecretConfig:
    name: str
    kind: str                                # kv2 | kv1 | leased | pki
    path: str                                # API path without /v1/, e.g. secret/data/app/db
    refresh: float = 300.0
    max_stale: float | None = None           # None: [cache] max_stale
    params: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))  # pki
    renew_at: float = 2.0 / 3.0              # pki, leased: fraction of the lifetime
    revoke_previous: bool = False            # pki: revoke the replaced serial after grace
    grace: float = 30.0                      # leased, pki: old lease/serial revoked after this
    revoke_on_shutdown: bool = False         # leased: revoke the lease at a clean shutdown
    version: int | None = None               # kv2: pin this version (rollback)
    check: tuple[str, ...] = ()              # argv run on a new value before it goes live
    expect_rotation_every: float | None = None   # alarm when it rotates more often than this


@dataclass(frozen=True)
class PolicyConfig:
    name: str
    allow: tuple[str, ...]                   # name globs (fnmatch)
    uids: tuple[int, ...] = ()               # users are resolved into uids at load
    gids: tuple[int, ...] = ()               # groups are resolved into gids at load
    users: tuple[str, ...] = ()              # as written, for messages
    groups: tuple[str, ...] = ()
    exe: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    admin: bool = False
    exe_sha256: tuple[str, ...] = ()         # lowercase hex sha256 of the executable


@dataclass(frozen=True)
class WaitConfig:
    min: float = 0.0
    max: float = 0.0


@dataclass(frozen=True)
class TemplateConfig:
    destination: Path
    source: Path | None = None
    contents: str | None = None
    mode: int = 0o600
    owner: int | None = None                 # uid
    group: int | None = None                 # gid
    command: tuple[str, ...] = ()
    command_timeout: float = 30.0
    wait: WaitConfig = field(default_factory=WaitConfig)
    backup: bool = False                     # keep the replaced file as DESTINATION.bak
    on_revoke: str = "keep"                  # keep | remove: the file when an input is revoked


@dataclass(frozen=True)
class BundleConfig:
    directory: Path
    files: Mapping[str, str]                 # file name -> template text
    mode: int = 0o600
    owner: int | None = None
    group: int | None = None
    command: tuple[str, ...] = ()
    command_timeout: float = 30.0
    wait: WaitConfig = field(default_factory=WaitConfig)
    grace: float = 60.0
    modes: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # per file
    on_revoke: str = "keep"                  # keep | remove: the files when an input is revoked


@dataclass(frozen=True)
class Config:
    agent: AgentConfig
    upstream: UpstreamConfig
    cache: CacheConfig
    audit: AuditConfig
    secrets: Mapping[str, SecretConfig]
    policies: tuple[PolicyConfig, ...]
    templates: tuple[TemplateConfig, ...] = ()
    bundles: tuple[BundleConfig, ...] = ()
    files: tuple[Path, ...] = ()             # the files this config was read from
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def max_stale_for(self, name: str) -> float:
        secret = self.secrets[name]
        return self.cache.max_stale if secret.max_stale is None else secret.max_stale

    @property
    def key_file(self) -> Path:
        return self.cache.key_file or self.agent.state_dir / "cache.key"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_MAIN_ONLY = ("agent", "upstream", "cache", "audit", "metrics")
_ANYWHERE = ("secrets", "policy", "template", "bundle")
_SECRET_KEYS = (
    "kind", "path", "refresh", "max_stale", "params", "renew_at", "revoke_previous", "grace",
    "revoke_on_shutdown", "version", "check", "expect_rotation_every",
)
_KIND_ONLY: dict[str, tuple[str, ...]] = {   # keys that only some kinds use
    "params": ("pki",),
    "renew_at": ("pki", "leased"),
    "revoke_previous": ("pki",),
    "grace": ("pki", "leased"),
    "revoke_on_shutdown": ("leased",),
    "version": ("kv2",),
}
_SELECTORS = ("uids", "users", "gids", "groups", "exe", "exe_sha256", "units")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?")
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 10**3, "KiB": 2**10, "MB": 10**6, "MiB": 2**20, "GB": 10**9,
    "GiB": 2**30,
}
_MODE = re.compile(r"[0-7]{3,4}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED_KEY = re.compile(rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*")
_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")

T = TypeVar("T")
KeyPath = tuple[str | int, ...]
_NO_INTS: tuple[int, ...] = ()
_NO_STRS: tuple[str, ...] = ()


def load(path: Path, *, check_permissions: bool = True) -> Config:
    """Read, validate and freeze the configuration at ``path`` and its ``conf.d/*.toml``.

    Args:
        path: the main TOML file. Every ``conf.d/*.toml`` in its directory is read after it,
            sorted by name; those may only hold ``[secrets.X]``, ``[[policy]]``,
            ``[[template]]`` and ``[[bundle]]``.
        check_permissions: also look at the filesystem: config files, their directories,
            template sources and credential files must exist and be safe (owned by root or the
            agent's user, not writable by group or others; credentials not readable by others).
            Off, nothing but the config files themselves is read.

    Returns:
        The frozen configuration.

    Raises:
        ConfigError: with every problem found, each ``"file:line: key.path: message"``, sorted
            by file (in reading order) then line.
    """
    path = Path(path)
    problems: list[_Problem] = []
    files = [path]
    confd = path.parent / "conf.d"
    if confd.is_dir():
        files.extend(sorted(confd.glob("*.toml"), key=lambda p: p.name))
    parsed: list[tuple[_File, dict[str, object]]] = []
    for order, file in enumerate(files):
        result = _parse(file, order, problems)
        if result is not None:
            parsed.append(result)
    if problems:
        # A file we could not parse makes cross-checks meaningless: report what we have.
        raise ConfigError(_sorted(problems))
    config = _Builder(problems, check_permissions).build(parsed)
    if problems:
        raise ConfigError(_sorted(problems))
    return config


@dataclass
class _Problem:
    order: int                               # the file's position in reading order
    line: int
    text: str


def _sorted(problems: list[_Problem]) -> list[str]:
    return [p.text for p in sorted(problems, key=lambda p: (p.order, p.line))]


def _parse(
    file: Path, order: int, problems: list[_Problem]
) -> tuple[_File, dict[str, object]] | None:
    try:
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        problems.append(_Problem(order, 0, f"{file}:0: (file): no such file"))
        return None
    except OSError as exc:
        problems.append(_Problem(order, 0, f"{file}:0: (file): cannot read: {exc.strerror}"))
        return None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        problems.append(_Problem(order, line, f"{file}:{line}: (file): not valid UTF-8"))
        return None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_LINE.search(message)
        line = int(match.group(1)) if match else 0
        problems.append(_Problem(order, line, f"{file}:{line}: TOML syntax error: {message}"))
        return None
    return _File(file, order, text, problems), data


def _split_key(raw: str) -> list[str]:
    """``a."b.c".d`` -> ``["a", "b.c", "d"]`` (TOML dotted key syntax)."""
    parts: list[str] = []
    pos = 0
    raw = raw.strip()
    while pos < len(raw):
        while pos < len(raw) and raw[pos] in " \t.":
            pos += 1
        if pos >= len(raw):
            break
        quote = raw[pos]
        if quote in "\"'":
            end = pos + 1
            while end < len(raw) and raw[end] != quote:
                end += 2 if quote == '"' and raw[end] == "\\" else 1
            body = raw[pos + 1 : end]
            if quote == '"':
                with contextlib.suppress(ValueError):
                    body = json.loads(f'"{body}"')
            parts.append(body)
            pos = end + 1
        else:
            match = _BARE_KEY.match(raw, pos)
            if match is None:
                break
            parts.append(match.group(0))
            pos = match.end()
    return parts


class _Locator:
    """Where each key (or table header) first appears in a TOML text, by key path.

    Not a parser: it follows table headers, ``[[array]]`` occurrences and ``key =`` lines, and
    skips the inside of multi-line strings. Good enough to point a human at the right line.
    """

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        counts: dict[KeyPath, int] = {}
        table: KeyPath = ()
        in_string: str | None = None
        for lineno, raw in enumerate(text.splitlines(), start=1):
            if in_string is not None:
                if in_string in raw:
                    in_string = None
                continue
            line = raw.strip()
            if line.startswith("[["):
                end = line.find("]]")
                parent: KeyPath = tuple(_split_key(line[2:end]))
                index = counts.get(parent, 0)
                counts[parent] = index + 1
                table = (*parent, index)
                self._add(table, lineno)
            elif line.startswith("["):
                end = line.find("]")
                table = tuple(_split_key(line[1:end]))
                self._add(table, lineno)
            else:
                match = _DOTTED_KEY.match(line)
                if match is None or not line[match.end() :].lstrip().startswith("="):
                    continue
                self._add((*table, *_split_key(match.group(0))), lineno)
                rest = line[match.end() :]
                for quote in ('"""', "'''"):
                    if rest.count(quote) == 1:
                        in_string = quote

    def _add(self, path: KeyPath, lineno: int) -> None:
        for i in range(1, len(path) + 1):
            self._lines.setdefault(path[:i], lineno)

    def line(self, path: KeyPath) -> int:
        """The line of ``path``, else of its nearest located parent, else 0."""
        for i in range(len(path), 0, -1):
            if path[:i] in self._lines:
                return self._lines[path[:i]]
        return 0


def format_key(path: KeyPath) -> str:
    """``("policy", 0, "uids")`` -> ``policy[0].uids``; odd names are quoted."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
            out += f".{text}" if out else text
    return out


class _File:
    """One config file being validated: where its problems go and how lines are found."""

    def __init__(self, path: Path, order: int, text: str, sink: list[_Problem]) -> None:
        self.path = path
        self.order = order
        self._locator = _Locator(text)
        self._sink = sink

    def line(self, key: KeyPath) -> int:
        return self._locator.line(key)

    def where(self, key: KeyPath) -> str:
        return f"{self.path}:{self.line(key)}"

    def problem(
        self, key: KeyPath, message: str, *, line: int | None = None, label: str | None = None
    ) -> None:
        line = self.line(key) if line is None else line
        label = label or (format_key(key) if key else "(file)")
        self._sink.append(_Problem(self.order, line, f"{self.path}:{line}: {label}: {message}"))

    def table(self, value: object, key: KeyPath, allowed: tuple[str, ...]) -> dict[str, object]:
        """``value`` as a table whose keys are all in ``allowed`` (unknown ones are reported)."""
        if not isinstance(value, dict):
            self.problem(key, "expected a table")
            return {}
        for name in value:
            if name not in allowed:
                self.problem((*key, name), "unknown key")
        return value

    def get(
        self,
        table: Mapping[str, object],
        key: KeyPath,
        name: str,
        convert: Callable[[object], T],
        default: T,
        *,
        required: bool = False,
    ) -> T:
        """Convert ``table[name]``, or report why it cannot be and return ``default``."""
        if name not in table:
            if required:
                self.problem((*key, name), "required")
            return default
        try:
            return convert(table[name])
        except _Invalid as exc:
            self.problem((*key, name), str(exc))
            return default


class _Invalid(Exception):
    """A value is wrong; the message says what was expected."""


# -- converters: object -> typed value, or _Invalid ---------------------------------------------


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid("expected a string")
    return value


def _nonempty(value: object) -> str:
    text = _string(value)
    if not text:
        raise _Invalid("must not be empty")
    return text


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("expected a boolean (true or false)")
    return value


def _abs_path(value: object) -> Path:
    text = _string(value)
    if not text.startswith("/"):
        raise _Invalid(f"expected an absolute path, not {text!r}")
    return Path(text)


def _integer(minimum: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid("expected an integer")
        if value < minimum:
            raise _Invalid(f"must be at least {minimum}")
        return value

    return convert


def parse_duration(value: object) -> float:
    """``"90s"``, ``"5m"``, ``"1h30m"``, ``"500ms"``, ``"2d"`` -> seconds. Bare numbers are refused.

    Raises:
        ValueError: the value is not a duration string.
    """
    if isinstance(value, str):
        pos, total = 0, 0.0
        for match in _DURATION_PART.finditer(value):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        else:
            if value and pos == len(value):
                return total
        raise ValueError(f'invalid duration {value!r}: expected a duration like "30s"')
    raise ValueError('expected a duration like "30s"')


def _duration(minimum: float = 0.0, *, strict: bool = False) -> Callable[[object], float]:
    def convert(value: object) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        if seconds < minimum or (strict and seconds <= minimum):
            bound = "greater than" if strict else "at least"
            raise _Invalid(f"must be {bound} {_show_seconds(minimum)}")
        return seconds

    return convert


def _show_seconds(seconds: float) -> str:
    return f"{seconds:g}s"


def _mode(value: object) -> int:
    if not isinstance(value, str):
        raise _Invalid('expected a mode like "0640"')
    if not _MODE.fullmatch(value):
        raise _Invalid(f'invalid mode {value!r}: expected a mode like "0640"')
    return int(value, 8)


def _size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise _Invalid('expected a size in bytes, or a string like "100MiB"')
    if size < 1:
        raise _Invalid("must be at least 1 byte")
    return size


def _string_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid("expected a list of strings")
    if not value:
        raise _Invalid("must not be empty")
    return tuple(value)


def _id_list(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise _Invalid("expected a list of non-negative integers")
    if not value:
        raise _Invalid("must not be empty")
    return tuple(value)


def _account_id(value: object, lookup: Callable[[str], int], kind: str, number: str) -> int:
    """A user or group name (resolved with ``lookup``) or a number, as chown(1) takes them."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value:
        try:
            return lookup(value)
        except KeyError:
            if value.isdigit():             # "1000": a number written as a string
                return int(value)
            raise _Invalid(f"no such {kind} {value!r}") from None
    raise _Invalid(f"expected a {kind} name or a {number}")


def _uid(value: object) -> int:
    return _account_id(value, lambda name: pwd.getpwnam(name).pw_uid, "user", "uid")


def _gid(value: object) -> int:
    return _account_id(value, lambda name: grp.getgrnam(name).gr_gid, "group", "gid")


def _user_name(value: object) -> str:
    name = _nonempty(value)
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise _Invalid(f"no such user {name!r}") from None
    return name


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        text = _string(value)
        if text not in options:
            listed = ", ".join(repr(o) for o in options)
            raise _Invalid(f"unknown value {text!r}: expected one of {listed}")
        return text

    return convert


def _url_list(value: object) -> tuple[str, ...]:
    urls = _string_list(value)
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise _Invalid(f"{url!r} is not an http:// or https:// URL")
    return urls


def _argv(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        raise _Invalid("expected an argv list, not a shell string")
    argv = _string_list(value)
    if not argv[0]:
        raise _Invalid("the program (first element) must not be empty")
    return argv


def _secret_path(value: object) -> str:
    text = _nonempty(value)
    if text.startswith("/"):
        raise _Invalid(f"{text!r} must not start with '/' (leave out /v1/ too)")
    if ".." in text.split("/"):
        raise _Invalid(f"{text!r} must not contain '..'")
    return text


def _listen(value: object) -> tuple[str, int]:
    text = _string(value)
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _Invalid('expected "HOST:PORT", e.g. "127.0.0.1:9464"')
    return host, int(port)


def _credential_name(value: object) -> str:
    text = _nonempty(value)
    if "/" in text:
        raise _Invalid(f"{text!r} must be a plain credential name (no '/')")
    return text


def _audit_path(value: object) -> str | None:
    if value is False or value == "off":
        return None
    if value == "journal":
        return "journal"
    if isinstance(value, str) and value.startswith("/"):
        return value
    raise _Invalid('expected an absolute path, "journal", or "off"')


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid("expected a number between 0 and 1, like 0.66")
    if not 0.0 < float(value) < 1.0:
        raise _Invalid("must be greater than 0 and less than 1")
    return float(value)


def _params(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _Invalid('expected a table like { common_name = "web.internal", ttl = "24h" }')
    return dict(value)


# -- the builder ---------------------------------------------------------------------------------


@dataclass
class _FileCheck:
    """A file the config names, looked at in phase two when permissions are checked."""

    where: _File
    key: KeyPath
    path: Path
    credential: bool = False                 # also refuse "readable by others"
    template: bool = False                   # read it for secret('...') references


class _Builder:
    """Phase one turns raw tables into dataclasses; phase two checks cross-references."""

    def __init__(self, problems: list[_Problem], check_permissions: bool) -> None:
        self.problems = problems
        self.check_permissions = check_permissions
        self.secrets: dict[str, SecretConfig] = {}
        self.secret_where: dict[str, str] = {}
        self.policies: list[PolicyConfig] = []
        self.allows: list[tuple[_File, KeyPath, tuple[str, ...]]] = []
        self.refs: list[tuple[_File, KeyPath, str, list[str]]] = []
        self.file_checks: list[_FileCheck] = []
        self.templates: list[TemplateConfig] = []
        self.bundles: list[BundleConfig] = []

    def build(self, parsed: list[tuple[_File, dict[str, object]]]) -> Config:
        main, data = parsed[0]
        main.table(data, (), _MAIN_ONLY + _ANYWHERE)
        agent = self.agent(main, data.get("agent", {}))
        upstream = self.upstream(main, data.get("upstream", {}))
        cache = self.cache(main, data.get("cache", {}))
        audit = self.audit(main, data.get("audit", {}))
        metrics = self.metrics(main, data.get("metrics", {}))
        for file, extra in parsed[1:]:
            for name in extra:
                if name in _MAIN_ONLY:
                    file.problem((name,), "only allowed in the main file, not in conf.d")
                elif name not in _ANYWHERE:
                    file.problem((name,), "unknown key")
        for file, content in parsed:
            self.catalog(file, content)
        self.cross_check(agent, [file for file, _ in parsed])
        return Config(
            agent=agent,
            upstream=upstream,
            cache=cache,
            audit=audit,
            secrets=MappingProxyType(self.secrets),
            policies=tuple(self.policies),
            templates=tuple(self.templates),
            bundles=tuple(self.bundles),
            files=tuple(file.path for file, _ in parsed),
            metrics=metrics,
        )

    # -- main-file sections

    def agent(self, f: _File, raw: object) -> AgentConfig:
        key: KeyPath = ("agent",)
        d = AgentConfig()
        t = f.table(raw, key, tuple(AgentConfig.__dataclass_fields__))
        positive = _duration(0.0, strict=True)
        return AgentConfig(
            socket=f.get(t, key, "socket", _abs_path, d.socket),
            socket_mode=f.get(t, key, "socket_mode", _mode, d.socket_mode),
            socket_group=f.get(t, key, "socket_group", _gid, d.socket_group),
            state_dir=f.get(t, key, "state_dir", _abs_path, d.state_dir),
            log_level=f.get(t, key, "log_level", _choice(LOG_LEVELS), d.log_level),
            ready_timeout=f.get(t, key, "ready_timeout", positive, d.ready_timeout),
            credentials_socket=f.get(t, key, "credentials_socket", _abs_path, None),
            user=f.get(t, key, "user", _user_name, d.user),
            max_connections=f.get(t, key, "max_connections", _integer(1), d.max_connections),
            max_connections_per_uid=f.get(
                t, key, "max_connections_per_uid", _integer(1), d.max_connections_per_uid
            ),
            requests_per_second_per_uid=f.get(
                t, key, "requests_per_second_per_uid", _integer(1),
                d.requests_per_second_per_uid,
            ),
            request_burst_per_uid=f.get(
                t, key, "request_burst_per_uid", _integer(1), d.request_burst_per_uid
            ),
            max_watchers_per_uid=f.get(
                t, key, "max_watchers_per_uid", _integer(0), d.max_watchers_per_uid
            ),
            max_request_bytes=f.get(
                t, key, "max_request_bytes", _integer(64), d.max_request_bytes
            ),
            idle_timeout=f.get(t, key, "idle_timeout", positive, d.idle_timeout),
            frame_timeout=f.get(t, key, "frame_timeout", positive, d.frame_timeout),
        )

    def upstream(self, f: _File, raw: object) -> UpstreamConfig:
        key: KeyPath = ("upstream",)
        d = UpstreamConfig()
        t = f.table(raw, key, tuple(UpstreamConfig.__dataclass_fields__))
        positive = _duration(0.0, strict=True)
        ca_file = f.get(t, key, "ca_file", _abs_path, None)
        if ca_file is not None:
            self.file_checks.append(_FileCheck(f, (*key, "ca_file"), ca_file))
        config = UpstreamConfig(
            addresses=f.get(t, key, "addresses", _url_list, d.addresses, required=True),
            ca_file=ca_file,
            tls_server_name=f.get(t, key, "tls_server_name", _nonempty, None),
            namespace=f.get(t, key, "namespace", _nonempty, None),
            timeout=f.get(t, key, "timeout", positive, d.timeout),
            max_concurrency=f.get(t, key, "max_concurrency", _integer(1), d.max_concurrency),
            backoff_min=f.get(t, key, "backoff_min", positive, d.backoff_min),
            backoff_max=f.get(t, key, "backoff_max", positive, d.backoff_max),
            login_backoff_max=f.get(t, key, "login_backoff_max", positive, d.login_backoff_max),
            auth=self.auth(f, t.get("auth", {})),
        )
        for name in ("backoff_max", "login_backoff_max"):
            if getattr(config, name) < config.backoff_min:
                f.problem((*key, name), "must be at least backoff_min")
        return config

    def auth(self, f: _File, raw: object) -> AuthConfig:
        key: KeyPath = ("upstream", "auth")
        t = f.table(raw, key, tuple(AuthConfig.__dataclass_fields__))
        method = f.get(t, key, "method", _choice(AUTH_METHODS), "", required=True)
        wanted = {
            "approle": ("role_id_file", "secret_id_file"), "token_file": ("token_file",),
            "cert": ("cert_file", "key_file"), "jwt": ("jwt_file",),
        }
        files: dict[str, Path | None] = {}
        for name in ("role_id_file", "secret_id_file", "token_file", "cert_file", "key_file",
                     "jwt_file"):
            needed = name in wanted.get(method, ())
            if method and not needed and name in t:
                f.problem((*key, name), f"not used by method {method!r}")
                continue
            files[name] = f.get(t, key, name, _abs_path, None, required=needed)
            path = files[name]
            if path is not None:
                credential = name not in ("role_id_file", "cert_file")
                self.file_checks.append(_FileCheck(f, (*key, name), path, credential=credential))
        return AuthConfig(
            method=method or "approle",
            mount=f.get(t, key, "mount", _nonempty, None),
            role_id_file=files.get("role_id_file"),
            secret_id_file=files.get("secret_id_file"),
            token_file=files.get("token_file"),
            cert_file=files.get("cert_file"),
            key_file=files.get("key_file"),
            jwt_file=files.get("jwt_file"),
            role=self._auth_role(f, t, key, method),
        )

    @staticmethod
    def _auth_role(f: _File, t: Mapping[str, object], key: KeyPath, method: str) -> str | None:
        if method and method not in ("cert", "jwt") and "role" in t:
            f.problem((*key, "role"), f"not used by method {method!r}")
            return None
        return f.get(t, key, "role", _nonempty, None, required=method == "jwt")

    def cache(self, f: _File, raw: object) -> CacheConfig:
        key: KeyPath = ("cache",)
        t = f.table(raw, key, tuple(CacheConfig.__dataclass_fields__))
        config = CacheConfig(
            max_stale=f.get(t, key, "max_stale", _duration(), CacheConfig.max_stale),
            key_file=f.get(t, key, "key_file", _abs_path, None),
            key_credential=f.get(t, key, "key_credential", _credential_name, None),
        )
        if "key_file" in t and "key_credential" in t:
            f.problem((*key, "key_credential"), "set key_file or key_credential, not both")
        return config

    def audit(self, f: _File, raw: object) -> AuditConfig:
        key: KeyPath = ("audit",)
        d = AuditConfig()
        t = f.table(raw, key, tuple(AuditConfig.__dataclass_fields__))
        return AuditConfig(
            path=f.get(t, key, "path", _audit_path, d.path),
            max_bytes=f.get(t, key, "max_bytes", _size, d.max_bytes),
            backups=f.get(t, key, "backups", _integer(0), d.backups),
            flush_interval=f.get(
                t, key, "flush_interval", _duration(0.0, strict=True), d.flush_interval
            ),
        )

    def metrics(self, f: _File, raw: object) -> MetricsConfig:
        key: KeyPath = ("metrics",)
        d = MetricsConfig()
        t = f.table(raw, key, tuple(MetricsConfig.__dataclass_fields__))
        return MetricsConfig(
            listen=f.get(t, key, "listen", _listen, d.listen),
            textfile=f.get(t, key, "textfile", _abs_path, d.textfile),
            textfile_interval=f.get(
                t, key, "textfile_interval", _duration(1.0), d.textfile_interval
            ),
        )

    # -- sections allowed in every file

    def catalog(self, f: _File, data: dict[str, object]) -> None:
        secrets = data.get("secrets", {})
        if not isinstance(secrets, dict):
            f.problem(("secrets",), "expected a table of secrets ([secrets.NAME])")
            secrets = {}
        for name, raw in secrets.items():
            self.secret(f, name, raw)
        for section, handler in (
            ("policy", self.policy),
            ("template", self.template),
            ("bundle", self.bundle),
        ):
            items = data.get(section, [])
            if not isinstance(items, list):
                f.problem((section,), f"expected an array of tables ([[{section}]])")
                continue
            for index, raw in enumerate(items):
                handler(f, (section, index), raw)

    def secret(self, f: _File, name: str, raw: object) -> None:
        key: KeyPath = ("secrets", name)
        if not re.fullmatch(SECRET_NAME_PATTERN, name):
            f.problem(key, f"invalid secret name {name!r}: must match {SECRET_NAME_PATTERN}")
        if name in self.secret_where:
            f.problem(key, f"secret {name!r} is already declared at {self.secret_where[name]}")
        t = f.table(raw, key, _SECRET_KEYS)
        kind = f.get(t, key, "kind", _choice(SECRET_KINDS), "", required=True)
        for option, kinds in _KIND_ONLY.items():
            if kind and option in t and kind not in kinds:
                f.problem((*key, option), f"not used by kind {kind!r}")
        no_params: dict[str, object] = {}
        params = f.get(t, key, "params", _params, no_params)
        config = SecretConfig(
            name=name,
            kind=kind,
            path=f.get(t, key, "path", _secret_path, "", required=True),
            refresh=f.get(t, key, "refresh", _duration(1.0), SecretConfig.refresh),
            max_stale=f.get(t, key, "max_stale", _duration(), None),
            params=MappingProxyType(params),
            renew_at=f.get(t, key, "renew_at", _fraction, SecretConfig.renew_at),
            revoke_previous=f.get(t, key, "revoke_previous", _bool, False),
            grace=f.get(t, key, "grace", _duration(), SecretConfig.grace),
            revoke_on_shutdown=f.get(t, key, "revoke_on_shutdown", _bool, False),
            version=f.get(t, key, "version", _integer(1), None),
            check=f.get(t, key, "check", _argv, _NO_STRS),
            expect_rotation_every=f.get(
                t, key, "expect_rotation_every", _duration(0.0, strict=True), None
            ),
        )
        if name not in self.secret_where:
            self.secret_where[name] = f.where(key)
            self.secrets[name] = config

    def policy(self, f: _File, key: KeyPath, raw: object) -> None:
        fields = ("name", "allow", "admin", *_SELECTORS)
        t = f.table(raw, key, fields)
        if isinstance(raw, dict) and not any(s in t for s in _SELECTORS):
            f.problem(key, f"a policy needs at least one of {', '.join(_SELECTORS)}")
        uids = list(f.get(t, key, "uids", _id_list, _NO_INTS))
        gids = list(f.get(t, key, "gids", _id_list, _NO_INTS))
        users = f.get(t, key, "users", _string_list, _NO_STRS)
        groups = f.get(t, key, "groups", _string_list, _NO_STRS)
        for user in users:
            try:
                uids.append(pwd.getpwnam(user).pw_uid)
            except KeyError:
                f.problem((*key, "users"), f"no such user {user!r}")
        for group in groups:
            try:
                gids.append(grp.getgrnam(group).gr_gid)
            except KeyError:
                f.problem((*key, "groups"), f"no such group {group!r}")
        exe = f.get(t, key, "exe", _string_list, _NO_STRS)
        for path in exe:
            if not path.startswith("/"):
                f.problem((*key, "exe"), f"{path!r} is not an absolute path")
        exe_sha256 = f.get(t, key, "exe_sha256", _string_list, _NO_STRS)
        for digest in exe_sha256:
            if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                f.problem((*key, "exe_sha256"), f"{digest[:80]!r} is not a sha256 "
                          "(64 hexadecimal digits)")
        units = f.get(t, key, "units", _string_list, _NO_STRS)
        for unit in units:
            if "/" in unit or not unit.endswith(UNIT_SUFFIXES) or unit in UNIT_SUFFIXES:
                f.problem(
                    (*key, "units"),
                    f"{unit!r} is not a systemd unit name (expected a suffix like .service)",
                )
        allow = f.get(t, key, "allow", _string_list, _NO_STRS, required=True)
        self.allows.append((f, (*key, "allow"), allow))
        self.policies.append(
            PolicyConfig(
                name=f.get(t, key, "name", _nonempty, f"policy[{len(self.policies)}]"),
                allow=allow,
                uids=tuple(dict.fromkeys(uids)),
                gids=tuple(dict.fromkeys(gids)),
                users=users,
                groups=groups,
                exe=exe,
                units=units,
                admin=f.get(t, key, "admin", _bool, False),
                exe_sha256=tuple(d.lower() for d in exe_sha256),
            )
        )

    def _wait(self, f: _File, t: Mapping[str, object], key: KeyPath) -> WaitConfig:
        if "wait" not in t:
            return WaitConfig()
        key = (*key, "wait")
        raw = t["wait"]
        if not isinstance(raw, dict):
            f.problem(key, 'expected a table like { min = "2s", max = "10s" }')
            return WaitConfig()
        w = f.table(raw, key, ("min", "max"))
        low = f.get(w, key, "min", _duration(), 0.0)
        high = f.get(w, key, "max", _duration(), low)
        if low > high:
            f.problem(
                key, f"min ({_show_seconds(low)}) is greater than max ({_show_seconds(high)})"
            )
        return WaitConfig(min=low, max=high)

    def _action(
        self, f: _File, t: Mapping[str, object], key: KeyPath
    ) -> tuple[int, int | None, int | None, tuple[str, ...], float, WaitConfig]:
        return (
            f.get(t, key, "mode", _mode, 0o600),
            f.get(t, key, "owner", _uid, None),
            f.get(t, key, "group", _gid, None),
            f.get(t, key, "command", _argv, _NO_STRS),
            f.get(t, key, "command_timeout", _duration(0.0, strict=True), 30.0),
            self._wait(f, t, key),
        )

    def template(self, f: _File, key: KeyPath, raw: object) -> None:
        t = f.table(raw, key, tuple(TemplateConfig.__dataclass_fields__))
        destination = f.get(t, key, "destination", _abs_path, Path("/"), required=True)
        source = f.get(t, key, "source", _abs_path, None)
        contents = f.get(t, key, "contents", _string, None)
        if isinstance(raw, dict) and ("source" in t) == ("contents" in t):
            f.problem(key, "set exactly one of source or contents")
        if contents is not None:
            self.refs.append((f, (*key, "contents"), "template", secret_refs(contents)))
        if source is not None:
            self.file_checks.append(_FileCheck(f, (*key, "source"), source, template=True))
        mode, owner, group, command, timeout, wait = self._action(f, t, key)
        self.templates.append(
            TemplateConfig(
                destination=destination,
                source=source,
                contents=contents,
                mode=mode,
                owner=owner,
                group=group,
                command=command,
                command_timeout=timeout,
                wait=wait,
                backup=f.get(t, key, "backup", _bool, False),
                on_revoke=f.get(t, key, "on_revoke", _choice(ON_REVOKE), "keep"),
            )
        )

    def bundle(self, f: _File, key: KeyPath, raw: object) -> None:
        t = f.table(raw, key, tuple(BundleConfig.__dataclass_fields__))
        directory = f.get(t, key, "directory", _abs_path, Path("/"), required=True)
        files: dict[str, str] = {}
        if "files" not in t:
            f.problem((*key, "files"), "required")
        elif not isinstance(t["files"], dict) or not t["files"]:
            f.problem((*key, "files"), "expected a non-empty table of file name = template")
        else:
            for name, text in t["files"].items():
                fkey = (*key, "files", name)
                if not name or "/" in name or name.startswith("..") or name == ".":
                    f.problem(fkey, f"{name!r} must be a plain file name (no '/', not '..')")
                if not isinstance(text, str):
                    f.problem(fkey, "expected a string (the file's template)")
                    continue
                files[name] = text
                self.refs.append((f, fkey, "template", secret_refs(text)))
        modes: dict[str, int] = {}
        if "modes" in t:
            if not isinstance(t["modes"], dict):
                f.problem((*key, "modes"), 'expected a table of file name = mode like "0640"')
            else:
                for name, value in t["modes"].items():
                    mkey = (*key, "modes", name)
                    if name not in files:
                        f.problem(mkey, f"{name!r} is not one of this bundle's files")
                        continue
                    try:
                        modes[name] = _mode(value)
                    except _Invalid as exc:
                        f.problem(mkey, str(exc))
        mode, owner, group, command, timeout, wait = self._action(f, t, key)
        self.bundles.append(
            BundleConfig(
                directory=directory,
                files=MappingProxyType(files),
                mode=mode,
                owner=owner,
                group=group,
                command=command,
                command_timeout=timeout,
                wait=wait,
                grace=f.get(t, key, "grace", _duration(), BundleConfig.grace),
                modes=MappingProxyType(modes),
                on_revoke=f.get(t, key, "on_revoke", _choice(ON_REVOKE), "keep"),
            )
        )

    # -- phase two

    def cross_check(self, agent: AgentConfig, files: list[_File]) -> None:
        names = list(self.secrets)
        for f, key, patterns in self.allows:
            for pattern in patterns:
                if pattern in self.secrets:
                    continue                    # a literal name (the common case: no scan)
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    f.problem(key, f"{pattern!r} matches no declared secret")
        for f, key, what, refs in self.refs:
            self._check_refs(f, key, what, refs)
        if not self.check_permissions:
            return
        owners = {0}
        if agent.user is not None:
            owners.add(pwd.getpwnam(agent.user).pw_uid)
        directories: set[Path] = set()
        for f in files:
            self._check_safe(f, (), f.path, owners)
            if f.path.parent not in directories:
                directories.add(f.path.parent)
                self._check_safe(f, (), f.path.parent, owners, label="(directory)")
        for check in self.file_checks:
            if self._check_safe(
                check.where, check.key, check.path, owners, credential=check.credential
            ) and check.template:
                try:
                    text = check.path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    check.where.problem(check.key, f"cannot read {check.path}: {exc}")
                    continue
                self._check_refs(check.where, check.key, str(check.path), secret_refs(text))

    def _check_refs(self, f: _File, key: KeyPath, what: str, refs: list[str]) -> None:
        for name in dict.fromkeys(refs):
            if name not in self.secrets:
                f.problem(key, f"{what} refers to undeclared secret {name!r}")

    def _check_safe(
        self,
        f: _File,
        key: KeyPath,
        path: Path,
        owners: set[int],
        *,
        credential: bool = False,
        label: str | None = None,
    ) -> bool:
        """Report ``path`` if missing or changeable by others; True if it exists."""
        line = 0 if not key else None
        try:
            st = path.stat()
        except FileNotFoundError:
            f.problem(key, f"{path}: no such file", line=line, label=label)
            return False
        except OSError as exc:
            f.problem(key, f"{path}: cannot stat: {exc.strerror}", line=line, label=label)
            return False
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid not in owners:
            f.problem(
                key,
                f"{path} is owned by uid {st.st_uid}: must be owned by root or the agent's user",
                line=line,
                label=label,
            )
        if mode & 0o022:
            f.problem(
                key,
                f"{path} is writable by group or others (mode {mode:04o}): chmod go-w",
                line=line,
                label=label,
            )
        if credential and mode & 0o004:
            f.problem(
                key,
                f"{path} is readable by others (mode {mode:04o}): chmod o-r",
                line=line,
                label=label,
            )
        return True
