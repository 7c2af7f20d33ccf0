"""Resolving a dotted saejax path to the name the API reference documents it under, by import
(`saejax.loop` is `saejax.run.loop`). No Sphinx here: the tests check it without the docs extra,
and `saejax_refs` (the Sphinx extension) uses it.
"""

import ast
import importlib
import pathlib
import sys
import types

class UnresolvedName(LookupError):
    """A dotted saejax path that does not import."""


def resolve(path: str) -> str:
    """The canonical documented name of a dotted saejax path, found by importing it.

    A module resolves to its `__name__`, a class or function to `__module__.__qualname__`, and
    anything else (a constant, a method's attribute) to its parent's canonical name plus its own.

    >>> resolve("saejax.loop.fit")
    'saejax.run.loop.fit'

    Raises:
        UnresolvedName: naming the path and the first part of it that does not exist.
    """
    parts = path.removesuffix("()").split(".")
    if parts[0] != "saejax":
        raise UnresolvedName(f"{path!r} is not a saejax path")
    obj = importlib.import_module("saejax")
    canonical = "saejax"
    for i, part in enumerate(parts[1:], start=1):
        prefix = ".".join(parts[:i])
        if hasattr(obj, part):
            child = getattr(obj, part)
        elif isinstance(obj, types.ModuleType):
            try:  # a submodule that nothing has imported yet
                child = importlib.import_module(f"{obj.__name__}.{part}")
            except ModuleNotFoundError as error:
                if error.name != f"{obj.__name__}.{part}":
                    raise  # the submodule exists but fails to import: a real error, not a bad name
                raise UnresolvedName(f"{path!r}: {prefix} has no {part!r}") from None
        else:
            raise UnresolvedName(f"{path!r}: {prefix} has no {part!r}")
        canonical = _canonical_name(child, obj, canonical, part)
        obj = child
    return canonical


def _canonical_name(obj, parent, parent_name: str, attribute: str) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and module.startswith("saejax") and isinstance(qualname, str) and "<" not in qualname:
        return f"{module}.{qualname}"
    if isinstance(parent, types.ModuleType):  # data has no name of its own: the module that assigns it
        for name in [parent.__name__] + sorted(m for m in sys.modules if m.startswith(parent.__name__ + ".")):
            home = sys.modules[name]
            if getattr(home, attribute, None) is obj and attribute in assigned_names(home):
                return f"{name}.{attribute}"
    return f"{parent_name}.{attribute}"


def assigned_names(module) -> set[str]:
    """The names a module's own top-level statements assign (not the ones it imports)."""
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return set()
    names = set()
    for node in ast.parse(pathlib.Path(path).read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names
