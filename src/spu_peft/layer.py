"""SPU layers: a frozen `nn.Linear` plus, per adapter, sparse weight deltas and a dense bias delta."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .blocks import LayoutCache, TileLayout, check_divisible
from .config import SPUConfig
from .distributed import full_tensor, is_sharded_tensor
from .encoding import index_dtype, whole_tiles
from .fsdp_units import refuse_base_layer_sharded_alone
from .merging import MergeMixin
from .optim_state import watch_resized
from .scoring import scoring_linear
from .sparse_linear import SparseDelta, compose_bias, compose_weight, run_entries, sparse_delta_linear, union_sum
from .state_sizes import fit_deltas_to_state_dict
from .supports import Float32BufferDict, adapter_seed, budget_shortfall, initial_values, random_support


class SPULayer(MergeMixin, BaseTunerLayer):
    """Per-adapter state of an SPU layer.

    `spu_indices` / `spu_values` hold the entries selected for the current task (the values train).
    `spu_frozen_indices` / `spu_frozen_values` hold what earlier selections of the same adapter learned, folded
    into one sparse delta when `select_parameters` picks new entries, so a task sequence never loses earlier updates;
    they are buffers (saved, never trained) and the frozen values stay float32 whatever the base dtype.
    `spu_bias` is a dense delta of the layer's bias. Indices are flat positions into the weight, sorted ascending;
    those of an adapter with a `block_size` are its tiles' flat positions in the grid of tiles, each standing for
    `br * bc` values (`spu_peft.blocks`): `support` gives any adapter's entries.
    Shapes come from `in_features` / `out_features`, never from the weight tensor, which a sharding engine (FSDP)
    may hold as a flat shard.
    """

    adapter_layer_names = ("spu_values", "spu_bias")
    other_param_names = ("spu_indices", "spu_frozen_indices", "spu_frozen_values")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.spu_values = nn.ParameterDict({})
        self.spu_bias = nn.ParameterDict({})
        self.spu_indices = BufferDict(persistent=True)
        self.spu_frozen_indices = BufferDict(persistent=True)
        self.spu_frozen_values = Float32BufferDict(persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._merge_backups: dict[str, tuple[Any, torch.Tensor | None]] = {}  # (weight backup, bias backup)
        self._scorer = None  # set by `select_parameters` while it scores (see `spu_peft.scoring`)
        self._block_sizes: dict[str, tuple[int, int] | None] = {}  # per adapter, from its config
        self._tile_layouts = LayoutCache()
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def weight_numel(self) -> int:
        return self.out_features * self.in_features

    def update_layer(self, adapter_name: str, config: SPUConfig, key: str) -> None:
        """Create the adapter's tensors with a data-free support; `select_parameters` replaces it later."""
        device = self.get_base_layer().weight.device
        if config.block_size is not None:
            check_divisible(self.weight_shape, config.block_size, key)
        self._block_sizes[adapter_name] = config.block_size
        self._tile_layouts.drop(adapter_name)
        if (shortfall := budget_shortfall(self.weight_shape, config, key)) is not None:
            warnings.warn(shortfall, UserWarning, stacklevel=2)
        indices = random_support(self.weight_shape, config, key, device, adapter_name)
        self.spu_indices[adapter_name] = indices
        seed = adapter_seed(config, "values", adapter_name, key)
        values = initial_values(indices.numel() * self.values_per_index(adapter_name), config, seed, device)
        self.spu_values[adapter_name] = nn.Parameter(values)
        self.spu_frozen_indices[adapter_name] = torch.zeros(0, dtype=indices.dtype, device=device)
        self.spu_frozen_values[adapter_name] = torch.zeros(0, dtype=torch.float32, device=device)
        if config.bias == "spu_only" and self.get_base_layer().bias is not None:
            seed = adapter_seed(config, "bias", adapter_name, key)
            self.spu_bias[adapter_name] = nn.Parameter(initial_values(self.out_features, config, seed, device))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """PEFT's move, except that the frozen values keep float32: a bf16 round trip would erode earlier tasks."""
        frozen = self.spu_frozen_values[adapter_name] if adapter_name in self.spu_frozen_values else None  # noqa: SIM401 (BufferDict has no get)
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        if frozen is not None:
            moved = self.spu_frozen_values[adapter_name]
            self.spu_frozen_values[adapter_name] = frozen.to(moved.device)

    # ---- reading the adapter -------------------------------------------------------------------------------------

    def block_size(self, adapter_name: str) -> tuple[int, int] | None:
        """The tiles the adapter's `spu_indices` count (its config's `block_size` when the adapter was created), None
        for entries: the config object can change later (`refuse_changed_block_size`), the held tiles cannot."""
        return self._block_sizes.get(adapter_name)

    def values_per_index(self, adapter_name: str) -> int:
        """How many values each index of the adapter's `spu_indices` stands for: a tile's entries, or one."""
        block_size = self.block_size(adapter_name)
        return 1 if block_size is None else block_size[0] * block_size[1]

    def support(self, adapter_name: str) -> torch.Tensor:
        """The sorted flat entry positions the adapter's values train (a tiled support's runs expanded)."""
        if (layout := self._layout(adapter_name)) is None:
            return self.spu_indices[adapter_name]
        return run_entries(layout.runs, layout.block_size[1])

    def _layout(self, adapter_name: str) -> TileLayout | None:
        """The tile layout of a tiled adapter's support (cached), None for an entry-level one."""
        if (block_size := self._block_sizes.get(adapter_name)) is None:
            return None
        return self._tile_layouts.get(adapter_name, self.spu_indices[adapter_name], self.weight_shape, block_size)

    def _frozen_deltas(self, adapter_name: str) -> list[SparseDelta]:
        """What earlier selections of the adapter learned, as one delta by entries (none before a reselection)."""
        if not self.spu_frozen_indices[adapter_name].numel():
            return []
        return [(self.spu_frozen_indices[adapter_name], self.spu_frozen_values[adapter_name])]

    def sparse_deltas(self, adapter_name: str) -> list[SparseDelta]:
        """The adapter's sparse deltas by entries (earlier tasks' folded delta first), as (indices, values) pairs."""
        return [*self._frozen_deltas(adapter_name), (self.support(adapter_name), self.spu_values[adapter_name])]

    def forward_deltas(self, adapter_name: str) -> tuple[list[SparseDelta], list[TileLayout | None]]:
        """`sparse_deltas` as the forward composes them, and one tile layout per delta (None for entries): a tiled
        support acts by runs of a tile row's values (`TileLayout.runs`), its entries never expanded."""
        deltas, values = self._frozen_deltas(adapter_name), self.spu_values[adapter_name]
        if (layout := self._layout(adapter_name)) is None:
            return [*deltas, (self.spu_indices[adapter_name], values)], [None] * (len(deltas) + 1)
        return [*deltas, (layout.runs, values.view(-1, layout.block_size[1]))], [None] * len(deltas) + [layout]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._block_sizes.pop(adapter_name, None)
        self._tile_layouts.drop(adapter_name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's dense weight delta, for inspection (the base weight's shape; its dtype, float32 for a
        quantized weight)."""
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        zeros = torch.zeros(self.weight_shape, dtype=dtype, device=weight.device)
        return compose_weight(zeros, self.sparse_deltas(adapter_name))

    def get_delta_bias(self, adapter_name: str) -> torch.Tensor | None:
        """The adapter's dense bias delta, or None when its biases do not train."""
        if adapter_name not in self.spu_bias:
            return None
        return self.spu_bias[adapter_name]

    # ---- changing the support ------------------------------------------------------------------------------------

    def set_support(self, adapter_name: str, indices: torch.Tensor, consolidate: bool = True) -> None:
        """Replace the adapter's trainable entries with `indices` (any order) and zero their values.

        With `consolidate`, what the current values learned is first folded into the frozen delta, so it keeps
        acting on the output. The values keep their `Parameter` object, so an optimizer that already holds it (as
        `Trainer`'s does) trains the new entries; `select_parameters(..., optimizer=...)` drops that optimizer's state
        for them (Adam's moments belonged to the old entries; `spu_peft.optim_state`).
        """
        device = self.get_base_layer().weight.device
        values = self.spu_values[adapter_name]
        indices = indices.to(device=device).long().unique(sorted=True)
        if (block_size := self._block_sizes.get(adapter_name)) is not None:
            tiles = whole_tiles(indices, self.weight_shape, block_size)
            if tiles is None:
                raise ValueError(
                    f"Adapter {adapter_name!r} trains whole {block_size} tiles (`block_size`), but the new support's "
                    f"{indices.numel()} entries are not made of whole tiles. Pass every entry of each tile, or use an "
                    "adapter without `block_size`."
                )
        if indices.numel() != values.shape[0] and is_sharded_tensor(values):
            raise ValueError(
                f"The new support has {indices.numel()} entries where the sharded values hold {values.shape[0]}; "
                "a model sharded with FSDP keeps its parameter shapes. Select with a per-tensor or per-row budget."
            )
        if consolidate:
            self._fold_into_frozen(adapter_name)
        self.spu_indices[adapter_name] = (indices if block_size is None else tiles).to(index_dtype(self.weight_numel))
        if values.shape[0] == indices.numel():
            with torch.no_grad():
                values.zero_()  # in place: sharded parameters (FSDP) keep their storage
        else:
            self.resize_values("spu_values", adapter_name, indices.shape)
        values.grad = None

    def resize_values(self, field: str, adapter_name: str, shape: torch.Size | tuple[int, ...]) -> None:
        """Give the adapter's `spu_values` or `spu_frozen_values` a new length (zeros), keeping dtype and device.

        A parameter keeps its object and only its data changes: an optimizer (a `Trainer`'s) that holds it trains the
        new entries instead of a tensor no layer reads any more. Its gradient belonged to the old entries and has their
        length (`zero_grad(set_to_none=False)` keeps one), which the next backward could not add to: it is dropped.
        An optimizer's state of the old length is refused at its next step, naming the fix. A buffer is replaced."""
        store = getattr(self, field)
        held = store[adapter_name]
        if held.shape == shape:
            return
        resized = torch.zeros(shape, dtype=held.dtype, device=held.device)
        if isinstance(held, nn.Parameter):
            held.data = resized
            held.grad = None
            watch_resized(held)
        else:
            store[adapter_name] = resized

    def _fold_into_frozen(self, adapter_name: str) -> None:
        values = full_tensor(self.spu_values[adapter_name].detach())
        if not values.any():
            return
        frozen_values = self.spu_frozen_values[adapter_name]
        indices, summed = union_sum(
            [(self.spu_frozen_indices[adapter_name], frozen_values), (self.support(adapter_name), values)]
        )
        self.spu_frozen_indices[adapter_name] = indices.to(index_dtype(self.weight_numel))
        self.spu_frozen_values[adapter_name] = summed.to(frozen_values.dtype)


class Linear(nn.Module, SPULayer):
    """SPU on a `torch.nn.Linear`: `y = x (W + sum of sparse deltas)^T + (b + bias deltas)`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SPUConfig, key: str) -> None:
        super().__init__()
        SPULayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, key=key)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """torch's `load_state_dict`, each sparse delta first sized to the state dict's (`fit_deltas_to_state_dict`)."""
        fit_deltas_to_state_dict(self, state_dict, prefix, error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _active_spu_adapters(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.spu_values]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        active = self._active_spu_adapters()
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        terms = [self.forward_deltas(name) for name in active]
        deltas = [delta for delta_list, _ in terms for delta in delta_list]
        layouts = [layout for _, layout_list in terms for layout in layout_list]
        delta_biases = [bias for name in active if (bias := self.get_delta_bias(name)) is not None]
        return self._adapted_forward(x, deltas, delta_biases, layouts, *args, **kwargs)

    def _mixed_batch_forward(
        self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """PEFT's mixed-batch inference (`model(..., adapter_names=[...])`): row `i` of `x` goes through adapter
        `adapter_names[i]` alone, `"__base__"` (or an adapter this layer does not hold) through the base layer, as
        LoRA's layers do. Without it, the names would be dropped and every row would get the active adapters."""
        if len(x) != len(adapter_names):
            raise ValueError(
                f"`adapter_names` names {len(adapter_names)} adapters for {len(x)} inputs; pass one name per input "
                'row ("__base__" for the base model). If you did, the model flattens or repeats its batch before this '
                "layer (OPT flattens batch x tokens before its MLP; `generate` repeats rows for "
                "`num_return_sequences`), and rows cannot be matched to names: run each adapter's inputs as a batch "
                "of their own (`set_adapter`)."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` while adapters are merged into the base weights: the base rows would get "
                "the merged deltas. Call `model.unmerge_adapter()` first."
            )
        result = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(adapter_names):
            if name not in self.spu_values:  # "__base__", or an adapter that does not target this layer
                continue
            rows = [i for i, row_name in enumerate(adapter_names) if row_name == name]
            biases = [bias] if (bias := self.get_delta_bias(name)) is not None else []
            deltas, layouts = self.forward_deltas(name)
            output = self._adapted_forward(x[rows], deltas, biases, layouts)
            result[rows] = output.to(result.dtype)
        return result

    def _adapted_forward(
        self,
        x: torch.Tensor,
        deltas: list[SparseDelta],
        delta_biases: list[torch.Tensor],
        layouts: list[TileLayout | None],
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """`x (W + deltas)^T + b + bias deltas` as one product with the composed weight."""
        refuse_base_layer_sharded_alone(base_layer := self.get_base_layer())  # FSDP gathers no weight for us
        weight = base_layer.weight
        bias = base_layer.bias
        if delta_biases:  # summed in float32 and rounded once on a half-precision base, as the weight is
            bias = compose_bias(bias, delta_biases)
        if not torch.is_autocast_enabled(x.device.type):
            x = self._cast_input_dtype(x, weight.dtype)
        return self._linear(x, weight, bias, deltas, layouts)

    def _linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        deltas: list[SparseDelta],
        layouts: list[TileLayout | None],
    ) -> torch.Tensor:
        if self._scorer is not None:  # select_parameters is scoring: record this layer's weight gradient
            probe, record = self._scorer
            return scoring_linear(x, weight, bias, deltas, probe, record)
        return sparse_delta_linear(x, weight, bias, deltas, layouts)

    def __repr__(self) -> str:
        return "spu." + super().__repr__()
