"""The builder: parsed TOML tables -> ``Config``, every problem recorded on the way.

Two phases, as OpenBao's agent config does it. Phase one (``Builder.build`` down to ``bundle``)
turns each raw table into its dataclass key by key: unknown keys are reported, each value goes
through a converter (``agentd.config.convert``) and a bad one is recorded and replaced by its
default, so that one run reports everything. Phase two (``cross_check``) checks what spans
tables: a policy's patterns and the templates' ``secret('...')`` references name declared secrets,
and, when asked, that the files the config names exist and are safe.
"""

from __future__ import annotations

import fnmatch
import os
import pwd
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TypedDict, TypeVar

from agentd import fsafe
from agentd.config import convert as conv
from agentd.config.kindkeys import KIND_ONLY, SECRET_KEYS, SECRET_KINDS
from agentd.config.locate import KeyPath
from agentd.config.schema import (
    AUTH_METHODS,
    CONNECT_GUARD_MODES,
    LOG_LEVELS,
    ON_REVOKE,
    SECRET_NAME_PATTERN,
    AgentConfig,
    AuditConfig,
    AuthConfig,
    BundleConfig,
    CacheConfig,
    Config,
    MetricsConfig,
    PolicyConfig,
    SecretConfig,
    TemplateConfig,
    UpstreamConfig,
    WaitConfig,
    policy_problems,
)
from agentd.config.source import SourceFile
from agentd.errors import RenderError, UnsafePath
from agentd.refs import ENGINES, JINJA, Engine, allowed, paths_of, template_refs

_MAIN_ONLY = ("agent", "upstream", "cache", "audit", "metrics")
_ANYWHERE = ("secrets", "policy", "template", "bundle")
_SELECTORS = ("uids", "users", "gids", "groups", "exe", "exe_sha256", "units")
S = TypeVar("S")
_NO_INTS: tuple[int, ...] = ()
_NO_STRS: tuple[str, ...] = ()

# How each plain key is converted, section by section, in the order they are read (the order
# problems on one line are reported in). Keys that need more than a converter are read by hand.
# [agent], [cache], [audit] and [metrics] accept exactly the keys of their table here.
_AGENT: conv.Converters = {
    "socket": conv.abs_path,
    "socket_mode": conv.mode,
    "socket_group": conv.gid,
    "state_dir": conv.abs_path,
    "log_level": conv.choice(LOG_LEVELS),
    "ready_timeout": conv.positive_duration,
    "host_id": conv.host_id,
    "credentials_socket": conv.abs_path,
    "user": conv.user_name,
    "max_connections": conv.integer(1),
    "max_connections_per_uid": conv.integer(1),
    "requests_per_second_per_uid": conv.integer(1),
    "request_burst_per_uid": conv.integer(1),
    "connects_per_second_per_uid": conv.integer(1),
    "connect_burst_per_uid": conv.integer(1),
    "listen_backlog": conv.integer(1),
    "private_sockets": conv.boolean,
    "connect_guard": conv.switch(CONNECT_GUARD_MODES),
    "max_watchers_per_uid": conv.integer(0),
    "max_request_bytes": conv.integer(64),
    "idle_timeout": conv.positive_duration,
    "frame_timeout": conv.positive_duration,
}
_UPSTREAM: conv.Converters = {                    # and the table [upstream.auth]
    "ca_file": conv.abs_path,
    "addresses": conv.url_list,
    "tls_server_name": conv.nonempty,
    "namespace": conv.nonempty,
    "timeout": conv.positive_duration,
    "max_concurrency": conv.integer(1),
    "backoff_min": conv.positive_duration,
    "backoff_max": conv.positive_duration,
    "login_backoff_max": conv.positive_duration,
}
_CACHE: conv.Converters = {
    "max_stale": conv.duration(),
    "key_file": conv.abs_path,
    "key_credential": conv.credential_name,
}
_AUDIT: conv.Converters = {
    "path": conv.audit_path,
    "max_bytes": conv.size,
    "backups": conv.integer(0),
    "flush_interval": conv.positive_duration,
}
_METRICS: conv.Converters = {
    "listen": conv.listen,
    "textfile": conv.abs_path,
    "textfile_interval": conv.duration(1.0),
    "textfile_mode": conv.mode,
    "textfile_group": conv.gid,
    "detailed": conv.boolean,
}
_SECRET: conv.Converters = {                      # after kind, params and path
    "refresh": conv.duration(1.0),
    "max_stale": conv.duration(),
    "renew_at": conv.fraction,
    "revoke_previous": conv.boolean,
    "grace": conv.duration(),
    "revoke_on_shutdown": conv.boolean,
    "version": conv.integer(1),
    "check": conv.argv,
    "expect_rotation_every": conv.positive_duration,
}
_METHOD_FILES: dict[str, tuple[str, ...]] = {   # [upstream.auth] files -> methods reading them
    "role_id_file": ("approle",),
    "secret_id_file": ("approle",),
    "token_file": ("token_file",),
    "cert_file": ("cert",),
    "key_file": ("cert",),
    "jwt_file": ("jwt",),
}
_OUTPUT: conv.Converters = {                      # shared by [[template]] and [[bundle]]
    "mode": conv.mode,
    "owner": conv.uid,
    "group": conv.gid,
    "command": conv.argv,
    "command_timeout": conv.positive_duration,
}
_GO_ONLY = ("left_delimiter", "right_delimiter", "error_on_missing_key", "env")


def _unused(
    f: SourceFile,
    t: Mapping[str, object],
    key: KeyPath,
    name: str,
    users: tuple[str, ...],
    chosen: str,
    what: str,
) -> bool:
    """Report ``name`` if it is set but the ``chosen`` kind or method is not one of its users.

    Nothing is reported while ``chosen`` is empty (missing or invalid, reported already).
    """
    if chosen and name in t and chosen not in users:
        f.problem((*key, name), f"not used by {what} {chosen!r}")
        return True
    return False


def _section(
    f: SourceFile, raw: object, name: str, make: Callable[..., S], converters: conv.Converters
) -> S:
    """A main-file section whose keys are exactly ``converters``' (defaults: ``make()``'s)."""
    key: KeyPath = (name,)
    t = f.table(raw, key, tuple(converters))
    return make(**f.get_all(t, key, converters, make()))


@dataclass
class _FileCheck:
    """A file the config names, looked at in phase two when permissions are checked."""

    where: SourceFile
    key: KeyPath
    path: Path
    credential: bool = False                 # also refuse "readable by others"
    template: bool = False                   # read it for secret('...') references
    allow: tuple[str, ...] | None = None     # the template's allow list, if it has one
    reader: Engine = JINJA                   # how the template's text is read
    follow: bool = False                     # a symlink is followed (fsafe's follow=True)


class _EngineFields(TypedDict):
    """The engine keys of TemplateConfig and BundleConfig, as keyword arguments."""

    engine: str
    left_delimiter: str
    right_delimiter: str
    error_on_missing_key: bool
    env: tuple[str, ...]


@dataclass(frozen=True)
class _EngineKeys:
    fields: _EngineFields
    reader: Engine


class Builder:
    """Phase one turns raw tables into dataclasses; phase two checks cross-references."""

    def __init__(self, check_permissions: bool) -> None:
        self.check_permissions = check_permissions
        self.secrets: dict[str, SecretConfig] = {}
        self.secret_where: dict[str, str] = {}
        self.policies: list[PolicyConfig] = []
        self.allows: list[tuple[SourceFile, KeyPath, tuple[str, ...]]] = []
        # a template text to index in phase two (Go paths need the whole catalog)
        self.refs: list[tuple[SourceFile, KeyPath, str, str, tuple[str, ...] | None, Engine]] = []
        self.file_checks: list[_FileCheck] = []
        self._directories: dict[tuple[Path, bool], str | None] = {}
        self._agent_groups: set[int] = {0, os.getegid()}
        self.templates: list[TemplateConfig] = []
        self.bundles: list[BundleConfig] = []

    def build(self, parsed: list[tuple[SourceFile, dict[str, object]]]) -> Config:
        main, data = parsed[0]
        main.table(data, (), _MAIN_ONLY + _ANYWHERE)
        agent = _section(main, data.get("agent", {}), "agent", AgentConfig, _AGENT)
        upstream = self.upstream(main, data.get("upstream", {}))
        cache = self.cache(main, data.get("cache", {}))
        audit = _section(main, data.get("audit", {}), "audit", AuditConfig, _AUDIT)
        metrics = _section(main, data.get("metrics", {}), "metrics", MetricsConfig, _METRICS)
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

    def upstream(self, f: SourceFile, raw: object) -> UpstreamConfig:
        key: KeyPath = ("upstream",)
        t = f.table(raw, key, tuple(UpstreamConfig.__dataclass_fields__))
        values = f.get_all(t, key, _UPSTREAM, UpstreamConfig(), required=("addresses",))
        if values["ca_file"] is not None:
            self.file_checks.append(_FileCheck(f, (*key, "ca_file"), values["ca_file"]))
        config = UpstreamConfig(**values, auth=self.auth(f, t.get("auth", {})))
        for name in ("backoff_max", "login_backoff_max"):
            if getattr(config, name) < config.backoff_min:
                f.problem((*key, name), "must be at least backoff_min")
        return config

    def auth(self, f: SourceFile, raw: object) -> AuthConfig:
        key: KeyPath = ("upstream", "auth")
        t = f.table(raw, key, tuple(AuthConfig.__dataclass_fields__))
        method = f.get(t, key, "method", conv.choice(AUTH_METHODS), "", required=True)
        files: dict[str, Path | None] = {}
        for name, methods in _METHOD_FILES.items():
            if _unused(f, t, key, name, methods, method, "method"):
                continue
            path = files[name] = f.get(
                t, key, name, conv.abs_path, None, required=method in methods
            )
            if path is not None:
                credential = name not in ("role_id_file", "cert_file")
                # cert auth's files are often kept current by the agent's own [[bundle]], whose
                # names are symlinks through ..data: followed within trusted directories.
                follow = name in ("cert_file", "key_file")
                self.file_checks.append(_FileCheck(f, (*key, name), path, credential=credential,
                                                   follow=follow))
        mount = f.get(t, key, "mount", conv.nonempty, None)
        role = None
        if not _unused(f, t, key, "role", ("cert", "jwt"), method, "method"):
            role = f.get(t, key, "role", conv.nonempty, None, required=method == "jwt")
        return AuthConfig(method=method or "approle", mount=mount, role=role, **files)

    @staticmethod
    def cache(f: SourceFile, raw: object) -> CacheConfig:
        config = _section(f, raw, "cache", CacheConfig, _CACHE)
        if isinstance(raw, dict) and "key_file" in raw and "key_credential" in raw:
            f.problem(("cache", "key_credential"), "set key_file or key_credential, not both")
        return config

    # -- sections allowed in every file

    def catalog(self, f: SourceFile, data: dict[str, object]) -> None:
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

    def secret(self, f: SourceFile, name: str, raw: object) -> None:
        key: KeyPath = ("secrets", name)
        if not re.fullmatch(SECRET_NAME_PATTERN, name):
            f.problem(key, f"invalid secret name {name!r}: must match {SECRET_NAME_PATTERN}")
        if name in self.secret_where:
            f.problem(key, f"secret {name!r} is already declared at {self.secret_where[name]}")
        t = f.table(raw, key, SECRET_KEYS)
        kind = f.get(t, key, "kind", conv.choice(SECRET_KINDS), "", required=True)
        for option, kinds in KIND_ONLY.items():
            _unused(f, t, key, option, kinds, kind, "kind")
        no_params: dict[str, object] = {}
        params = f.get(t, key, "params", conv.params, no_params)
        config = SecretConfig(
            name=name,
            kind=kind,
            params=MappingProxyType(params),
            path=f.get(t, key, "path", conv.secret_path, "", required=True),
            **f.get_all(t, key, _SECRET, SecretConfig),
        )
        if name not in self.secret_where:
            self.secret_where[name] = f.where(key)
            self.secrets[name] = config

    def policy(self, f: SourceFile, key: KeyPath, raw: object) -> None:
        fields = ("name", "allow", "admin", *_SELECTORS)
        t = f.table(raw, key, fields)
        if isinstance(raw, dict) and not any(s in t for s in _SELECTORS):
            f.problem(key, f"a policy needs at least one of {', '.join(_SELECTORS)}")
        uids = list(f.get(t, key, "uids", conv.id_list, _NO_INTS))
        gids = list(f.get(t, key, "gids", conv.id_list, _NO_INTS))
        users = f.get(t, key, "users", conv.string_list, _NO_STRS)
        groups = f.get(t, key, "groups", conv.string_list, _NO_STRS)
        uids += f.each((*key, "users"), users, conv.existing_uid)
        gids += f.each((*key, "groups"), groups, conv.existing_gid)
        exe = f.get(t, key, "exe", conv.string_list, _NO_STRS)
        f.each((*key, "exe"), exe, conv.exe_path)
        exe_sha256 = f.get(t, key, "exe_sha256", conv.string_list, _NO_STRS)
        exe_sha256_lower = f.each((*key, "exe_sha256"), exe_sha256, conv.sha256)
        units = f.get(t, key, "units", conv.string_list, _NO_STRS)
        f.each((*key, "units"), units, conv.unit_name)
        allow = f.get(t, key, "allow", conv.string_list, _NO_STRS, required=True)
        self.allows.append((f, (*key, "allow"), allow))
        policy = PolicyConfig(
            name=f.get(t, key, "name", conv.nonempty, f"policy[{len(self.policies)}]"),
            allow=allow,
            uids=tuple(dict.fromkeys(uids)),
            gids=tuple(dict.fromkeys(gids)),
            users=users,
            groups=groups,
            exe=exe,
            units=units,
            admin=f.get(t, key, "admin", conv.boolean, False),
            exe_sha256=tuple(exe_sha256_lower),
        )
        self.policies.append(policy)
        for problem in policy_problems(policy):
            f.problem((*key, *problem.key), problem.message)

    def _engine(self, f: SourceFile, t: Mapping[str, object], key: KeyPath) -> _EngineKeys:
        """``engine`` and Go's options (which only ``engine = "go"`` takes)."""
        name = f.get(t, key, "engine", conv.choice(ENGINES), "jinja")
        if name != "go":
            for option in _GO_ONLY:
                if option in t:
                    f.problem((*key, option), 'only for engine = "go"')
        fields = _EngineFields(
            engine=name,
            left_delimiter=f.get(t, key, "left_delimiter", conv.nonempty, "{{"),
            right_delimiter=f.get(t, key, "right_delimiter", conv.nonempty, "}}"),
            error_on_missing_key=f.get(t, key, "error_on_missing_key", conv.boolean, True),
            env=f.get(t, key, "env", conv.string_list, ()),
        )
        return _EngineKeys(fields, Engine(name, fields["left_delimiter"], fields["right_delimiter"],
                                          fields["error_on_missing_key"], fields["env"]))

    def _wait(self, f: SourceFile, t: Mapping[str, object], key: KeyPath) -> WaitConfig:
        if "wait" not in t:
            return WaitConfig()
        key = (*key, "wait")
        raw = t["wait"]
        if not isinstance(raw, dict):
            f.problem(key, 'expected a table like { min = "2s", max = "10s" }')
            return WaitConfig()
        w = f.table(raw, key, ("min", "max"))
        low = f.get(w, key, "min", conv.duration(), 0.0)
        high = f.get(w, key, "max", conv.duration(), low)
        if low > high:
            low_s, high_s = conv.show_seconds(low), conv.show_seconds(high)
            f.problem(key, f"min ({low_s}) is greater than max ({high_s})")
        return WaitConfig(min=low, max=high)

    def template(self, f: SourceFile, key: KeyPath, raw: object) -> None:
        t = f.table(raw, key, tuple(TemplateConfig.__dataclass_fields__))
        destination = f.get(t, key, "destination", conv.abs_path, Path("/"), required=True)
        source = f.get(t, key, "source", conv.abs_path, None)
        contents = f.get(t, key, "contents", conv.string, None)
        if isinstance(raw, dict) and ("source" in t) == ("contents" in t):
            f.problem(key, "set exactly one of source or contents")
        allow = f.get(t, key, "allow", conv.string_list, None)
        engine = self._engine(f, t, key)
        if contents is not None:
            self.refs.append((f, (*key, "contents"), "template", contents, allow, engine.reader))
        if source is not None:
            self.file_checks.append(_FileCheck(f, (*key, "source"), source, template=True,
                                               allow=allow, reader=engine.reader))
        output = f.get_all(t, key, _OUTPUT, TemplateConfig)
        self.templates.append(
            TemplateConfig(
                destination=destination,
                source=source,
                contents=contents,
                **output,
                wait=self._wait(f, t, key),
                backup=f.get(t, key, "backup", conv.boolean, False),
                on_revoke=f.get(t, key, "on_revoke", conv.choice(ON_REVOKE), "keep"),
                allow=allow,
                **engine.fields,
            )
        )

    def bundle(self, f: SourceFile, key: KeyPath, raw: object) -> None:
        t = f.table(raw, key, tuple(BundleConfig.__dataclass_fields__))
        directory = f.get(t, key, "directory", conv.abs_path, Path("/"), required=True)
        files: dict[str, str] = {}
        allow = f.get(t, key, "allow", conv.string_list, None)
        engine = self._engine(f, t, key)
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
                self.refs.append((f, fkey, "template", text, allow, engine.reader))
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
                    mode = f.convert(mkey, value, conv.mode, None)
                    if mode is not None:
                        modes[name] = mode
        output = f.get_all(t, key, _OUTPUT, BundleConfig)
        self.bundles.append(
            BundleConfig(
                directory=directory,
                files=MappingProxyType(files),
                **output,
                wait=self._wait(f, t, key),
                grace=f.get(t, key, "grace", conv.duration(), BundleConfig.grace),
                modes=MappingProxyType(modes),
                on_revoke=f.get(t, key, "on_revoke", conv.choice(ON_REVOKE), "keep"),
                allow=allow,
                **engine.fields,
            )
        )

    # -- phase two

    def cross_check(self, agent: AgentConfig, files: list[SourceFile]) -> None:
        names = list(self.secrets)
        for f, key, patterns in self.allows:
            for pattern in patterns:
                if pattern in self.secrets:
                    continue                    # a literal name (the common case: no scan)
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    f.problem(key, f"{pattern!r} matches no declared secret")
        self.by_path = paths_of(self.secrets)
        for f, key, what, text, allow, reader in self.refs:
            self._check_refs(f, key, what, text, allow, reader)
        if not self.check_permissions:
            return
        owners = {0}
        if agent.user is not None:
            entry = pwd.getpwnam(agent.user)
            owners.add(entry.pw_uid)
            self._agent_groups.add(entry.pw_gid)
        directories: set[Path] = set()
        for f in files:
            # its directory is checked next, with the directories above it
            self._check_safe(f, (), f.path, owners, ancestors=False)
            if f.path.parent not in directories:
                directories.add(f.path.parent)
                self._check_safe(f, (), f.path.parent, owners, label="(directory)")
        for check in self.file_checks:
            if self._check_safe(
                check.where, check.key, check.path, owners, credential=check.credential,
                follow=check.follow,
            ) and check.template:
                try:
                    text = fsafe.read_text(check.path, owners=owners)
                except UnsafePath as exc:
                    check.where.problem(check.key, f"cannot read {exc}")
                    continue
                self._check_refs(check.where, check.key, str(check.path), text, check.allow,
                                 check.reader)

    def _check_refs(self, f: SourceFile, key: KeyPath, what: str, text: str,
                    allow: tuple[str, ...] | None, reader: Engine) -> None:
        try:
            refs = template_refs(text, reader, self.by_path, template=what)
        except RenderError as exc:             # Go: syntax, unsupported function, unknown path
            f.problem(key, str(exc))
            return
        for name in refs:
            if name not in self.secrets:
                f.problem(key, f"{what} refers to undeclared secret {name!r}")
            elif allow is not None and not allowed(name, allow):
                f.problem(key, f"{what} names secret {name!r}, which the template's allow list "
                          "does not include")

    def _check_safe(
        self,
        f: SourceFile,
        key: KeyPath,
        path: Path,
        owners: set[int],
        *,
        credential: bool = False,
        label: str | None = None,
        ancestors: bool = True,
        follow: bool = False,
    ) -> bool:
        """Report ``path`` if missing, a symlink, or changeable by others (it or a directory
        above it: ``fsafe``'s rules, the same the agent applies at every later read); True if
        nothing is wrong with it (a template's text is then read)."""
        line = 0 if not key else None
        try:
            st = path.lstat()
        except OSError as exc:
            missing = isinstance(exc, FileNotFoundError)
            why = "no such file" if missing else f"cannot stat: {exc.strerror}"
            f.problem(key, f"{path}: {why}", line=line, label=label)
            return False
        if stat.S_ISLNK(st.st_mode) and follow:
            try:
                fsafe.read_file(path, secret=credential, owners=owners, follow=True)
                complaints = []
            except UnsafePath as exc:
                complaints = [str(exc)]
        elif stat.S_ISLNK(st.st_mode):
            complaints = [f"{path} is a symlink: name the file itself"]
        else:
            complaints = self._complaints(path, st, owners, credential=credential)
        # A directory (a config file's) is checked itself above: only what is above it here.
        above = stat.S_ISDIR(st.st_mode)
        unsafe = self._unsafe_directory(path.parent, owners, above=above) if ancestors else None
        if unsafe is not None:
            complaints.append(unsafe)
        for message in complaints:
            f.problem(key, message, line=line, label=label)
        return not complaints

    def _complaints(self, path: Path, st: os.stat_result, owners: set[int], *,
                    credential: bool) -> list[str]:
        """What is wrong with a (non-symlink) file's owner and mode."""
        mode = stat.S_IMODE(st.st_mode)
        complaints: list[str] = []
        if st.st_uid not in owners:
            complaints.append(
                f"{path} is owned by uid {st.st_uid}: must be owned by root or the agent's user"
            )
        if mode & 0o022:
            complaints.append(
                f"{path} is writable by group or others (mode {mode:04o}): chmod go-w"
            )
        if credential and mode & 0o004:
            complaints.append(f"{path} is readable by others (mode {mode:04o}): chmod o-r")
        elif credential and mode & 0o040 and st.st_gid not in self._agent_groups:
            complaints.append(f"{path} is readable by group {st.st_gid} (mode {mode:04o}): a "
                              "credential is for root or the agent only: chmod g-r")
        return complaints

    def _unsafe_directory(self, directory: Path, owners: set[int], *,
                          above: bool = False) -> str | None:
        """Why ``directory`` or one above it is unsafe to trust (None: it is fine); memoised.
        ``above``: ``directory`` only leads to a directory checked by itself."""
        if (directory, above) not in self._directories:
            try:
                os.close(fsafe.open_dir(directory, owners=owners, above=above))
                self._directories[directory, above] = None
            except UnsafePath as exc:
                self._directories[directory, above] = str(exc)
        return self._directories[directory, above]
