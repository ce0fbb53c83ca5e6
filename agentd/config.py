"""TOML configuration -> frozen, validated dataclasses.

Theory of operation: ``load(path)`` reads the main file and then ``conf.d/*.toml`` beside it (sorted),
parses each with tomllib, and validates in two phases (as OpenBao's agent config does): phase one
turns raw tables into typed values key by key, collecting *every* problem instead of stopping at the
first; phase two checks cross-references (a policy granting a pattern, a template naming a secret,
file permissions). If anything is wrong, one ``ConfigError`` carries all problems, each formatted as
``file:line: key.path: message`` (line is where the key can be located in that file, 0 if nowhere).

The dataclasses below are the contract the rest of agentd codes against. All are frozen; mappings
are read-only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONFIG_PATH = Path("/etc/agentd/agentd.toml")
DEFAULT_SOCKET = Path("/run/agentd/agentd.sock")
SECRET_NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"


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
    max_request_bytes: int = 65536
    idle_timeout: float = 300.0              # close a connection idle this long
    frame_timeout: float = 5.0               # close a connection whose frame is not complete


@dataclass(frozen=True)
class AuthConfig:
    method: str = "approle"                  # approle | token_file (cert, jwt later)
    mount: str | None = None                 # auth mount path; default: the method's name
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    token_file: Path | None = None


@dataclass(frozen=True)
class UpstreamConfig:
    addresses: tuple[str, ...] = ()
    ca_file: Path | None = None
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
class SecretConfig:
    name: str
    kind: str                                # kv2 | kv1 (leased, pki later)
    path: str                                # upstream API path without /v1/, e.g. secret/data/app/db
    refresh: float = 300.0
    max_stale: float | None = None           # None: [cache] max_stale


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

    def max_stale_for(self, name: str) -> float:
        secret = self.secrets[name]
        return self.cache.max_stale if secret.max_stale is None else secret.max_stale

    @property
    def key_file(self) -> Path:
        return self.cache.key_file or self.agent.state_dir / "cache.key"
