"""Selective Parameter Update (SPU) as a PEFT method.

Importing `spu_peft` registers SPU with PEFT, so `get_peft_model(model, SPUConfig())` and
`PeftModel.from_pretrained(model, path)` work for SPU adapters.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .adapter_loader import load_adapter
from .compose import dense_deltas, fold_adapters, subtract_adapter
from .config import SPUConfig, SPUPeftType
from .distributed import save_adapter, scalar_parameters
from .hub import model_card_section, update_model_card
from .integrity import SPUAdapterFileError
from .layer import Linear, SPULayer
from .model import MODEL_TAGS, SPUModel
from .selection import SCORES, SelectionReport, select_parameters
from .trainer import SPUSelectionCallback

__version__ = "0.1.0"


def _register() -> None:
    """Put SPU into PEFT's registries by hand: PEFT's public `peft.utils.register_peft_method` refuses every name
    outside its closed `PeftType` enum ("Unknown PEFT type SPU", checked by tests/test_public_api.py)."""
    PEFT_TYPE_TO_CONFIG_MAPPING[SPUPeftType.SPU] = SPUConfig
    PEFT_TYPE_TO_TUNER_MAPPING[SPUPeftType.SPU] = SPUModel
    PEFT_TYPE_TO_PREFIX_MAPPING[SPUPeftType.SPU] = SPUModel.prefix


_register()

__all__ = [
    "MODEL_TAGS",
    "SCORES",
    "Linear",
    "SPUAdapterFileError",
    "SPUConfig",
    "SPULayer",
    "SPUModel",
    "SPUPeftType",
    "SPUSelectionCallback",
    "SelectionReport",
    "__version__",
    "dense_deltas",
    "fold_adapters",
    "load_adapter",
    "model_card_section",
    "save_adapter",
    "scalar_parameters",
    "select_parameters",
    "subtract_adapter",
    "update_model_card",
]
