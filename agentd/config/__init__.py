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

The package, in the order the data flows:

- ``schema``: the frozen dataclasses (the contract the rest of agentd codes against), defaults
  and allowed values; ``kindkeys``: which ``[secrets.X]`` keys each secret kind accepts.
- ``source``: reading and parsing one file, and reporting a problem at a key of it;
  ``locate``: which line a key stands on, and how a key path is written in a message.
- ``convert``: raw value -> typed value, or ``Invalid`` with the message.
- ``build``: the two phases, from parsed tables to ``Config``.

Everything other modules use is importable from ``agentd.config`` itself.
"""

from __future__ import annotations

from pathlib import Path

from agentd.config.build import Builder
from agentd.config.convert import parse_duration
from agentd.config.kindkeys import SECRET_KINDS
from agentd.config.locate import KeyPath, format_key
from agentd.config.schema import (
    AUTH_METHODS,
    CONNECT_GUARD_MODES,
    DEFAULT_CONFIG_PATH,
    DEFAULT_SOCKET,
    LOG_LEVELS,
    ON_REVOKE,
    PROGRAM_ONLY_MESSAGE,
    SECRET_NAME_PATTERN,
    UNIT_SUFFIXES,
    AgentConfig,
    AuditConfig,
    AuthConfig,
    BundleConfig,
    CacheConfig,
    Config,
    MetricsConfig,
    PolicyConfig,
    PolicyProblem,
    SecretConfig,
    TemplateConfig,
    UpstreamConfig,
    WaitConfig,
    policy_problems,
)
from agentd.config.source import Problem, SourceFile, parse, sorted_texts
from agentd.errors import ConfigError

__all__ = [
    "AUTH_METHODS",
    "CONNECT_GUARD_MODES",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_SOCKET",
    "LOG_LEVELS",
    "ON_REVOKE",
    "PROGRAM_ONLY_MESSAGE",
    "SECRET_KINDS",
    "SECRET_NAME_PATTERN",
    "UNIT_SUFFIXES",
    "AgentConfig",
    "AuditConfig",
    "AuthConfig",
    "BundleConfig",
    "CacheConfig",
    "Config",
    "KeyPath",
    "MetricsConfig",
    "PolicyConfig",
    "PolicyProblem",
    "SecretConfig",
    "TemplateConfig",
    "UpstreamConfig",
    "WaitConfig",
    "format_key",
    "load",
    "parse_duration",
    "policy_problems",
]


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
    problems: list[Problem] = []
    files = [path]
    confd = path.parent / "conf.d"
    if confd.is_dir():
        files.extend(sorted(confd.glob("*.toml"), key=lambda p: p.name))
    parsed: list[tuple[SourceFile, dict[str, object]]] = []
    for order, file in enumerate(files):
        result = parse(file, order, problems)
        if result is not None:
            parsed.append(result)
    if problems:
        # A file we could not parse makes cross-checks meaningless: report what we have.
        raise ConfigError(sorted_texts(problems))
    config = Builder(check_permissions).build(parsed)
    if problems:
        raise ConfigError(sorted_texts(problems))
    return config
