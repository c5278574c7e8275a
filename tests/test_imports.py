"""The package's import graph has no cycle: every ``import`` in ``adacache_fx/``, the ones inside
functions included, read from the source (an AST walk), so that a cycle dodged by a
function-level import still counts. The layering is trace -> analyse -> rewrite -> compile ->
guard; a module importing a later stage's module is what makes cycles."""
from __future__ import annotations

import ast
import pathlib

import adacache_fx

PACKAGE = pathlib.Path(adacache_fx.__file__).parent


def _modules(root: pathlib.Path) -> dict:
    """``{dotted module name: (path, is a package __init__)}``."""
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_init else parts)] = (path, is_init)
    return out


def import_graph(root: pathlib.Path = PACKAGE) -> dict:
    """``{module: {modules it imports}}`` within the package (an imported name resolves to the
    most specific module that exists: ``from .x import y`` is module ``x.y`` or else ``x``)."""
    modules = _modules(root)

    def resolve(name: str):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {name: set() for name in modules}
    for name, (path, is_init) in modules.items():
        package = name if is_init else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                found = resolve(target) if target.startswith(root.name) else None
                if found is not None and found != name:
                    edges[name].add(found)
    return edges


def cycles(edges: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_walk_sees_function_level_imports(tmp_path):
    """The walk is not blind to a cycle dodged by an import inside a function."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from .a import other\n")
    (pkg / "c.py").write_text("from . import a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_the_pipeline_folders():
    """The layout the design card names: the passes (analysis, rewrite) and the Triton kernels."""
    for folder in ("passes/analysis", "passes/rewrite", "triton_kernels", "compile", "runtime"):
        assert (PACKAGE / folder / "__init__.py").exists(), folder
