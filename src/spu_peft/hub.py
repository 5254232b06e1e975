"""Model cards for SPU adapters: what was adapted, how entries were chosen, how to load the adapter."""

from __future__ import annotations

import os

from huggingface_hub import ModelCard
from safetensors import safe_open

from .config import SPUConfig
from .integrity import WEIGHTS_NAME
from .model import MODEL_TAGS
from .naming import relative_name
from .vocabulary import embedding_modules

SECTION_HEADING = "## Selective Parameter Update (SPU)"

# The transformers class that builds each PEFT task type's base model: the head PEFT trains (`classifier`, `score`,
# `qa_outputs`) and the module paths the adapter file names (`bert.encoder...`, `model.layers...`) come with it.
TASK_TYPE_TO_MODEL_CLASS: dict[str, str] = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}


def _model_class(config: SPUConfig, model_class: str | None) -> str:
    """The class the card's code builds the base with: the one given (the base the adapter was trained on), else the
    task type's, else the one PEFT's `auto_mapping` recorded for a transformers base, else `AutoModel`."""
    if model_class:
        return model_class
    task_type = getattr(config.task_type, "value", config.task_type)
    if task_type in TASK_TYPE_TO_MODEL_CLASS:
        return TASK_TYPE_TO_MODEL_CLASS[task_type]
    auto_mapping = getattr(config, "auto_mapping", None) or {}
    if str(auto_mapping.get("parent_library", "")).startswith("transformers"):
        return auto_mapping.get("base_model_class") or "AutoModel"
    return "AutoModel"


def model_card_section(
    config: SPUConfig,
    base_model: str | None = None,
    *,
    adapter_name: str = "default",
    model_class: str | None = None,
    vocabulary_size: int | None = None,
) -> str:
    """A markdown section describing an SPU adapter, from its config, with code that loads it.

    The code builds the base with `model_class` (a transformers class name; by default the task type's `AutoModelFor...`
    or `AutoModel`): a bare `AutoModel` lacks a task model's head and names its layers without the task model's
    prefix, so the file would not fit. An adapter other than `default` lives in the subfolder of its name, which
    `PeftModel.from_pretrained` is told, with the name. `vocabulary_size`, for an adapter file holding token
    embeddings (saved for a vocabulary resized before training, or trained densely), makes the code resize the base to
    their rows first, which loading needs (a no-op where the base has them already)."""
    targets = config.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list)) else targets
    selection = config.selection or {}
    cls = _model_class(config, model_class)
    revision = f', revision="{config.revision}"' if config.revision else ""
    subfolder = "" if adapter_name == "default" else f', subfolder="{adapter_name}", adapter_name="{adapter_name}"'
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
        f"from transformers import {cls}",
        "",
        f'base = {cls}.from_pretrained("{base_model or "<base model>"}"{revision})',
        *(
            [f"base.resize_token_embeddings({vocabulary_size})  # the adapter's embeddings' rows"]
            if vocabulary_size
            else []
        ),
        f'model = PeftModel.from_pretrained(base, "<this repo>"{subfolder})',
        "```",
    ]
    return "\n".join(lines) + "\n"


def update_model_card(model, save_directory: str | os.PathLike, adapter_name: str = "default") -> ModelCard:
    """Add (or refresh) the SPU section and tags in the `README.md` that `save_pretrained` wrote.

    PEFT writes one generic card, in `save_directory` itself, whichever adapters it saves (those other than
    `default` get only their weights and config in `save_directory/<adapter_name>/`); call this after
    `model.save_pretrained(save_directory)`. The section describes `adapter_name`, and its code builds the base with
    the class of the model's own base (a transformers class), which the adapter file's layer names fit.
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
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    model_class = type(base).__name__ if type(base).__module__.startswith("transformers.") else None
    folder = os.path.join(os.fspath(save_directory), "" if adapter_name == "default" else adapter_name)
    vocabulary = _saved_vocabulary_size(model, os.path.join(folder, WEIGHTS_NAME))
    section = model_card_section(
        config, base_model, adapter_name=adapter_name, model_class=model_class, vocabulary_size=vocabulary
    )
    card.text = text.rstrip() + "\n\n" + section
    if not card.data.get("base_model"):  # PEFT writes '' (and an empty base_model tag) for a base without a name
        card.data.base_model = None
    tags = {tag for tag in card.data.get("tags") or [] if tag != "base_model:adapter:"}
    card.data["tags"] = sorted(tags | set(MODEL_TAGS))
    card.save(path)
    return card


def _saved_vocabulary_size(model, weights: str) -> int | None:
    """The number of rows of the input token embeddings in the adapter file `weights` (PEFT saves them when the
    vocabulary was resized, `save_embedding_layers`, and when they train densely, `modules_to_save`), or None."""
    if not hasattr(model, "get_base_model") or not os.path.isfile(weights):
        return None
    base = model.get_base_model()
    try:
        inputs = base.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    names = tuple(f"{name}." for name, module in embedding_modules(base) if module is inputs)
    with safe_open(weights, framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is no dict)
            if names and relative_name(key).startswith(names):
                return int(handle.get_slice(key).get_shape()[0])
    return None
