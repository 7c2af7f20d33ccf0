"""The default role for saejax's docs: single backticks in docstrings.

saejax's docstrings write both code and names in single backticks (`x_ND`, `saejax.loop.fit`).
Text that looks like a dotted saejax path is resolved by importing it, to the name the API
reference documents it under (`saejax.loop` is `saejax.run.loop`), and becomes a checked
cross-reference; a path that does not import is a warning naming it, so a strict build fails on
a renamed function. Any other text is inline code. The same role is available in Markdown pages
as {saejax}`saejax.loop.fit`.
"""

import inspect
import re

from docutils import nodes
from sphinx import addnodes
from sphinx.util import logging
from sphinx.util.docstrings import prepare_docstring

from saejax_names import UnresolvedName, resolve

logger = logging.getLogger(__name__)

SAEJAX_PATH = re.compile(r"saejax(\.[A-Za-z_][A-Za-z0-9_]*)+(\(\))?")


def drop_inherited_type_docstring(app, what, name, obj, options, lines):
    """A constant without a doc comment would show its type's docstring (a dict's, a family
    class's with its attributes): show nothing instead."""
    if what in ("data", "attribute") and not inspect.isclass(obj) and not callable(obj) and lines:
        inherited = getattr(obj, "__doc__", None)  # an instance's __doc__ is its type's (or numpy's variant)
        if isinstance(inherited, str) and "\n".join(lines).strip() == "\n".join(prepare_docstring(inherited)).strip():
            lines.clear()


def skip_namedtuple_field_aliases(app, what, name, obj, skip, options):
    """A NamedTuple's fields are documented by its class docstring's Attributes section, not
    again as the generated "Alias for field number N" properties."""
    if what == "class" and isinstance(getattr(obj, "__doc__", None), str) and obj.__doc__.startswith("Alias for field number"):
        return True
    return None


COMMAND_LINE = re.compile(r"(saejax|python|pip|export|tensorboard|sphinx-build) ")


def literal_command_blocks(app, what, name, obj, options, lines):
    """An indented block of commands after a paragraph (`    saejax train --config=...`, as the
    docstrings write them) is shown as typed, a literal block, not as a reflowed quotation."""
    i = 2
    while i < len(lines):
        line, blank, before = lines[i], lines[i - 1], lines[i - 2]
        if (line.startswith("    ") and COMMAND_LINE.match(line.strip()) and not blank.strip() and before.strip()
                and not before.startswith(" ") and not before.rstrip().endswith("::")):
            lines[i - 1:i] = ["", "::", ""]
            i += 2
        i += 1


def resolve_through_saejax(app, env, node, contnode):
    """A `py` reference that Sphinx could not find (a name as a module imports it, such as a
    signature's `Backbone` or a Raises section's `CheckpointError`, or a short saejax path) is
    looked up by import from the referring module, then resolved under its canonical name."""
    if node.get("refdomain") != "py":
        return None
    target, module = node["reftarget"].removeprefix("~"), node.get("py:module") or ""
    paths = [target] if target.startswith("saejax.") else []
    if module.startswith("saejax"):
        context = f"{module}.{node['py:class']}" if node.get("py:class") else module
        paths += [f"{context}.{target}", f"{module}.{target}"]
    for path in paths:
        try:
            canonical = resolve(path)
        except (UnresolvedName, ImportError):
            continue
        if canonical != target:
            return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder, "obj", canonical, node, contnode)
    return None


def saejax_default_role(name, rawtext, text, lineno, inliner, options=None, content=()):
    """`saejax.x.y` -> a checked cross-reference to its canonical name; anything else -> code."""
    if not SAEJAX_PATH.fullmatch(text):
        return [nodes.literal(rawtext, text, classes=["code"])], []
    try:
        target = resolve(text)
    except UnresolvedName as error:
        source, line = inliner.reporter.get_source_and_line(lineno)
        logger.warning("unresolved saejax name in backticks: %s", error, location=(source, line),
                       type="saejax", subtype="unresolved")
        return [nodes.literal(rawtext, text, classes=["code"])], []
    ref = addnodes.pending_xref(rawtext, refdomain="py", reftype="obj", reftarget=target, refexplicit=True,
                                refwarn=True, refdoc=inliner.document.settings.env.docname)
    ref += nodes.literal(rawtext, text, classes=["xref", "py", "py-obj"])
    return [ref], []


def setup(app):
    app.add_role("saejax", saejax_default_role)
    # Before napoleon (priority 500) rewrites the docstring, so that it still compares equal.
    app.connect("autodoc-process-docstring", drop_inherited_type_docstring, priority=400)
    app.connect("autodoc-process-docstring", literal_command_blocks, priority=300)
    app.connect("autodoc-skip-member", skip_namedtuple_field_aliases)
    app.connect("missing-reference", resolve_through_saejax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
