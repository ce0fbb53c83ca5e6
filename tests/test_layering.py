"""The layering the README and docs/design.md claim, read from the code with ``ast``.

Nothing under agentd/ is imported here: each module's source is parsed and its imports collected,
so a rule holds for the code as written, whatever is already in ``sys.modules``.

The rules:

- ``agentd/protocol.py`` is a sans-IO core: neither it nor anything it imports (within agentd)
  imports trio, asyncio or socket-level modules.
- Only ``agentd/crypto.py`` imports ``cryptography``; only ``agentd/watch.py`` imports
  ``pyinotify``; h11 is imported only by ``agentd/transport.py`` (the upstream client) and
  ``agentd/metrics.py`` (its own small HTTP listener), nowhere else.
- The render worker (``agentd/render/worker.py``, run as a child process) does not load the
  cache, the config, crypto or trio, and of third-party code only msgpack and the template engine.
- ``agentd/devserver.py`` and ``agentd/demo.py`` use only the standard library (and the demo the
  dev server), so that the demo does not depend on the code it demonstrates.
- ``agentd/errors.py`` imports nothing from agentd: every module may raise its exceptions.
- No circle: no two modules of agentd import each other, directly or around a loop. Here every
  import counts, those for type checking and lazy ones too: they tie two modules' designs
  together as much as the others (a circle is where a name belongs in a third module).

What counts as an import: every ``import`` and ``from ... import`` in a module, at any depth
(also inside functions: they run when the function does), except those under
``if TYPE_CHECKING:`` and those inside a module-level ``__getattr__`` (PEP 562 lazy attributes),
which do not run when the module is loaded. Importing ``agentd.a.b`` runs ``agentd/__init__.py``
and ``agentd/a/__init__.py`` first, so a module's closure includes the ``__init__`` of every
package on the way.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "agentd"
STDLIB = frozenset(sys.stdlib_module_names)


# --- reading imports -----------------------------------------------------------------------------


def module_path(root: Path, name: str) -> Path | None:
    """The file of module ``name`` (``a.b`` -> ``a/b.py`` or ``a/b/__init__.py``) under ``root``."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.Module, *, every: bool = False
                  ) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, skipping TYPE_CHECKING blocks and PEP 562
    ``__getattr__`` (with ``every``: every import statement)."""
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if not every and isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        lazy = isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
        if not every and lazy and node in tree.body:
            continue
        todo.extend(ast.iter_child_nodes(node))


def direct_imports(root: Path, name: str, *, every: bool = False) -> set[str]:
    """The absolute names module ``name`` imports: ``import a.b`` gives ``a.b``; ``from a import
    b`` gives ``a.b`` when that is a module under ``root``, else ``a``; relative imports are
    resolved against the module's package. ``every``: TYPE_CHECKING and lazy imports too."""
    path = module_path(root, name)
    if path is None:
        raise FileNotFoundError(f"no module {name} under {root}")
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in _import_nodes(tree, every=every):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        if node.level:
            package = name.split(".") if is_package else name.split(".")[:-1]
            anchor = package[: len(package) - (node.level - 1)]
            base = ".".join([*anchor, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            found.add(sub if module_path(root, sub) else base)
    return found


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def closure(root: Path, start: str, package: str = PACKAGE) -> set[str]:
    """Every module that loading ``start`` loads: modules of ``package`` found under ``root``
    (followed, with their packages' ``__init__``), and the names of everything else imported
    on the way (recorded, not followed). ``start`` itself is included."""
    seen: set[str] = set()
    outside: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        for mod in _with_parents(name):
            if mod in seen:
                continue
            if mod.split(".")[0] != package or module_path(root, mod) is None:
                outside.add(mod)
                continue
            seen.add(mod)
            todo.extend(direct_imports(root, mod))
    return seen | outside


def top_level(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def importers(root: Path, library: str, package: str = PACKAGE) -> set[str]:
    """The modules of ``package`` that import ``library`` (or a submodule of it) directly."""
    found = set()
    for path in sorted((root / package).rglob("*.py")):
        name = module_name(root, path)
        if library in top_level(direct_imports(root, name)):
            found.add(name)
    return found


def circles(root: Path, package: str = PACKAGE) -> list[list[str]]:
    """The groups of modules of ``package`` that import each other around a loop (strongly
    connected, more than one module; a module importing itself is not counted), by imports of
    every kind, each group sorted."""
    names = sorted(module_name(root, path) for path in (root / package).rglob("*.py"))
    edges = {name: sorted(m for m in direct_imports(root, name, every=True)
                          if m in names and m != name) for name in names}
    # Tarjan's algorithm, iterative (the graph is small; recursion would do as well).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in names:
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        found.append(sorted(group))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(found)


# --- the rules -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    name: str
    check: Callable[[Path], list[str]]   # the violations in the tree at root; [] when it holds


def only_importers(library: str, allowed: set[str]) -> Rule:
    def check(root: Path) -> list[str]:
        found = importers(root, library)
        problems = [f"{mod} imports {library} (only {sorted(allowed)} may)"
                    for mod in sorted(found - allowed)]
        if not found & allowed:
            problems.append(f"none of {sorted(allowed)} imports {library}: the rule is stale")
        return problems

    return Rule(f"only {', '.join(sorted(allowed))} import {library}", check)


def closure_excludes(module: str, forbidden: set[str], why: str) -> Rule:
    def check(root: Path) -> list[str]:
        if module_path(root, module) is None:
            return [f"{module} does not exist"]
        loaded = closure(root, module)
        return [f"{module} loads {name} ({why})" for name in sorted(forbidden)
                if name in loaded or name in top_level(loaded)]

    return Rule(f"{module} loads none of {', '.join(sorted(forbidden))}", check)


def third_party_only(module: str, allowed: set[str], why: str) -> Rule:
    def check(root: Path) -> list[str]:
        if module_path(root, module) is None:
            return [f"{module} does not exist"]
        outside = top_level(closure(root, module)) - STDLIB - {PACKAGE}
        return [f"{module} loads {name} ({why})" for name in sorted(outside - allowed)]

    return Rule(f"{module} loads no third-party code but {sorted(allowed)}", check)


def imports_only(module: str, allowed_internal: set[str], why: str) -> Rule:
    def check(root: Path) -> list[str]:
        if module_path(root, module) is None:
            return [f"{module} does not exist"]
        internal = {m for m in direct_imports(root, module) if top_level({m}) == {PACKAGE}}
        return [f"{module} imports {name} ({why})"
                for name in sorted(internal - allowed_internal - {PACKAGE})]

    return Rule(f"{module} imports from agentd only {sorted(allowed_internal)}", check)


SOCKET_LEVEL = {"trio", "anyio", "asyncio", "socket", "ssl", "selectors"}
WORKER = "agentd.render.worker"

PROTOCOL_IS_SANS_IO = closure_excludes("agentd.protocol", SOCKET_LEVEL, "the core is sans-IO")
CRYPTOGRAPHY = only_importers("cryptography", {"agentd.crypto"})
PYINOTIFY = only_importers("pyinotify", {"agentd.watch"})
H11 = only_importers("h11", {"agentd.transport", "agentd.metrics"})
WORKER_OPENS_NO_CACHE = closure_excludes(
    WORKER, {"agentd.cache", "agentd.config", "agentd.crypto", "trio"},
    "the sandboxed worker renders templates and opens nothing else",
)
WORKER_THIRD_PARTY = third_party_only(
    WORKER, {"msgpack", "jinja2", "markupsafe"}, "the worker needs msgpack and the engines only")
DEMO_STDLIB = third_party_only("agentd.demo", set(), "the demo does not depend on the code it "
                               "demonstrates")
DEMO_INTERNAL = imports_only("agentd.demo", {"agentd.devserver"}, "the demo runs agentd as a "
                             "child process, through its CLI")
DEVSERVER = imports_only("agentd.devserver", set(), "shared with the tests: stdlib only")
DEVSERVER_STDLIB = third_party_only("agentd.devserver", set(), "shared with the tests")
ERRORS_IS_A_LEAF = imports_only("agentd.errors", set(), "every module raises its exceptions")
NO_CIRCLE = Rule("no modules of agentd import each other around a loop",
                 lambda root: [f"a circle: {' -> '.join(group)}" for group in circles(root)])

RULES = [PROTOCOL_IS_SANS_IO, CRYPTOGRAPHY, PYINOTIFY, H11, DEMO_STDLIB, DEMO_INTERNAL,
         DEVSERVER, DEVSERVER_STDLIB, ERRORS_IS_A_LEAF, NO_CIRCLE]
WORKER_RULES = [WORKER_OPENS_NO_CACHE, WORKER_THIRD_PARTY]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_layering_rule_holds(rule: Rule) -> None:
    assert rule.check(ROOT) == []


@pytest.mark.parametrize("rule", WORKER_RULES, ids=lambda r: r.name)
def test_render_worker_loads_no_cache(rule: Rule) -> None:
    assert rule.check(ROOT) == []


# --- the machinery itself, on small synthetic trees ----------------------------------------------


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_closure_follows_absolute_relative_and_package_imports(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {
        "agentd/__init__.py": '"""pkg"""\n',
        "agentd/a.py": "from agentd import b\nimport agentd.sub.c\n",
        "agentd/b.py": "import msgpack\nfrom agentd.errors import Oops\n",
        "agentd/errors.py": "class Oops(Exception): ...\n",
        "agentd/sub/__init__.py": "from .helper import x\n",
        "agentd/sub/helper.py": "import socket\nx = 1\n",
        "agentd/sub/c.py": "from . import d\nfrom ..e import y\n"
                           "def later():\n    import ssl\n",
        "agentd/sub/d.py": "",
        "agentd/e.py": "import os.path\ny = 2\n",
        "agentd/unrelated.py": "import trio\n",
    })
    assert closure(root, "agentd.a") == {
        "agentd", "agentd.a", "agentd.b", "agentd.errors", "agentd.sub", "agentd.sub.helper",
        "agentd.sub.c", "agentd.sub.d", "agentd.e", "msgpack", "socket", "ssl", "os", "os.path",
    }
    assert direct_imports(root, "agentd.a") == {"agentd.b", "agentd.sub.c"}
    assert direct_imports(root, "agentd.b") == {"msgpack", "agentd.errors"}
    assert "trio" not in closure(root, "agentd.a")


def test_closure_skips_type_checking_and_lazy_getattr(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {
        "agentd/__init__.py": "",
        "agentd/render/__init__.py": (
            "def __getattr__(name):\n    from agentd.render.service import Renderer\n"
            "    return Renderer\n"
        ),
        "agentd/render/service.py": "import trio\nfrom agentd import cache\n",
        "agentd/render/worker.py": (
            "from typing import TYPE_CHECKING\nimport msgpack\nimport jinja2\n"
            "if TYPE_CHECKING:\n    from agentd.config import Config\nelse:\n    import json\n"
        ),
        "agentd/cache.py": "",
        "agentd/config.py": "",
    })
    assert closure(root, "agentd.render.worker") == {
        "agentd", "agentd.render", "agentd.render.worker", "typing", "msgpack", "jinja2", "json",
    }
    for rule in WORKER_RULES:
        assert rule.check(root) == []


BAD_TREES: dict[str, dict[str, str]] = {
    # the protocol reaches trio through a module it imports
    PROTOCOL_IS_SANS_IO.name: {
        "agentd/protocol.py": "from agentd.errors import E\n",
        "agentd/errors.py": "import trio\nclass E(Exception): ...\n",
    },
    CRYPTOGRAPHY.name: {
        "agentd/crypto.py": "import cryptography\n",
        "agentd/kinds/pki.py": "from cryptography import x509\n",
    },
    PYINOTIFY.name: {"agentd/watch.py": "import trio\n"},   # stale: nobody imports it
    H11.name: {"agentd/transport.py": "import h11\n", "agentd/server.py": "import h11\n"},
    # the package __init__ pulls the service (and the cache) into the worker
    WORKER_OPENS_NO_CACHE.name: {
        "agentd/render/__init__.py": "from agentd.render.service import Renderer\n",
        "agentd/render/service.py": "from agentd.cache import Cache\n",
        "agentd/render/worker.py": "import msgpack\n",
        "agentd/cache.py": "",
    },
    WORKER_THIRD_PARTY.name: {
        "agentd/render/__init__.py": "", "agentd/render/worker.py": "import prometheus_client\n"},
    DEMO_STDLIB.name: {"agentd/demo.py": "import httpx\n"},
    DEMO_INTERNAL.name: {"agentd/demo.py": "from agentd.client import Client\n",
                         "agentd/client.py": ""},
    DEVSERVER.name: {"agentd/devserver.py": "from agentd import errors\n", "agentd/errors.py": ""},
    DEVSERVER_STDLIB.name: {"agentd/devserver.py": "import requests\n"},
    ERRORS_IS_A_LEAF.name: {"agentd/errors.py": "from agentd.config import Config\n",
                            "agentd/config.py": ""},
    # three modules around a loop, one of its links only for type checking
    NO_CIRCLE.name: {
        "agentd/a.py": "from agentd.b import x\n",
        "agentd/b.py": "from agentd import c\nx = 1\n",
        "agentd/c.py": "from typing import TYPE_CHECKING\n"
                       "if TYPE_CHECKING:\n    from agentd.a import y\n",
    },
}


@pytest.mark.parametrize("rule", RULES + WORKER_RULES, ids=lambda r: r.name)
def test_each_rule_can_fail(rule: Rule, tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"agentd/__init__.py": "", **BAD_TREES[rule.name]})
    assert rule.check(root), f"{rule.name} found nothing wrong in a tree that breaks it"
