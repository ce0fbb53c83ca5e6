"""``agentd render --dry-run``: what rendering the config would change, file by file.

Renders every output with values fetched through the caller's ``fetch`` (the CLI asks the running
agent's socket) in a worker of its own, and compares with what is on disk. Writes nothing; values
never leave ``dry_run``: its result holds paths, actions and reasons only.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentd.config import Config
from agentd.errors import AgentdError, RenderError
from agentd.frozen import thaw
from agentd.refs import paths_of, template_refs, upstream_reply
from agentd.render.files import owner_ids
from agentd.render.outputs import outputs_of
from agentd.render.pool import RenderWorker


@dataclass(frozen=True)
class PlannedChange:
    """What a render would do to one file. ``reason`` never holds a value."""

    path: str
    action: str          # "create" | "update" | "unchanged" | "error"
    reason: str


def _compare(path: Path, data: bytes, mode: int, uid: int, gid: int, *,
             bundle: bool = False) -> PlannedChange:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return PlannedChange(str(path), "create", f"missing; would write {len(data)} bytes")
    except OSError as exc:
        return PlannedChange(str(path), "error", f"cannot stat: {exc.strerror}")
    if stat.S_ISLNK(st.st_mode) and not bundle:
        return PlannedChange(str(path), "error", "the destination is a symlink: would refuse")
    try:
        current = path.read_bytes()
        st = path.stat()
    except OSError as exc:
        return PlannedChange(str(path), "error", f"cannot read: {exc.strerror}")
    reasons = []
    if current != data:
        reasons.append(f"content differs ({len(current)} -> {len(data)} bytes, values masked)")
    if stat.S_IMODE(st.st_mode) != mode:
        reasons.append(f"mode {stat.S_IMODE(st.st_mode):04o} -> {mode:04o}")
    if (st.st_uid, st.st_gid) != (uid, gid):
        reasons.append(f"owner {st.st_uid}:{st.st_gid} -> {uid}:{gid}")
    if reasons:
        return PlannedChange(str(path), "update", "; ".join(reasons))
    return PlannedChange(str(path), "unchanged", "identical")


async def dry_run(config: Config, fetch: Any) -> list[PlannedChange]:
    """What rendering ``config`` would change, file by file; nothing is written.

    ``fetch(name)`` is an async callable returning a secret's data (the CLI asks the running
    agent's socket, so the caller's own policies decide what it may see). Values never leave
    this function: the result holds paths, actions and reasons only. The worker it starts is
    closed before it returns.
    """
    plans: list[PlannedChange] = []
    worker = RenderWorker()
    try:
        for output in outputs_of(config):
            try:
                texts = output.texts()
                reader = output.config.reader
                go = reader.options(output.key) if reader.name == "go" else None
                by_path = paths_of(config.secrets)
                data: dict[str, Any] = {}
                for text in texts.values():
                    for name in template_refs(text, reader, by_path, template=output.key):
                        secret = config.secrets[name]
                        key = secret.path if go else name
                        if key not in data:
                            value = thaw(await fetch(name))
                            data[key] = upstream_reply(secret.kind, value, version=0) \
                                if go else value
                rendered = {n: await worker.render(t, data, go=go) for n, t in texts.items()}
            except (RenderError, AgentdError) as exc:
                plans.append(PlannedChange(output.key, "error", str(exc)))
                continue
            uid, gid = owner_ids(output.config.owner, output.config.group)
            modes, paths = output.modes(), output.paths()
            for name, out in rendered.items():
                plans.append(_compare(paths[name], out, modes[name], uid, gid,
                                      bundle=output.links))
    finally:
        await worker.aclose()
    return plans
