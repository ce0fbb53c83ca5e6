"""Templates and bundles: sandboxed render, atomic file and bundle writes, change commands.

One module per job (decision 8)::

    worker.py    the sandboxed child (``python -m agentd.render.worker``): msgpack + Jinja2 only
    pool.py      RenderWorker, the parent side: pipelined requests, kill on timeout
    files.py     the one atomic-write and bundle-swap implementation (also snapshot, metrics,
                 key files); no trio, no config
    outputs.py   Output: TemplateOutput and BundleOutput, looked up by config type
    service.py   Renderer: every target's task, its inputs, batched writes
    target.py    Target: one template or bundle, its explicit TargetState, its status
    commands.py  change commands: debounce, timeout, kill
    dryrun.py    ``agentd render --dry-run``

This package module stays light: the names below are imported from their module on first use,
so that ``import agentd.render.files`` (crypto, snapshot) and the worker child do not pull in
trio, the config or the cache.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentd.errors import RenderError
    from agentd.refs import secret_refs
    from agentd.render.dryrun import PlannedChange, dry_run
    from agentd.render.files import (
        DATA,
        DATA_TMP,
        TMP_MARK,
        FileWrite,
        bundle_current,
        check_dir,
        clean_bundle,
        clean_temps,
        create_file,
        open_dir,
        remove_version,
        replace_file,
        write_bundle,
        write_file,
        write_files,
    )
    from agentd.render.pool import RenderWorker
    from agentd.render.service import Renderer
    from agentd.render.target import Target, TargetState, TargetStatus

_WHERE = {
    "RenderError": "agentd.errors",
    "secret_refs": "agentd.refs",
    "PlannedChange": "agentd.render.dryrun",
    "dry_run": "agentd.render.dryrun",
    **dict.fromkeys(["DATA", "DATA_TMP", "TMP_MARK", "FileWrite", "bundle_current", "check_dir",
                     "clean_bundle", "clean_temps", "create_file", "open_dir", "remove_version",
                     "replace_file", "write_bundle", "write_file", "write_files"],
                    "agentd.render.files"),
    "RenderWorker": "agentd.render.pool",
    "Renderer": "agentd.render.service",
    **dict.fromkeys(["Target", "TargetState", "TargetStatus"], "agentd.render.target"),
}

__all__ = [
    "DATA",
    "DATA_TMP",
    "TMP_MARK",
    "FileWrite",
    "PlannedChange",
    "RenderError",
    "RenderWorker",
    "Renderer",
    "Target",
    "TargetState",
    "TargetStatus",
    "bundle_current",
    "check_dir",
    "clean_bundle",
    "clean_temps",
    "create_file",
    "dry_run",
    "open_dir",
    "remove_version",
    "replace_file",
    "secret_refs",
    "write_bundle",
    "write_file",
    "write_files",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
