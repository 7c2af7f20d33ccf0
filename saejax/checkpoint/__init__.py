"""Checkpoints and file formats.

- `TrainCheckpointer`: orbax checkpoints of a whole training run (resumable bit for bit).
- `save_sae` / `load_sae`: the portable SAE directory (safetensors + config.json).
- `import_saev`: the reference's `sae.pt`, read without torch and without unpickling code.
"""

from saejax.checkpoint.errors import CheckpointError
from saejax.checkpoint.portable import load_sae, save_sae
from saejax.checkpoint.saev import import_saev
from saejax.checkpoint.train_state import RestoredRun, TrainCheckpointer

__all__ = ["CheckpointError", "RestoredRun", "TrainCheckpointer", "import_saev", "load_sae", "save_sae"]
