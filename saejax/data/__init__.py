"""Images in, activations out: the host-side sources and their batches (`sources`,
`huggingface`, `images`, `batching`, all re-exported here as `saejax.data.<name>`), the sharded harvest and device shuffle
buffer (`activations`), the activation streams that feed training (`stream`), and saev's
activation shards (`shards`).

>>> source = saejax.data.ImageFolderSource("/data/flowers", image_size=224)
>>> batch = next(saejax.data.batches(source, 64, seed=0))      # uint8 [64, 224, 224, 3] on the host
"""

from saejax.data.batching import Batch, batches, gather_over_processes, one_pass, permutation, process_share
from saejax.data.images import (IMAGE_EXTENSIONS, RESAMPLING, Resizing, UnreadableImageError, find_images,
                                match_mask, patch_mode_labels, read_image)
from saejax.data.huggingface import HfDatasetSource
from saejax.data.sources import (ArraySource, Example, FileListSource, ImageFolderSource, Source, TfdsSource,
                                 skipped_report)

__all__ = ["IMAGE_EXTENSIONS", "RESAMPLING", "ArraySource", "Batch", "Example", "FileListSource", "HfDatasetSource",
           "ImageFolderSource",
           "Resizing", "Source", "TfdsSource", "UnreadableImageError", "batches", "find_images", "gather_over_processes", "match_mask",
           "one_pass", "patch_mode_labels", "permutation", "process_share", "read_image", "skipped_report"]
