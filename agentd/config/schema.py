"""The configuration's shape: frozen dataclasses, their defaults, and the allowed values.

This is the contract the rest of agentd codes against (DESIGN.md, "Configuration shape"): keys may
be added, none renamed. All classes are frozen; mappings are read-only. The builder
(``agentd.config.build``) fills them from TOML; nothing here reads a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from agentd.refs import Engine

DEFAULT_CONFIG_PATH = Path("/etc/agentd/agentd.toml")
DEFAULT_SOCKET = Path("/run/agentd/agentd.sock")
ON_REVOKE = ("keep", "remove")      # what a template does with its file when an input is revoked
SECRET_NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"  # noqa: S105 (a name, not a password)
AUTH_METHODS: tuple[str, ...] = ("approle", "token_file", "cert", "jwt")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
CONNECT_GUARD_MODES: tuple[str, ...] = ("auto", "on", "off")
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
    host_id: str | None = None               # None: $AGENTD_HOST_ID, else /etc/machine-id
    credentials_socket: Path | None = None
    user: str | None = None                  # the agent's own user, if not root (file checks)
    max_connections: int = 1024              # open connections on the socket, all peers
    max_connections_per_uid: int = 64
    requests_per_second_per_uid: int = 5000      # token bucket refill rate, per uid
    request_burst_per_uid: int = 10000           # token bucket size, per uid
    connects_per_second_per_uid: int = 500       # new connections: refill rate, per uid
    connect_burst_per_uid: int = 1000            # new connections: bucket size, per uid
    listen_backlog: int = 1024                   # connections the kernel queues (decision 13)
    private_sockets: bool = True                 # a socket per uid/group named (decision 13)
    connect_guard: str = "auto"                  # auto | on | off: storming uids shut out
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
    textfile_mode: int = 0o640               # not world-readable: see ``detailed``
    textfile_group: int | None = None        # gid (e.g. node_exporter's); default the agent's
    # Per-secret and per-policy series (secret names, versions, ages, policy names). Off by
    # default: the endpoint answers anyone who can reach it, while `list` answers each peer only
    # with what it may read (issue 13 item 14).
    detailed: bool = False


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

    @property
    def names_only_a_program(self) -> bool:
        """True when ``exe``/``exe_sha256`` are the rule's only selectors: any user who can run
        that program would match it (``LD_PRELOAD`` into it, exec it after connecting,
        bind-mount another program over its path in a user namespace), so such a rule is a
        config error (``policy_problems``) and matches no process (``access.rule_matches``)."""
        names_program = bool(self.exe or self.exe_sha256)
        names_who = bool(self.uids or self.gids or self.users or self.groups or self.units)
        return names_program and not names_who


PROGRAM_ONLY_MESSAGE = "name a uid, user, gid or group too: exe alone can be run by any user"


class PolicyProblem(NamedTuple):
    """One problem of a policy rule: where (a key path relative to the rule) and what."""

    key: tuple[str, ...]
    message: str


def policy_problems(rule: PolicyConfig) -> list[PolicyProblem]:
    """What is wrong with ``rule`` (no file:line prefix): a rule must name who, not only
    which program (``PolicyConfig.names_only_a_program``)."""
    if not rule.names_only_a_program:
        return []
    return [PolicyProblem(("exe",) if rule.exe else ("exe_sha256",), PROGRAM_ONLY_MESSAGE)]


@dataclass(frozen=True)
class WaitConfig:
    min: float = 0.0
    max: float = 0.0


@dataclass(frozen=True, kw_only=True)
class TemplateText:
    """What templates and bundles share about their text: which secrets it may read and the
    language it is written in (keyword-only, so the outputs' own fields come first)."""

    allow: tuple[str, ...] | None = None     # secret name globs it may name (None: see docs)
    engine: str = "jinja"                    # jinja | go (consul-template's Go templates)
    left_delimiter: str = "{{"               # Go only
    right_delimiter: str = "}}"              # Go only
    error_on_missing_key: bool = True        # Go only: False prints <no value> as Go does
    env: tuple[str, ...] = ()                # Go only: variables its `env` may read

    @property
    def reader(self) -> Engine:
        """How its text is read (``agentd.refs``): the engine and Go's options."""
        return Engine(self.engine, self.left_delimiter, self.right_delimiter,
                      self.error_on_missing_key, self.env)


@dataclass(frozen=True)
class TemplateConfig(TemplateText):
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
class BundleConfig(TemplateText):
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

