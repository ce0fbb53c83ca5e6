"""Repository rules that no other test would notice breaking.

- The README keeps the two quick-start commands, and its relative links point at real files.
- CI's entry point is executable and runs ``make test``.
- Every module under agentd/ has a docstring (STYLE.md: a newcomer can name each module's job).
- Only the CLI and the demo print: everything else logs (JSON on stderr) or returns values, so a
  stray ``print`` can never put a secret on a terminal or into a journal.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "agentd"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAY_PRINT = {"cli.py", "demo.py"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_readme_has_the_two_quick_start_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make demo" in readme
    assert "make test" in readme


def test_readme_relative_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    assert local, "the README links to nothing under the repository"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_ci_entry_point_is_executable_and_runs_make_test() -> None:
    run = ROOT / ".ci" / "run"
    assert run.is_file()
    assert os.access(run, os.X_OK), ".ci/run must be executable: chmod +x .ci/run"
    lines = [line.split("#", 1)[0].strip() for line in run.read_text().splitlines()]
    assert any(re.match(r"^(exec\s+)?make\s+(\S+=\S+\s+)*test(\s|$)", line) for line in lines), (
        ".ci/run must call `make test`"
    )
    assert any("set -euo pipefail" in line for line in lines)


def test_package_has_modules() -> None:
    assert (PACKAGE / "__init__.py") in MODULES


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_every_module_has_a_docstring(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    docstring = ast.get_docstring(tree)
    assert docstring and docstring.strip(), f"{_rel(path)} has no module docstring"


@pytest.mark.parametrize(
    "path", [p for p in MODULES if p.name not in MAY_PRINT or p.parent != PACKAGE], ids=_rel
)
def test_no_print_outside_cli_and_demo(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    calls = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Name) and node.func.id == "print")
            or (isinstance(node.func, ast.Attribute) and node.func.attr == "print"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "builtins")
        )
    ]
    assert not calls, f"{_rel(path)} calls print() on line(s) {calls}: log instead"
