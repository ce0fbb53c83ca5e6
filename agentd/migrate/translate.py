"""One translation of one agent config (``Migration``): each stanza translated, turned into a
comment where agentd does the job differently, or refused where it cannot do what the agent did;
each distinct upstream path a template reads becomes one ``[secrets.NAME]``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentd.config import SECRET_NAME_PATTERN, parse_duration
from agentd.migrate.hcl import Block
from agentd.migrate.mounts import Mount, MountLookup
from agentd.migrate.scan import (
    ENV_FUNCTIONS,
    REFUSED_FUNCTIONS,
    SECRET_FUNCTIONS,
    env_names,
    scan_template,
)
from agentd.migrate.tomlwrite import comment, toml_text, toml_value

AGENT_SOCKET_ADDR = "unix:///run/agentd/agentd.sock"


_SUPPORTED_AUTH = ("approle", "token_file", "cert", "jwt")
_LOG_LEVELS = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning",
               "warning": "warning", "error": "error", "err": "error"}
_SHELL_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./'\" -]*")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    what: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}: {self.why}"


@dataclass
class SecretUse:
    function: str
    path: str
    args: tuple[str, ...]
    where: str                                # "file:line" of the use


@dataclass
class Secret:
    name: str
    kind: str
    path: str
    params: dict[str, str]
    uses: list[SecretUse]
    origin: str                               # how the kind was decided (a comment)
    inferred: bool


def secret_name(path: str, taken: Mapping[str, str]) -> str:
    """A stable local name for an upstream path: the path's words, without a KV v2 ``data``."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    if len(parts) >= 3 and parts[1] == "data":
        parts = [parts[0], *parts[2:]]
    base = re.sub(r"[^a-z0-9_-]+", "-", "-".join(parts).lower())
    base = re.sub(r"-{2,}", "-", base).strip("-_") or "secret"
    digest = hashlib.sha256(path.encode()).hexdigest()[:8]
    name = base if len(base) <= 63 else f"{base[:54].rstrip('-_')}-{digest}"
    if name in taken and taken[name] != path:
        name = f"{base[:54].rstrip('-_')}-{digest}"
    assert re.fullmatch(SECRET_NAME_PATTERN, name), name
    return name


def _duration(value: Any) -> str | None:
    """A Go duration (or a number of seconds, as HCL allows) as agentd writes it; None if not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return f"{value:g}s"
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text == "0":
        return "0s"
    try:
        parse_duration(text)
    except ValueError:
        return None
    return text


def _mode(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        text = str(value)                     # HCL 1 reads 0640 as octal; python-hcl2 as 640
    elif isinstance(value, str):
        text = value.strip().removeprefix("0o")
    else:
        return None
    if not re.fullmatch(r"[0-7]{1,4}", text):
        return None
    return text.rjust(4, "0")


class Migration:
    """One translation of one HCL file."""

    def __init__(self, path: Path, text: str, root: Block, *, lookup: MountLookup | None,
                 fallback_address: str | None) -> None:
        self.path = path
        self.text = text
        self.file = str(path)
        self.root = root
        self.lookup = lookup
        self.fallback_address = fallback_address
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self.head: list[str] = []              # comments for the top of the file
        self.agent: list[str] = []
        self.upstream: list[str] = []
        self.auth: list[str] = []
        self.secrets: dict[str, Secret] = {}   # upstream path -> secret
        self.names: dict[str, str] = {}        # name -> upstream path
        self.templates: list[list[str]] = []
        self.refresh: str | None = None
        self.renew_at: float | None = None
        self.exec_notes: list[str] = []
        self.create_dirs: list[str] = []       # templates relying on create_dest_dirs

    def problem(self, line: int, what: str, why: str, file: str | None = None) -> None:
        self.problems.append(Problem(file or self.file, line, what, why))

    def where(self, line: int, file: str | None = None) -> str:
        return f"{Path(file or self.file).name}:{line}"

    def file_path(self, value: Any, line: int, what: str) -> str:
        """A file the HCL names, made absolute (agentd takes absolute paths only)."""
        if not isinstance(value, str) or not value:
            self.problem(line, what, "expected a file path")
            return ""
        path = Path(value)
        if path.is_absolute():
            return value
        resolved = str((self.path.parent / path).resolve())
        self.notes.append(f"{self.file}:{line}: {what}: relative path {value!r} taken from the "
                          f"HCL file's directory: {resolved}")
        return resolved

    # -- top level

    def run(self) -> str | None:
        stanzas = {"vault", "auto_auth", "template_config", "template", "env_template", "exec",
                   "listener", "cache", "api_proxy", "telemetry"}
        known_attrs = {"pid_file", "exit_after_auth", "log_level", "log_file", "log_format",
                       "log_rotate_bytes", "log_rotate_duration", "log_rotate_max_files",
                       "disable_mlock", "disable_idle_connections", "disable_keep_alives",
                       "plugin_directory"}
        for name, line in self.root.entries():
            if name not in stanzas and name not in known_attrs:
                self.problem(line, name, "unknown stanza: agentd does not know what it would do")
        self.top_attributes()
        self.template_config()             # before the secrets: refresh and renew_at
        self.vault()
        self.auto_auth()
        for block in self.root.children("listener"):
            kind = block.labels[0] if block.labels else str(block.get("type", ""))
            address = block.get("address", "")
            self.head += comment(
                f"listener \"{kind}\" {address} ({self.where(block.line)}): agentd does not "
                "proxy to the upstream and never uses a token a client sends. Its one Unix "
                "socket answers reads of the declared secrets by upstream path, who may read "
                "what is decided by [[policy]] from the caller's uid, executable and unit: "
                f"BAO_AGENT_ADDR={AGENT_SOCKET_ADDR} bao kv get secret/app/db works unchanged. "
                + ("There is no TCP listener (no peer credentials on TCP). "
                   if kind == "tcp" else ""))
        for name in ("cache", "api_proxy"):
            for block in self.root.children(name):
                self.head += comment(
                    f"{name} ({self.where(block.line)}): agentd always caches the declared "
                    "secrets (sealed in memory, and in an encrypted snapshot across restarts) and "
                    f"serves them on its socket ({AGENT_SOCKET_ADDR}, HTTP and msgpack); it "
                    "proxies nothing else and forwards no token.")
        for block in self.root.children("telemetry"):
            self.head += comment(
                f"telemetry ({self.where(block.line)}): see [metrics] listen and textfile "
                "(Prometheus) in docs/configuration.md.")
        self.exec_stanzas()
        for index, block in enumerate(self.root.children("template")):
            self.template(index, block)
        if not self.root.children("template") and not self.secrets:
            self.notes.append(f"{self.file}: no template stanza: the output declares no secret; "
                              "add [secrets.NAME] for what clients will ask the socket for")
        if self.problems:
            return None
        return self.render()

    def top_attributes(self) -> None:
        root = self.root
        level = root.get("log_level")
        if level is not None:
            mapped = _LOG_LEVELS.get(str(level).lower())
            if mapped is None:
                self.problem(root.line_of("log_level"), "log_level", f"unknown level {level!r}")
            else:
                self.agent += [f"log_level = {toml_value(mapped)}   "
                               f"# log_level = {level!r} ({self.where(root.line_of('log_level'))})"]
        for name in ("log_file", "log_format", "log_rotate_bytes", "log_rotate_duration",
                     "log_rotate_max_files"):
            if name in root.attrs:
                self.head += comment(f"{name} ({self.where(root.line_of(name))}): agentd logs "
                                      "JSON lines on stderr (the journal under systemd).")
        if "pid_file" in root.attrs:
            self.head += comment(f"pid_file ({self.where(root.line_of('pid_file'))}): agentd "
                                  "writes no pid file; systemd tracks it (Type=notify).")
        if root.get("exit_after_auth") is True:
            self.head += comment(
                f"exit_after_auth ({self.where(root.line_of('exit_after_auth'))}): agentd is a "
                "daemon and keeps the files current; it has no render-once-and-exit mode.")
            self.notes.append(f"{self.file}:{root.line_of('exit_after_auth')}: exit_after_auth: "
                              "agentd keeps running (it is a daemon)")

    def template_config(self) -> None:
        for block in self.root.children("template_config"):
            for name, line in block.entries():
                value = block.get(name)
                if name == "static_secret_render_interval":
                    duration = _duration(value)
                    if duration is None:
                        self.problem(line, f"template_config.{name}",
                                     f"{value!r} is not a duration")
                    else:
                        self.refresh = duration
                elif name == "lease_renewal_threshold":
                    if isinstance(value, (int, float)) and 0 < value < 1:
                        self.renew_at = float(value)
                    else:
                        self.problem(line, f"template_config.{name}",
                                     "expected a fraction between 0 and 1")
                elif name == "exit_on_retry_failure":
                    self.head += comment(
                        f"template_config.exit_on_retry_failure = {toml_value(value)} "
                        f"({self.where(line)}): agentd never exits because the upstream or a "
                        "template fails: it serves the last good values (up to max_stale), backs "
                        "off and retries, and reports the failure in `agentd status`, its "
                        "metrics and its logs.")
                elif name == "max_connections_per_host":
                    self.head += comment(
                        f"template_config.max_connections_per_host ({self.where(line)}): see "
                        "[upstream] max_concurrency (default 8).")
                else:
                    self.problem(line, f"template_config.{name}", "unknown setting")

    def vault(self) -> None:
        blocks = self.root.children("vault")
        block = blocks[0] if blocks else Block("vault", (), 0)
        address = block.get("address")
        where = self.where(block.line_of("address"))
        if address is None:
            for env in ("BAO_ADDR", "VAULT_ADDR"):
                if os.environ.get(env):
                    address, where = os.environ[env], f"${env}"
                    break
        if address is None and self.fallback_address:
            address, where = self.fallback_address, "--upstream"
        if not isinstance(address, str) or not address:
            self.problem(block.line, "vault.address", "no upstream address (and no $BAO_ADDR, "
                         "$VAULT_ADDR or --upstream): agentd needs [upstream] addresses")
            return
        self.upstream.append(f"addresses = {toml_value([address])}   # from {where}")
        ca = block.get("ca_cert")
        if ca is not None:
            ca = self.file_path(ca, block.line_of("ca_cert"), "vault.ca_cert")
            self.upstream.append(f"ca_file = {toml_value(ca)}   "
                                 f"# vault.ca_cert ({self.where(block.line_of('ca_cert'))})")
        for name in ("tls_server_name", "namespace"):
            if name in block.attrs:
                self.upstream.append(f"{name} = {toml_value(block.get(name))}")
        if "client_timeout" in block.attrs:
            timeout = _duration(block.get("client_timeout"))
            if timeout is None:
                self.problem(block.line_of("client_timeout"), "vault.client_timeout",
                             f"{block.get('client_timeout')!r} is not a duration")
            else:
                self.upstream.append(f"timeout = {toml_value(timeout)}   # vault.client_timeout")
        for name, line in block.entries():
            if name in ("address", "ca_cert", "tls_server_name", "namespace", "client_timeout"):
                continue
            if name in ("client_cert", "client_key"):
                continue                       # used by auth "cert" below
            if name == "tls_skip_verify":
                if block.get(name) in (True, "true", "1"):
                    self.problem(line, "vault.tls_skip_verify", "agentd always verifies the "
                                 "upstream's certificate; give its CA in vault.ca_cert")
            elif name == "ca_path":
                self.problem(line, "vault.ca_path", "agentd takes one CA bundle file "
                             "(ca_file), not a directory: concatenate the certificates")
            elif name == "retry":
                self.upstream += comment(
                    f"vault.retry ({self.where(line)}): agentd retries every upstream request "
                    "with jittered exponential backoff (backoff_min, backoff_max) and never "
                    "gives up.")
            else:
                self.problem(line, f"vault.{name}", "not supported by agentd's [upstream]")

    def auto_auth(self) -> None:
        blocks = self.root.children("auto_auth")
        if not blocks:
            self.problem(0, "auto_auth", "missing: agentd logs in itself and needs a method "
                         "(approle, token_file, cert or jwt)")
            return
        block = blocks[0]
        methods = block.children("method")
        for name, line in block.entries():
            if name == "sink":
                self.problem(line, "auto_auth.sink", "agentd keeps its token in memory and "
                             "never writes it to a file: give each reader of that token its "
                             "secrets through the socket, `agentd exec` or a template instead "
                             "(if nothing reads it, remove the sink and run migrate again)")
            elif name not in ("method",):
                self.problem(line, f"auto_auth.{name}", "not supported")
        if len(methods) != 1:
            self.problem(block.line, "auto_auth.method",
                         f"expected exactly one method, found {len(methods)}")
            return
        method = methods[0]
        kind = method.labels[0] if method.labels else str(method.get("type", ""))
        config_blocks = method.children("config")
        config = config_blocks[0] if config_blocks else Block("config", (), method.line)
        what = f'auto_auth.method "{kind}"'
        if kind not in _SUPPORTED_AUTH:
            self.problem(method.line, what, "agentd logs in with approle, token_file, cert or "
                         "jwt only")
            return
        self.auth.append(f"method = {toml_value(kind)}   # {what} ({self.where(method.line)})")
        mount = method.get("mount_path")
        if isinstance(mount, str) and mount.strip("/") not in ("", f"auth/{kind}"):
            self.auth.append(f"mount = {toml_value(mount.strip('/').removeprefix('auth/'))}")
        for name, line in method.entries():
            if name in ("type", "mount_path", "config"):
                continue
            if name == "namespace":
                self.upstream.append(f"namespace = {toml_value(method.get(name))}   "
                                     f"# {what} namespace")
            elif name in ("min_backoff", "max_backoff", "exit_on_err"):
                self.auth += comment(f"{name} ({self.where(line)}): agentd re-logs in with "
                                      "jittered backoff up to [upstream] login_backoff_max "
                                      "(default 5m) and never exits for a failed login.")
            else:
                self.problem(line, f"{what} {name}", "not supported")
        getattr(self, f"_auth_{kind}")(config, what)

    def _auth_keys(self, config: Block, what: str, mapping: Mapping[str, str | None],
                   required: tuple[str, ...]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name, line in config.entries():
            if name not in mapping:
                self.problem(line, f"{what} config.{name}", "not supported by agentd")
                continue
            target = mapping[name]
            if target is not None:
                found[target] = config.get(name)
        for name in required:
            if mapping.get(name) not in found:
                self.problem(config.line, f"{what} config.{name}", "required by agentd")
        return found

    def auth_file(self, config: Block, found: Mapping[str, Any], key: str) -> str:
        return self.file_path(found[key], config.line, f"auth config {key}")

    def _auth_approle(self, config: Block, what: str) -> None:
        found = self._auth_keys(config, what, {
            "role_id_file_path": "role_id_file", "secret_id_file_path": "secret_id_file",
            "remove_secret_id_file_after_reading": None}, ("role_id_file_path",
                                                           "secret_id_file_path"))
        for key in ("role_id_file", "secret_id_file"):
            if key in found:
                self.auth.append(f"{key} = {toml_value(self.auth_file(config, found, key))}")
        if config.get("remove_secret_id_file_after_reading", True) is not False:
            self.auth += comment(
                "The OpenBao Agent deletes the secret_id file after reading it (unless "
                "remove_secret_id_file_after_reading = false); agentd keeps it and reads it "
                "again at each login: it must be a reusable secret_id, mode 0600 or 0640.")

    def _auth_token_file(self, config: Block, what: str) -> None:
        found = self._auth_keys(config, what, {"token_file_path": "token_file"},
                                ("token_file_path",))
        if "token_file" in found:
            self.auth.append(
                f"token_file = {toml_value(self.auth_file(config, found, 'token_file'))}")

    def _auth_cert(self, config: Block, what: str) -> None:
        found = self._auth_keys(config, what, {
            "name": "role", "client_cert": "cert_file", "client_key": "key_file",
            "reload": None, "ca_cert": None}, ())
        vault = (self.root.children("vault") or [Block("vault", (), 0)])[0]
        for key, fallback in (("cert_file", "client_cert"), ("key_file", "client_key")):
            value = found.get(key, vault.get(fallback))
            if value is not None:
                value = self.file_path(value, config.line, f"{what} {fallback}")
            if value is None:
                self.problem(config.line, f"{what} config.{fallback}",
                             "agentd needs the client certificate and key files "
                             f"(in the method's config or in vault.{fallback})")
            else:
                self.auth.append(f"{key} = {toml_value(value)}")
        if "role" in found:
            self.auth.append(f"role = {toml_value(found['role'])}")
        if "ca_cert" in config.attrs:
            self.auth += comment("config.ca_cert of the cert method: agentd verifies the "
                                  "upstream with [upstream] ca_file for every request.")

    def _auth_jwt(self, config: Block, what: str) -> None:
        found = self._auth_keys(config, what, {
            "path": "jwt_file", "role": "role", "remove_jwt_after_reading": None,
            "remove_jwt_follows_symlinks": None}, ("path", "role"))
        for key in ("jwt_file", "role"):
            if key in found:
                value = self.auth_file(config, found, key) if key == "jwt_file" else found[key]
                self.auth.append(f"{key} = {toml_value(value)}")
        if config.get("remove_jwt_after_reading", True) is not False:
            self.auth += comment("The OpenBao Agent deletes the JWT file after reading it; "
                                  "agentd leaves it and reads it again at each login.")

    # -- exec and env_template

    def exec_stanzas(self) -> None:
        env_blocks = self.root.children("env_template")
        exec_blocks = self.root.children("exec")
        envs: list[str] = []
        for block in env_blocks:
            var = block.labels[0] if block.labels else "?"
            text = block.get("contents")
            file = None
            if text is None and isinstance(block.get("source"), str):
                text, file = self.read_source(block.get("source"), block.line_of("source"),
                                              f'env_template "{var}".source')
            if not isinstance(text, str):
                if "source" not in block.attrs:
                    self.problem(block.line, f'env_template "{var}"', "needs contents or source")
                continue
            offset = 0 if file else block.line_of("contents") + \
                (1 if str(self.raw_attr(block, "contents")).startswith("<<") else 0) - 1
            uses = self.scan(text, file or self.file, offset, block.get("left_delimiter", "{{"),
                             block.get("right_delimiter", "}}"), f'env_template "{var}"')
            simple = re.fullmatch(r'\s*\{\{-?\s*with\s+secret\s+"([^"]+)"\s*-?\}\}\{\{-?\s*'
                                  r'\.Data(?:\.data)?\.([A-Za-z0-9_]+)\s*-?\}\}\{\{-?\s*end'
                                  r'\s*-?\}\}\s*', text)
            if simple and uses:
                envs.append(f"--env {var}={uses[0]}.{simple.group(2)}")
            else:
                names = ", ".join(dict.fromkeys(uses)) or "no secret"
                envs.append(f"--env {var}=NAME.FIELD (reads {names})")
        for block in exec_blocks:
            command = block.get("command")
            argv = command if isinstance(command, list) else \
                (shlex.split(command) if isinstance(command, str) else [])
            self.exec_notes += comment(
                f"exec ({self.where(block.line)}): agentd does not supervise the program "
                "itself: run it with `agentd exec` (for example in the unit's ExecStart=), which "
                "asks the agent as the calling user (a [[policy]] must grant it) and puts the "
                "values in its environment; --restart-on-change restarts it when a value "
                "changes (restart_on_secret_changes).")
            flags: list[str] = []
            if block.get("restart_on_secret_changes", "always") == "always":
                flags.append("--restart-on-change")
                stop = block.get("restart_stop_signal")
                if isinstance(stop, str) and stop.upper().removeprefix("SIG") != "TERM":
                    flags.append(f"--signal {stop.upper().removeprefix('SIG')}")
            line = "#   agentd exec " + " ".join([*flags, *(envs or ["--env VAR=NAME.FIELD"])]) \
                + " -- " + " ".join(shlex.quote(str(a)) for a in argv)
            self.exec_notes.append(line)
        if env_blocks and not exec_blocks:
            self.exec_notes += comment(
                "env_template without exec: pass the values with `agentd exec "
                + " ".join(envs) + " -- PROGRAM`.")

    def raw_attr(self, block: Block, name: str) -> str:
        """The attribute's source text start (to tell a heredoc from a quoted string)."""
        line = block.line_of(name)
        lines = self.text.splitlines()
        if 0 < line <= len(lines):
            after = lines[line - 1].split("=", 1)
            return after[1].strip() if len(after) == 2 else ""
        return ""

    # -- templates and the secrets they read

    def read_source(self, source: str, line: int, what: str) -> tuple[str | None, str | None]:
        path = Path(source)
        if not path.is_absolute():
            path = self.path.parent / path
        try:
            return path.read_text(), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            self.problem(line, what, f"cannot read {path}: {getattr(exc, 'strerror', exc)} "
                         "(migrate reads each template to declare the secrets it uses)")
            return None, None

    def scan(self, text: str, file: str, offset: int, left: Any, right: Any,
             what: str) -> list[str]:
        """Declare the secrets ``text`` reads; return their names. Problems are located at
        ``file`` line ``offset + line in the text``.

        The text is parsed by agentd's own Go engine, as ``check-config`` will: a syntax error
        or a function it lacks is a problem here already, and the secret references are the
        engine's. Functions agentd refuses on purpose, and computed paths, are named first with
        the reason."""
        from agentd import gotemplate

        names: list[str] = []
        calls = scan_template(text, str(left), str(right))
        clean = True
        for call in calls:
            line = offset + call.line
            if call.function in REFUSED_FUNCTIONS:
                self.problem(line, f"{what}: {call.function}", REFUSED_FUNCTIONS[call.function],
                             file=file)
                clean = False
            elif call.function not in ENV_FUNCTIONS and not call.literal:
                self.problem(line, f"{what}: {call.function}", "the path or an argument is not "
                             "a string literal: agentd declares every secret a template reads "
                             "(and its parameters) in its config, so each must be written out",
                             file=file)
                clean = False
        # (function, path, args, line) of each secret read: the engine's, or, when the text
        # is refused anyway, this scan's literal ones (so that every problem is named at once)
        refs = [(c.function, c.args[0], c.args[1:], c.line) for c in calls
                if c.function in SECRET_FUNCTIONS and c.literal]
        if clean:
            try:
                parsed = gotemplate.parse(text, name=what, left_delim=str(left),
                                          right_delim=str(right), env_allow=env_names(calls))
            except gotemplate.GoTemplateError as exc:
                message = str(exc)
                for prefix in (f"{what}:{exc.line}: ", f"{what}: "):
                    message = message.removeprefix(prefix)
                self.problem(offset + (exc.line or 1), what,
                             f"agentd's Go engine cannot take it: {message}", file=file)
            else:
                refs = [(r.function, r.path, tuple(r.args), r.line)
                        for r in parsed.secret_paths()]
        for function, path, args, at in refs:
            line = offset + at
            use = SecretUse(function, path, tuple(args), self.where(line, file))
            name = self.declare(use, line, file, what)
            if name is not None:
                names.append(name)
        return names

    def declare(self, use: SecretUse, line: int, file: str, what: str) -> str | None:
        fail = f"{what}: {use.function} {json.dumps(use.path)}"
        if use.function == "secrets":
            self.problem(line, fail, "a LIST of keys: agentd has no list kind yet; read each "
                         "secret by its path with `secret` instead", file=file)
            return None
        path = use.path.strip().lstrip("/").removeprefix("v1/")
        params: dict[str, str] = {}
        for arg in use.args:
            key, sep, value = arg.partition("=")
            if not sep or not key:
                self.problem(line, fail, f"argument {arg!r} is not key=value", file=file)
                return None
            params[key] = value
        parts = [p for p in path.split("/") if p]
        if len(parts) < 2 or ".." in parts:
            self.problem(line, fail, "not a secret path (MOUNT/PATH)", file=file)
            return None
        kind, upstream_path, origin, inferred = self.kind_of(path, parts, use.function)
        if kind is None:
            self.problem(line, fail, origin, file=file)
            return None
        if params and kind != "pki":
            self.problem(line, fail, "a write with key=value arguments: agentd writes to the "
                         "upstream only to issue certificates (pki/issue/ROLE)", file=file)
            return None
        known = self.secrets.get(upstream_path)
        if known is not None:
            if known.params != params:
                self.problem(line, fail, f"already used with other parameters at "
                             f"{known.uses[0].where}: agentd's catalog holds one secret per "
                             "upstream path", file=file)
                return None
            known.uses.append(use)
            return known.name
        name = secret_name(upstream_path, self.names)
        self.names[name] = upstream_path
        if upstream_path != path:
            origin += (f". The template reads {path} (consul-template's KV v2 shorthand, which "
                       f"reads {upstream_path}); agentd looks template paths up as written, so "
                       "write it with data/ in the template until agentd does the same")
            self.notes.append(f"{file}:{line}: {path} is KV v2 data at {upstream_path}: agentd "
                              "resolves template paths as written; write the data/ path in the "
                              "template (check-config names it otherwise)")
        secret = Secret(name, kind, upstream_path, params, [use], origin, inferred)
        self.secrets[upstream_path] = secret
        return name

    def kind_of(self, path: str, parts: list[str],
                function: str) -> tuple[str | None, str, str, bool]:
        """(kind, upstream path, how it was decided, inferred); kind None: why not."""
        if self.lookup is not None:
            mount = self.lookup(path)
            if isinstance(mount, Mount):
                return self._kind_from_mount(path, mount, function)
            self.notes.append(f"{path}: {mount}; its kind is inferred from the path")
            reason = f"inferred from the path ({mount})"
        else:
            reason = "inferred from the path (no --upstream to ask)"
        if function == "pkiCert" or (len(parts) >= 3 and parts[-2] == "issue"):
            if len(parts) < 3 or parts[-2] != "issue":
                return None, path, "pkiCert needs a MOUNT/issue/ROLE path", True
            return "pki", path, f"pki: {reason}", True
        if len(parts) >= 3 and "creds" in parts[1:-1]:
            return "leased", path, f"leased (dynamic credentials): {reason}", True
        if len(parts) >= 3 and parts[1] == "data":
            return "kv2", path, f"KV version 2: {reason}", True
        if len(parts) >= 2 and parts[1] == "metadata":
            return None, path, "KV v2 metadata: agentd reads secret data, not metadata", True
        return ("kv1", path, f"KV version 1: {reason}; if {parts[0]}/ is a KV version 2 mount, "
                f"the path is {parts[0]}/data/{'/'.join(parts[1:])} and the kind kv2", True)

    def _kind_from_mount(self, path: str, mount: Mount,
                         function: str) -> tuple[str | None, str, str, bool]:
        base = mount.path if mount.path.endswith("/") else mount.path + "/"
        rest = path[len(base):] if path.startswith(base) else path.split("/", 1)[-1]
        said = f"the upstream says {base} is a {mount.type} mount" + \
            (f" (version {mount.version})" if mount.version else "")
        if mount.type in ("kv", "generic") and mount.version == "2":
            if rest.startswith("metadata/"):
                return None, path, f"KV v2 metadata: agentd reads secret data ({said})", False
            if not rest.startswith("data/"):
                rest = "data/" + rest
            return "kv2", base + rest, f"KV version 2: {said}", False
        if mount.type in ("kv", "generic", "cubbyhole"):
            return "kv1", path, f"KV version 1: {said}", False
        if mount.type == "pki":
            if rest.startswith("issue/"):
                return "pki", path, f"pki: {said}", False
            if function == "pkiCert":
                return None, path, f"pkiCert needs a MOUNT/issue/ROLE path ({said})", False
            return "kv1", path, f"a plain read: {said}", False
        if rest.startswith("creds/") or "/creds/" in rest:
            return "leased", path, f"leased (dynamic credentials): {said}", False
        return "kv1", path, f"a plain read: {said}", False

    def template(self, index: int, block: Block) -> None:
        what = f"template[{index}]"
        out: list[str] = [f"# {what} ({self.where(block.line)})", 'engine = "go"']
        known = {"source", "contents", "destination", "perms", "user", "group", "command",
                 "command_timeout", "exec", "error_on_missing_key", "left_delimiter",
                 "right_delimiter", "backup", "wait", "create_dest_dirs", "error_fatal",
                 "sandbox_path", "function_denylist", "function_blacklist"}
        for name, line in block.entries():
            if name not in known:
                self.problem(line, f"{what}.{name}", "not supported by agentd's [[template]]")
        left, right = block.get("left_delimiter", "{{"), block.get("right_delimiter", "}}")
        source, contents = block.get("source"), block.get("contents")
        text: str | None = None
        file: str | None = None
        offset = 0
        if (source is None) == (contents is None):
            self.problem(block.line, what, "needs exactly one of source or contents")
        elif isinstance(source, str):
            path = Path(source)
            absolute = path if path.is_absolute() else (self.path.parent / path).resolve()
            if not path.is_absolute():
                out += comment(f"source {source!r} was relative: taken from {self.path.parent} "
                                "(the OpenBao Agent resolves it from its working directory)")
            out.append(f"source = {toml_value(str(absolute))}")
            text, file = self.read_source(str(absolute), block.line_of("source"),
                                          f"{what}.source")
        elif isinstance(contents, str):
            out.append(f"contents = {toml_text(contents)}")
            text = contents
            heredoc = self.raw_attr(block, "contents").startswith("<<")
            offset = block.line_of("contents") + (1 if heredoc else 0) - 1
        else:
            self.problem(block.line, what, "source and contents must be strings")
        if text is not None:
            self.scan(text, file or self.file, offset, left, right, what)
        destination = block.get("destination")
        if not isinstance(destination, str) or not destination:
            self.problem(block.line, f"{what}.destination", "required")
        else:
            dest = Path(destination)
            if not dest.is_absolute():
                out += comment(f"destination {destination!r} was relative: taken from "
                                f"{self.path.parent}")
                dest = (self.path.parent / dest).resolve()
            out.append(f"destination = {toml_value(str(dest))}")
        perms = block.get("perms")
        if perms is None:
            out.append('mode = "0644"   # the OpenBao Agent\'s default (agentd\'s own is "0600")')
        else:
            mode = _mode(perms)
            if mode is None:
                self.problem(block.line_of("perms"), f"{what}.perms",
                             f"{perms!r} is not a file mode like \"0640\"")
            else:
                out.append(f"mode = {toml_value(mode)}")
        for hcl_key, key in (("user", "owner"), ("group", "group")):
            value = block.get(hcl_key)
            if value is not None:
                out.append(f"{key} = {toml_value(value)}")
        out += self.command(block, what)
        missing = block.get("error_on_missing_key")
        if missing is True:
            out.append("error_on_missing_key = true")
        else:
            if missing is False:
                out.append("error_on_missing_key = false   # as the HCL says: a missing key "
                           "renders <no value>")
            else:
                out += comment(
                    "agentd fails closed: a key missing from a secret fails the render and the "
                    "previous file stays (the OpenBao Agent writes <no value> unless "
                    "error_on_missing_key = true). Add error_on_missing_key = false to render "
                    "<no value> as it did.")
        envs = env_names(scan_template(text, str(left), str(right))) if text else []
        if envs:
            out.append(f"env = {toml_value(envs)}   # agentd's Go engine reads only the "
                       "environment variables listed here")
        if "left_delimiter" in block.attrs:
            out.append(f"left_delimiter = {toml_value(str(left))}")
        if "right_delimiter" in block.attrs:
            out.append(f"right_delimiter = {toml_value(str(right))}")
        if block.get("backup") is True:
            out.append("backup = true   # DESTINATION.bak, a hard link: same owner and mode")
        for wait in block.children("wait"):
            table: dict[str, str] = {}
            for key in ("min", "max"):
                if key in wait.attrs:
                    value = _duration(wait.get(key))
                    if value is None:
                        self.problem(wait.line_of(key), f"{what}.wait.{key}",
                                     f"{wait.get(key)!r} is not a duration")
                    else:
                        table[key] = value
            for key, line in wait.entries():
                if key not in ("min", "max"):
                    self.problem(line, f"{what}.wait.{key}", "unknown setting")
            if table:
                out.append(f"wait = {toml_value(table)}")
        if block.get("create_dest_dirs") is not False:
            self.create_dirs.append(self.where(block.line))
        if "error_fatal" in block.attrs:
            out += comment("error_fatal: agentd never exits because one template fails; the "
                            "failure is logged, counted and retried, the other files go on.")
        self.templates.append(out)

    def command(self, block: Block, what: str) -> list[str]:
        out: list[str] = []
        execs = block.children("exec")
        command: Any = block.get("command")
        timeout: Any = block.get("command_timeout")
        if execs:
            if "command" in block.attrs:
                self.problem(block.line_of("command"), f"{what}.command",
                             "set command or exec, not both")
                return out
            command = execs[0].get("command")
            timeout = execs[0].get("timeout", timeout)
            for name, line in execs[0].entries():
                if name not in ("command", "timeout"):
                    self.problem(line, f"{what}.exec.{name}", "not supported")
        if command is None or command == "" or command == []:
            return out
        if isinstance(command, list) and len(command) == 1 and isinstance(command[0], str) \
                and " " in command[0]:
            command = command[0]                   # consul-template runs it as a shell string
        if isinstance(command, str):
            try:
                words = shlex.split(command) if _SHELL_SAFE.fullmatch(command) else []
            except ValueError:                     # unbalanced quotes: leave it to the shell
                words = []
            if words:
                out += comment("command was a string without shell syntax: split into words "
                                "(agentd runs an argv, never a shell by itself).")
                out.append(f"command = {toml_value(words)}")
            else:
                out += comment("command was a shell string: agentd never uses a shell by "
                                "itself, so it is run through /bin/sh -c explicitly, as the "
                                "OpenBao Agent did. An argv without a shell is safer.")
                out.append(f"command = {toml_value(['/bin/sh', '-c', command])}")
        elif isinstance(command, list) and all(isinstance(a, str) for a in command):
            out.append(f"command = {toml_value(command)}")
        else:
            self.problem(block.line_of("command"), f"{what}.command",
                         "expected a string or a list of strings")
        if timeout is not None:
            value = _duration(timeout)
            if value is None:
                self.problem(block.line, f"{what}.command_timeout", f"{timeout!r} is not a "
                             "duration")
            else:
                out.append(f"command_timeout = {toml_value(value)}")
        return out

    # -- output

    def render(self) -> str:
        lines: list[str] = [
            f"# agentd configuration translated by `agentd migrate` from {self.path.name}.",
            "# Every template keeps its Go text unchanged (engine = \"go\"). Where agentd "
            "deliberately",
            "# differs from the OpenBao/Vault Agent, a comment says so (docs/migration.md lists "
            "them all):",
            "# files are written with their final owner and mode before the rename, a missing "
            "key fails",
            "# the render (fail closed), commands run as an argv without a shell, and nothing "
            "is readable",
            "# through the socket until a [[policy]] grants it (deny by default).",
        ]
        if self.create_dirs:
            self.head += comment(
                "create_dest_dirs (the default, in template " + ", ".join(self.create_dirs) +
                "): agentd does not create a missing destination directory; create it "
                "beforehand (tmpfiles.d, the package, or StateDirectory=/RuntimeDirectory=).")
        if self.head:
            lines += ["#", *self.head]
        if self.agent:
            lines += ["", "[agent]", *self.agent]
        lines += ["", "[upstream]", *self.upstream, "", "[upstream.auth]", *self.auth]
        for secret in sorted(self.secrets.values(), key=lambda s: s.name):
            lines += ["", f"[secrets.{secret.name}]"]
            used = ", ".join(dict.fromkeys(u.where for u in secret.uses[:4]))
            more = f" and {len(secret.uses) - 4} more" if len(secret.uses) > 4 else ""
            lines += comment(f"{secret.uses[0].function} {json.dumps(secret.uses[0].path)} "
                              f"({used}{more})")
            lines += comment(("INFERRED, check it: " if secret.inferred else "kind: ")
                              + secret.origin)
            lines.append(f"kind = {toml_value(secret.kind)}")
            lines.append(f"path = {toml_value(secret.path)}")
            if secret.kind == "pki":
                lines.append(f"params = {toml_value(secret.params)}")
            if secret.kind in ("kv1", "kv2") and self.refresh is not None:
                lines.append(f"refresh = {toml_value(self.refresh)}   "
                             "# template_config.static_secret_render_interval")
            if secret.kind in ("leased", "pki") and self.renew_at is not None:
                lines.append(f"renew_at = {self.renew_at!r}   "
                             "# template_config.lease_renewal_threshold")
        names = sorted(s.name for s in self.secrets.values())
        lines += ["", *comment(
            "agentd is deny-by-default: templates render without a policy, but no process reads "
            "a secret over the socket, `agentd exec` or the HTTP face until a [[policy]] grants "
            "it. migrate invents none; an example:"),
            "# [[policy]]", '# name = "app"', '# users = ["app"]',
            f"# allow = {toml_value(names or ['NAME'])}"]
        if self.exec_notes:
            lines += ["", *self.exec_notes]
        for table in self.templates:
            lines += ["", "[[template]]", *table]
        return "\n".join(lines) + "\n"
