"""The package's import rules that import-linter (pyproject.toml, ``make lint``) cannot state:
no import cycle, no private name across modules, imports inside functions only where they defer a
heavy library, and notebooks that call only the public names of the package and its subpackages."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import pytest

from twotower.config import PROJECT_ROOT

pytestmark = pytest.mark.unit

PACKAGE = PROJECT_ROOT / "twotower"
# Libraries whose import costs seconds or starts machinery (TensorFlow, Merlin, Feast, FAISS,
# gRPC, Dask, plotting): a module may import a module of its own package inside a function only
# to put these off until the function runs.
HEAVY = {"tensorflow", "merlin", "nvtabular", "feast", "faiss", "tritonclient", "matplotlib", "dask", "distributed"}
HEAVY |= {"scipy", "grpc"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


class Import:
    def __init__(self, module: str, name: str | None, line: int, in_function: bool):
        self.module, self.name, self.line, self.in_function = module, name, line, in_function

    @property
    def target(self) -> str | None:
        """The package module this import loads (``from pkg import submodule`` loads the submodule)."""
        dotted = f"{self.module}.{self.name}" if self.name else self.module
        if dotted in MODULES:
            return dotted
        return self.module if self.module in MODULES else None


def imports_of(module: str) -> list[Import]:
    """Every import that runs (those under ``if TYPE_CHECKING:`` never do)."""
    found: list[Import] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.extend(Import(child.module, alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.Import):
                found.extend(Import(alias.name, None, child.lineno, in_function) for alias in child.names)
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(MODULES[module].read_text()), False)
    return found


IMPORTS = {module: imports_of(module) for module in MODULES}


def package_parents(module: str) -> list[str]:
    """The packages whose ``__init__`` runs before ``module``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES]


def libraries_loaded(module: str, seen: set[str] | None = None) -> set[str]:
    """Top-level names of the third-party and standard libraries that importing ``module`` loads."""
    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    libraries: set[str] = set()
    for parent in package_parents(module):
        libraries |= libraries_loaded(parent, seen)
    for entry in IMPORTS[module]:
        if entry.in_function:
            continue
        if entry.module.split(".")[0] == "twotower":
            if entry.target:
                libraries |= libraries_loaded(entry.target, seen)
        else:
            libraries.add(entry.module.split(".")[0])
    return libraries


def test_the_package_has_no_import_cycle():
    graph = {m: {e.target for e in IMPORTS[m] if e.target and e.target != m} for m in MODULES}
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(cycles)


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{module}:{e.line} imports {e.name} from {e.module}"
        for module, entries in IMPORTS.items()
        for e in entries
        if e.module.startswith("twotower") and e.name and e.name.startswith("_")
    ]
    assert not private, "\n".join(private)


def test_imports_inside_functions_only_defer_heavy_libraries():
    misplaced = []
    for module, entries in IMPORTS.items():
        at_top = {e.target for e in entries if not e.in_function}
        already = libraries_loaded(module)
        for e in entries:
            if not e.in_function or not e.target:
                continue
            if e.target in at_top:
                misplaced.append(f"{module}:{e.line} imports {e.target} inside a function and at the top")
            elif not (libraries_loaded(e.target) & HEAVY) - already:
                misplaced.append(f"{module}:{e.line} imports {e.target} inside a function, deferring no heavy library")
    assert not misplaced, "\n".join(misplaced)


def notebook_imports() -> list[tuple[str, str, list[str]]]:
    found = []
    for path in sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        lines = [line for cell in cells if cell["cell_type"] == "code" for line in "".join(cell["source"]).splitlines()]
        python = "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))  # IPython magics
        for node in ast.walk(ast.parse(python)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twotower"):
                found.append((path.name, node.module, [alias.name for alias in node.names]))
    return found


def test_notebooks_call_only_the_public_names():
    assert notebook_imports(), "no notebook imports the package"
    for notebook, module, names in notebook_imports():
        # the package, a module at its top (config, pipeline, notebooks) or a subpackage's public face
        assert module.count(".") <= 1, f"{notebook}: from {module} import ... reaches inside a subpackage"
        public = importlib.import_module(module)
        for name in names:
            is_submodule = f"{module}.{name}" in MODULES  # e.g. twotower.pipeline, twotower.models.base
            exported = getattr(public, "__all__", dir(public))
            assert is_submodule or name in exported, f"{notebook}: {module}.{name} is not public"
