"""What the API reference's module pages list, computed by importing saejax.

Every public module of the package gets a page (leading-underscore modules are private). A
page documents what its module defines, respecting `__all__` where the module has one, and
links what a package only re-exports to the page of the module that defines it, so each object
is documented once, under its canonical name. The result is plain data for the autosummary
template (`_templates/autosummary/module.rst`), which reads it as `api[module name]`.
"""

import importlib
import inspect
import pkgutil
import re

from sphinx.pycode import ModuleAnalyzer

from saejax_names import assigned_names

UPPER_CASE = re.compile(r"[A-Z][A-Z0-9_]*")
MAX_VALUE_CHARS = 60


def module_tables(package: str) -> dict[str, dict[str, list[str]]]:
    """`{module name: {"submodules", "reexports", "classes", "exceptions", "functions", "data",
    "data_without_value"}}` for `package` and every public module under it."""
    modules = {}
    pending = [package]
    while pending:
        module = importlib.import_module(pending.pop())
        modules[module.__name__] = module
        if hasattr(module, "__path__"):
            pending.extend(f"{module.__name__}.{info.name}" for info in pkgutil.iter_modules(module.__path__)
                           if not info.name.startswith("_"))
    # What a package's `__all__` re-exports is public where it is defined, even when that
    # module's own `__all__` leaves it out.
    reexported = {}
    for module in modules.values():
        for member in getattr(module, "__all__", ()):
            obj = getattr(module, member)
            home = getattr(obj, "__module__", None) if inspect.isclass(obj) or callable(obj) else None
            if home in modules and home != module.__name__:
                reexported.setdefault(home, []).append(obj.__name__)
    return {name: _module_table(module, reexported.get(name, [])) for name, module in sorted(modules.items())}


def _module_table(module, public_elsewhere: list[str]) -> dict[str, list[str]]:
    name = module.__name__
    submodules = []
    if hasattr(module, "__path__"):
        submodules = [f"{name}.{info.name}" for info in pkgutil.iter_modules(module.__path__)
                      if not info.name.startswith("_")]
    exported = getattr(module, "__all__", None)
    assigned_here = assigned_names(module)
    documented_data = {attr for (_, attr) in _attribute_docs(name)}
    table = {"submodules": submodules, "reexports": [], "classes": [], "exceptions": [], "functions": [], "data": [],
             "data_without_value": []}
    candidates = (exported + [n for n in public_elsewhere if n not in exported] if exported is not None
                  else [n for n in vars(module) if not n.startswith("_")])
    for member in candidates:
        if member.startswith("_"):
            continue  # private, and dunders such as __version__
        obj = getattr(module, member)
        if inspect.ismodule(obj):
            continue  # submodules have their own pages
        home = getattr(obj, "__module__", None) if (inspect.isclass(obj) or callable(obj)) else None
        if home is not None and home != name:
            if exported is not None and member in exported and home.startswith("saejax"):
                table["reexports"].append(f"{home}.{obj.__qualname__}")
            continue  # imported, documented where it is defined
        if inspect.isclass(obj):
            table["exceptions" if issubclass(obj, BaseException) else "classes"].append(member)
        elif home == name and (inspect.isroutine(obj) or callable(obj)):
            table["functions"].append(member)
        elif member in assigned_here and (exported is not None or UPPER_CASE.fullmatch(member)
                                          or member in documented_data):
            # A long value (a registry, a table) is unreadable in a signature line: docs only.
            short = len(repr(obj)) <= MAX_VALUE_CHARS and "\n" not in repr(obj)
            table["data" if short else "data_without_value"].append(member)
    return table


def _attribute_docs(name: str):
    analyzer = ModuleAnalyzer.for_module(name)
    return [key for key in analyzer.find_attr_docs() if key[0] == ""]
