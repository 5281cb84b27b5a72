"""The packages stand on each other in one direction: app -> core, worker -> core, core -> model, and model
on nothing of ours. Never back: app and worker never import each other, core imports neither, and no
module imports one that imports it back. Serving never loads the training loop."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "core", "app", "worker")
# What each package may import of ours (besides itself).
ALLOWED = {
    "model": set(),
    "core": {"model"},
    "app": {"core", "model"},
    "worker": {"core", "model"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(path): path for path in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path, module: str, known: set[str], module_level_only: bool) -> set[str]:
    """The project modules ``path`` (the module ``module``) imports: at its top level only, or anywhere."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # imports inside top-level if/try blocks run at import time too
        nodes = [n for statement in tree.body if not _is_definition(statement) for n in ast.walk(statement)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    ours = set()
    for name in found:
        while name and name not in known:  # `import a.b.c` of a module a.b: the module a.b
            name = name.rpartition(".")[0]
        if name and name != module:
            ours.add(name)
    return ours


def _is_definition(node: ast.stmt) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    every = {name: path for package in PACKAGES for name, path in modules(package).items()}
    known = set(every)
    return {name: imports(path, name, known, module_level_only) for name, path in every.items()}


def layer_violations(graph: dict[str, set[str]], package: str | None = None) -> list[str]:
    """``"<module> imports <module>"`` for each import against the layers (of ``package``'s modules only)."""
    wrong = []
    for module, targets in sorted(graph.items()):
        layer = module.split(".")[0]
        if package not in (None, layer):
            continue
        wrong.extend(
            f"{module} imports {target}"
            for target in sorted(targets)
            if target.split(".")[0] not in {layer, *ALLOWED[layer]}
        )
    return wrong


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_packages_below_it(package):
    assert layer_violations(import_graph(module_level_only=False), package) == []


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(import_graph(module_level_only=True)) == []


def test_the_rules_catch_a_wrong_import_and_a_cycle():
    graph = {"core.a": {"core.b", "app.main"}, "core.b": {"core.a"}, "model.x": {"core.a"}, "app.main": set()}
    assert layer_violations(graph) == ["core.a imports app.main", "model.x imports core.a"]
    assert cycles(graph) == [["core.a", "core.b"]]


@pytest.mark.slow
def test_the_api_process_does_not_load_the_training_code():
    code = "import sys, app.main; print(sorted(m for m in ('model.training', 'torchmetrics') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
