"""How much the tasks of a sequence share their selected entries (the paper's Figure 4).

The sequence saves each task's SPU adapter (`runs/<method>_lr<lr>/adapter_task<t>/`); its support is that task's
selection. The repeat rate of task i in task j, per fc1 and per tower, is `spu_peft.studies.overlap.shared`: the
share of task i's entries that task j also selected (about the density by chance; the paper reports 30-40%).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from peft import PeftModel
from torch import nn

from ..layer import SPULayer
from ..naming import spu_layers
from ..studies.overlap import shared, tower_layers

ADAPTER_DIR = re.compile(r"adapter_task(\d+)$")


def model_support(model: nn.Module, adapter_name: str = "default") -> dict[str, set[int]]:
    """Per SPU layer (relative name), the entries `adapter_name` trains now (flat indices into the weight).

    Raises:
        ValueError: when no SPU layer holds `adapter_name` (an empty support would compare as sharing nothing).
    """
    support = {name: set(layer.support(adapter_name).tolist()) for name, layer in spu_layers(model, adapter_name)}
    if not support:
        held = sorted({a for m in model.modules() if isinstance(m, SPULayer) for a in m.spu_indices})
        raise ValueError(
            f"adapter_name: no SPU layer holds {adapter_name!r}; "
            + (
                f"pass one of {held}"
                if held
                else f"{type(model).__name__} has no SPU adapter, add one with get_peft_model"
            )
        )
    return support


def adapter_support(base: nn.Module, adapter_dir: str | os.PathLike[str]) -> dict[str, set[int]]:
    """`model_support` of the adapter saved in `adapter_dir`, loaded onto a copy of `base` (which is not changed)."""
    return model_support(PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)))


def task_adapter_dirs(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The `adapter_task<t>` folders of one method's run folder, in task order."""
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(
            f"run_dir: {str(run_dir)!r} is not a folder; make the sequence run first (`run_sequence` or "
            "benchmarks/cl_sequence.py with --output-dir results/<sequence>), then pass its run of an SPU method, "
            "e.g. results/<sequence>/runs/spu_replay_lr0.0003"
        )
    found = [(int(m.group(1)), p) for p in Path(run_dir).iterdir() if (m := ADAPTER_DIR.match(p.name)) and p.is_dir()]
    if not found:
        raise ValueError(
            f"run_dir: {str(run_dir)!r} holds no adapter_task<t>/ folder; pass a run of an SPU method, e.g. "
            "results/<sequence>/runs/spu_replay_lr0.0003"
        )
    return [p for _, p in sorted(found)]


def task_supports(base: nn.Module, run_dir: str | os.PathLike[str]) -> list[dict[str, set[int]]]:
    """Each task's selection, read from the adapters a sequence run saved in `run_dir`."""
    return [adapter_support(base, d) for d in task_adapter_dirs(run_dir)]


def repeat_rates(supports: Sequence[dict[str, set[int]]]) -> dict[str, np.ndarray]:
    """Per layer, and pooled per tower (`vision_model`, `text_model`) where the layers belong to one, the
    (tasks, tasks) matrix whose entry (i, j) is the share of task i's entries that task j selected too."""
    if not supports:
        raise ValueError("supports: empty; pass one selection (layer name -> entries) per task")
    layers = list(supports[0])
    for index, support in enumerate(supports[1:], 1):
        lacks, extra = sorted(set(layers) - set(support)), sorted(set(support) - set(layers))
        if lacks or extra:
            raise ValueError(
                f"supports[{index}] "
                + (f"lacks {lacks}" if lacks else f"has {extra}")
                + " where supports[0] "
                + ("has them" if lacks else "does not")
                + "; repeat rates compare adapters on the same layers, so pass supports of one target_modules setup"
            )
    groups = {name: [name] for name in layers}
    groups |= {tower: names for tower, names in tower_layers(supports[0]).items() if names}
    return {
        group: np.array([[shared(a, b, names) for b in supports] for a in supports]) for group, names in groups.items()
    }
