"""What the render package's modules import: the worker child and the file routines stay light.

Read from real processes: the worker is started exactly as ``RenderWorker`` starts it
(``python -m agentd.render.worker``) under ``-X importtime``, which names every module the
interpreter imported; the file routines are imported the way the key file code imports them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agentd.config import TemplateConfig
from agentd.render.outputs import TemplateOutput
from agentd.render.target import TRANSITIONS, Target, TargetState

HEAVY = ("trio", "cryptography", "agentd.config", "agentd.cache", "agentd.crypto")


def _imported(args: list[str]) -> set[str]:
    out = subprocess.run([sys.executable, "-X", "importtime", *args], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60, check=True)
    return {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_the_worker_child_imports_msgpack_jinja2_and_pure_agentd_modules_only() -> None:
    modules = _imported(["-m", "agentd.render.worker"])        # stdin at EOF: it exits at once
    assert {"msgpack", "jinja2.sandbox"} <= modules     # (the worker itself runs as __main__)
    assert _heavy(modules) == []
    assert sorted(m for m in modules if m.startswith("agentd")) == [
        "agentd", "agentd.errors", "agentd.frozen", "agentd.hardening", "agentd.jsonnum",
        "agentd.render"]


def test_the_file_routines_import_neither_trio_nor_the_config() -> None:
    modules = _imported(["-c", "import agentd.render.files"])
    assert _heavy(modules) == []


def test_crypto_uses_the_file_routines_without_trio_or_the_renderer() -> None:
    modules = _imported(["-c", "import agentd.crypto"])
    assert "agentd.render.files" in modules
    assert [m for m in _heavy(modules) if not m.startswith(("cryptography", "agentd.crypto"))] \
        == []
    assert "agentd.render.service" not in modules


def test_a_target_moves_only_along_the_declared_transitions(tmp_path: Path) -> None:
    target = Target(config=TemplateConfig(destination=tmp_path / "f", contents="x"))
    assert target.state is TargetState.IDLE and isinstance(target.output, TemplateOutput)
    for state in (TargetState.RENDERING, TargetState.WRITING, TargetState.WRITING_RECHECK,
                  TargetState.WRITING_RECHECK, TargetState.RENDERING, TargetState.IDLE):
        target.to(state)
    with pytest.raises(RuntimeError, match="cannot go from IDLE to WRITING"):
        target.to(TargetState.WRITING)
    assert set(TRANSITIONS) == set(TargetState)
