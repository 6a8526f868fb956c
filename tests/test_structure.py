"""The package's shape: a light config and CLI, and no import circles at any depth."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "oodscale"
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
