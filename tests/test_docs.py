"""The docs' resolver for single-backtick saejax names (docs/_ext/saejax_names.py, used by the
Sphinx extension saejax_refs.py): a name resolves, by import, to the name the API reference
documents it under, and a name that does not exist is an error naming it, which is what makes
the strict docs build fail on a renamed function."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "docs" / "_ext"))
from saejax_names import UnresolvedName, resolve  # noqa: E402


@pytest.mark.parametrize(("written", "canonical"), [
    ("saejax.loop.fit", "saejax.run.loop.fit"),                               # a short module name
    ("saejax.loop.fit()", "saejax.run.loop.fit"),
    ("saejax.stream.ActivationStream", "saejax.data.stream.ActivationStream"),
    ("saejax.sae.topk", "saejax.core.sae.topk"),
    ("saejax.sae", "saejax.core.sae"),                                        # a module
    ("saejax.backbones.load", "saejax.backbones.loading.load"),               # a package's re-export
    ("saejax.train.Trainer.resample", "saejax.core.train.Trainer.resample"),  # a method
    ("saejax.backbones.FAMILIES", "saejax.backbones.families.FAMILIES"),      # data: where it is assigned
    ("saejax.sharding.RULES", "saejax.sharding.RULES"),
])
def test_a_real_name_resolves_to_its_canonical_name(written, canonical):
    assert resolve(written) == canonical


@pytest.mark.parametrize(("written", "missing"), [
    ("saejax.loop.fitt", "'fitt'"),
    ("saejax.stream.ActivationStrem", "'ActivationStrem'"),
    ("saejax.nosuchmodule.thing", "'nosuchmodule'"),
])
def test_a_misspelt_name_raises_naming_it(written, missing):
    with pytest.raises(UnresolvedName, match=f"{written.replace('.', '[.]')}.*{missing}"):
        resolve(written)
