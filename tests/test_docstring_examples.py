"""Docstring examples (`>>>` lines) cannot drift from the code: every example parses, and every
call in one that reaches a saejax function, class or method is bound to that callable's
signature (argument count, keyword names), as Python would bind it.

The examples run on the real sizes of the paper (a ViT-B, 24,576 latents, a hub checkpoint), so
they are checked, not executed: a call reaches its callable through the module's own names, a
dotted `saejax.` path, saejax's short names (`discovery.discover`), or a variable the example
(or an earlier one in the same docstring) assigned from a saejax call whose class or return
annotation is known (`trainer = make_trainer(...)`, then `trainer.init(...)`). A call on
anything else (a variable of unknown type, jax, numpy) is not checked: about two thirds of the
calls in the examples are checked. README's and the guide's code blocks are executed by
tests/test_readme.py.
"""

from __future__ import annotations

import ast
import builtins
import doctest
import importlib
import inspect
import pathlib
import typing

import pytest

import saejax

ROOT = pathlib.Path(saejax.__file__).parent
MODULES = sorted(".".join(("saejax", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
                 for p in ROOT.rglob("*.py") if p.name != "__main__.py")  # importing __main__ runs it


class Instance(typing.NamedTuple):
    """An example's variable known to hold an instance of `cls`."""
    cls: type


def docstring_examples(module):
    """`(docstring owner's name, [example sources])` for the module and everything it defines."""
    for test in doctest.DocTestFinder(recurse=True, exclude_empty=True).find(module):
        yield test.name, [example.source for example in test.examples]


def _is_saejax(obj) -> bool:
    return str(getattr(obj, "__module__", "") or "").startswith("saejax")


def _returned_class(fn):
    """The saejax class `fn` returns (a class itself, or its return annotation), else None."""
    if inspect.isclass(fn):
        return fn if _is_saejax(fn) else None
    try:
        hint = typing.get_type_hints(fn).get("return")
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate here is simply not used
        return None
    if inspect.ismethod(fn) and isinstance(fn.__self__, type) and hint is not None and isinstance(hint, type):
        return hint if _is_saejax(hint) else None  # a classmethod constructor (`Hparams.of`)
    return hint if isinstance(hint, type) and _is_saejax(hint) else None


class Checker:
    def __init__(self, module):
        self.module, self.names, self.problems = module, {}, []

    def value(self, node):
        """What an expression names: a module, class, function, `Instance`, or None (unknown)."""
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            if node.id == "saejax":
                return saejax
            if hasattr(builtins, node.id):
                return None
            # The module's own names, else saejax's short names (`discovery.discover`, `shapes.source`).
            return getattr(self.module, node.id, getattr(saejax, node.id, None))
        if isinstance(node, ast.Attribute):
            base = self.value(node.value)
            if base is None:
                return None
            if isinstance(base, Instance):
                if not hasattr(base.cls, node.attr):
                    return None  # an instance attribute (a dataclass field's value): not checked
                static = inspect.getattr_static(base.cls, node.attr)
                attr = getattr(base.cls, node.attr)
                if isinstance(static, (staticmethod, classmethod)) or not inspect.isfunction(attr):
                    return attr
                return ("method", attr)
            return getattr(base, node.attr, None) if inspect.ismodule(base) or inspect.isclass(base) else None
        if isinstance(node, ast.Call):
            target = self.value(node.func)
            fn = target[1] if isinstance(target, tuple) else target
            cls = _returned_class(fn) if callable(fn) else None
            return Instance(cls) if cls is not None else None
        return None

    def check_call(self, call: ast.Call, where: str):
        target = self.value(call.func)
        method = isinstance(target, tuple)
        fn = target[1] if method else target
        if not callable(fn) or not _is_saejax(fn) or isinstance(fn, Instance):
            return
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            return
        starred = any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords)
        elided = any(isinstance(a, ast.Constant) and a.value is Ellipsis for a in call.args)
        positional = [None] * (len(call.args) + method)
        keywords = {k.arg: None for k in call.keywords if k.arg is not None}
        try:
            if starred or elided:  # `f(a, ...)`, `f(*xs)`: only the keyword names can be checked
                signature.bind_partial(*([None] * method), **keywords)
            else:
                signature.bind(*positional, **keywords)
        except TypeError as error:
            self.problems.append(f"{where}: {ast.unparse(call)}: {error}")

    def run(self, owner: str, sources: list[str]):
        self.names = {}
        for source in sources:
            try:
                tree = ast.parse(source)
            except SyntaxError as error:
                self.problems.append(f"{owner}: an example that is not Python: {source.strip()!r} ({error.msg})")
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    self.check_call(node, owner)
            for statement in tree.body:
                if isinstance(statement, ast.Assign):
                    known = self.value(statement.value)
                    for target in statement.targets:
                        for name in ast.walk(target):
                            if isinstance(name, ast.Name):
                                self.names[name.id] = known if isinstance(target, ast.Name) else None


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_match_the_signatures_they_call(name):
    module = importlib.import_module(name)
    checker = Checker(module)
    for owner, sources in docstring_examples(module):
        checker.run(owner, sources)
    assert checker.problems == []


def test_the_checker_catches_a_wrong_keyword_and_a_wrong_argument_count():
    """The drift it exists for: a keyword that does not exist, a call with too many arguments
    and a method of a variable the example made."""
    from saejax.data import activations

    checker = Checker(activations)
    checker.run("example", ["buf = ShuffleBuffer.create(capacity=2**16, d_model=768, mesh=mesh)"])
    checker.run("example", ["from saejax.core import resample",
                            "params, opt_state, n = saejax.resample.resample_dead(trainer, state, x, key)"])
    checker.run("example", ["trainer = saejax.train.make_trainer(ae)",
                            "state = trainer.init(key, hparams, b_dec, 3)"])
    assert checker.problems == [
        "example: ShuffleBuffer.create(capacity=2 ** 16, d_model=768, mesh=mesh): missing a required argument: "
        "'row_shape'",
        "example: saejax.resample.resample_dead(trainer, state, x, key): missing a required argument: 'dead_F'",
        "example: trainer.init(key, hparams, b_dec, 3): too many positional arguments",
    ]
