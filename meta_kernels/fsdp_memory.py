"""Memory per GPU of sharded (FSDP) first-order meta-training of the ViT, computed from the
config: what the README's table of the production presets comes from.

    meta-kernels memory --preset production_7b --gpus 8

Persistent, sharded over the ranks (fp32): weights, gradients, the base weights kept while a
task adapts, the meta-gradient (FOMAML) or adapted-weight (Reptile) sum, and Adam's two moments
(FOMAML only; Reptile's update needs no optimiser state). Transient: FSDP's unsharded working
set (the current and the prefetched block, their unsharded gradients, the root unit), and the
larger of the inner loop's fp32 activations and the query pass's bf16-autocast activations plus
the bf16 weight casts autocast keeps for the backward. The activation bytes per token are those
autograd saves for this ViT, checked against a measurement in tests/test_sharded.py. Not
counted: the CUDA context, NCCL buffers and allocator slack (typically 1-3 GB)."""
from __future__ import annotations

import math

from meta_kernels.config import MetaLearningFullConfig
from meta_kernels.models.vit import vit_param_count

IMAGE_SHAPES = {"omniglot": (1, 28, 28), "mini_imagenet": (3, 84, 84)}


def vit_activation_bytes(*, examples: int, image_shape, dim: int, depth: int, heads: int, patch_size: int,
                         autocast_bf16: bool) -> int:
    """Bytes autograd saves for the backward of one forward of `examples` images (the ViT of
    meta_kernels.models), in fp32 or under bf16 autocast (which also saves bf16 weight casts)."""
    c, h, w = image_shape
    tokens = (h // patch_size) * (w // patch_size) + 1
    embed_and_head = 4 * (c * h * w + 2 * tokens * dim) * examples
    if autocast_bf16:
        per_block = tokens * (36 * dim + 4 * heads + 16) * examples + 2 * 12 * dim * dim
        embed_and_head += 2 * c * patch_size ** 2 * dim  # the patch embedding's bf16 weight cast
    else:
        per_block = 4 * tokens * (16 * dim + 4 + heads) * examples
    return depth * per_block + embed_and_head


def sharded_memory_per_gpu(config: MetaLearningFullConfig, world_size: int) -> dict[str, float]:
    """Bytes per GPU, by component, for `config` (model.arch='vit') on `world_size` ranks."""
    m, ep = config.model, config.episodes
    if m.arch != "vit":
        raise ValueError("the memory model covers the sharded ViT (model.arch='vit')")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    image = IMAGE_SHAPES.get(ep.dataset)
    if image is None:
        raise ValueError(f"no image shape known for dataset {ep.dataset!r}; known: {', '.join(IMAGE_SHAPES)}")
    shape = dict(in_channels=image[0], image_size=image[1], n_way=ep.n_way, dim=m.dim, depth=m.depth,
                 heads=m.heads, patch_size=m.patch_size, mlp_ratio=m.mlp_ratio)
    total = vit_param_count(**shape)
    block = vit_param_count(**{**shape, "depth": 1}) - vit_param_count(**{**shape, "depth": 0})
    root = total - m.depth * block
    copies = 6 if config.maml.algo == "fomaml" else 4  # weights, grads, base, sum (+ Adam m, v)
    act = dict(image_shape=image, dim=m.dim, depth=m.depth, heads=m.heads, patch_size=m.patch_size)
    inner = vit_activation_bytes(examples=math.ceil(ep.n_way * ep.k_shot / world_size), autocast_bf16=False, **act)
    query = vit_activation_bytes(examples=math.ceil(ep.n_way * ep.q_query / world_size),
                                 autocast_bf16=config.run.autocast == "bf16", **act)
    parts = {"parameters": float(total),
             "sharded_state": 4.0 * copies * total / world_size,
             "fsdp_unsharded": 4.0 * (4 * block + 2 * root),  # two blocks' and the root unit's weights and grads
             "inner_activations": float(inner),
             "query_activations": float(query) if config.maml.algo == "fomaml" else 0.0}
    parts["peak"] = parts["sharded_state"] + parts["fsdp_unsharded"] + max(parts["inner_activations"],
                                                                           parts["query_activations"])
    return parts


def memory_table(presets=("production_1b", "production_3b", "production_7b"), gpus=(8, 16)) -> str:
    rows = ["| preset | parameters | GPUs | sharded state | FSDP working set | activations (inner / query) | peak per GPU |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    gb = lambda b: f"{b / 1e9:.1f} GB"
    for name in presets:
        config = MetaLearningFullConfig.preset(name)
        for n in gpus:
            p = sharded_memory_per_gpu(config, n)
            rows.append(f"| {name} | {p['parameters'] / 1e9:.2f} B | {n} | {gb(p['sharded_state'])} | "
                        f"{gb(p['fsdp_unsharded'])} | {gb(p['inner_activations'])} / {gb(p['query_activations'])} | "
                        f"{gb(p['peak'])} |")
    return "\n".join(rows)
