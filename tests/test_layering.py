"""The library's layers, read from its imports: no import cycle; the execution, engine and stage
code imports no Dagster; stages know no task, engine, input format or model store; and a user's
project with a `resources` module of its own imports llm_assets without a clash."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llm_assets"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every llm_assets module -> every module it imports (at module level or in a function)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import module` imports the module; `from module import name`, the module.
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[module_name(path)] = names
    return found


def resolve(name: str, modules: set[str]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_no_import_cycle():
    found = imports()
    graph = {m: {resolve(n, set(found)) for n in names} - {None, m} for m, names in found.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert cycles == []


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("llm_assets.execution", ("dagster", "dagster_aws", "resources")),
        ("llm_assets.engines", ("dagster", "dagster_aws", "resources")),
        (
            "llm_assets.stages",
            (
                "dagster",
                "llm_assets.engines",
                "llm_assets.tasks",
                "llm_assets.openai_batch",
                "llm_assets.model_store",
                "llm_assets.sources",
            ),
        ),
        ("llm_assets.storage", ("dagster", "dagster_aws", "resources")),
        ("llm_assets.ray_session", ("dagster", "resources")),
        ("llm_assets.rows", ("dagster", "llm_assets.stages", "llm_assets.engines")),
    ],
)
def test_a_layer_imports_nothing_above_it(layer, forbidden):
    found = imports()
    offending = sorted(
        f"{module} imports {name}"
        for module, names in found.items()
        if module == layer or module.startswith(layer + ".")
        for name in names
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )
    assert offending == []


def test_a_project_with_its_own_resources_module_imports_llm_assets(tmp_path):
    (tmp_path / "resources.py").write_text("MINE = True\n")
    script = (
        "import resources\n"
        "from llm_assets.defs import factory\n"
        "from llm_assets.resources import PartitionStorage\n"
        "assert resources.MINE, resources.__file__\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_private_dagster_and_ray_apis_are_used_in_one_module():
    private = ("dagster._", "ray._", "ray.serve._")
    found = imports()
    offending = sorted(
        f"{module} imports {name}"
        for module, names in found.items()
        if module != "llm_assets.private_apis"
        for name in names
        if name.startswith(private)
    )
    assert offending == []
    calls = [
        path for path in PACKAGE.rglob("*.py") if "serve._run(" in path.read_text() and path.name != "private_apis.py"
    ]
    assert calls == []
