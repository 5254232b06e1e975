"""SPU on bitsandbytes-quantized linear layers (`Linear8bitLt`, `Linear4bit`): QLoRA-style training of sparse deltas.

The quantized base layer computes its own output; the sparse deltas' product is added in the adapter's float dtype
(`QuantizedLinear`). Magnitude scores and merges read the dequantized weight; a merge requantizes `W + delta` and
keeps the original quantized weight, so `unmerge` restores it exactly.

`spu_layer_class` picks the SPU layer for any target: these for bitsandbytes' layers, `Linear` for a plain one.
bitsandbytes is imported only by a model that holds its layers, so `spu_peft` itself never imports it.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from abc import abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .blocks import TileLayout
from .layer import Linear
from .sparse_linear import SparseDelta, compose_weight


class QuantizedLinear(Linear):
    """SPU on a quantized linear layer: `y = base_layer(x) + x (sum of sparse deltas)^T + bias deltas`.

    The quantized layer runs its own kernel; the deltas' product is computed in the adapter values' dtype (autocast's
    when on) and added in the base output's dtype, as PEFT's LoRA does on quantized bases. Subclasses say how to read
    the weight as floats (`dense_base_weight`, for magnitude scores and merges) and how to requantize a merged weight
    (`_requantize`, which returns the replaced quantized weight so `_restore_weight` can put it back exactly).
    A merge dequantizes, adds the deltas and requantizes, so the merged weight is rounded to the quantization grid (a
    warning gives the largest rounding error); `unmerge` puts the original quantized weight back, bit for bit.
    """

    quantization = "quantized"  # how the warnings name the format

    def _adapted_forward(
        self,
        x: torch.Tensor,
        deltas: list[SparseDelta],
        delta_biases: list[torch.Tensor],
        layouts: list[TileLayout | None],
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        dtype = deltas[-1][1].dtype  # the trained values' (frozen deltas are float32 whatever the adapter's dtype)
        bias = None
        for delta_bias in delta_biases:
            bias = delta_bias.to(dtype) if bias is None else bias + delta_bias.to(dtype)
        # an all-zero "weight" that costs no memory: the product is the deltas' alone, with their gradients
        zero = torch.zeros((), dtype=dtype, device=x.device).expand(self.weight_shape)
        return result + self._linear(x, zero, bias, deltas, layouts).to(result.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's dense weight delta in float32, the dtype it acts in here: a 4-bit weight's own dtype is that
        of the storage of its codes (`bnb_4bit_quant_storage`, bfloat16 for FSDP), which would round the delta."""
        device = self.get_base_layer().weight.device
        return compose_weight(torch.zeros(self.weight_shape, device=device), self.sparse_deltas(adapter_name))

    def _write_merged_weight(self, adapter_names: list[str], merged_weight: torch.Tensor) -> Any:
        backup = self._requantize(merged_weight)
        adapter_name = adapter_names[0] if len(adapter_names) == 1 else adapter_names
        error = (self.dense_base_weight() - merged_weight.float()).abs().max().item()
        warnings.warn(
            f"Merging SPU adapter {adapter_name!r} into a {self.quantization} weight rounds `W + delta` to the "
            f"quantization grid: the merged weight differs from it by up to {error:.3g} per entry, so outputs may "
            "differ slightly from the unmerged model's. `unmerge` restores the original quantized weight exactly.",
            UserWarning,
            stacklevel=4,
        )
        return backup

    @abstractmethod
    def dense_base_weight(self) -> torch.Tensor:
        """The dequantized base weight (float32)."""

    @abstractmethod
    def _requantize(self, weight: torch.Tensor) -> Any:
        """Make the float `weight`, quantized, the base weight; return the replaced quantized weight."""

    @abstractmethod
    def _restore_weight(self, backup: Any) -> None:
        """Put back the quantized weight `_requantize` returned."""


def _bnb():
    """The bitsandbytes module if it has been imported (a model holding its layers did), else None."""
    return sys.modules.get("bitsandbytes")


def bnb_layer_class(base: nn.Module) -> type[QuantizedLinear] | None:
    """The SPU layer for a bitsandbytes linear layer, None for any other module.

    Raises:
        ValueError: an 8-bit layer that keeps float16 master weights (`has_fp16_weights=True`), which SPU does not
            support.
    """
    bnb = _bnb()
    if bnb is None:
        return None
    if isinstance(base, bnb.nn.Linear4bit):
        return Linear4bit
    if isinstance(base, bnb.nn.Linear8bitLt):
        if base.state.has_fp16_weights:
            raise ValueError(
                "SPU supports bitsandbytes `Linear8bitLt` layers with int8 weights only, not `has_fp16_weights=True` "
                "(float16 master weights); load the model with BitsAndBytesConfig(load_in_8bit=True) and its default "
                "`llm_int8_has_fp16_weight=False`."
            )
        return Linear8bitLt
    return None


@contextlib.contextmanager
def cpu_repacking_off(model: nn.Module) -> Iterator[None]:
    """Keep bitsandbytes from repacking `model`'s 4-bit weights for its CPU inference kernel while selection scores.

    Scoring runs in eval mode, where a `Linear4bit` on a CPU with AVX512-BF16 whose input needs no gradient (one before
    the first target) repacks its weight in place, for good: bfloat16 block scales move the base's output, and the
    layer passes no gradient to its input in training. Each layer's setting is put back afterwards. Layers an earlier
    evaluation repacked are unpacked first (`unpack_cpu_repacked`): through them every score would be zero.
    """
    unpack_cpu_repacked(model)
    bnb = _bnb()
    layers = [] if bnb is None else [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    layers = [m for m in layers if getattr(m, "support_avx512bf16_for_cpu", False)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for layer in layers:
            layer.support_avx512bf16_for_cpu = True


def _is_repacked(weight: nn.Parameter) -> bool:
    return getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False)


def _unpacked(codes: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """bitsandbytes' inverse of its CPU repacking (`state` is changed in place), with the block scales of an unnested
    state put back in the order dequantization reads them. The repacking stores them as an (in_features / blocksize,
    out_features) matrix, and bitsandbytes 0.50's inverse leaves them so: each row that spans more than one block then
    dequantizes with other rows' scales (entries off by 70% on a tiny LLaMA; its own `_save_to_state_dict` and `.cuda()`
    write that weight back). A nested state's scales are put back in order by the inverse itself."""
    nested = state.original_nested
    codes, state = _bnb().functional._convert_weight_packed_for_cpu_inverse(codes, state)
    if not nested and state.absmax.dim() == 2:
        state.absmax = state.absmax.t().reshape(-1).float()
    return codes, state


def unpack_cpu_repacked(model: nn.Module) -> None:
    """Put every 4-bit weight of `model` that bitsandbytes repacked for its CPU inference kernel back in its standard
    layout, in place (the repacking's bfloat16 block scales stay, so the outputs stay the repacked model's).

    A `Linear4bit`'s first eval-mode forward on a CPU with AVX512-BF16, on an input that needs no gradient (an
    evaluation, `generate`), repacks its weight for good. The packed kernel has no backward, so every gradient that
    passes through such a layer is silently zero (a selection scores nothing, training stops learning), and
    bitsandbytes' own unpacking, run by `state_dict()`, scrambles an unnested weight's scales (`_unpacked`).
    """
    bnb = _bnb()
    if bnb is None:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and _is_repacked(module.weight):
            weight = module.weight
            weight.data, weight.quant_state = _unpacked(weight.data, weight.quant_state)
            module.quant_state = weight.quant_state


def guard_cpu_repacking(model: nn.Module) -> None:
    """Hooks on `model` that unpack its repacked 4-bit weights (`unpack_cpu_repacked`) before each training forward
    with gradients and before `state_dict()` (so `save_pretrained`, `Trainer` checkpoints and `torch.save` write, and
    leave, the right weight). Nothing is registered on a model without a bitsandbytes 4-bit layer."""
    bnb = _bnb()
    if bnb is None or not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()):
        return
    model.register_forward_pre_hook(_unpack_before_training)
    model.register_state_dict_pre_hook(_unpack_before_saving)


def _unpack_before_training(module: nn.Module, args: tuple) -> None:
    if module.training and torch.is_grad_enabled():
        unpack_cpu_repacked(module)


def _unpack_before_saving(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    unpack_cpu_repacked(module)


class Linear8bitLt(QuantizedLinear):
    """SPU on a bitsandbytes `Linear8bitLt` (LLM.int8(): int8 codes with one float scale per output row)."""

    quantization = "8-bit"

    def dense_base_weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        weight = base.weight
        if weight.dtype != torch.int8:  # not quantized yet (quantization happens on the first move to a device)
            return weight.detach().float()
        scales = base.state.SCB if base.state.SCB is not None else weight.SCB  # the first forward moves them
        return _bnb().functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))

    def _requantize(self, weight: torch.Tensor) -> tuple:
        bnb = _bnb()
        base = self.get_base_layer()
        backup = (base.weight, base.state.CB, base.state.SCB)
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))  # as `Int8Params` does
        base.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
        base.state.CB = base.state.SCB = None  # the next forward takes the new codes and scales from the weight
        return backup

    def _restore_weight(self, backup: tuple) -> None:
        base = self.get_base_layer()
        base.weight, base.state.CB, base.state.SCB = backup


class Linear4bit(QuantizedLinear):
    """SPU on a bitsandbytes `Linear4bit` (QLoRA's NF4 or FP4 codes with one scale per block of entries)."""

    quantization = "4-bit"

    def dense_base_weight(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        if not weight.bnb_quantized:  # not quantized yet (quantization happens on the first move to a device)
            return weight.detach().float()
        codes, state = weight.data, weight.quant_state
        if _is_repacked(weight):  # repacked in place for bitsandbytes' CPU inference kernel: unpack a copy of it
            codes, state = _unpacked(codes, copy.deepcopy(state))
        return _bnb().functional.dequantize_4bit(codes, state).float()

    def _requantize(self, weight: torch.Tensor) -> tuple:
        bnb = _bnb()
        base = self.get_base_layer()
        old = base.weight
        settings = {
            "blocksize": old.blocksize,
            "compress_statistics": old.compress_statistics,
            "quant_type": old.quant_type,
            "quant_storage": old.quant_storage,
        }
        codes, new_state = bnb.functional.quantize_4bit(weight.to(_original_dtype(old)), **settings)
        base.weight = bnb.nn.Params4bit(
            codes, requires_grad=False, quant_state=new_state, module=base, bnb_quantized=True, **settings
        )
        base.quant_state = new_state
        return (old,)

    def _restore_weight(self, backup: tuple) -> None:
        base = self.get_base_layer()
        (base.weight,) = backup
        base.quant_state = base.weight.quant_state


def _original_dtype(weight: nn.Parameter) -> torch.dtype:
    """The dtype a 4-bit weight was quantized from (bitsandbytes dequantizes to it)."""
    state = weight.quant_state
    if not weight.bnb_quantized or state is None:
        return weight.dtype
    if getattr(state, "packing_format_for_cpu", False):  # the CPU repacking records the dtype it replaced
        return state.original_dtype
    return state.dtype


def spu_layer_class(base: nn.Module, key: str) -> type[Linear]:
    """The SPU layer for a target: bitsandbytes' quantized layers get theirs; a plain linear layer (`torch.nn.Linear`
    or a subclass that keeps its `forward`, which SPU replaces by `F.linear` on the composed weight) with a
    floating-point weight gets `Linear`. Anything else is refused, by its type, before it could run wrongly."""
    quantized = bnb_layer_class(base)
    if quantized is not None:
        return quantized
    weight = getattr(base, "weight", None)
    what = f"a {type(base).__module__}.{type(base).__qualname__}"
    if isinstance(base, nn.Linear):
        if type(base).forward is not nn.Linear.forward:
            what += " (a linear layer with its own `forward`, which SPU would bypass)"
        elif not (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
            what += f" with a {getattr(weight, 'dtype', type(weight).__name__)} weight"
        else:
            return Linear
    raise ValueError(
        f"`target_modules` matched {key!r}, {what}; SPU adapts `torch.nn.Linear` layers with floating-point weights "
        "and bitsandbytes' `Linear8bitLt` / `Linear4bit`. Narrow `target_modules` to such layers (e.g. ['fc1'])."
    )
