"""config.load: each bad fixture's exact problems, shipped configs, types, conf.d, permissions."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from agentd import config
from agentd.config import (
    AgentConfig,
    AuditConfig,
    CacheConfig,
    Config,
    SecretConfig,
    WaitConfig,
    format_key,
    load,
    parse_duration,
)
from agentd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "config"
NOBODY = 65534

# fixture -> every problem it must produce, in order, as (file relative to the fixture, line, text).
# A directory fixture is read through its agentd.toml (and conf.d/).
BAD: dict[str, list[tuple[str, int, str]]] = {
    "bad-unknown-key.toml": [("", 3, "agent.socket_path: unknown key")],
    "bad-duration.toml": [("", 13, 'secrets.db.refresh: expected a duration like "30s"')],
    "bad-mode.toml": [
        ("", 3, "agent.socket_mode: invalid mode '0668': expected a mode like \"0640\""),
    ],
    "bad-connect-guard.toml": [
        ("", 3, "agent.connect_guard: unknown value 'sometimes': expected one of 'auto', 'on', "
                "'off'"),
    ],
    "bad-host-id.toml": [
        ("", 3, "agent.host_id: must be 1 to 128 printable ASCII characters without spaces"),
    ],
    "bad-secret-name.toml": [
        ("", 10, "secrets.DB: invalid secret name 'DB': must match [a-z0-9][a-z0-9_-]{0,62}"),
    ],
    "bad-unknown-kind.toml": [
        (
            "", 11,
            "secrets.db.kind: unknown value 'ssh': expected one of 'kv2', 'kv1', 'leased', 'pki'",
        ),
    ],
    "bad-secret-option-for-kind.toml": [
        ("", 12, "secrets.web.version: not used by kind 'pki'"),
        ("", 13, "secrets.web.renew_at: must be greater than 0 and less than 1"),
    ],
    "bad-missing-addresses.toml": [("", 2, "upstream.addresses: required")],
    "bad-approle-missing-secret-id-file.toml": [
        ("", 5, "upstream.auth.secret_id_file: required"),
    ],
    "bad-unknown-user.toml": [
        ("", 16, "policy[0].users: no such user 'no-such-user-for-agentd'"),
    ],
    "bad-policy-no-selector.toml": [
        (
            "",
            14,
            "policy[0]: a policy needs at least one of uids, users, gids, groups, exe, "
            "exe_sha256, units",
        ),
    ],
    "bad-allow-matches-nothing.toml": [
        ("", 20, "policy[1].allow: 'web-*' matches no declared secret"),
    ],
    "bad-template-shell-command.toml": [
        ("", 21, "template[0].command: expected an argv list, not a shell string"),
    ],
    "bad-template-both-source-and-contents.toml": [
        ("", 18, "template[0]: set exactly one of source or contents"),
    ],
    "bad-template-unknown-secret.toml": [
        ("", 19, "template[0].contents: template refers to undeclared secret 'api-token'"),
    ],
    "bad-wait-min-over-max.toml": [
        ("", 21, "template[0].wait: min (10s) is greater than max (2s)"),
    ],
    "bad-toml-syntax.toml": [
        ("", 11, "TOML syntax error: Invalid value (at line 11, column 8)"),
    ],
    "bad-duplicate-secret": [
        (
            "conf.d/x.toml",
            2,
            "secrets.db: secret 'db' is already declared at {dir}/agentd.toml:10",
        ),
    ],
    "bad-main-only-in-confd": [
        ("conf.d/10-agent.toml", 1, "agent: only allowed in the main file, not in conf.d"),
    ],
    "bad-secret-path.toml": [
        (
            "",
            12,
            "secrets.db.path: '/v1/secret/data/app/db' must not start with '/' "
            "(leave out /v1/ too)",
        ),
    ],
    "bad-address-scheme.toml": [
        ("", 3, "upstream.addresses: 'bao-2:8200' is not an http:// or https:// URL"),
    ],
    "bad-auth-key-for-other-method.toml": [
        ("", 9, "upstream.auth.token_file: not used by method 'approle'"),
    ],
    "bad-policy-exe-and-units.toml": [
        ("", 15, "policy[0].exe: 'usr/bin/app' is not an absolute path"),
        (
            "",
            16,
            "policy[0].units: 'app' is not a systemd unit name (expected a suffix like .service)",
        ),
    ],
    "bad-policy-exe-sha256.toml": [
        ("", 15, "policy[0].exe_sha256: 'abc123' is not a sha256 (64 hexadecimal digits)"),
    ],
    "bad-bundle-file-name.toml": [
        (
            "",
            20,
            "bundle[0].files.\"../key.pem\": '../key.pem' must be a plain file name "
            "(no '/', not '..')",
        ),
    ],
    "bad-cache-key-both.toml": [
        ("", 12, "cache.key_credential: set key_file or key_credential, not both"),
    ],
    "bad-policy-not-array.toml": [
        ("", 14, "policy: expected an array of tables ([[policy]])"),
    ],
    "bad-refresh-too-short.toml": [("", 13, "secrets.db.refresh: must be at least 1s")],
    "bad-audit.toml": [
        ("", 11, 'audit.path: expected an absolute path, "journal", or "off"'),
        ("", 12, 'audit.max_bytes: expected a size in bytes, or a string like "100MiB"'),
    ],
    # Several defects in one file: every one is reported, in line order.
    "bad-many.toml": [
        ("", 3, "agent.socket: expected an absolute path, not 'run/agentd.sock'"),
        (
            "",
            4,
            "agent.log_level: unknown value 'verbose': "
            "expected one of 'debug', 'info', 'warning', 'error'",
        ),
        ("", 5, 'agent.ready_timeout: expected a duration like "30s"'),
        ("", 8, "upstream.addresses: must not be empty"),
        (
            "",
            11,
            "upstream.auth.method: unknown value 'kerberos': "
            "expected one of 'approle', 'token_file', 'cert', 'jwt'",
        ),
        (
            "",
            16,
            "secrets.db.refresh: invalid duration '5 minutes': expected a duration like \"30s\"",
        ),
        ("", 17, "secrets.db.colour: unknown key"),
        ("", 26, "policy[1].groups: no such group 'no-such-group-for-agentd'"),
        ("", 27, "policy[1].allow: must not be empty"),
        ("", 29, "template[0]: set exactly one of source or contents"),
        ("", 30, "template[0].destination: expected an absolute path, not 'etc/app.conf'"),
        ("", 31, 'template[0].mode: expected a mode like "0640"'),
    ],
}


def problems(path: Path, *, check_permissions: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path, check_permissions=check_permissions)
    assert info.value.problems == str(info.value).splitlines()
    return info.value.problems


def test_every_bad_fixture_has_an_expectation() -> None:
    assert sorted(p.name for p in FIXTURES.glob("bad-*")) == sorted(BAD)
    assert len(BAD) >= 16


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_fixture(name: str) -> None:
    fixture = FIXTURES / name
    main = fixture / "agentd.toml" if fixture.is_dir() else fixture
    expected = []
    for rel, line, text in BAD[name]:
        file = fixture / rel if rel else main
        expected.append(f"{file}:{line}: {text.replace('{dir}', str(fixture))}")
    assert problems(main) == expected


def test_config_error_exit_code() -> None:
    with pytest.raises(ConfigError) as info:
        load(FIXTURES / "bad-unknown-key.toml", check_permissions=False)
    assert info.value.exit_code == 2


# -- the shipped configs ----------------------------------------------------------------------


def test_reference_config_parses_with_every_default() -> None:
    cfg = load(ROOT / "config" / "agentd.reference.toml", check_permissions=False)
    # The reference documents the defaults: the sections it sets in full equal the defaults.
    assert cfg.agent == AgentConfig()
    assert cfg.cache == CacheConfig()
    assert cfg.audit == AuditConfig()
    assert cfg.upstream.timeout == 10.0
    assert (cfg.upstream.backoff_min, cfg.upstream.backoff_max) == (1.0, 60.0)
    assert cfg.upstream.login_backoff_max == 300.0
    assert cfg.upstream.max_concurrency == 8
    assert cfg.upstream.auth.method == "approle"
    assert cfg.upstream.auth.secret_id_file == Path("/etc/agentd/secret_id")
    assert sorted(cfg.secrets) == ["db", "web-tls"]
    assert cfg.secrets["db"].refresh == 300.0
    assert cfg.secrets["web-tls"] == SecretConfig(name="web-tls", kind="pki", path="pki/issue/web")
    assert cfg.max_stale_for("db") == 86400.0
    assert cfg.key_file == Path("/var/lib/agentd/cache.key")
    (policy,) = cfg.policies
    assert (policy.name, policy.uids, policy.allow, policy.admin) == (
        "webapp",
        (0,),
        ("db", "web-*"),
        False,
    )
    (template,) = cfg.templates
    assert template.contents == "password = {{ secret('db').password }}\n"
    assert (template.mode, template.command_timeout, template.wait) == (0o600, 30.0, WaitConfig())
    (bundle,) = cfg.bundles
    assert sorted(bundle.files) == ["cert.pem", "key.pem"]
    assert bundle.grace == 60.0


def test_example_config_parses() -> None:
    cfg = load(ROOT / "config" / "agentd.example.toml", check_permissions=False)
    assert cfg.upstream.addresses == (
        "https://bao-1.example.internal:8200",
        "https://bao-2.example.internal:8200",
    )
    assert cfg.upstream.ca_file == Path("/etc/agentd/ca.pem")
    assert {n: s.kind for n, s in cfg.secrets.items()} == {"db": "kv2", "api-key": "kv2"}
    assert cfg.secrets["db"].refresh == 60.0
    (template,) = cfg.templates
    assert template.source == Path("/etc/agentd/templates/db.conf.j2")
    assert (template.mode, template.owner, template.group) == (0o640, 0, 0)
    assert template.command == ("systemctl", "reload", "webapp.service")
    assert template.wait == WaitConfig(min=2.0, max=10.0)
    assert cfg.policies[0].units == ("webapp.service",)


# -- a good config, with the filesystem checks on ------------------------------------------------


def line_of(path: Path, text: str) -> int:
    """The 1-based number of the first line of ``path`` that holds ``text``."""
    lines = path.read_text().splitlines()
    return next(n for n, line in enumerate(lines, start=1) if text in line)


def at(path: Path, text: str) -> str:
    """``file:line`` of the first line of ``path`` holding ``text``, as problems start."""
    return f"{path}:{line_of(path, text)}"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    path.chmod(mode)
    return path


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """A config directory with the credential and template files a good config names."""
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    write(etc / "role_id", "role\n", 0o644)
    write(etc / "secret_id", "secret\n", 0o600)
    write(etc / "ca.pem", "-----BEGIN CERTIFICATE-----\n", 0o644)
    write(etc / "db.conf.j2", "password = {{ secret('db').password }}\n", 0o644)
    return etc


def good(etc: Path, extra: str = "") -> Path:
    """A valid config using every kind of value, plus ``extra`` lines at the end."""
    return write(etc / "agentd.toml", textwrap.dedent(GOOD.format(etc=etc, nobody=NOBODY)) + extra)


GOOD = """\
        [agent]
        socket = "/run/agentd/agentd.sock"
        socket_mode = "660"
        socket_group = "root"
        log_level = "debug"
        ready_timeout = "1m30s"
        credentials_socket = "/run/agentd/creds.sock"
        idle_timeout = "500ms"

        [upstream]
        addresses = ["http://127.0.0.1:8200"]
        ca_file = "{etc}/ca.pem"

        [upstream.auth]
        method = "approle"
        mount = "approle-hosts"
        role_id_file = "{etc}/role_id"
        secret_id_file = "{etc}/secret_id"

        [cache]
        max_stale = "2d"
        key_credential = "agentd-cache-key"

        [audit]
        path = false
        max_bytes = "64KiB"

        [secrets.db]
        kind = "kv2"
        path = "secret/data/app/db"
        refresh = "90s"
        max_stale = "1h"

        [secrets.legacy_token]
        kind = "kv1"
        path = "kv1/legacy/token"

        [[policy]]
        users = ["root"]
        uids = [1000, 0]
        groups = ["root"]
        gids = [4]
        allow = ["*"]
        admin = true

        [[policy]]
        name = "units"
        units = ["app.service", "backup.timer"]
        exe = ["/usr/bin/app"]
        allow = ["db"]

        [[template]]
        source = "{etc}/db.conf.j2"
        destination = "/etc/app/db.conf"
        mode = "0640"
        owner = "root"
        group = 0
        command = ["systemctl", "reload", "app.service"]
        command_timeout = "10s"
        wait = {{ min = "2s" }}

        [[bundle]]
        directory = "/etc/app/tls"
        files = {{ "token" = "{{{{ secret('legacy_token').value }}}}" }}
        owner = {nobody}
        """


def test_good_config_has_the_right_types(etc: Path) -> None:
    cfg = load(good(etc))
    assert isinstance(cfg, Config)
    assert cfg.files == (etc / "agentd.toml",)
    assert cfg.agent.socket_mode == 0o660
    assert cfg.agent.socket_group == 0
    assert cfg.agent.ready_timeout == 90.0
    assert cfg.agent.idle_timeout == 0.5
    assert cfg.agent.credentials_socket == Path("/run/agentd/creds.sock")
    assert cfg.upstream.auth.mount == "approle-hosts"
    assert cfg.cache.max_stale == 172800.0
    assert cfg.cache.key_credential == "agentd-cache-key"
    assert cfg.audit.path is None
    assert cfg.audit.max_bytes == 65536
    assert cfg.secrets["db"].refresh == 90.0
    assert cfg.max_stale_for("db") == 3600.0
    assert cfg.max_stale_for("legacy_token") == 172800.0
    admin, units = cfg.policies
    assert admin.name == "policy[0]"
    assert admin.uids == (1000, 0)               # uids first, then resolved users, no repeats
    assert admin.gids == (4, 0)
    assert admin.users == ("root",)
    assert admin.admin is True
    assert units.name == "units"
    assert units.units == ("app.service", "backup.timer")
    (template,) = cfg.templates
    assert (template.mode, template.owner, template.group) == (0o640, 0, 0)
    assert template.command_timeout == 10.0
    assert template.wait == WaitConfig(min=2.0, max=2.0)  # a missing max is min
    (bundle,) = cfg.bundles
    assert bundle.owner == NOBODY
    assert dict(bundle.files) == {"token": "{{ secret('legacy_token').value }}"}
    with pytest.raises(TypeError):
        cfg.secrets["x"] = cfg.secrets["db"]  # type: ignore[index]


# Every key a table may hold, set to a value that is not its default: the value must reach the
# Config (a key the builder allowed but did not read would silently keep its default).
# (table header, base keys of that table, key = value, expected attribute value)
KEY_TABLES = {
    "[agent]": "",
    "[upstream]": 'addresses = ["https://bao:8200"]',
    "[upstream.auth]": 'method = "token_file"\ntoken_file = "/etc/agentd/token"',
    "[cache]": "",
    "[audit]": "",
    "[metrics]": "",
    "[secrets.kv]": 'kind = "kv2"\npath = "secret/data/a"',
    "[secrets.pki]": 'kind = "pki"\npath = "pki/issue/a"',
    "[secrets.lease]": 'kind = "leased"\npath = "db/creds/a"',
    "[[template]]": 'destination = "/etc/a"\ncontents = "x"',
    "[[bundle]]": 'directory = "/etc/b"\nfiles = { "a" = "x" }',
}
EVERY_KEY: list[tuple[str, str, object]] = [
    ("[agent]", 'socket = "/run/x.sock"', Path("/run/x.sock")),
    ("[agent]", 'socket_mode = "0600"', 0o600),
    ("[agent]", "socket_group = 0", 0),
    ("[agent]", 'state_dir = "/var/x"', Path("/var/x")),
    ("[agent]", 'log_level = "debug"', "debug"),
    ("[agent]", 'ready_timeout = "5s"', 5.0),
    ("[agent]", 'credentials_socket = "/run/c.sock"', Path("/run/c.sock")),
    ("[agent]", 'user = "root"', "root"),
    ("[agent]", 'host_id = "web-042"', "web-042"),
    ("[agent]", "max_connections = 10", 10),
    ("[agent]", "max_connections_per_uid = 5", 5),
    ("[agent]", "requests_per_second_per_uid = 7", 7),
    ("[agent]", "request_burst_per_uid = 9", 9),
    ("[agent]", "connects_per_second_per_uid = 11", 11),
    ("[agent]", "connect_burst_per_uid = 13", 13),
    ("[agent]", "listen_backlog = 17", 17),
    ("[agent]", "private_sockets = false", False),
    ("[agent]", 'connect_guard = "on"', "on"),
    ("[agent]", "connect_guard = false", "off"),
    ("[agent]", "max_watchers_per_uid = 3", 3),
    ("[agent]", "max_request_bytes = 1000", 1000),
    ("[agent]", 'idle_timeout = "1m"', 60.0),
    ("[agent]", 'frame_timeout = "2s"', 2.0),
    ("[upstream]", 'ca_file = "/etc/ca.pem"', Path("/etc/ca.pem")),
    ("[upstream]", 'tls_server_name = "bao"', "bao"),
    ("[upstream]", 'namespace = "ns"', "ns"),
    ("[upstream]", 'timeout = "3s"', 3.0),
    ("[upstream]", "max_concurrency = 2", 2),
    ("[upstream]", 'backoff_min = "2s"', 2.0),
    ("[upstream]", 'backoff_max = "90s"', 90.0),
    ("[upstream]", 'login_backoff_max = "10m"', 600.0),
    ("[upstream.auth]", 'mount = "tok"', "tok"),
    ("[cache]", 'max_stale = "1h"', 3600.0),
    ("[cache]", 'key_file = "/k"', Path("/k")),
    ("[cache]", 'key_credential = "cred"', "cred"),
    ("[audit]", 'path = "journal"', "journal"),
    ("[audit]", 'max_bytes = "1KiB"', 1024),
    ("[audit]", "backups = 2", 2),
    ("[audit]", 'flush_interval = "3s"', 3.0),
    ("[metrics]", 'listen = "127.0.0.1:9"', ("127.0.0.1", 9)),
    ("[metrics]", 'textfile = "/t.prom"', Path("/t.prom")),
    ("[metrics]", 'textfile_interval = "30s"', 30.0),
    ("[metrics]", 'textfile_mode = "0644"', 0o644),
    ("[metrics]", "textfile_group = 0", 0),
    ("[metrics]", "detailed = true", True),
    ("[secrets.kv]", 'refresh = "2m"', 120.0),
    ("[secrets.kv]", 'max_stale = "1h"', 3600.0),
    ("[secrets.kv]", "version = 3", 3),
    ("[secrets.kv]", 'check = ["/bin/true"]', ("/bin/true",)),
    ("[secrets.kv]", 'expect_rotation_every = "1h"', 3600.0),
    ("[secrets.pki]", 'params = { ttl = "1h" }', {"ttl": "1h"}),
    ("[secrets.pki]", "renew_at = 0.5", 0.5),
    ("[secrets.pki]", "revoke_previous = true", True),
    ("[secrets.pki]", 'grace = "1m"', 60.0),
    ("[secrets.lease]", "revoke_on_shutdown = true", True),
    ("[[template]]", 'mode = "0640"', 0o640),
    ("[[template]]", "owner = 0", 0),
    ("[[template]]", "group = 0", 0),
    ("[[template]]", 'command = ["/bin/true"]', ("/bin/true",)),
    ("[[template]]", 'command_timeout = "5s"', 5.0),
    ("[[template]]", 'wait = { min = "1s", max = "2s" }', WaitConfig(min=1.0, max=2.0)),
    ("[[template]]", "backup = true", True),
    ("[[template]]", 'on_revoke = "remove"', "remove"),
    ("[[template]]", 'allow = ["db*"]', ("db*",)),
    ("[[template]]", 'engine = "go"', "go"),
    ("[[bundle]]", 'engine = "go"', "go"),
    ("[[bundle]]", 'allow = ["web-*"]', ("web-*",)),
    ("[[bundle]]", 'mode = "0640"', 0o640),
    ("[[bundle]]", "owner = 0", 0),
    ("[[bundle]]", "group = 0", 0),
    ("[[bundle]]", 'command = ["/bin/true"]', ("/bin/true",)),
    ("[[bundle]]", 'command_timeout = "5s"', 5.0),
    ("[[bundle]]", 'wait = { min = "1s" }', WaitConfig(min=1.0, max=1.0)),
    ("[[bundle]]", 'grace = "1s"', 1.0),
    ("[[bundle]]", 'modes = { a = "0644" }', {"a": 0o644}),
    ("[[bundle]]", 'on_revoke = "remove"', "remove"),
]


def _table_of(cfg: Config, header: str) -> Any:
    name = header.strip("[]")
    if name.startswith("secrets."):
        return cfg.secrets[name.removeprefix("secrets.")]
    if name == "upstream.auth":
        return cfg.upstream.auth
    if name in ("template", "bundle"):
        return getattr(cfg, f"{name}s")[0]
    return getattr(cfg, name)


def _config_with(tmp_path: Path, header: str, line: str) -> Config:
    """The config of KEY_TABLES, with ``line`` added to the table ``header``."""
    text = "".join(
        f"{h}\n{base}\n{line if h == header else ''}\n" for h, base in KEY_TABLES.items()
    )
    path = write(tmp_path / ("with-key.toml" if line else "base.toml"), text)
    return load(path, check_permissions=False)


# Keys only engine = "go" takes: test_go_template_keys covers them.
GO_ONLY = {"left_delimiter", "right_delimiter", "error_on_missing_key", "env"}

# Keys EVERY_KEY leaves out: those KEY_TABLES sets, and the method-specific auth keys (the
# fixtures and test_token_file_method cover those).
NOT_IN_EVERY_KEY = {
    "[upstream]": {"addresses", "auth"},
    "[upstream.auth]": {"method", "role_id_file", "secret_id_file", "token_file", "cert_file",
                        "key_file", "jwt_file", "role"},
    "[secrets]": {"name", "kind", "path"},
    "[[template]]": {"destination", "contents", "source", *GO_ONLY},
    "[[bundle]]": {"directory", "files", *GO_ONLY},
}



def test_every_key_has_a_case(tmp_path: Path) -> None:
    base = _config_with(tmp_path, "", "")
    fields: dict[str, set[str]] = {}             # the secrets' three tables count as one
    cases: dict[str, set[str]] = {}
    for header in KEY_TABLES:
        group = "[secrets]" if header.startswith("[secrets.") else header
        names = set(type(_table_of(base, header)).__dataclass_fields__)
        fields[group] = names - NOT_IN_EVERY_KEY.get(group, set())
        cases[group] = set()
    for header, line, _ in EVERY_KEY:
        cases["[secrets]" if header.startswith("[secrets.") else header].add(line.split(" =")[0])
    assert cases == fields


@pytest.mark.parametrize(("header", "line", "expected"), EVERY_KEY, ids=lambda v: str(v)[:40])
def test_every_key_reaches_the_config(
    tmp_path: Path, header: str, line: str, expected: object
) -> None:
    key = line.split(" =")[0]
    default = getattr(_table_of(_config_with(tmp_path, header, ""), header), key)
    assert default != expected                   # else the case proves nothing
    assert getattr(_table_of(_config_with(tmp_path, header, line), header), key) == expected


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("5m", 300.0), ("24h", 86400.0), ("500ms", 0.5), ("1h30m", 5400.0),
     ("2d", 172800.0), ("0s", 0.0), ("1.5s", 1.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("value", [30, 1.5, "", "30", "s", "5 m", "1h 30m", "-5s", "5sm", True])
def test_not_durations(value: object) -> None:
    with pytest.raises(ValueError, match='expected a duration like "30s"'):
        parse_duration(value)


def test_format_key() -> None:
    assert format_key(("policy", 0, "uids")) == "policy[0].uids"
    assert format_key(("secrets", "db", "refresh")) == "secrets.db.refresh"
    assert format_key(("bundle", 1, "files", "tls.crt")) == 'bundle[1].files."tls.crt"'


def test_secret_kinds_are_a_tuple_to_extend() -> None:
    assert config.SECRET_KINDS == ("kv2", "kv1", "leased", "pki")


# -- conf.d ---------------------------------------------------------------------------------------


def test_conf_d_adds_secrets_policies_templates_and_bundles(etc: Path) -> None:
    main = good(etc)
    write(
        etc / "conf.d" / "20-web.toml",
        """\
        [secrets.web]
        kind = "kv2"
        path = "secret/data/web"

        [[policy]]
        users = ["root"]
        allow = ["web", "db"]

        [[bundle]]
        directory = "/etc/web/tls"
        files = { "cert.pem" = "{{ secret('web').cert }}" }
        """,
    )
    write(
        etc / "conf.d" / "10-cron.toml",
        """\
        [secrets.cron]
        kind = "kv1"
        path = "kv1/cron"

        [[template]]
        contents = "{{ secret('cron').key }} {{ secret('db').password }}"
        destination = "/etc/cron.key"
        """,
    )
    write(etc / "conf.d" / "ignored.txt", "[agent]\n")
    cfg = load(main)
    assert cfg.files == (main, etc / "conf.d" / "10-cron.toml", etc / "conf.d" / "20-web.toml")
    assert list(cfg.secrets) == ["db", "legacy_token", "cron", "web"]
    assert [p.name for p in cfg.policies] == ["policy[0]", "units", "policy[2]"]
    assert [t.destination for t in cfg.templates] == [
        Path("/etc/app/db.conf"),
        Path("/etc/cron.key"),
    ]
    assert [b.directory for b in cfg.bundles] == [Path("/etc/app/tls"), Path("/etc/web/tls")]


def test_conf_d_problems_name_their_own_file_and_come_after_the_main_file(etc: Path) -> None:
    main = good(etc, '\n[secrets.Bad]\nkind = "kv2"\npath = "x"\n')
    extra = write(
        etc / "conf.d" / "a.toml",
        """\
        [upstream]
        timeout = "1s"

        [[policy]]
        exe = ["/usr/bin/x"]
        allow = ["nothing-*"]
        surprise = 1
        """,
    )
    assert problems(main, check_permissions=True) == [
        f"{at(main, '[secrets.Bad]')}: secrets.Bad: invalid secret name 'Bad': "
        f"must match {config.SECRET_NAME_PATTERN}",
        f"{extra}:1: upstream: only allowed in the main file, not in conf.d",
        f"{extra}:5: policy[0].exe: name a uid, user, gid or group too: exe alone can be run "
        "by any user",
        f"{extra}:6: policy[0].allow: 'nothing-*' matches no declared secret",
        f"{extra}:7: policy[0].surprise: unknown key",
    ]


def test_syntax_errors_of_all_files_are_reported_together(etc: Path) -> None:
    main = write(etc / "agentd.toml", "[upstream\n")
    extra = write(etc / "conf.d" / "x.toml", "a = 1\na = 2\n")
    assert problems(main) == [
        f"{main}:1: TOML syntax error: Expected ']' at the end of a table declaration "
        "(at line 1, column 10)",
        f"{extra}:2: TOML syntax error: Cannot overwrite a value (at line 2, column 6)",
    ]


def test_an_almost_empty_file(tmp_path: Path) -> None:
    main = write(tmp_path / "agentd.toml", "[[policy]]\n[[template]]\n[[bundle]]\n")
    assert problems(main) == [
        f"{main}:0: upstream.addresses: required",
        f"{main}:0: upstream.auth.method: required",
        f"{main}:1: policy[0]: a policy needs at least one of "
        "uids, users, gids, groups, exe, exe_sha256, units",
        f"{main}:1: policy[0].allow: required",
        f"{main}:2: template[0].destination: required",
        f"{main}:2: template[0]: set exactly one of source or contents",
        f"{main}:3: bundle[0].directory: required",
        f"{main}:3: bundle[0].files: required",
    ]


def test_wrong_types_name_the_expected_type(tmp_path: Path) -> None:
    main = write(
        tmp_path / "agentd.toml",
        """\
        agent = "x"

        [upstream]
        addresses = "https://bao:8200"
        max_concurrency = "8"
        auth = { method = "token_file", token_file = 5 }

        [audit]
        path = true
        backups = -1

        [secrets.db]
        kind = "kv2"
        path = "secret/data/db"
        max_stale = 3600

        [[policy]]
        uids = ["root"]
        admin = "yes"
        allow = "db"
        """,
    )
    assert problems(main) == [
        f"{main}:1: agent: expected a table",
        f"{main}:4: upstream.addresses: expected a list of strings",
        f"{main}:5: upstream.max_concurrency: expected an integer",
        f"{main}:6: upstream.auth.token_file: expected a string",
        f'{main}:9: audit.path: expected an absolute path, "journal", or "off"',
        f"{main}:10: audit.backups: must be at least 0",
        f'{main}:15: secrets.db.max_stale: expected a duration like "30s"',
        f"{main}:18: policy[0].uids: expected a list of non-negative integers",
        f"{main}:19: policy[0].admin: expected a boolean (true or false)",
        f"{main}:20: policy[0].allow: expected a list of strings",
    ]


def test_missing_main_file(tmp_path: Path) -> None:
    assert problems(tmp_path / "nope.toml") == [f"{tmp_path}/nope.toml:0: (file): no such file"]


# -- permissions and files that must exist --------------------------------------------------------


def test_world_writable_config_and_directory(etc: Path) -> None:
    main = good(etc)
    main.chmod(0o666)
    etc.chmod(0o777)
    found = problems(main, check_permissions=True)
    assert found[:2] == [
        f"{main}:0: (file): {main} is writable by group or others (mode 0666): chmod go-w",
        f"{main}:0: (directory): {etc} is writable by group or others (mode 0777): chmod go-w",
    ]
    # ... and every file the config names in that directory (CA, credentials) with it: another
    # user can swap any of them (issue 13 item 13).
    assert found[2:]
    assert all(p.endswith(f": {etc}: directory is writable by others (mode 0777): chmod go-w")
               for p in found[2:]), found[2:]
    # Not looked at when the filesystem checks are off.
    assert load(main, check_permissions=False).files == (main,)


def test_group_writable_conf_d_file(etc: Path) -> None:
    main = good(etc)
    extra = write(etc / "conf.d" / "x.toml", "", 0o620)
    assert problems(main, check_permissions=True) == [
        f"{extra}:0: (file): {extra} is writable by group or others (mode 0620): chmod go-w",
    ]


def test_secret_id_readable_by_others(etc: Path) -> None:
    main = good(etc)
    (etc / "secret_id").chmod(0o644)
    assert problems(main, check_permissions=True) == [
        f"{at(main, 'secret_id_file')}: upstream.auth.secret_id_file: "
        f"{etc}/secret_id is readable by others (mode 0644): chmod o-r",
    ]


def test_files_owned_by_another_uid(etc: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    main = good(etc)
    os.chown(etc / "role_id", NOBODY, NOBODY)
    os.chown(main, NOBODY, NOBODY)
    message = "must be owned by root or the agent's user"
    assert problems(main, check_permissions=True) == [
        f"{main}:0: (file): {main} is owned by uid {NOBODY}: {message}",
        f"{at(main, 'role_id_file')}: upstream.auth.role_id_file: "
        f"{etc}/role_id is owned by uid {NOBODY}: {message}",
    ]
    # ... unless that uid is the agent's own user.
    nobody = __import__("pwd").getpwuid(NOBODY).pw_name
    text = main.read_text().replace("[agent]\n", f'[agent]\nuser = "{nobody}"\n', 1)
    main.write_text(text)
    assert load(main).agent.user == nobody


def test_missing_files_and_template_source_references(etc: Path) -> None:
    main = good(etc)
    (etc / "ca.pem").unlink()
    write(etc / "db.conf.j2", "{{ secret('db').password }} {{ secret(\"other\").x }}\n", 0o644)
    assert problems(main, check_permissions=True) == [
        f"{at(main, 'ca_file')}: upstream.ca_file: {etc}/ca.pem: no such file",
        f"{at(main, 'source =')}: template[0].source: "
        f"{etc}/db.conf.j2 refers to undeclared secret 'other'",
    ]
    assert load(main, check_permissions=False).upstream.ca_file == etc / "ca.pem"


def test_token_file_method(etc: Path) -> None:
    main = good(etc)
    text = main.read_text().replace(
        f'role_id_file = "{etc}/role_id"\nsecret_id_file = "{etc}/secret_id"',
        f'token_file = "{etc}/token"',
    ).replace('method = "approle"', 'method = "token_file"')
    main.write_text(text)
    write(etc / "token", "s.abc\n", 0o604)
    assert problems(main, check_permissions=True) == [
        f"{at(main, 'token_file =')}: upstream.auth.token_file: "
        f"{etc}/token is readable by others (mode 0604): chmod o-r",
    ]
    (etc / "token").chmod(0o400)
    auth = load(main).upstream.auth
    assert (auth.method, auth.token_file, auth.role_id_file) == ("token_file", etc / "token", None)


def test_go_template_keys_and_paths_resolve_through_the_catalog(tmp_path: Path) -> None:
    """engine = "go": Go's options reach the config; `secret "path"` must name a declared
    secret's path (decision 3), and problems name the template's line."""
    main = write(tmp_path / "agentd.toml", """\
        [upstream]
        addresses = ["http://127.0.0.1:1"]
        [upstream.auth]
        method = "token_file"
        token_file = "/t"

        [secrets.db]
        kind = "kv2"
        path = "secret/data/app/db"

        [[template]]
        destination = "/etc/a"
        engine = "go"
        left_delimiter = "[["
        right_delimiter = "]]"
        error_on_missing_key = false
        env = ["HOSTNAME"]
        contents = "[[ with secret \\"secret/data/app/db\\" ]][[ .Data.data.password ]][[ end ]]"
        """)
    (template,) = load(main, check_permissions=False).templates
    assert (template.engine, template.left_delimiter, template.right_delimiter,
            template.error_on_missing_key, template.env) == ("go", "[[", "]]", False,
                                                             ("HOSTNAME",))
    bad = write(tmp_path / "bad.toml", """\
        [upstream]
        addresses = ["http://127.0.0.1:1"]
        [upstream.auth]
        method = "token_file"
        token_file = "/t"

        [secrets.db]
        kind = "kv2"
        path = "secret/data/app/db"

        [[template]]
        destination = "/etc/a"
        engine = "go"
        contents = "{{ secret \\"secret/data/app/db\\" }}\\n{{ secret \\"secret/data/other\\" }}"

        [[template]]
        destination = "/etc/b"
        engine = "go"
        contents = "{{ plugin \\"x\\" }}"

        [[template]]
        destination = "/etc/c"
        left_delimiter = "[["
        contents = "x"
        """)
    first = at(bad, 'contents = "{{ secret')
    second = at(bad, 'contents = "{{ plugin')
    third = at(bad, "left_delimiter")
    assert problems(bad) == [
        f"{first}: template[0].contents: template:2: secret 'secret/data/other': no declared "
        "secret has this path (declare it under [secrets.NAME])",
        f'{second}: template[1].contents: template:1: function "plugin" not supported',
        f'{third}: template[2].left_delimiter: only for engine = "go"',
    ]
