"""Model cards for SPU adapters: what was adapted, how entries were chosen, how to load the adapter."""

from __future__ import annotations

import os

from huggingface_hub import ModelCard

from .config import SPUConfig
from .model import MODEL_TAGS

SECTION_HEADING = "## Selective Parameter Update (SPU)"


def model_card_section(config: SPUConfig, base_model: str | None = None) -> str:
    """A markdown section describing an SPU adapter, from its config."""
    targets = config.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list)) else targets
    selection = config.selection or {}
    lines = [
        SECTION_HEADING,
        "",
        "This adapter was trained with Selective Parameter Update (Zhang et al., CVPR 2024) using "
        "[spu-peft](https://pypi.org/project/spu-peft/): only a sparse set of entries of each target matrix changed.",
        "",
        f"- base model: `{base_model or config.base_model_name_or_path or 'unknown'}`",
        f"- target modules: `{targets}`; dense modules: `{config.modules_to_save or []}`; bias: `{config.bias}`",
        f"- density: {config.density} ({config.budget})",
        f"- selection score: `{selection.get('score', 'none (seeded random support)')}`, "
        f"share of batches: {selection.get('fraction')}, batches: {selection.get('num_batches')}, "
        f"selections so far: {selection.get('num_selections', 0)}",
    ]
    if selection.get("description"):
        lines.append(f"- selection data: {selection['description']}")
    lines += [
        "",
        "Load it (import `spu_peft` first: it registers SPU with PEFT):",
        "",
        "```python",
        "import spu_peft",
        "from peft import PeftModel",
        "from transformers import AutoModel",
        "",
        f'base = AutoModel.from_pretrained("{base_model or "<base model>"}")',
        'model = PeftModel.from_pretrained(base, "<this repo>")',
        "```",
    ]
    return "\n".join(lines) + "\n"


def update_model_card(model, save_directory: str | os.PathLike, adapter_name: str = "default") -> ModelCard:
    """Add (or refresh) the SPU section and tags in the `README.md` that `save_pretrained` wrote.

    PEFT writes one generic card, in `save_directory` itself, whichever adapters it saves (those other than
    `default` get only their weights and config in `save_directory/<adapter_name>/`); call this after
    `model.save_pretrained(save_directory)`. The section describes `adapter_name`.
    """
    config = model.peft_config.get(adapter_name)
    if not isinstance(config, SPUConfig):
        raise ValueError(f"{adapter_name!r} is not an SPU adapter of this model; adapters: {sorted(model.peft_config)}")
    path = os.path.join(os.fspath(save_directory), "README.md")
    if not os.path.exists(path):
        raise ValueError(f"No model card at {path}; call `model.save_pretrained({os.fspath(save_directory)!r})` first.")
    card = ModelCard.load(path)
    text = card.text
    if SECTION_HEADING in text:
        text = text[: text.index(SECTION_HEADING)].rstrip() + "\n"
    base_model = card.data.get("base_model") or config.base_model_name_or_path
    card.text = text.rstrip() + "\n\n" + model_card_section(config, base_model)
    if not card.data.get("base_model"):  # PEFT writes '' (and an empty base_model tag) for a base without a name
        card.data.base_model = None
    tags = {tag for tag in card.data.get("tags") or [] if tag != "base_model:adapter:"}
    card.data["tags"] = sorted(tags | set(MODEL_TAGS))
    card.save(path)
    return card
