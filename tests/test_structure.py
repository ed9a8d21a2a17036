"""The shape of the source tree: no import cycles, a small top level, and function-level imports that say why.

Modules are found from ``pyproject.toml``'s ``package-dir`` (``apb/``, and ``parallel/`` and
``kernels/`` installed as ``apb.parallel`` and ``apb.kernels``) and read with :mod:`ast`, so
nothing is imported and every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser under its PyPI name
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL_FILES = {"__init__.py", "__main__.py", "config.py", "engine.py", "batch.py"}


def _package_dirs() -> dict[str, Path]:
    """Top-level package name -> source folder, from pyproject's package-dir (``apb.parallel`` -> parallel/)."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: REPO / folder for name, folder in table.items()}


def _modules() -> dict[str, Path]:
    """Every project module by dotted name; a package is its ``__init__``."""
    out: dict[str, Path] = {}
    for pkg, folder in _package_dirs().items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _under_type_checking(tree: ast.AST) -> set[int]:
    """ids of import nodes inside ``if TYPE_CHECKING:`` (never executed, so never part of a cycle)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _project_imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import in the file, at any depth.

    ``from apb.x import y`` is an import of ``apb.x.y`` when that is a module, else of ``apb.x``
    (whose ``__init__`` defines ``y``). Importing ``apb.x.y`` is not counted as importing the
    parents' ``__init__`` files: every module would then depend on ``apb/__init__.py``.
    """
    tree = ast.parse(path.read_text(), str(path))
    skip = _under_type_checking(tree)
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub if sub in modules else base, node.lineno))
    return [(m, line) for m, line in found if m in modules and m != name]


def _graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    where: dict[tuple[str, str], str] = {}
    for name, path in modules.items():
        for target, line in sorted(_project_imports(name, path, modules), key=lambda x: x[1]):
            graph[name].add(target)
            where.setdefault((name, target), f"{path.relative_to(REPO)}:{line}")
    return graph, where


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan): the modules caught in cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def _shortest_cycle(graph: dict[str, set[str]], start: str, comp: set[str]) -> list[str]:
    """A shortest closed path from ``start`` back to itself inside its component (breadth-first)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A shortest cycle through every module caught in one, each cycle listed once (from its first module)."""
    found: dict[tuple[str, ...], list[str]] = {}
    for comp in _components(graph):
        for module in sorted(comp):
            cycle = _shortest_cycle(graph, module, comp)[:-1]
            i = cycle.index(min(cycle))
            canon = cycle[i:] + cycle[:i]
            found.setdefault(tuple(canon), canon + canon[:1])
    return sorted(found.values())


def test_cycle_finder_finds_a_registration_cycle():
    graph = {"apb.m": {"apb.m.full", "apb.m.base"}, "apb.m.full": {"apb.m", "apb.m.base"}, "apb.m.base": set(),
             "apb.a": {"apb.b"}, "apb.b": {"apb.c"}, "apb.c": {"apb.a"}, "apb.d": {"apb.a"}}
    assert _cycles(graph) == [["apb.a", "apb.b", "apb.c", "apb.a"], ["apb.m", "apb.m.full", "apb.m"]]


def test_modules_come_from_the_package_dir_mapping():
    modules = _modules()
    assert modules["apb.parallel.comm"] == REPO / "parallel" / "comm.py"
    assert modules["apb.kernels"] == REPO / "kernels" / "__init__.py"
    assert modules["apb.engine"] == REPO / "apb" / "engine.py"


def test_no_import_cycles():
    graph, where = _graph()
    cycles = _cycles(graph)
    lines = [" -> ".join(c) + "\n    " + "\n    ".join(f"{a} imports {b} at {where[a, b]}" for a, b in zip(c, c[1:]))
             for c in cycles]
    assert not cycles, f"{len(cycles)} import cycle(s) among the project's modules:\n" + "\n".join(lines)


def test_top_level_holds_only_the_entry_points():
    extra = sorted(p.name for p in (REPO / "apb").glob("*.py") if p.name not in TOP_LEVEL_FILES)
    assert not extra, (f"apb/ should hold only {sorted(TOP_LEVEL_FILES)} at its top level; move "
                       f"{extra} into the role folder they belong to (model, methods, runtime, tools, cli)")


def _comment_lines(source: str) -> set[int]:
    return {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}


def _function_level_imports(path: Path) -> list[ast.stmt]:
    tree = ast.parse(path.read_text(), str(path))
    return sorted({id(n): n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}.values(),
                  key=lambda n: n.lineno)


def _uncommented_function_imports() -> tuple[int, list[str]]:
    """(how many function-level imports there are, those without a comment saying why).

    The comment sits on the import's own line(s) or on the line above; a comment above a run of
    consecutive imports covers the whole run.
    """
    total, bad = 0, []
    for path in sorted(_modules().values()):
        source = path.read_text()
        comments = _comment_lines(source)
        imports = _function_level_imports(path)
        import_lines = {ln for n in imports for ln in range(n.lineno, n.end_lineno + 1)}
        total += len(imports)
        for n in imports:
            above = n.lineno - 1
            while above in import_lines and above not in comments:
                above -= 1
            if not comments & set(range(n.lineno, n.end_lineno + 1)) and above not in comments:
                text = source.splitlines()[n.lineno - 1].strip()
                bad.append(f"{path.relative_to(REPO)}:{n.lineno}: {text}")
    return total, bad


def test_function_level_imports_say_why():
    total, bad = _uncommented_function_imports()
    assert not bad, (f"{len(bad)} of {total} imports inside functions have no comment saying why they are not at the "
                     "top of the module (a cycle, an optional or heavy dependency, a worker-only library); add one on "
                     "the line or just above, or move the import up:\n" + "\n".join(bad))
