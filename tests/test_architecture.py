"""The house rules of docs/architecture.md, checked on the code as it is: imports run one way through the layers,
no two modules import each other (directly or round a loop), no module takes a private name from another, and
imports inside functions only keep an optional heavy dependency off the import path."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "shards", "engine", "evaluate", "portal", "launch")  # bottom to top
FOLDERS = [folder for folder in LAYERS if (ROOT / folder / "__init__.py").is_file()]
# Optional extras (setup.py) that a function may import where it needs them, so that `import rafmedia.<folder>`
# works without them and a missing one is a clear error naming the extra.
OPTIONAL_DEPENDENCIES = {"deepspeed", "nvidia", "submitit", "mpi4py", "peft"}
# Heavy and used by one command only: the web portal's stack (FastAPI, SQLAlchemy, Alembic, uvicorn, httpx) would add
# about 1.5 s to every other `raf` command; `launch/commands.py` loads it when `raf portal` runs.
DEFERRED_MODULES = {"rafmedia.launch.portal_commands"}


def module_files() -> dict[str, Path]:
    """rafmedia.<dotted name> -> file, for every module of the code folders."""
    files = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            files["rafmedia." + ".".join(parts)] = path
    return files


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (each one an import cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_layers_contract_of_import_linter_is_kept():
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-logo", "--no-cache",
                             str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "broken" not in result.stdout.split("Contracts:")[-1].replace("0 broken", "")


def test_no_module_imports_a_higher_layer():
    for name, path in module_files().items():
        layer = LAYERS.index(name.split(".")[1])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            imported = node.module if isinstance(node, ast.ImportFrom) and node.level == 0 else None
            names = [imported] if imported else [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for target in names:
                parts = (target or "").split(".")
                if parts[0] == "rafmedia" and len(parts) > 1 and parts[1] in LAYERS:
                    assert LAYERS.index(parts[1]) <= layer, f"{path.relative_to(ROOT)}:{node.lineno} imports {target}"


def test_no_import_cycles_between_modules_counting_imports_inside_functions():
    graph = grimp.build_graph(*[f"rafmedia.{folder}" for folder in FOLDERS])
    edges = {module: set(graph.find_modules_directly_imported_by(module)) for module in graph.modules
             if module.startswith("rafmedia.")}
    cycles = strongly_connected(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(cycle) for cycle in cycles)


def test_no_module_takes_a_private_name_from_another():
    offences = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("rafmedia."):
                offences += [f"{path.relative_to(ROOT)}:{node.lineno} takes {alias.name} from {node.module}"
                             for alias in node.names
                             if alias.name.startswith("_") and not alias.name.startswith("__") and node.module != name]
    assert not offences, "\n".join(offences)


def test_imports_inside_functions_only_keep_optional_dependencies_off_the_import_path_and_say_why():
    offences = []
    for path in module_files().values():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        functions = [node for node in ast.walk(ast.parse(source))
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in {id(n): n for f in functions for n in ast.walk(f)
                     if isinstance(n, (ast.Import, ast.ImportFrom))}.values():
            modules = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if any((module or "").split(".")[0] not in OPTIONAL_DEPENDENCIES and module not in DEFERRED_MODULES
                   for module in modules):
                offences.append(f"{where} imports {', '.join(map(str, modules))} inside a function: import it at the "
                                f"top (only the optional {sorted(OPTIONAL_DEPENDENCIES)} and "
                                f"{sorted(DEFERRED_MODULES)} may wait)")
            elif "#" not in lines[node.lineno - 1] and not lines[node.lineno - 2].strip().startswith("#"):
                offences.append(f"{where}: say in a comment why {modules[0]} is imported here")
    assert not offences, "\n".join(offences)


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(edges) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []
