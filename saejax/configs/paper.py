"""Shared pieces of the paper-reproduction configs (clip_vit_b16.py, dinov2_b14.py)."""

import ml_collections
from ml_collections import config_dict


def source_keys(**data) -> dict:
    """`data` with every key `builders.build_source` reads (neutral values where `data` has none),
    so that any command's source can be switched from the command line:
    `--config.data.kind=hf --config.data.path=/data/flowers_saved`, or `kind=folder` with
    `train_dir` / `validation_dir`."""
    return {**dict(kind="", path="", split="train", validation_split="validation", image_column="image",
                   label_column="label", streaming=False, cache_dir=config_dict.placeholder(str), train_dir="",
                   validation_dir="", skip_unreadable=False, seed=0), **data}


def imagenet(image_size: int) -> dict:
    """ImageNet-1K from the Hugging Face hub as saev reads it (`data.kind="hf"`), images resized
    (short side) and centre-cropped to `image_size` on the host."""
    return source_keys(kind="hf", path="ILSVRC/imagenet-1k", image_size=image_size)


def paper_config(backbone: str, data_image_size: int) -> ml_collections.ConfigDict:
    """The paper's recipe (REFERENCE.md section 2) on ImageNet-1K, read as saev reads it:
    `datasets.load_dataset("ILSVRC/imagenet-1k", split="train")`, so image ids are the data
    set's row indices, the ids of saev's pretrained SAEs and their exemplars."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # "auto": bf16 matmuls (float32 accumulation, float32 state) on TPU / GPU, float32 on CPU;
    # see benchmarks/harvest.py and benchmarks/sae_step.py for the measured gain and error.
    c.backbone = dict(name=backbone, dtype="auto")
    c.layers = (10,)  # residual after block 10 of 12 ("second to last"); several layers share one forward pass
    c.tokens = "patches"
    # Images are resized (short side) and centre-cropped on the host to `image_size`; the
    # backbone's own preprocessing then matches the reference pipeline.
    # ImageNet-1K from the Hugging Face hub (gated: accept its terms and log in first), downloaded
    # once into `cache_dir`; `streaming=True` reads it without downloading it whole (shuffled by
    # shard, see saejax.data.HfDatasetSource). Or through tfds: kind="tfds", name="imagenet2012",
    # train_split="train", validation_split="validation", data_dir=... (ArrayRecord).
    c.data = imagenet(data_image_size)
    c.image_batch_size = 256
    c.buffer_tokens = 2**20  # rows mixed per fill; two fills live on the devices (2 x 1M x 768 fp32 = 6 GiB in all)
    # Buffer groups (each shuffled on its own, split over `data`): None = the data axis size. Fix it to get the
    # same stream on meshes of different sizes (a multiple of each data axis size).
    c.shuffle_groups = None
    c.mesh = dict(model=1)  # devices on `model` (sweep members, or one SAE's latents); the rest on `data`
    c.normalization_samples = 2**19
    c.sae = dict(architecture="relu", expansion=32, k=32, compute_dtype="auto")  # k: kept by topk / batchtopk
    c.objective = dict(sparsity="l1", sparsity_warmup_steps=0)
    c.optimizer = dict(warmup_steps=500)
    c.sweep = dict(learning_rate=(3e-4, 1e-3, 3e-3), sparsity_coeff=(4e-4, 8e-4, 1.6e-3), k=(0,))
    c.batch_size = 16_384
    c.total_tokens = 100_000_000
    c.dead_after_tokens = 10_000_000
    c.resample_every = 0  # the reference never resamples; try 1000 with resample_until 4000
    c.resample_until = None
    c.checkpoint_every = 500
    c.on_nonfinite = "stop"  # or "freeze": a diverging sweep member keeps its last finite state, the others go on
    c.log_every = 10
    c.keep_checkpoints = 2
    c.eval_images = 10_000
    # Spliced-in fidelity (saejax.fidelity) on this many of the evaluation images; head "auto":
    # the checkpoint's classifier if it has one, else the pooled embedding only; "zero_shot"
    # with prompts=("a photo of a tench", ...), one per class in label order, for a full CLIP.
    c.fidelity = dict(images=512, head="auto")
    return c


def small_config(family: str, image_size: int, patch_size: int) -> ml_collections.ConfigDict:
    """A one-minute CPU run of the same loop on a tiny random backbone and noise images."""
    c = paper_config("", image_size)
    c.backbone = dict(name="", random=dict(family=family, directory="/tmp/saejax-random-backbones", seed=0,
                                           sizes=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                      intermediate_size=64, image_size=image_size,
                                                      patch_size=patch_size)))
    c.layers = (1,)  # second to last of 3 blocks
    # kind=folder reads the *_dir folders; kind=hf reads `path` (a save_to_disk folder, parquet files)
    c.data = source_keys(kind="random", train_images=512, validation_images=64, image_size=image_size)
    c.image_batch_size = 16
    c.buffer_tokens = 2048
    c.shuffle_groups = 8  # the same stream on 1, 2, 4 or 8 data devices
    c.normalization_samples = 1024
    c.sae = dict(architecture="relu", expansion=4, k=8)
    c.optimizer = dict(warmup_steps=5)
    c.sweep = dict(learning_rate=(1e-3, 3e-3), sparsity_coeff=(4e-4,), k=(0,))
    c.batch_size = 256
    c.total_tokens = 256 * 60
    c.dead_after_tokens = 5_000
    c.checkpoint_every = 20
    c.log_every = 1
    c.eval_images = 64
    c.fidelity = dict(images=32, head="auto")
    return c
