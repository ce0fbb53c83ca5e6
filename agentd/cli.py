"""The ``agentd`` command: a thin argparse front over the daemon and the client.

Every AgentdError becomes one line on stderr and its exit code (0 ok, 1 runtime failure, 2 usage or
config error); no traceback reaches the user for an error we expected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from agentd import __version__
from agentd.errors import AgentdError, ConfigError, RequestError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 itself; keep our one-line style
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agentd", description="Per-host secrets agent for OpenBao and Vault.")
    parser.add_argument("--version", action="version", version=f"agentd {__version__}")
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
    p = sub.add_parser("ping", help="check that the agent answers")
    with_socket(p)
    p = sub.add_parser("demo", add_help=False,
                       help="run a local OpenBao dev server and the agent end to end")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


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
    return _client_command(args)


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
            print(json.dumps(client.status(), indent=2, sort_keys=True, default=str))
            return 0
        if args.command == "ping":
            client.ping()
            print("ok")
            return 0
    raise UsageError(f"unknown command {args.command}")
