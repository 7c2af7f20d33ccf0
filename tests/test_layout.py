"""The package's layers: each module imports only its own layer and those below it (README,
"Architecture"), and no module is over 450 lines without a reason written at its top."""

import ast
import importlib
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "saejax"
LAYERS = ("provenance", "sharding", "core", "checkpoint", "backbones", "data", "analysis", "pages", "run", "datasets",
          "studies", "configs", "cli")


def layer_of(module: str) -> int:
    """`saejax.core.sae` -> the index of `core` in LAYERS; a short name (`saejax.sae`, re-exported
    by `saejax/__init__.py`) counts as the module it names."""
    top = module.split(".")[1]
    if top not in LAYERS:
        top = getattr(importlib.import_module("saejax"), top).__name__.split(".")[1]
    return LAYERS.index(top)


def saejax_imports(path: pathlib.Path):
    """Every saejax module `path` imports, at the top or inside a function."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saejax"):
            names = [node.module] if node.module != "saejax" else [f"saejax.{a.name}" for a in node.names]
            yield from names
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("saejax."))


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        name = ".".join(("saejax", *path.relative_to(ROOT).with_suffix("").parts))
        if name != "saejax.__init__":
            yield name.removesuffix(".__init__"), path


def test_every_import_goes_down_the_layers():
    upward = []
    for name, path in modules():
        for imported in saejax_imports(path):
            if layer_of(imported) > layer_of(name):
                upward.append(f"{name} imports {imported}")
    assert not upward, upward


def test_only_the_commands_and_their_configs_read_ml_collections():
    readers = sorted(name for name, path in modules() for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                         (getattr(node, "module", None) or a.name).startswith("ml_collections") for a in node.names))
    assert readers and all(name.startswith(("saejax.cli", "saejax.configs")) for name in readers), readers


def test_long_modules_say_why_at_their_top():
    unexplained = [name for name, path in modules() if len(path.read_text().splitlines()) > 450
                   and "Long because" not in (ast.get_docstring(ast.parse(path.read_text())) or "")]
    assert not unexplained, unexplained


def resolve(imported: str) -> str | None:
    """The module file an import names: `saejax.backbones._hf` as itself, a name imported from a
    module as that module (`saejax.backbones.preprocess.BILINEAR` -> `...preprocess`)."""
    while imported:
        parts = imported.split(".")[1:]
        if (ROOT.joinpath(*parts).with_suffix(".py")).is_file() or (ROOT.joinpath(*parts) / "__init__.py").is_file():
            return imported
        imported = imported.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """`{module: modules it imports}`, every import counted (function-level ones too). A
    module's imports of its own packages' faces (`from saejax.backbones import _hf` in a
    backbones module reads `_hf`, not the face) are resolved to the submodule they name."""
    graph = {}
    for name, path in modules():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saejax"):
                targets = [resolve(f"{node.module}.{a.name}") for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.startswith("saejax.")]
            else:
                continue
            edges |= {t for t in targets if t and t != name and not name.startswith(t + ".")}
        graph[name] = edges
    return graph


def test_the_import_plan_has_no_circle():
    graph = import_graph()
    assert "saejax.backbones.weights" in graph["saejax.backbones.open_clip"]  # the graph sees real imports
    circles, state = [], {}

    def visit(module, trail):
        state[module] = "open"
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, circles
