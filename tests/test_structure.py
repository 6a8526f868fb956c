"""The package's shape: a light config and CLI, and no import circles at any depth."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

PACKAGE = REPO / "oodscale"
TESTS = REPO / "tests"
HEAVY = ("torch", "pytorch_metric_learning", "webdataset", "diffusers")


def _heavy_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after running `code`."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_config_and_help_import_nothing_heavy():
    assert _heavy_after("from oodscale.config import load_config\n"
                        "load_config('configs/fashion.yaml')") == []
    assert _heavy_after("from oodscale.cli import main\n"
                        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass") == []


def test_config_docs_import_nothing_heavy():
    """`make docs` renders the defaults table from the config alone."""
    assert _heavy_after("from oodscale.config_docs import render_table\n"
                        "render_table('configs/digits.yaml')") == []


def test_status_imports_nothing_heavy(tmp_path):
    """`oodscale status` reads manifests and cards only, here of an empty root."""
    assert _heavy_after("from oodscale.cli import main\n"
                        f"assert main(['status', 'configs/digits.yaml', "
                        f"'storage.root={tmp_path}']) == 0") == []


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """Every module of the package that `tree` imports, at any depth (inside functions too);
    imports under `if TYPE_CHECKING:` never run, so they do not count."""
    skipped = {id(n) for node in ast.walk(tree)
               if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
               for body in node.body for n in ast.walk(body)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            submodules = {f"{node.module}.{a.name}" for a in node.names}
            found.update(submodules if submodules <= modules else
                         {node.module} & modules)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, as the modules around it, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_has_no_import_circle():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(ast.parse(path.read_text()), set(files)) - {name}
             for name, path in files.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _test_modules_imported(tree: ast.Module, test_modules: set[str]) -> set[str]:
    """The modules of `test_modules` (stems of tests/test_*.py) that `tree` imports, however
    spelt: `tests.test_x`, a bare `test_x` (pytest's rootdir on sys.path) or relative `.test_x`."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names = [base, *(f"{base}.{a.name}".lstrip(".") for a in node.names)]
        else:
            continue
        found.update(first for name in names
                     if (first := name.removeprefix("tests.").split(".")[0]) in test_modules)
    return found


def test_no_test_module_imports_another():
    """Tests share code through helper modules (support.py, faults.py, kustomize.py, ...) and
    conftest.py's fixtures: a test module imported by another runs twice under two names, and
    ties one module's tests to another's internals."""
    test_modules = {p.stem for p in TESTS.glob("test_*.py")}
    found = {p.name: sorted(_test_modules_imported(ast.parse(p.read_text()), test_modules)
                            - {p.stem})
             for p in sorted(TESTS.glob("*.py"))}
    assert {name: hits for name, hits in found.items() if hits} == {}, (
        "move what they share into a helper module of tests/ (not test_*.py) or a fixture")


def test_the_test_import_finder_sees_every_spelling():
    tree = ast.parse("from tests.test_a import x\nimport tests.test_b\nfrom tests import test_c\n"
                     "from .test_d import y\nfrom . import test_e\nfrom test_f import z\n"
                     "import test_g as g\nfrom tests.support import CONFIG\n"
                     "from oodscale import test_h\n")
    modules = {f"test_{c}" for c in "abcdefgh"}
    assert _test_modules_imported(tree, modules) == modules - {"test_h"}
