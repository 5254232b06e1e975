"""A tensor's version counter, which notes of "this tensor as it was" compare (a layout cache, an injection's note)."""

from __future__ import annotations

import torch


def tensor_version(tensor: torch.Tensor) -> int:
    """`tensor._version`, or 0 for an inference tensor (made under `torch.inference_mode()`, as an adapter created or
    loaded there is), which has no counter and which no code outside inference mode can change in place."""
    return 0 if tensor.is_inference() else tensor._version
