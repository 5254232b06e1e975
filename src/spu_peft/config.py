"""Configuration of the SPU adapter."""

from __future__ import annotations

import copy
import enum
import json
import numbers
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import CONFIG_NAME

from .adapter_folder import check_file_fits_config, refuse_pickled_weights, weights_file
from .blocks import check_block_size
from .constants import (
    TRANSFORMERS_MODELS_TO_SPU_MODULES_TO_SAVE_MAPPING,
)
from .integrity import (
    WEIGHTS_NAME,
    SPUAdapterFileError,
    atomic_write_text,
    cover_added_tensors,
    read_adapter_file,
)
from .task_heads import matching_modules, note_read_from_file


class SPUPeftType(str, enum.Enum):
    """PEFT's `PeftType` is a closed enum, so SPU brings its own member with the value PEFT stores on disk."""

    SPU = "SPU"


# The fields `PeftModel.save_pretrained` sets on the live config before it writes the config (it restores only
# `inference_mode`, and only after the write succeeded).
_SET_BY_PEFT_SAVE = ("inference_mode", "base_model_name_or_path")

BUDGETS = ("per_tensor", "per_row", "global")
BIAS_OPTIONS = ("none", "spu_only", "all")


@dataclass
class SPUConfig(PeftConfig):
    """Configuration of [`SPUModel`], the Selective Parameter Update adapter (Zhang et al., CVPR 2024).

    SPU trains a sparse subset of the entries of each targeted weight matrix. The subset is chosen from data by
    [`spu_peft.select_parameters`]; until then a seeded random pattern of the same size stands in, so the adapter works
    like any PEFT adapter from the moment it is created.

    Args:
        target_modules (`Optional[Union[list[str], str]]`):
            Names (suffix match) or a regex of the linear layers to adapt. `None` picks the first MLP linear of each
            block for known model types (CLIP: `fc1` in both towers).
        exclude_modules (`Optional[Union[list[str], str]]`):
            Names or a regex of modules never to adapt.
        layers_to_transform (`Optional[Union[list[int], int]]`):
            Adapt only the targets in these blocks (the index after `layers_pattern` in a module's path, as PEFT reads
            it for LoRA). Only with a list of `target_modules`. `None` (the default) adapts every block.
        layers_pattern (`Optional[Union[list[str], str]]`):
            The name of the model's list of blocks (`'layers'`, `'h'`) whose index `layers_to_transform` reads; `None`
            takes the first numbered segment of the path.
        density (`float`):
            Fraction of the entries of each target matrix that train, in (0, 1]. Defaults to `0.1`, as in the paper.
        budget (`str`):
            How the entries are counted: `"per_tensor"` (top `density` of each matrix, the paper's rule),
            `"per_row"` (top `density` of each output row) or `"global"` (top `density` of all targets pooled, so
            layers get different counts). Defaults to `"per_tensor"`.
        block_size (`Optional[tuple[int, int]]`):
            Select whole tiles of `(rows, columns)` entries instead of single entries: a tile scores the sum of its
            entries' scores, and the top tiles up to `density` are chosen under `budget` (`"per_row"` counts per row
            of tiles). Every target's shape must be divisible by it. Training computes the weight gradient only at
            the selected tiles. `None` (the default) selects entries.
        bias (`str`):
            `"spu_only"` trains a dense, per-adapter delta of the targeted layers' biases (the paper trains the fc1
            biases); `"none"` leaves biases frozen; `"all"` trains every bias of the model in place, shared by all
            adapters, as PEFT's `bias="all"` does for LoRA. Defaults to `"spu_only"`.

            This departs from PEFT on purpose: PEFT's `"<method>_only"` makes the *base* biases of the targeted layers
            trainable, shared by every adapter, and allows only one adapter with a bias. SPU's `"spu_only"` keeps the
            base biases frozen and gives each adapter its own bias delta (`spu_bias`), so one adapter per task works,
            disabling or deleting an adapter restores the base exactly, and adapters can be folded and subtracted.
            `"all"` keeps PEFT's semantics: the base biases change, are saved in the adapter file, are not undone by
            `disable_adapter()`, and a model with such an adapter holds no other adapter.
        modules_to_save (`Optional[list[str]]`):
            Modules trained densely and saved beside the deltas. `None` uses the model type's default (CLIP:
            `visual_projection`) less any module `target_modules` selects, which is adapted sparsely; pass `[]` for
            none.
        init_weights (`bool`):
            `True` starts the values at zero, so the adapter is the identity. `False` draws random non-zero values
            (used by tests). Defaults to `True`.
        seed (`int`):
            Seed of the data-free initial selection, of the `init_weights=False` values and of the `random` score.
            Each is mixed with the adapter's and the layer's name, so layers and adapters differ while a rebuild with
            the same names is identical. Defaults to `0`.
        selection (`Optional[dict]`):
            Filled in by `select_parameters`: the score, the share of data used and a description of the data, so
            a saved adapter says how its entries were chosen. Leave it `None`.
    """

    # Not a field: SPU trains no single token rows. TRL's trainers read it on any PeftConfig and set it when cloning a
    # chat template adds tokens; `SPUModel` refuses a set value, naming a template that adds none.
    trainable_token_indices: ClassVar[list[int] | dict[str, list[int]] | None] = None

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Linear layers to adapt (names or regex); None uses the model type's MLP first layer."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or regex of modules never to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Indices of the blocks whose targets are adapted; None: every block."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the list of blocks that `layers_to_transform` indexes."}
    )
    density: float = field(
        default=0.1, metadata={"help": "Fraction of each target matrix's entries that train, in (0, 1]."}
    )
    budget: str = field(default="per_tensor", metadata={"help": f"How entries are counted, one of {BUDGETS}."})
    block_size: tuple[int, int] | None = field(
        default=None, metadata={"help": "(rows, columns) of the tiles selected instead of entries; None: entries."}
    )
    bias: str = field(default="spu_only", metadata={"help": f"Bias handling, one of {BIAS_OPTIONS}."})
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Dense trainable modules; None uses the model type's default, [] none."},
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: zero values (identity adapter); False: random values."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the initial selection and of the random score."})
    selection: dict[str, Any] | None = field(
        default=None, metadata={"help": "How the entries were selected; written by select_parameters."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SPUPeftType.SPU
        self.target_modules = _names("target_modules", self.target_modules, allow_regex=True)
        self.exclude_modules = _names("exclude_modules", self.exclude_modules, allow_regex=True)
        self.modules_to_save = _names("modules_to_save", self.modules_to_save, allow_regex=False)
        self._check_layers()
        if isinstance(self.density, bool) or not isinstance(self.density, numbers.Real):
            raise ValueError(f"`density` must be a number in (0, 1], got {self.density!r}")
        self.density = float(self.density)
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"`density` must be in (0, 1], got {self.density}")
        if self.budget not in BUDGETS:
            raise ValueError(f"`budget` must be one of {BUDGETS}, got {self.budget!r}")
        self.block_size = check_block_size(self.block_size)
        if self.bias not in BIAS_OPTIONS:
            raise ValueError(f"`bias` must be one of {BIAS_OPTIONS}, got {self.bias!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"`init_weights` must be True or False, got {self.init_weights!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}")
        self.seed = int(self.seed)
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"`seed` must be in [0, 2**63), got {self.seed}")
        if self.selection is not None and not isinstance(self.selection, dict):
            raise ValueError(f"`selection` must be a dict written by select_parameters or None, got {self.selection!r}")

    def _check_layers(self) -> None:
        """`layers_to_transform` / `layers_pattern` as PEFT's matching reads them (the rules of `LoraConfig`): indices
        only select among a list of target names, and a pattern only says where the indices are."""
        indices, pattern = self.layers_to_transform, self.layers_pattern
        if indices is not None and not (
            _is_layer_index(indices) or (isinstance(indices, list) and all(map(_is_layer_index, indices)))
        ):
            raise ValueError(
                f"`layers_to_transform` must be None, a layer index or a list of them (integers >= 0), got {indices!r}"
            )
        names = [pattern] if isinstance(pattern, str) else pattern
        if pattern is not None and not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)):
            raise ValueError(
                f"`layers_pattern` must be None or a name or list of names, e.g. 'layers', got {pattern!r}"
            )
        for name, value in (("layers_to_transform", indices), ("layers_pattern", pattern)):
            if value is not None and isinstance(self.target_modules, str):
                raise ValueError(
                    f"`{name}` cannot be used when `target_modules` is a str ({self.target_modules!r}): the regex "
                    "chooses the layers itself. Pass a list of names, e.g. target_modules=['fc1']."
                )
        if pattern and indices is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")

    def to_json_dict(self) -> dict[str, Any]:
        """The config as `adapter_config.json` holds it; a field JSON cannot hold raises a `ValueError` naming it."""
        output = self.to_dict()
        for key, value in output.items():
            if isinstance(value, set):
                output[key] = sorted(value)
        for spec in fields(self):
            if spec.name not in output:
                continue
            try:
                json.dumps(output[spec.name], allow_nan=False)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"SPUConfig `{spec.name}` = {output[spec.name]!r} cannot be written to {CONFIG_NAME} ({error}); "
                    "use strings, numbers, lists and dicts (e.g. a list instead of a set in a description)."
                ) from error
        return output

    # what SPU's save hook digested (keys, digest), until the config save that follows it; no field: not saved
    _digested: ClassVar[tuple[frozenset[str], torch.Tensor] | None] = None
    # attributes a save leaves on the live config for the config write that follows it; never copied or pickled
    _SAVE_STATE: ClassVar[tuple[str, ...]] = ("_digested", "_fields_before_save")

    def __getstate__(self) -> dict[str, Any]:
        """The config without what a save in progress noted: a copy (`copy.deepcopy`, `own_config`) or a pickle starts
        with no record, so its own later save cannot seal a file by another save's record."""
        return {key: value for key, value in self.__dict__.items() if key not in self._SAVE_STATE}

    def record_digested_keys(self, keys: Iterable[str], digest: torch.Tensor) -> None:
        """Note the keys of the tensors whose digest SPU's save hook just added, and that digest. PEFT writes the
        weights and then this config; tensors it added to the file after the hook (the embedding layers of
        `save_embedding_layers`) are covered then (`integrity.cover_added_tensors`), in a file whose digest is this
        one (another adapter's file has the same keys)."""
        self._digested = (frozenset(keys), digest)

    def note_fields_before_save(self) -> None:
        """Remember the fields that `PeftModel.save_pretrained` sets on this (live) config before writing it; the
        tuner's save hook calls this first. PEFT puts back `inference_mode` only after a successful write, so a
        refused write (`save_pretrained` below) puts them back itself: a refused save leaves the model as it was."""
        self._fields_before_save = {name: getattr(self, name) for name in _SET_BY_PEFT_SAVE}

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write `adapter_config.json` through a temporary file, after checking that JSON can hold every field, and
        extend the digest of the weights PEFT wrote just before to the embedding layers PEFT added (if it did).

        What the save hook noted is spent by this write, written or refused, and used only when
        `PeftModel.save_pretrained` calls it (it always passes `auto_mapping_dict`): a save of the config alone puts
        back no field and seals no file, whatever a hook that no save followed (a state dict taken) left behind."""
        digested, before = (self.__dict__.pop(name, None) for name in self._SAVE_STATE)
        if "auto_mapping_dict" not in kwargs:
            digested, before = None, None
        try:
            self._write(save_directory, digested, **kwargs)
        except BaseException:
            for name, value in (before or {}).items():
                setattr(self, name, value)
            raise

    def _write(self, save_directory: str, digested: tuple[frozenset[str], torch.Tensor] | None, **kwargs: Any) -> None:
        output = self.to_json_dict()
        if (auto_mapping := kwargs.pop("auto_mapping_dict", None)) is not None:
            output["auto_mapping"] = auto_mapping
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` {save_directory!r} is a file; pass a folder.")
        refuse_pickled_weights(save_directory)
        weights = os.path.join(save_directory, WEIGHTS_NAME)
        if digested is not None and os.path.isfile(weights):
            cover_added_tensors(weights, *digested)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(output, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """PEFT's loader, with errors naming the file; then the adapter file beside the config is checked.

        PEFT's loaders (`PeftModel.from_pretrained`, `load_adapter`) read the config before they change the model or
        open the weights, so a weights file that is missing, not a regular file (a folder, a FIFO that would block
        the reader, a dangling symlink), a pickle `adapter_model.bin`, unreadable, altered since it was saved
        (`integrity.read_adapter_file`) or not made with this config is refused here, naming it, while the model is
        untouched. Nothing is recorded on the config (only that it came from a file is noted, beside it): whether the
        file fits the model is checked in the tuner's load hook, on the state dict PEFT reads.
        """
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (ValueError, TypeError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
                raise  # nothing was read: PEFT's own message says what is missing
            raise SPUAdapterFileError(
                f"{os.path.join(folder, CONFIG_NAME)}: {error}. The file is damaged or was edited; save the adapter "
                "again, or restore the file from a copy."
            ) from error
        weights = weights_file(pretrained_model_name_or_path, subfolder, cls._split_kwargs(kwargs)[0])
        check_file_fits_config(os.path.join(folder, CONFIG_NAME), weights, config, read_adapter_file(weights))
        note_read_from_file(config)  # `add_task_heads` adds no head module its file may lack
        return config


def default_modules_to_save(config: SPUConfig, model_type: str | None, module_names: list[str]) -> list[str] | None:
    """The model type's dense modules, for `modules_to_save=None`, less those `target_modules` selects. PEFT keeps a
    dense module out of the targets, so the default made a layer the user named to adapt sparsely (CLIP's
    `target_modules=['fc1', 'visual_projection']`) train densely instead, in silence. A list given is kept as is."""
    kept = [
        wanted
        for wanted in TRANSFORMERS_MODELS_TO_SPU_MODULES_TO_SAVE_MAPPING.get(model_type, ())
        if not any(check_target_module_exists(config, name) for name in matching_modules(wanted, module_names))
    ]
    return kept or None


def own_config(configs: dict[str, PeftConfig], adapter_name: str) -> list[str]:
    """Give `adapter_name` its own copy of a config object another adapter holds too, and return those adapters that
    have been selected.

    PEFT stores the object it is given (`add_adapter("b", model.peft_config["a"])`, as TRL's reference adapters are
    made), and `select_parameters` writes its record into the adapter's config: a shared object would let a selection
    of either adapter rewrite both records. The new adapter starts fresh, as a LoRA adapter does, not as a copy."""
    config = configs[adapter_name]
    sharing = [name for name, other in configs.items() if name != adapter_name and other is config]
    if sharing:
        configs[adapter_name] = copy.deepcopy(config)
    return sharing if config.selection is not None else []


def _is_layer_index(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _names(name: str, value: Any, allow_regex: bool) -> set[str] | list[str] | str | None:
    """Module names as PEFT takes them: None, a list or set of strings, or (where PEFT allows) one regex string."""
    if allow_regex and isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(
                f"`{name}` = {value!r} is read as a regular expression, and it is not one ({error}). Escape special "
                "characters (`re.escape`), or pass a list of module names, e.g. ['fc1']."
            ) from error
    if value is None or (allow_regex and isinstance(value, str)):
        return value
    if isinstance(value, (list, set, tuple)) and all(isinstance(item, str) and item for item in value):
        return set(value) if allow_regex else list(value)
    shape = "a list of module names or a regex string" if allow_regex else "a list of module names"
    raise ValueError(f"`{name}` must be None or {shape}, got {value!r}")


def refuse_token_rows(config: SPUConfig) -> None:
    """Refuse `trainable_token_indices`, which SPU does not train and TRL's trainers set on the config they are given
    when `chat_template_path` clones a template that adds tokens (without the attribute they failed on SPU's config)."""
    if (tokens := getattr(config, "trainable_token_indices", None)) is not None:
        raise ValueError(
            f"SPU does not train single token embeddings, but the config asks for trainable_token_indices={tokens}. "
            "TRL's trainers set it when `chat_template_path` names a tokenizer whose chat template adds tokens. Use a "
            "template that adds none: a `.jinja` file (`chat_template_path='template.jinja'`) or "
            "`tokenizer.chat_template = ...` with the tokenizer's own tokens; then pass a new SPUConfig (TRL changed "
            "this one)."
        )
