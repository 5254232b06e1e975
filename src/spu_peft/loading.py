"""Loading SPU adapters: the one validator of an adapter's tensors against a model.

An adapter file holds, per SPU layer, the support of each sparse delta (a packed bit mask, int32 indices or, with a
`block_size`, int32 tile positions), its values and the bias delta, plus the dense `modules_to_save`, with
`bias="all"` the model's biases and, where PEFT saved them (`save_embedding_layers`), the token embeddings. Anything
missing, extra, of another dtype than its role allows, non-finite, too large for the model's dtype, of the wrong
length or made for another base raises an `SPUAdapterFileError` that names the module and the field. The changes the
file implies for the model (new supports, resized placeholders) are returned, to be made only once all of it passed.
Saving applies the same rule to what it writes (`check_savable`), so a save never writes what a load refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .config import SPUConfig
from .encoding import (
    BLOCK_SIZE_FIELD,
    TILE_FIELDS,
    check_indices,
    check_values,
    decode_tiles,
    index_dtype,
    unpack_mask,
    whole_tiles,
)
from .integrity import (
    DIGEST_KEY,
    SPUAdapterFileError,
    digest_problem,
)
from .layer import SPULayer
from .naming import PEFT_PREFIX, auxiliary_wrappers, is_stored_bias, relative_name, spu_layers
from .vocabulary import embedding_keys, embedding_modules, shape_problem, tied_problem, vocabulary_problem

# every per-adapter tensor of an SPU layer, as the model's state dict names it
SPU_FIELDS = ("spu_indices", "spu_values", "spu_frozen_indices", "spu_frozen_values", "spu_bias")
# (in-memory index buffer, on-disk mask key, values tensor) of the two sparse deltas each adapter holds
SPARSE_FIELDS = (
    ("spu_indices", "spu_mask", "spu_values"),
    ("spu_frozen_indices", "spu_frozen_mask", "spu_frozen_values"),
)
# every per-adapter field of an SPU layer as keys spell it, in the model or in the file: the keys that end with the
# adapter's name (`<layer>.<field>.<adapter>`), and the only ones, whatever the name is
STORED_FIELDS = frozenset(
    {*SPU_FIELDS, *(mask for _, mask, _ in SPARSE_FIELDS), *TILE_FIELDS.values(), BLOCK_SIZE_FIELD}
)
# the float dtypes a stored weight may have; anything else is bits of another type read as numbers
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# a change to the model that is made only once the whole file has been validated
Change = Callable[[], None]


def _where(module: str, field: str) -> str:
    return f"SPU adapter file, module `{module}` ({field})"


def _finite(tensor: torch.Tensor, where: str) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise SPUAdapterFileError(f"{where}: contains NaN or infinity; the file is corrupt.")


def weight_problem(tensor: torch.Tensor, dtype: torch.dtype) -> str | None:
    """What keeps `tensor` from being a stored weight acting in `dtype`, or None: it must be finite and no larger
    than the square root of the dtype's largest number, which overflows in its product with an activation of the same
    size (1.8e19 for float32 and bfloat16, 256 for float16): no trained weight is that large."""
    if not tensor.is_floating_point() or not tensor.numel() or tensor.device.type == "meta":
        return None
    tensor = tensor.detach()
    if not torch.isfinite(tensor).all():
        return "contains NaN or infinity"
    limit = torch.finfo(dtype).max ** 0.5
    if float(tensor.abs().max()) > limit:
        return (
            f"holds {float(tensor.abs().max()):.3g}, beyond {limit:.3g}, the largest magnitude the model's {dtype} "
            "can multiply without overflow"
        )
    return None


def _check_float(tensor: torch.Tensor, where: str, dtype: torch.dtype) -> None:
    """A stored weight must have a float dtype and pass `weight_problem` for the model's `dtype`."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise SPUAdapterFileError(
            f"{where}: stored as {tensor.dtype}, but weights are stored as float16, bfloat16, float32 or float64; the "
            "file's header was edited or it is corrupt."
        )
    if problem := weight_problem(tensor, dtype):
        raise SPUAdapterFileError(f"{where}: {problem}; the file is corrupt.")


class _AdapterFile:
    """The tensors of an adapter file, looked up with or without PEFT's key prefix, each taken at most once."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.tensors = {key: tensor for key, tensor in state_dict.items() if key != DIGEST_KEY}  # checked apart

    def take(self, key: str) -> torch.Tensor | None:
        found = [k for k in (PEFT_PREFIX + key, key) if k in self.tensors]
        if len(found) > 1:
            raise SPUAdapterFileError(f"SPU adapter file: `{key}` is stored twice (with and without `{PEFT_PREFIX}`).")
        return self.tensors.pop(found[0]) if found else None

    def leftover(self) -> list[str]:
        return sorted(self.tensors)


def decode_adapter_state_dict(
    model: nn.Module, config: SPUConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[Change]]:
    """Validate an SPU adapter file against `model`; return it with supports decoded, and the changes to make.

    Nothing is written: keys come back in the checkpoint spelling (`base_model.model.<module>.<field>`) and the
    changes (each layer's new support and the values placeholder resized to the file's count, which a global
    budget makes differ between layers) are returned for the caller to apply once everything else has passed.
    Raises `SPUAdapterFileError` naming the module and field if the file does not fit.
    """
    file = _AdapterFile(state_dict)
    decoded = _take_embeddings(file, model)  # first: another vocabulary is named, not an SPU `lm_head`'s mask length
    changes: list[Change] = []
    for name, layer in spu_layers(model, adapter_name):
        try:
            decoded.update(_decode_layer(file, name, layer, adapter_name, config.block_size, changes))
        except SPUAdapterFileError:
            raise
        except ValueError as error:  # the support and values checks of `encoding` name module and field already
            raise SPUAdapterFileError(str(error)) from error
    for name, wrapper in auxiliary_wrappers(model, adapter_name):
        decoded.update(_take_auxiliary(file, name, wrapper, adapter_name))
    if config.bias == "all":
        decoded.update(_take_learnable_biases(file, model))
    if leftover := file.leftover():
        shown = ", ".join(f"`{k}`" for k in leftover[:5]) + (
            f" and {len(leftover) - 5} more" if len(leftover) > 5 else ""
        )
        raise SPUAdapterFileError(
            f"SPU adapter file: {len(leftover)} tensor(s) this adapter does not have: {shown}. The file was made for "
            "another model or config, or was edited; load it onto the base model and config it was saved from."
        )
    return decoded, changes


def apply_changes(changes: list[Change]) -> None:
    for change in changes:
        change()


def _decode_layer(
    file: _AdapterFile,
    name: str,
    layer: SPULayer,
    adapter_name: str,
    block_size: tuple[int, int] | None,
    changes: list[Change],
) -> dict[str, torch.Tensor]:
    numel = layer.weight_numel
    base_dtype = layer.get_base_layer().weight.dtype
    out = {}
    stored_block, tiled = file.take(f"{name}.{BLOCK_SIZE_FIELD}"), False  # the block size is read with the tiles
    for buffer_name, mask_name, values_name in SPARSE_FIELDS:
        mask = file.take(f"{name}.{mask_name}")
        indices = file.take(f"{name}.{buffer_name}")
        tiles = file.take(f"{name}.{TILE_FIELDS[buffer_name]}")
        values = file.take(f"{name}.{values_name}")
        if sum(t is not None for t in (mask, indices, tiles)) > 1:
            raise SPUAdapterFileError(
                f"{_where(name, mask_name)}: the file stores more than one of a bit mask, tiles and `{buffer_name}` "
                "for one delta; it was edited or is corrupt."
            )
        if values is None:
            if mask is not None or indices is not None or tiles is not None:
                raise SPUAdapterFileError(
                    f"{_where(name, values_name)}: the file has a support but no values; it is corrupt."
                )
            if buffer_name == "spu_indices":
                raise SPUAdapterFileError(
                    f"{_where(name, buffer_name)}: the file holds nothing for this layer; it was saved from a model "
                    "with different target modules. Load it onto the base model and config it was trained with."
                )
            continue  # no frozen delta: an adapter saved before its first reselection
        if mask is not None:
            support = unpack_mask(mask, numel, _where(name, mask_name))
        elif indices is not None:
            support = check_indices(indices, numel, _where(name, buffer_name))
        elif tiles is not None:
            where = _where(name, TILE_FIELDS[buffer_name])
            support = decode_tiles(tiles, stored_block, block_size, layer.weight_shape, where)
        elif values.numel() == 0:
            support = torch.zeros(0, dtype=torch.long)
        else:
            raise SPUAdapterFileError(
                f"{_where(name, buffer_name)}: the file has values but no support; it is corrupt."
            )
        check_values(values, support.numel(), _where(name, values_name))
        placeholder = getattr(layer, values_name)[adapter_name]
        _check_float(values, _where(name, values_name), limit_dtype(placeholder.dtype, base_dtype))
        order = support.argsort()
        support, values = support[order], values[order].to(placeholder.dtype)
        if buffer_name == "spu_indices" and block_size is not None:  # held as tiles (`SPULayer.spu_indices`)
            support = _as_tiles(support, layer.weight_shape, block_size, _where(name, buffer_name))
        support = support.to(device=layer.get_base_layer().weight.device, dtype=index_dtype(numel))
        changes.append(_layout_change(layer, buffer_name, values_name, adapter_name, support, values.shape))
        out[f"{PEFT_PREFIX}{name}.{buffer_name}"] = support
        out[f"{PEFT_PREFIX}{name}.{values_name}"] = values
        tiled = tiled or tiles is not None
    if stored_block is not None and not tiled:
        raise SPUAdapterFileError(
            f"{_where(name, BLOCK_SIZE_FIELD)}: the file stores a block size but no tiles; it was edited or is corrupt."
        )
    bias = file.take(f"{name}.spu_bias")
    if adapter_name in layer.spu_bias:
        if bias is None:
            raise SPUAdapterFileError(
                f"{_where(name, 'spu_bias')}: the adapter trains this layer's bias but the file has no bias delta; "
                "it is corrupt or was saved with another `bias` setting."
            )
        if bias.dim() != 1 or bias.numel() != layer.out_features:
            raise SPUAdapterFileError(
                f"{_where(name, 'spu_bias')}: shape {tuple(bias.shape)} in the file but ({layer.out_features},) in the "
                "model; the adapter was made for a different base model."
            )
        placeholder = layer.spu_bias[adapter_name]
        _check_float(bias, _where(name, "spu_bias"), limit_dtype(placeholder.dtype, base_dtype))
        out[f"{PEFT_PREFIX}{name}.spu_bias"] = bias.to(placeholder.dtype)
    elif bias is not None:
        raise SPUAdapterFileError(
            f"{_where(name, 'spu_bias')}: the file has a bias delta but this adapter's config trains no bias here "
            "(its bias is 'none' or 'all', or the base layer has no bias); load it with the config it was saved with."
        )
    return out


def limit_dtype(stored: torch.dtype, base: torch.dtype) -> torch.dtype:
    """The narrower of an adapter tensor's dtype and the base weight's: the delta acts in both."""
    if not base.is_floating_point:
        return stored
    return base if torch.finfo(base).max < torch.finfo(stored).max else stored


def _as_tiles(support: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int], where: str) -> torch.Tensor:
    """The tiles of a tiled adapter's stored support, refusing one that is not made of whole tiles."""
    tiles = whole_tiles(support, shape, block_size)
    if tiles is None:
        raise SPUAdapterFileError(
            f"{where}: the adapter's config trains whole {tuple(block_size)} tiles (`block_size`) but the file's "
            f"{support.numel()} entries are not made of whole tiles; it was saved with another config or is corrupt."
        )
    return tiles


def _layout_change(
    layer: SPULayer, buffer_name: str, values_name: str, adapter_name: str, support: torch.Tensor, shape: torch.Size
) -> Change:
    """Install the file's support and give the values placeholder its length (load_state_dict then fills it)."""

    def change() -> None:
        getattr(layer, buffer_name)[adapter_name] = support
        layer.resize_values(values_name, adapter_name, shape)

    return change


def _take_auxiliary(
    file: _AdapterFile, name: str, wrapper: AuxiliaryTrainingWrapper, adapter_name: str
) -> dict[str, torch.Tensor]:
    """The dense `modules_to_save` tensors (under the model's keys where PEFT renamed them already)."""
    out = {}
    model_tensors = dict(wrapper.named_parameters()) | dict(wrapper.named_buffers())
    for checkpoint_key, model_key in wrapper.adapter_state_dict_load_map(adapter_name).items():
        tensor = file.take(f"{name}.{model_key}")
        if tensor is None:
            tensor = file.take(f"{name}.{checkpoint_key}")
        if tensor is None:
            raise _missing_auxiliary(name, checkpoint_key)
        target = model_tensors.get(model_key)
        if target is not None and target.is_floating_point():
            _check_float(tensor, _where(name, checkpoint_key), target.dtype)
            tensor = tensor.to(target.dtype)  # what load_state_dict would do; also when it assigns (meta placeholders)
        else:
            _finite(tensor, _where(name, checkpoint_key))
        out[f"{PEFT_PREFIX}{name}.{model_key}"] = tensor
    return out


def _missing_auxiliary(name: str, key: str) -> SPUAdapterFileError:
    return SPUAdapterFileError(
        f"{_where(name, key)}: the adapter trains `{name}` densely (modules_to_save) but the file has no `{key}`; it "
        "is corrupt or was saved with other `modules_to_save`."
    )


def _take_learnable_biases(file: _AdapterFile, model: nn.Module) -> dict[str, torch.Tensor]:
    """With `bias="all"`, the model's own biases travel in the file: each must be there, a float and finite."""
    out = {}
    for key, parameter in model.named_parameters():
        key = relative_name(key)
        if not is_stored_bias(key):
            continue
        tensor = file.take(key)
        if tensor is None:
            raise SPUAdapterFileError(
                f"SPU adapter file, `{key}`: the adapter has bias='all' but the file lacks this bias; it is corrupt."
            )
        _check_float(tensor, f"SPU adapter file, `{key}`", parameter.dtype)
        out[PEFT_PREFIX + key] = tensor.to(parameter.dtype)
    return out


def _take_embeddings(file: _AdapterFile, model: nn.Module) -> dict[str, torch.Tensor]:
    """The input and output token embeddings PEFT saves beside the adapter when the vocabulary was resized
    (`save_embedding_layers`), loaded into the model's as LoRA's are if its vocabulary has their size (a fresh base has
    its original one until resized as before training); tied ones (`loaded` by storage) take only two equal tensors."""
    out, loaded = {}, {}
    for name, module in embedding_modules(model):
        for key, model_key, target, load in embedding_keys(name, module):
            tensor = file.take(key)
            if tensor is None:
                continue
            where = f"SPU adapter file, `{key}`"
            if problem := vocabulary_problem(tuple(tensor.shape), tuple(target.shape)):
                raise SPUAdapterFileError(f"{where}: {problem}")
            _check_float(tensor, where, target.dtype)
            if not load:
                continue
            value = tensor.to(target.dtype)
            first = loaded.setdefault(target.untyped_storage().data_ptr(), (key, value))
            if first[0] != key and not torch.equal(first[1], value):
                raise SPUAdapterFileError(f"{where}: {tied_problem(first[0])}")
            out[PEFT_PREFIX + model_key] = value
    return out


def check_shapes(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Turn shape mismatches (an adapter made for another base) into a clear error before torch raises one.

    SPU's own tensors were checked by the decoder (their placeholders take the file's length), so only the dense
    tensors (`modules_to_save`, `bias="all"`) are compared here; a token embedding trained densely, by the vocabulary.
    """
    model_state = {relative_name(k): v for k, v in model.state_dict().items()}
    for key, tensor in state_dict.items():
        name = relative_name(key)
        target = model_state.get(name)
        if target is not None and ".spu_" not in name and target.shape != tensor.shape:
            embeddings = tuple(f"{embedding}." for embedding, _ in embedding_modules(model))
            check = vocabulary_problem if name.startswith(embeddings) else shape_problem
            raise SPUAdapterFileError(f"SPU adapter file, `{name}`: {check(tuple(tensor.shape), tuple(target.shape))}")


def check_savable(adapter_name: str, weights: Iterable[tuple[str, torch.Tensor, torch.dtype]]) -> None:
    """Refuse to save what loading would refuse: given (where, tensor, dtype it acts in) of every float tensor a
    save writes, one that is not finite or too large for its dtype (`weight_problem`, the rule loading applies)."""
    for where, tensor, dtype in weights:
        if problem := weight_problem(tensor, dtype):
            raise ValueError(
                f"SPU cannot save adapter {adapter_name!r}: {where} {problem}, and loading would refuse the file. "
                "Training diverged: lower the learning rate or clip gradients, and save from a finite checkpoint."
            )


def auxiliary_state_dict(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict:
    """The dense `modules_to_save` tensors PEFT adds to an adapter's saved state dict after the tuner's hook, taken
    the way PEFT takes them (so the digest the hook adds covers them too)."""
    out = {}
    for name, module in _peft_auxiliary_wrappers(model):
        inner = {k.removeprefix(f"{name}."): v for k, v in state_dict.items() if k.startswith(f"{name}.")}
        out.update({f"{name}.{k}": v for k, v in module.adapter_state_dict(adapter_name, inner).items()})
    return out


def check_digest(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse a state dict whose tensors do not match its `DIGEST_KEY` entry, or that has none. PEFT hands the load
    hook the dense `modules_to_save` tensors under the model's keys already; they are checked under the file's."""
    file_keys = {}
    for name, module in _peft_auxiliary_wrappers(model):
        load_map = module.adapter_state_dict_load_map(adapter_name)
        file_keys.update({f"{name}.{model_key}": f"{name}.{key}" for key, model_key in load_map.items()})
    tensors = {file_keys.get(key, key): tensor for key, tensor in state_dict.items()}
    if problem := digest_problem(tensors):
        embeddings = {key for name, module in embedding_modules(model) for key, *_ in embedding_keys(name, module)}
        others = {key: tensor for key, tensor in tensors.items() if relative_name(key) not in embeddings}
        if len(others) < len(tensors) and digest_problem(others) is None:
            problem = (
                "its token embeddings are outside its digest, which covers every other tensor: they were added after "
                "SPU's save hook, by `get_peft_model_state_dict(save_embedding_layers=...)` (whose state dict only a "
                "save completes) or by a save stopped before it finished. Save the adapter with `save_pretrained` "
                "and load that folder; for a file you trust, `spu_peft.integrity.seal_file(path)` records its digest."
            )
        raise SPUAdapterFileError(f"SPU adapter file: {problem}")


def _peft_auxiliary_wrappers(model: nn.Module) -> Iterator[tuple[str, AuxiliaryTrainingWrapper]]:
    """The `modules_to_save` wrappers under the names PEFT's save and load give their tensors."""
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            yield name.removeprefix("_fsdp_wrapped_module."), module
