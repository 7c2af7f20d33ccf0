"""The package's layers: each module imports only its own layer and those below it (README,
"Architecture"), and no module is over 450 lines without a reason written at its top."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "saejax"
LAYERS = ("sharding", "core", "checkpoint", "backbones", "data", "analysis", "pages", "run", "datasets")


def layer_of(module: str) -> int:
    """`saejax.core.sae` -> the index of `core` in LAYERS."""
    return LAYERS.index(module.split(".")[1])


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


def test_long_modules_say_why_at_their_top():
    unexplained = [name for name, path in modules() if len(path.read_text().splitlines()) > 450
                   and "Long because" not in (ast.get_docstring(ast.parse(path.read_text())) or "")]
    assert not unexplained, unexplained
