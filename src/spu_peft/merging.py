"""Merging an SPU layer's adapters into its base weight and bias, and undoing it bit for bit."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge

from .sparse_linear import compose_bias, compose_weight


class MergeMixin:
    """`merge` / `unmerge` of `SPULayer`, which provides `spu_values`, `sparse_deltas`, `get_delta_bias`,
    `merged_adapters`, `_merge_backups` and `get_base_layer`; a quantized layer overrides how the base weight is read
    and written (`dense_base_weight`, `_write_merged_weight`, `_restore_weight`)."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active adapters' deltas to the base weight and bias in place, keeping what the merge overwrote so
        that `unmerge` restores them bit for bit.

        Every merged adapter is composed with the unmerged base at once, as the unmerged forward composes the active
        ones: on a half-precision base `W + all deltas` is rounded once, not once per adapter, so the merged model
        computes what the unmerged one did. Merging more adapters later unmerges first and merges them all anew.
        """
        new = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.spu_values]
        previous = list(self.merged_adapters)
        if not new:
            return
        if previous:
            self.unmerge()
        try:
            self._merge_together([*previous, *new], new if safe_merge else None)
        except ValueError:
            if previous:  # put back the merge that was there (it passed its checks then)
                self._merge_together(previous, None)
            raise

    def _merge_together(self, names: list[str], check: list[str] | None) -> None:
        """Write `W + all deltas of names` and `b + their bias deltas` into the unmerged base layer, refusing a
        non-finite result when `check` names the adapters to blame; the first name keeps the backup."""
        base_layer = self.get_base_layer()
        deltas = [delta for name in names for delta in self.sparse_deltas(name)]
        merged_weight = compose_weight(self.dense_base_weight(), deltas).detach()
        delta_biases = [bias.detach() for name in names if (bias := self.get_delta_bias(name)) is not None]
        merged_bias = compose_bias(base_layer.bias.data, delta_biases) if delta_biases else None
        if check and not (
            torch.isfinite(merged_weight).all() and (merged_bias is None or torch.isfinite(merged_bias).all())
        ):
            blamed = check[0] if len(check) == 1 else check
            raise ValueError(f"NaNs detected in the merged weights. The adapter {blamed} seems to be broken")
        bias_backup = None if merged_bias is None else base_layer.bias.data.clone()
        self._merge_backups[names[0]] = (self._write_merged_weight(names, merged_weight), bias_backup)
        self._merge_backups.update({name: (None, None) for name in names[1:]})  # `unmerge` pops the last first
        if merged_bias is not None:
            base_layer.bias.data.copy_(merged_bias)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Restore the base weight and bias exactly as they were before `merge`."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight_backup, bias = self._merge_backups.pop(name)
            if weight_backup is not None:
                self._restore_weight(weight_backup)
            if bias is not None:
                base_layer.bias.data.copy_(bias)

    def dense_base_weight(self) -> torch.Tensor:
        """The base weight as a dense floating-point matrix (detached): what magnitude scores and merges read."""
        return self.get_base_layer().weight.detach()

    def _write_merged_weight(self, adapter_names: list[str], merged_weight: torch.Tensor) -> Any:
        """Make `merged_weight` the base weight; return what `_restore_weight` needs to undo it: the entries the
        adapters touch (a sparse delta changes only those)."""
        weight = self.get_base_layer().weight
        touched = torch.cat([idx.long() for name in adapter_names for idx, _ in self.sparse_deltas(name)]).unique()
        backup = (touched, weight.data.reshape(-1)[touched].clone())
        weight.data.copy_(merged_weight)
        return backup

    def _restore_weight(self, backup: Any) -> None:
        touched, original = backup
        self.get_base_layer().weight.data.reshape(-1)[touched] = original
