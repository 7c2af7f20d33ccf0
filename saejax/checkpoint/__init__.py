"""Checkpoints and file formats.

- `TrainCheckpointer`: orbax checkpoints of a whole training run (resumable bit for bit).
- `save_sae` / `load_sae`: the portable SAE directory (safetensors + config.json).
- `import_saev`: the reference's `sae.pt`, read without torch and without unpickling code.
- `load_pretrained`: saev's published SAEs from the hub, with the normalisation they need.
"""

from saejax.checkpoint.errors import CheckpointError
from saejax.checkpoint.portable import load_sae, save_sae
from saejax.checkpoint.pretrained import PRETRAINED, load_pretrained
from saejax.checkpoint.saev import import_saev
from saejax.checkpoint.train_state import RestoredRun, TrainCheckpointer

__all__ = ["PRETRAINED", "CheckpointError", "RestoredRun", "TrainCheckpointer", "import_saev", "load_pretrained",
           "load_sae", "save_sae"]
