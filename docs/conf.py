# Strict build: sphinx-build -W --keep-going -n -b html docs docs/_build/html
"""Sphinx configuration for saejax's documentation site."""

import os
import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

import saejax  # noqa: E402
import saejax_api  # noqa: E402

project = "saejax"
author = "the saejax authors"
release = saejax.__version__
copyright = "the saejax authors"  # noqa: A001

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "myst_nb",
    "saejax_refs",
]

# Single backticks in docstrings: a saejax path becomes a checked cross-reference, anything
# else inline code (docs/_ext/saejax_refs.py).
default_role = "saejax"
smartquotes = False  # "--config" stays two hyphens, as typed

exclude_patterns = ["_build", "jupyter_execute", ".gitignore"]
templates_path = ["_templates"]
html_theme = "furo"
html_title = "saejax"

# API reference: one generated page per public module (docs/_ext/saejax_api.py decides what
# each lists; the template is _templates/autosummary/module.rst).
autosummary_generate = True
autosummary_context = {"api": saejax_api.module_tables("saejax")}
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_class_signature = "separated"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Markdown pages and the Colab notebooks. The notebooks are executed for the site on CPU with
# their SMALL switch (about 40 s for the three on 2 cores); an error fails the build.
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 4
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 300
nb_execution_in_temp = True
nb_output_stderr = "remove"  # library warnings (tqdm's, with this machine's paths) are not the notebooks' output
os.environ["SAEJAX_SMALL"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# README and the guide link BUILD.md by its path in the repository, which works on GitHub; in the
# site it is a page of its own (build.md includes it), so those links point there.
BUILD_MD_LINK = re.compile(r"\]\((?:\.\./)*BUILD\.md(#[^)]*)?\)")


def link_build_md_page(app, docname, source):
    source[0] = BUILD_MD_LINK.sub(lambda m: f"](/build.md{m.group(1) or ''})", source[0])


def setup(app):
    app.connect("source-read", lambda app, docname, source: link_build_md_page(app, docname, source))
    app.connect("include-read", lambda app, path, docname, source: link_build_md_page(app, docname, source))

# Strict cross-references. Only other libraries' names are excused (no intersphinx inventory can
# be downloaded here); a saejax name that does not exist is always an error.
nitpicky = True
EXTERNAL = [
    r"jax(\..*)?", r"jnp(\..*)?", r"np(\..*)?", r"numpy(\..*)?", r"optax(\..*)?", r"flax(\..*)?", r"orbax(\..*)?",
    r"chex(\..*)?", r"PIL(\..*)?", r"ml_collections(\..*)?", r"grain(\..*)?", r"absl(\..*)?", r"transformers(\..*)?",
    r"huggingface_hub(\..*)?", r"tensorflow_datasets(\..*)?", r"tfds(\..*)?", r"safetensors(\..*)?", r"jaxlib(\..*)?",
    r"typing(\..*)?", r"collections(\..*)?", r"types(\..*)?", r"pathlib(\..*)?", r"os(\..*)?", r"concurrent(\..*)?",
    r"threading(\..*)?", r"dataclasses(\..*)?", r"enum(\..*)?", r"io(\..*)?", r"functools(\..*)?",
    # Builtins, also as the fragments a generic alias leaves in a signature ("tuple[bool").
    r"(int|float|str|bool|bytes|dict|list|tuple|set|frozenset|object|type|None|callable|Exception|BaseException)(\[.*)?",
    r"Any|Callable|Iterable|Iterator|Mapping|Sequence|Optional|Union|NamedTuple|Literal|Self|TypeVar|Generator",
]
nitpick_ignore_regex = [("py:.*", pattern) for pattern in EXTERNAL]
