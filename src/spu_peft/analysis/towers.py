"""Where causal tracing corrupts and restores a transformers model, found by its module names.

A *tower* is one stack of transformer blocks with the embedding that feeds it (CLIP has two: `vision_model` and
`text_model`; ViT, BERT and LLaMA-style models one each). In every block a *kind* names one module whose output can
be restored: the whole block, its attention, its MLP, and the MLP's first and second layers. The names below cover
CLIP, SigLIP, ViT, BERT and LLaMA-style models of transformers 5; another architecture passes its own `TraceTower`s.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from ..naming import relative_name

# Stacks of blocks, as `<tower>.<stack>.<i>`.
BLOCK_STACKS = ("encoder.layers", "encoder.layer", "layers", "layer")
# Modules whose output is the input embedding (patches or tokens), relative to the tower.
EMBEDDINGS = (
    "embeddings.patch_embedding",
    "embeddings.patch_embeddings",
    "embeddings.token_embedding",
    "embeddings.word_embeddings",
    "embed_tokens",
)
# Per kind, the first of these names a block holds is the module restored. BERT's `attention.output.dense` is the
# attention's own contribution (its `attention` module adds the residual and a LayerNorm); its MLP's output is
# `output.dense`, its second layer's (as a CLIP MLP's output is its `fc2`'s).
KIND_MODULES: dict[str, tuple[str, ...]] = {
    "block": ("",),
    "attention": ("attention.output.dense", "self_attn", "attention", "attn"),
    "mlp": ("mlp", "output.dense"),
    "fc1": ("mlp.fc1", "intermediate.dense", "mlp.up_proj", "mlp.c_fc"),
    "gate": ("mlp.gate_proj",),
    "fc2": ("mlp.fc2", "output.dense", "mlp.down_proj", "mlp.c_proj"),
}
# Kinds that are a choice of SPU `target_modules`; `block` and `mlp` hold several layers.
LAYER_KINDS = ("fc1", "gate", "fc2", "attention")


@dataclass(frozen=True)
class TraceTower:
    """One stack of blocks to trace.

    Args:
        name: the tower's module name (`vision_model`; `""` for a bare model).
        embedding: the module whose output gets the noise (full name).
        blocks: the full names of the blocks, in order.
        kinds: per kind, the restored module's name relative to a block (`""`: the block itself).
        targets: per kind, the block-relative names of the `nn.Linear` layers an adapter of that kind trains.
    """

    name: str
    embedding: str
    blocks: tuple[str, ...]
    kinds: dict[str, str] = field(default_factory=dict)
    targets: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def module(self, block: int, kind: str) -> str:
        """The full name of `kind`'s module in block `block`."""
        return ".".join(p for p in (self.blocks[block], self.kinds[kind]) if p)


def _stacks(model: nn.Module) -> Iterator[tuple[str, str, nn.ModuleList]]:
    """(tower name, stack name, blocks) of every block stack, outermost first, nested ones skipped."""
    seen: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(s + ".") for s in seen):
            continue
        for stack in BLOCK_STACKS:
            if name == stack or name.endswith("." + stack):
                seen.append(name)
                yield name[: -len(stack)].rstrip("."), name, module
                break


def _linears(block: nn.Module, prefix: str) -> tuple[str, ...]:
    """Block-relative names of the `nn.Linear` modules at or under `prefix` (a PEFT-wrapped one by its own name)."""
    names: list[str] = []
    for name, module in block.named_modules():
        inside = not prefix or name == prefix or name.startswith(prefix + ".")
        name = name.removesuffix(".base_layer")
        if inside and isinstance(module, nn.Linear) and name not in names:
            names.append(name)
    return tuple(names)


def find_towers(model: nn.Module) -> list[TraceTower]:
    """Every tower of `model` with an embedding and blocks named as CLIP, SigLIP, ViT, BERT or LLaMA name them.

    Raises:
        ValueError: when no tower is found (pass `towers=` to `causal_trace` with your model's names).
    """
    modules = dict(model.named_modules())
    towers = []
    for tower, stack, blocks in _stacks(model):
        embedding = next(
            (f"{tower}.{e}".lstrip(".") for e in EMBEDDINGS if f"{tower}.{e}".lstrip(".") in modules), None
        )
        if embedding is None or not len(blocks):
            continue
        first = blocks[0]
        present = {name for name, _ in first.named_modules()}
        kinds = {
            k: next(c for c in options if c in present) for k, options in KIND_MODULES.items() if present & set(options)
        }
        targets = {k: _linears(first, m if k != "attention" else m.split(".")[0]) for k, m in kinds.items()}
        names = tuple(f"{stack}.{i}" for i in range(len(blocks)))
        towers.append(TraceTower(relative_name(tower), embedding, names, kinds, targets))
    if not towers:
        raise ValueError(
            f"towers: found no block stack ({', '.join(BLOCK_STACKS)}) with an embedding ({', '.join(EMBEDDINGS)}) "
            f"in {type(model).__name__}; pass `towers=[TraceTower(...)]` naming its modules"
        )
    return towers
