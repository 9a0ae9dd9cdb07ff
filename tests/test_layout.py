"""The package's layers point one way: each module imports only from its own layer and the ones above it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vediff"
# Top to bottom; vediff/__init__.py re-exports the public names and sits outside the order.
LAYERS = ["utils", "models", "sampling", "pipelines", "training", "cli"]


def layer_of(module: str) -> int:
    parts = module.split(".")
    assert parts[0] == "vediff" and len(parts) > 1, f"{module} is not inside a layer"
    return LAYERS.index(parts[1])


def vediff_imports(path: Path) -> set[str]:
    """Every vediff module `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vediff"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("vediff"))
    return found


def test_every_module_imports_only_its_own_layer_and_those_above():
    checked = 0
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "__init__.py":
            continue
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        own = layer_of(module)
        for imported in vediff_imports(path):
            assert layer_of(imported) <= own, f"{module} imports {imported}, a layer below it"
        checked += 1
    assert checked >= 20

