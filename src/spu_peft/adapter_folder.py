"""The files of an adapter folder beside its config: which weights file belongs to it, and whether the two fit."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import hf_hub_download
from peft.config import PeftConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import CONFIG_NAME

from .constants import PEFT_TASK_MODULES_TO_SAVE
from .integrity import PEFT_PREFIX, WEIGHTS_NAME, SPUAdapterFileError


def refuse_pickled_weights(save_directory: str) -> None:
    """PEFT writes the weights before the config: a `.bin` newer than the folder's safetensors file (or alone) is this
    save's, written with `safe_serialization=False`. SPU loads only its safetensors file, so a config written now
    would make the folder load an older adapter, or none, without a word."""
    pickled = os.path.join(save_directory, "adapter_model.bin")
    weights = os.path.join(save_directory, WEIGHTS_NAME)
    if not os.path.isfile(pickled):
        return
    if os.path.isfile(weights) and os.stat(weights).st_mtime_ns > os.stat(pickled).st_mtime_ns:
        return
    raise ValueError(
        f"{pickled}: `save_pretrained(safe_serialization=False)` saved the adapter as a pickle, which SPU does not "
        f"load (its {WEIGHTS_NAME} carries the digest that shows it intact); {CONFIG_NAME} was not written, so "
        "this folder still holds the SPU adapter saved before, if any. Save again without `safe_serialization=False`."
    )


def check_file_fits_config(config_file: str, weights: str, config: PeftConfig, tensors: dict[str, Any]) -> None:
    """Refuse an adapter file and config that do not belong together, as far as that shows without the model (the
    load hook checks each tensor against the model): every layer with a sparse delta in the file must be one the
    config targets (PEFT's own matching), else PEFT would adapt other layers or none; and every module the config
    trains densely must have a tensor in the file, which PEFT looks up before SPU's load hook sees the file (a missing
    one is a bare `KeyError` there)."""
    layers = {key.removeprefix(PEFT_PREFIX).rpartition(".")[0] for key in tensors if ".spu_" in key}
    if config.target_modules is not None and (
        stray := sorted(layer for layer in layers if not check_target_module_exists(config, layer))
    ):
        raise SPUAdapterFileError(
            f"{weights}: holds a sparse delta for `{stray[0]}` ({len(stray)} such layer(s)), which `target_modules`, "
            f"`exclude_modules` and `modules_to_save` in {config_file} do not select: one of the two files was "
            "edited, or they belong to different adapters. Restore them from a copy, or save the adapter again."
        )
    task_type = getattr(config.task_type, "value", config.task_type)
    added_by_peft = PEFT_TASK_MODULES_TO_SAVE.get(task_type, ())  # each task model adds a list; one of them exists
    for name in config.modules_to_save or ():  # PEFT wraps every module whose path ends with the name
        if name not in added_by_peft and not any(f"{name}." in key for key in tensors):
            raise SPUAdapterFileError(
                f"{weights}: the adapter trains `{name}` densely (modules_to_save) but the file has no tensor of it; "
                "it is corrupt or was saved with other `modules_to_save`. Save the adapter again, or restore the file "
                "from a copy."
            )


def weights_file(name_or_path: str, subfolder: str | None, hub_kwargs: dict[str, Any]) -> str:
    """The adapter file beside the config: in the folder, or fetched from the Hub (PEFT fetches it next anyway)."""
    folder = os.path.join(name_or_path, subfolder or "")
    if os.path.isdir(name_or_path):
        local = os.path.join(folder, WEIGHTS_NAME)
        if not os.path.lexists(local) and os.path.lexists(os.path.join(folder, "adapter_model.bin")):
            raise SPUAdapterFileError(
                f"{os.path.join(folder, 'adapter_model.bin')}: SPU adapters load from {WEIGHTS_NAME}, whose digest "
                "shows they are intact; a pickled .bin carries none. Load it with the code that saved it and save "
                "it again with `save_pretrained` (safe_serialization=True, the default)."
            )
        if not os.path.lexists(local):
            raise SPUAdapterFileError(
                f"{local}: missing beside {CONFIG_NAME}; the adapter folder is incomplete. Save the adapter again, or "
                "restore the file from a copy. (To read only a config, as from an experiment folder, use "
                "`peft.PeftConfig.from_pretrained`.)"
            )
        return local
    try:
        return hf_hub_download(name_or_path, WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
    except Exception as error:  # noqa: BLE001 (offline, missing, or only a .bin: each is a refusal here)
        raise SPUAdapterFileError(
            f"{name_or_path}: could not fetch {WEIGHTS_NAME} ({error}); SPU adapters are loaded from that file. "
            "Check the repository name and your connection, or load from a local folder."
        ) from error
