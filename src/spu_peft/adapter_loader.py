"""The user's door for loading an adapter folder: `load_adapter` runs PEFT's loaders after the checks PEFT's own code
would make unclearly or not at all (an interrupted save, a damaged config, a weights file PEFT reads without SPU's
config hook)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peft import PeftModel
from peft.utils import CONFIG_NAME
from torch import nn

from .config import SPUPeftType
from .injection import take_injection
from .integrity import WEIGHTS_NAME, SPUAdapterFileError, check_regular_file, read_adapter_file, recover_folder


def check_config_file(path: str | os.PathLike[str]) -> None:
    """Refuse an `adapter_config.json` that PEFT itself would read with an unclear error: not a regular file, not
    UTF-8 JSON, not a JSON object, or not an SPU config."""
    check_regular_file(path, CONFIG_NAME)
    try:
        loaded = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise SPUAdapterFileError(
            f"{os.fspath(path)}: not UTF-8 JSON ({error}); the file is damaged or was re-encoded. Save the adapter "
            "again, or restore the file from a copy."
        ) from error
    if not isinstance(loaded, dict):
        raise SPUAdapterFileError(
            f"{os.fspath(path)}: holds a JSON {type(loaded).__name__}, not the object of settings `save_pretrained` "
            "writes; the file was edited. Save the adapter again, or restore the file from a copy."
        )
    if loaded.get("peft_type") != SPUPeftType.SPU.value:
        raise SPUAdapterFileError(
            f"{os.fspath(path)}: `peft_type` is {loaded.get('peft_type')!r}, not 'SPU'; this is not an SPU adapter. "
            "Load it with the PEFT method that saved it."
        )


def load_adapter(model: nn.Module, model_id: str | os.PathLike[str], adapter_name: str = "default", **kwargs: Any):
    """Load an SPU adapter onto a base model (`PeftModel.from_pretrained`) or into a `PeftModel` (`load_adapter`),
    with the checks PEFT's own code would make unclearly or not at all; returns the `PeftModel`.

    Before PEFT runs, a local folder's interrupted save (`spu_peft.save_adapter`) is completed or cleaned, and the
    config is checked (a regular file of UTF-8 JSON holding an SPU config); loading into an adapter name that exists
    already also checks the weights file (PEFT reads no config there, so SPU's config hook does not run), and that
    adapter, even one just created and untouched, is never removed by a refusal. Every refusal is an
    `SPUAdapterFileError` naming the file, and leaves the model as it was. `kwargs` go to PEFT.
    """
    folder = os.path.join(os.fspath(model_id), kwargs.get("subfolder") or "")
    recover_folder(model_id)  # a no-op for a Hub name or a folder without leftovers
    existing = isinstance(model, PeftModel) and adapter_name in model.peft_config
    if os.path.isdir(os.fspath(model_id)):
        check_config_file(os.path.join(folder, CONFIG_NAME))
        if existing:
            read_adapter_file(os.path.join(folder, WEIGHTS_NAME))
    if existing:
        take_injection(model.base_model, adapter_name)  # the caller's adapter: a refused file never removes it
    if isinstance(model, PeftModel):
        model.load_adapter(os.fspath(model_id), adapter_name=adapter_name, **kwargs)
        return model
    return PeftModel.from_pretrained(model, os.fspath(model_id), adapter_name=adapter_name, **kwargs)
