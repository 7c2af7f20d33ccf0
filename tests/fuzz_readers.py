"""Fuzzes the three checkpoint readers with broken copies of valid files (run by
tests/test_fuzz_readers.py in its own process, so that its peak memory is its own).

    python tests/fuzz_readers.py OUT_JSON CASES_PER_READER

Every broken file must either load or raise the reader's one error type with a message that
names the file; the process's peak memory is reported against its peak before fuzzing.
"""

import json
import os
import resource
import shutil
import sys
import tempfile

import jax
import numpy as np

from saejax import backbones, sae
from saejax.checkpoint import CheckpointError, import_saev, load_sae, save_sae
from saejax.core.normalization import estimate_normalization

HERE = os.path.dirname(os.path.abspath(__file__))


def mutations(data: bytes, rng: np.random.Generator):
    """Truncations, bit flips and overwritten runs, weighted to the headers at the front."""
    n = len(data)
    kind = rng.integers(4)
    if kind == 0:
        return data[: rng.integers(n)]
    buf = bytearray(data)
    hot = min(n, 512)
    if kind == 1:
        for _ in range(rng.integers(1, 9)):
            i = rng.integers(hot) if rng.random() < 0.7 else rng.integers(n)
            buf[i] ^= 1 << int(rng.integers(8))
    elif kind == 2:
        i = rng.integers(hot) if rng.random() < 0.7 else rng.integers(n)
        length = int(rng.integers(1, 64))
        buf[i:i + length] = rng.bytes(len(buf[i:i + length]))
    else:  # huge numbers where sizes live: 0xff runs
        i = rng.integers(hot)
        buf[i:i + 8] = b"\xff" * len(buf[i:i + 8])
    return bytes(buf)


def fuzz(name, target_file, read, error_types, cases, rng):
    valid = open(target_file, "rb").read()
    counts = {"loaded": 0, "refused": 0}
    for _ in range(cases):
        with open(target_file, "wb") as f:
            f.write(mutations(valid, rng))
        try:
            read()
            counts["loaded"] += 1
        except error_types as e:
            where = os.path.dirname(target_file)
            if where not in str(e):
                raise AssertionError(f"{name}: {type(e).__name__} does not name the file: {e}") from e
            counts["refused"] += 1
    with open(target_file, "wb") as f:
        f.write(valid)
    return counts


def main(out, cases):
    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp()
    saev_file = os.path.join(tmp, "saev", "sae.pt")
    os.makedirs(os.path.dirname(saev_file))
    shutil.copy(os.path.join(HERE, "fixtures", "saev_sae.pt"), saev_file)
    ae = sae.jumprelu(16, 64)
    norm = estimate_normalization(jax.random.normal(jax.random.key(1), (64, 16)))
    sae_dir = save_sae(os.path.join(tmp, "sae"), ae, ae.init(jax.random.key(0)), normalization=norm)
    backbone_dir = os.path.join(tmp, "backbone")
    shutil.copytree(os.path.join(HERE, "fixtures", "backbones", "vit"), backbone_dir)
    readers = {
        "import_saev": (saev_file, lambda: import_saev(saev_file), CheckpointError),
        "load_sae": (os.path.join(sae_dir, "sae.safetensors"), lambda: load_sae(sae_dir), CheckpointError),
        "load_sae config": (os.path.join(sae_dir, "config.json"), lambda: load_sae(sae_dir), CheckpointError),
        "backbones.load": (os.path.join(backbone_dir, "model.safetensors"),
                           lambda: backbones.load(backbone_dir, cache_dir=False), ValueError),
        "backbones.load config": (os.path.join(backbone_dir, "config.json"),
                                  lambda: backbones.load(backbone_dir, cache_dir=False), ValueError),
    }
    for _, read, _ in readers.values():
        read()  # every reader reads its valid file once: imports and compilations before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # backbones.load builds the model's shapes each time: fewer of its cases keep the run short.
    results = {name: fuzz(name, file, read, errors, cases if name.startswith(("import", "load_sae")) else cases // 5, rng)
               for name, (file, read, errors) in readers.items()}
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    json.dump({"results": results, "peak_kib_before": before, "peak_kib_after": after}, open(out, "w"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
