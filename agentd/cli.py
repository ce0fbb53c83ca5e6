"""The ``agentd`` command: a thin argparse front over the daemon and the client.

Every AgentdError becomes one line on stderr and its exit code (0 ok, 1 runtime failure, 2 usage or
config error); no traceback reaches the user for an error we expected.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from agentd import __version__
from agentd.errors import AgentdError, ConfigError, RequestError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 itself; keep our one-line style
        raise UsageError(f"{self.prog}: {message}")


def version_line() -> str:
    """``agentd 0.1.0 (Python 3.11.2, /opt/agentd/venv/bin/python)``: what a bug report needs."""
    return f"agentd {__version__} (Python {platform.python_version()}, {sys.executable})"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agentd", description="Per-host secrets agent for OpenBao and Vault.")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("-c", "--config", required=required, default=None,
                       help="configuration file (default /etc/agentd/agentd.toml)")

    def with_socket(p: argparse.ArgumentParser) -> None:
        with_config(p, required=False)
        p.add_argument("--socket", help="agentd socket path (else -c's [agent] socket, "
                                        "$AGENTD_SOCKET, /run/agentd/agentd.sock)")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")

    p = sub.add_parser("run", help="run the agent in the foreground")
    with_config(p, required=False)
    p = sub.add_parser("check-config", help="validate a configuration and exit")
    with_config(p, required=False)
    p = sub.add_parser("get", help="print a secret (a field's raw value, or the data as JSON)")
    with_socket(p)
    p.add_argument("name")
    p.add_argument("field", nargs="?")
    p.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    p = sub.add_parser("list", help="names this caller may read")
    with_socket(p)
    p = sub.add_parser("status", help="agent status (admin)")
    with_socket(p)
    p.add_argument("--json", action="store_true", help="print the whole status as JSON")
    p = sub.add_parser("ping", help="check that the agent answers")
    with_socket(p)
    p = sub.add_parser("catalog", help="every declared secret, its schedule and its consumers")
    with_socket(p)
    p.add_argument("--upstream-policy", action="store_true",
                   help="print the least-privilege OpenBao policy (HCL) for this catalog")
    p.add_argument("--json", action="store_true", help="print the catalog as JSON")
    p = sub.add_parser("render", help="show which files rendering would change (--dry-run)")
    with_socket(p)
    p.add_argument("--dry-run", action="store_true", required=True,
                   help="compare only; write nothing (the only mode)")
    p = sub.add_parser("exec", help="run a program with secrets in its environment",
                       description="Ask the agent as the calling user, then run PROG with the "
                                   "values in its environment.")
    with_socket(p)
    p.add_argument("--env", action="append", default=[], metavar="VAR=NAME[.FIELD]",
                   help="set VAR to the field's value (or the secret's data as JSON); repeat")
    p.add_argument("--restart-on-change", action="store_true",
                   help="stay as the parent and restart PROG when a value changes")
    p.add_argument("--signal", default="TERM", help="sent to PROG before a restart (TERM)")
    p.add_argument("--grace", default="10s",
                   help="wait this long after --signal before SIGKILL (10s)")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- PROG [ARGS...]")
    p = sub.add_parser("migrate", help="translate an OpenBao/Vault Agent config (HCL) to TOML")
    p.add_argument("hcl", metavar="AGENT.hcl", help="the OpenBao/Vault Agent configuration")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the TOML to FILE (mode 0640) instead of stdout")
    p.add_argument("--upstream", metavar="ADDR",
                   help="ask this OpenBao/Vault server for each mount's type and KV version")
    p.add_argument("--token-file", metavar="FILE",
                   help="token for --upstream (else $BAO_TOKEN, else $VAULT_TOKEN)")
    p.add_argument("--ca-file", metavar="FILE",
                   help="CA bundle for --upstream (else the HCL's vault.ca_cert)")
    p = sub.add_parser("demo", add_help=False,
                       help="run a local OpenBao dev server and the agent end to end")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    _add_manual(parser, sub.choices)
    return parser


_COMMON = """\
exit status:
  0  success
  1  runtime failure: the agent, the upstream, a file, or a request denied or unavailable
  2  usage or configuration error

environment:
  AGENTD_SOCKET  the socket client commands use when neither --socket nor -c is given

files:
  /etc/agentd/agentd.toml, /etc/agentd/conf.d/*.toml   configuration
  /run/agentd/agentd.sock                               the client socket
  /var/lib/agentd/                                      sealed snapshot and its key
  /var/log/agentd/audit.jsonl                           audit stream

see also: docs/operations.md, docs/configuration.md, docs/protocol.md
  (installed in /usr/share/doc/agentd/), systemctl(1), agentd.service, agentd.socket"""

# Man-style texts for `agentd COMMAND --help`: (description, examples). Appended to what each
# subparser already says; the common sections follow the examples.
_MANUAL: dict[str, tuple[str, str]] = {
    "run": (
        "Run the agent in the foreground (it never forks; systemd supervises it). It logs in, "
        "fetches every declared secret, then accepts on the socket (or the one systemd passes "
        "with socket activation) and sends READY=1. SIGHUP reloads the configuration, "
        "SIGTERM/SIGINT stop it cleanly. Logs are JSON lines on stderr.",
        "examples:\n  agentd run -c /etc/agentd/agentd.toml\n"
        "  systemctl start agentd        # the packaged unit runs exactly this",
    ),
    "check-config": (
        "Load the configuration (and conf.d/*.toml beside it) exactly as `run` would, and print "
        "every problem at once as FILE:LINE: KEY: MESSAGE. Exit 0 means `run` accepts it.",
        "examples:\n  agentd check-config -c /etc/agentd/agentd.toml && systemctl reload agentd",
    ),
    "get": (
        "Ask the agent for secret NAME as the calling user (that user's policies decide). "
        "With FIELD, print that field's raw value; without, the data as JSON. A secret this "
        "caller may not read is `forbidden`, whether it exists or not.",
        "examples:\n  agentd get db password\n  agentd get db --json | jq .version",
    ),
    "list": (
        "Print the names of the secrets the calling user may read, one per line.",
        "examples:\n  agentd list",
    ),
    "status": (
        "Print the agent's state as JSON: upstream, auth, every secret's version, age and stale "
        "flag, reloads, audit counters. Needs a policy with admin = true.",
        "examples:\n  sudo agentd status | jq .secrets",
    ),
    "render": (
        "With --dry-run (the only mode): render every [[template]] and [[bundle]] of the "
        "configuration with the values the running agent serves to this caller (its socket, so "
        "this caller's policies decide; run it as root), compare with the files on disk, and "
        "print for each file: create, update (content differs, mode, owner), unchanged, or "
        "error. Values are never printed, only sizes. Nothing is written. Exit 1 if any "
        "template fails.",
        "examples:\n  agentd render --dry-run -c /etc/agentd/agentd.toml",
    ),
    "catalog": (
        "Print every secret declared in the configuration: kind, upstream path, refresh or "
        "lease schedule, pinned version, and its consumers (policies, credential units, "
        "templates, bundles). If the agent answers and this caller is admin, the next rotation "
        "is shown too. --upstream-policy prints the least-privilege OpenBao policy (HCL) the "
        "agent's own login needs for exactly this catalog.",
        "examples:\n  agentd catalog -c /etc/agentd/agentd.toml\n"
        "  agentd catalog --upstream-policy | bao policy write agentd-host -",
    ),
    "ping": (
        "Check that the agent answers on its socket; prints `ok`.",
        "examples:\n  agentd ping --timeout 2 || systemctl status agentd",
    ),
    "migrate": (
        "Translate an OpenBao/Vault Agent configuration (HCL) into an agentd TOML on stdout: "
        "vault and auto_auth become [upstream], every secret path the templates read becomes "
        "a [secrets.NAME] (its kind asked of the server with --upstream, else inferred from the "
        "path and marked INFERRED), and each template stanza a [[template]] with engine = "
        "\"go\" that renders the same Go template text. Comments say where agentd differs. "
        "Anything that cannot be carried over faithfully (another auth method, a sink, plugin, "
        "an unknown stanza) is listed on stderr as FILE:LINE: what: why, and nothing is "
        "printed (exit 2). Notes (no policy generated, inferred kinds) go to stderr too.",
        "examples:\n  agentd migrate /etc/openbao/agent.hcl > /etc/agentd/agentd.toml\n"
        "  BAO_TOKEN=... agentd migrate agent.hcl --upstream https://bao:8200 -o agentd.toml",
    ),
    "exec": (
        "",
        "examples:\n  agentd exec --env DB_PASSWORD=db.password -- /usr/bin/app --serve\n"
        "  agentd exec --restart-on-change --env DB=db -- /usr/bin/app",
    ),
}


def _add_manual(parser: argparse.ArgumentParser,
                commands: Mapping[str, argparse.ArgumentParser]) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("commands: run, check-config, get, list, status, catalog, ping, exec, "
                     "render, migrate, demo;\n"
                     "`agentd COMMAND --help` describes each.\n\n" + _COMMON)
    for name, (description, examples) in _MANUAL.items():
        command = commands.get(name)
        if command is None:
            continue
        command.formatter_class = argparse.RawDescriptionHelpFormatter
        if description:
            command.description = textwrap.fill(description, 78)
        command.epilog = f"{examples}\n\n{_COMMON}"


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(args_list)
        return _run(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return exc.exit_code
    except RequestError as exc:
        print(f"agentd: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except AgentdError as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else Path("/etc/agentd/agentd.toml")


def _run(args: argparse.Namespace) -> int:
    if args.command in ("run", "check-config"):
        from agentd import config as config_mod

        path = _config_path(args)
        if not path.exists():
            raise ConfigError([f"{path}:0: no such file"])
        config = config_mod.load(path)
        if args.command == "check-config":
            print(f"{path}: ok ({len(config.secrets)} secrets, {len(config.policies)} policies, "
                  f"{len(config.templates)} templates)")
            return 0
        import trio

        from agentd import daemon, logs

        logs.setup(config.agent.log_level)
        trio.run(partial(daemon.serve, config, config_path=path))
        return 0
    if args.command == "demo":
        from agentd import demo

        return int(demo.main(args.rest))
    if args.command == "exec":
        return _exec_command(args)
    if args.command == "migrate":
        return _migrate_command(args)
    if args.command == "catalog":
        return _catalog_command(args)
    if args.command == "render":
        return _render_command(args)
    return _client_command(args)


def _render_command(args: argparse.Namespace) -> int:
    """``render --dry-run``: render with values from the running agent, compare, write nothing."""
    import trio

    from agentd import config as config_mod
    from agentd import render
    from agentd.client import open_client, resolve_socket_path

    path = _config_path(args)
    if not path.exists():
        raise ConfigError([f"{path}:0: no such file"])
    config = config_mod.load(path)
    socket_path = resolve_socket_path(args.socket, args.config, os.environ)

    async def plan() -> list[render.PlannedChange]:
        with trio.fail_after(args.timeout + 60):
            client = await open_client(socket_path)
            try:
                async def fetch(name: str) -> Any:
                    # numbers with their upstream text, as the agent's renders see them
                    return (await client.get(name, exact=True))["data"]

                return await render.dry_run(config, fetch)
            finally:
                await client.aclose()

    plans = trio.run(plan)
    width = max((len(p.path) for p in plans), default=4)
    for p in plans:
        print(f"{p.action:<9} {p.path:<{width}}  {p.reason}")
    changes = sum(1 for p in plans if p.action in ("create", "update"))
    errors = sum(1 for p in plans if p.action == "error")
    print(f"{changes} file(s) would change, {errors} error(s), "
          f"{len(plans) - changes - errors} unchanged")
    return 1 if errors else 0


def _migrate_command(args: argparse.Namespace) -> int:
    """``migrate AGENT.hcl``: the TOML on stdout (or -o), exit 0; problems on stderr, exit 2."""
    from agentd import migrate

    token = None
    if args.upstream is not None:
        if args.token_file:
            try:
                token = Path(args.token_file).read_text().strip()
            except OSError as exc:
                raise UsageError(f"migrate: --token-file: {exc.strerror}: "
                                 f"{args.token_file}") from None
        else:
            token = os.environ.get("BAO_TOKEN") or os.environ.get("VAULT_TOKEN")
        if not token:
            raise UsageError("migrate: --upstream needs a token (--token-file, $BAO_TOKEN or "
                             "$VAULT_TOKEN)")
    try:
        result = migrate.migrate(Path(args.hcl), upstream=args.upstream, token=token,
                                 ca_file=args.ca_file)
    except migrate.UpstreamLookupError as exc:
        print(f"agentd: migrate: {exc}", file=sys.stderr)
        return 1
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if result.toml is None:
        for problem in result.problems:
            print(problem, file=sys.stderr)
        print(f"agentd: migrate: {len(result.problems)} problem(s); no configuration written",
              file=sys.stderr)
        return 2
    if args.output:
        out = Path(args.output)
        tmp = out.with_name(f".{out.name}.migrate-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        with os.fdopen(fd, "w") as f:
            f.write(result.toml)
        os.replace(tmp, out)
    else:
        sys.stdout.write(result.toml)
    return 0


def _catalog_command(args: argparse.Namespace) -> int:
    from agentd import catalog
    from agentd import config as config_mod
    from agentd.client import Client, resolve_socket_path

    path = _config_path(args)
    if not path.exists():
        raise ConfigError([f"{path}:0: no such file"])
    config = config_mod.load(path, check_permissions=False)
    if args.upstream_policy:
        sys.stdout.write(catalog.upstream_policy(config))
        return 0
    status: Any = None
    try:   # the running agent adds the next rotation and expiry, if this caller is admin
        with Client.connect(resolve_socket_path(args.socket, args.config, os.environ),
                            timeout=min(args.timeout, 2.0)) as client:
            status = client.status()
    except AgentdError:
        status = None
    items = catalog.entries(config, status)
    if args.json:
        print(json.dumps(items, indent=2, sort_keys=True))
    else:
        sys.stdout.write(catalog.render(items))
    return 0


def _exec_command(args: argparse.Namespace) -> int:
    from agentd import execcmd
    from agentd.client import resolve_socket_path

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("exec: no program given (agentd exec --env VAR=NAME -- PROG)")
    if not args.env:
        raise UsageError("exec: give at least one --env VAR=NAME[.FIELD]")
    specs = [execcmd.parse_env_spec(text) for text in args.env]
    stop_signal = execcmd.parse_signal(args.signal)
    grace = execcmd.parse_grace(args.grace)
    path = resolve_socket_path(args.socket, args.config, os.environ)
    if not args.restart_on_change:
        execcmd.exec_with_env(path, specs, argv, timeout=args.timeout, environ=os.environ)
    import logging

    import trio

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    exec_log = logging.getLogger("agentd.exec")
    exec_log.addHandler(handler)
    exec_log.propagate = False
    supervisor = execcmd.Supervisor(path, specs, argv, stop_signal=stop_signal, grace=grace)
    return trio.run(supervisor.run)


def _ago(when: Any, now: float) -> str:
    if not isinstance(when, (int, float)):
        return "-"
    delta = now - when
    word = "ago" if delta >= 0 else "from now"
    delta = abs(delta)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{delta / size:.1f}{unit} {word}"
    return f"{delta:.0f}s {word}"


def format_status(status: Mapping[str, Any], *, now: float) -> str:
    """``agentd status`` for people: upstream, auth, secrets, templates, recent errors."""
    up, auth = status.get("upstream", {}), status.get("auth", {})
    server = status.get("server", {})
    uptime = _ago(now - float(status.get("uptime", 0)), now).replace(" ago", "")
    shut_out = server.get("blocked_uids") or 0
    lines = [
        f"agentd {status.get('version')}  pid {status.get('pid')}  "
        f"{'ready' if status.get('ready') else 'NOT READY'}  up {uptime}",
        f"upstream  {up.get('address')}  {'up' if up.get('up') else 'DOWN'}  "
        f"requests {up.get('requests')}  errors {up.get('errors')}",
        f"auth      {auth.get('method')}  {auth.get('state')}  "
        f"token expires {_ago(auth.get('expires_at'), now) if auth.get('expires_at') else 'never'}",
        f"socket    connections {server.get('connections', 0)}  "
        f"refused {server.get('refused_connections', 0)}  "
        f"connect guard {'ready' if server.get('connect_guard') else 'off'}"
        + (f"  {shut_out} uid{'s' if shut_out > 1 else ''} shut out (storming; see the log)"
           if shut_out else ""),
        "",
        f"{'SECRET':<24} {'KIND':<7} {'VERSION':>7}  {'FETCHED':<14} {'STATE':<9} "
        f"{'FROM':<8} NEXT",
    ]
    errors: list[str] = []
    for name, s in sorted(status.get("secrets", {}).items()):
        if s.get("revoked"):
            state = "revoked"
        elif s.get("version") is None:
            state = "missing"
        else:
            state = "stale" if s.get("stale") else "ok"
        # where the served value came from, and the next upstream step and when it is due
        source = "-" if s.get("version") is None else (
            "snapshot" if s.get("from_snapshot") else "upstream")
        due = s.get("next_step_at", s.get("next_rotation"))
        step = f"{s['next_step']} " if s.get("next_step") and due is not None else ""
        lines.append(
            f"{name:<24} {s.get('kind', ''):<7} {s.get('version') or '-':>7}  "
            f"{_ago(s.get('fetched_at'), now):<14} {state:<9} {source:<8} "
            f"{step}{_ago(due, now)}"
        )
        if s.get("last_error"):
            errors.append(f"secret {name}: {s['last_error']}")
    templates = status.get("templates", {})
    if templates:
        lines += ["", f"{'TEMPLATE':<48} {'WRITES':>6} {'FAILS':>5}  LAST OK"]
        for target, t in sorted(templates.items()):
            lines.append(f"{target[-48:]:<48} {t.get('writes', 0):>6} {t.get('failures', 0):>5}"
                         f"  {_ago(t.get('last_ok_at'), now)}")
            for key in ("last_error", "last_command_error"):
                if t.get(key):
                    errors.append(f"template {target}: {t[key]}")
    for source, err in (("upstream", up.get("last_error")), ("auth", auth.get("last_error"))):
        if err:
            errors.append(f"{source}: {err}")
    denied = status.get("alerts", {}).get("policy_denied")
    if denied:
        errors.append(f"ALERT: upstream policy denies {', '.join(denied)} (served stale)")
    lines += ["", "recent errors:" if errors else "recent errors: none"]
    lines += [f"  {e}" for e in errors]
    return "\n".join(lines) + "\n"


def _client_command(args: argparse.Namespace) -> int:
    from agentd.client import Client, resolve_socket_path

    path = resolve_socket_path(args.socket, args.config, os.environ)
    with Client.connect(path, timeout=args.timeout) as client:
        if args.command == "get":
            if args.json:
                reply = client.call("get", name=args.name,
                                    **({"field": args.field} if args.field else {}))
                print(json.dumps(reply, sort_keys=True))
                return 0
            reply = client.get(args.name, args.field)
            value = reply["data"]
            if args.field is not None and isinstance(value, str):
                sys.stdout.write(value + "\n")
            elif isinstance(value, (bytes, bytearray)):
                sys.stdout.buffer.write(bytes(value))
            else:
                print(json.dumps(value, sort_keys=True))
            return 0
        if args.command == "list":
            for name in client.list():
                print(name)
            return 0
        if args.command == "status":
            status = client.status()
            if args.json:
                print(json.dumps(status, indent=2, sort_keys=True, default=str))
            else:
                sys.stdout.write(format_status(status, now=time.time()))
            return 0
        if args.command == "ping":
            client.ping()
            print("ok")
            return 0
    raise UsageError(f"unknown command {args.command}")
