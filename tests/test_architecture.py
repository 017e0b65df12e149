"""The import graph: no cycles, and imports point one way:
shared constants/manifest <- compile, schedules <- runtime <- bench <- interface <- cli (compile's build
driver and attention op call into schedules; schedules never import compile)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("compile", "schedules", "runtime", "bench")  # folders mapped onto mlc_magicdec.<name>
SHARED = ("constants", "errors", "fileio", "hashing", "manifest", "texts", "tvm_loading")  # TVM-free modules
# what each layer may import, besides itself and the shared modules
ALLOWED = {
    "shared": set(),
    "schedules": set(),
    "compile": {"schedules"},
    "runtime": {"compile", "schedules"},
    "bench": {"compile", "schedules", "runtime"},
    "interface": {"compile", "schedules", "runtime", "bench"},
    "cli": {"compile", "schedules", "runtime", "bench", "interface"},
}


def _module_files() -> dict[str, Path]:
    roots = [(REPO / "mlc_magicdec", ("mlc_magicdec",))]
    roots += [(REPO / package, ("mlc_magicdec", package)) for package in PACKAGES]
    files = {}
    for folder, prefix in roots:
        for path in folder.rglob("*.py"):
            name = ".".join((*prefix, *path.relative_to(folder).with_suffix("").parts))
            files[name.removesuffix(".__init__")] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """``module -> project modules it imports`` (every import statement, lazy ones included)."""
    files = _module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = {t for t in targets if t in files and t not in (name, "mlc_magicdec")}
    return graph


def layer(module: str) -> str:
    part = module.split(".")[1] if module.count(".") else ""
    if part in SHARED:
        return "shared"
    return part if part in ALLOWED else "cli"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the packages
    assert cycles(graph) == []


def test_imports_point_one_way():
    wrong = [f"{m} -> {d}" for m, deps in sorted(import_graph().items()) for d in sorted(deps)
             if layer(d) != layer(m) and layer(d) != "shared" and layer(d) not in ALLOWED[layer(m)]]
    assert wrong == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_shared_modules_do_not_import_tvm():
    names = ", ".join(f"mlc_magicdec.{m}" for m in SHARED)
    code = f"import sys, {names}; assert 'tvm' not in sys.modules, 'tvm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_command_line_parses_without_tvm():
    """``mlc-magicdec --help`` (and every parse error) answers without loading TVM: commands import their
    work lazily."""
    code = "import sys, mlc_magicdec.cli; assert 'tvm' not in sys.modules, 'tvm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
