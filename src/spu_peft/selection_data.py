"""The task data `select_parameters` scores on: which batches it takes, and the objective it differentiates.

Mistakes in the data are caught here, before the first forward pass: keys the model's forward does not take, labels
a data-free or output-norm score would silently ignore, and an iterator with no length whose `fraction` cannot be
applied (an endless one would run for ever).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import typing
import warnings
from collections.abc import Iterable, Iterator, Mapping
from itertools import chain, islice
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

# Keys of labelled batches that a forward may leave in its `**kwargs` unused (Trainer keeps them for every model)
LABEL_KEYS = frozenset({"labels", "label", "label_ids", "return_loss"})


class BatchChecker:
    """Checks each batch's keys against the forward's before it runs; warns once about ignored labels.

    A `PeftModel` passes the batch on to its base model, so that model's forward is read. Its named arguments are
    taken, and a `**kwargs` annotated with a `TypedDict` (transformers' `Unpack[TransformersKwargs]`) takes that
    dict's keys; a plain `**kwargs` takes anything, and then keys are not checked.
    """

    def __init__(self, model: nn.Module, score: str) -> None:
        while callable(getattr(model, "get_base_model", None)) and model.get_base_model() is not model:
            model = model.get_base_model()
        self.name, self.score, self.warned = type(model).__name__, score, False
        self.named: set[str] = set()
        self.options: set[str] | None = set()  # None: any key
        self.options_name = ""
        for parameter in inspect.signature(model.forward).parameters.values():
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                self.named.add(parameter.name)
            elif parameter.kind == parameter.VAR_KEYWORD:
                args = typing.get_args(parameter.annotation) if typing.get_origin(parameter.annotation) else ()
                typed = args[0] if len(args) == 1 and hasattr(args[0], "__optional_keys__") else None
                self.options = None if typed is None else set(typed.__optional_keys__ | typed.__required_keys__)
                self.options_name = getattr(typed, "__name__", "")

    def __call__(self, batch: Any) -> None:
        if not isinstance(batch, Mapping):
            raise ValueError(
                "select_parameters expects batches that are dicts of the model's keyword arguments "
                f"(e.g. a DataLoader over a processor's output), got {type(batch).__name__}."
            )
        if self.options is not None and (unknown := set(batch) - LABEL_KEYS - self.named - self.options):
            raise ValueError(
                f"The batches have keys {sorted(unknown)} that {self.name}'s forward does not take; it takes "
                f"{sorted(self.named)}{f' and the options of {self.options_name}' if self.options else ''}. Rename or "
                "drop them (a processor's output has the right names)."
            )
        misnamed = self.misnamed_labels(batch)
        if misnamed and self.score != "output_norm":
            raise ValueError(
                f"The batches carry their labels as `{misnamed}`, which {self.name}'s forward does not read: it takes "
                "`labels`. Rename the key to `labels` (transformers' DataCollatorWithPadding and default_data_collator "
                "do)."
            )
        labels = sorted(LABEL_KEYS & set(batch))
        if labels and self.score == "output_norm" and not self.warned:
            self.warned = True
            fix = (
                f"rename `{misnamed}` to `labels` (the name {self.name}'s forward reads) and use score='task_loss'"
                if misnamed
                else "use score='task_loss' or 'fisher'"
            )
            warnings.warn(
                f"The batches carry {labels}, which score='output_norm' ignores (it differentiates the norm of the "
                f"model's output); {fix} to score the loss of labelled batches.",
                UserWarning,
                stacklevel=4,  # select_parameters -> _gradient_score_sums -> this check
            )

    def misnamed_labels(self, batch: Mapping[str, Any]) -> str | None:
        """The key (`label`, `label_ids`) a batch carries its labels under when the forward reads them as `labels`.

        transformers' collators rename these keys; a plain `DataLoader` keeps a `datasets` column `label`, which a
        forward's `**kwargs` swallows, so the model returns no loss although the batch has labels.
        """
        if "labels" not in self.named or batch.get("labels") is not None:
            return None
        return next((key for key in ("label", "label_ids") if key in batch and key not in self.named), None)


def scoring_batches(dataloader: Iterable, fraction: float, max_batches: int | None) -> tuple[Iterator[Any], str]:
    """The first `fraction` of the dataloader's batches (at least one), at most `max_batches`; and a description of
    how many that is, for the log line that announces the scoring.

    An iterable without a length (a generator) has no fraction to take: it gives `max_batches` batches, or all of
    them with `fraction=1.0`.
    """
    check_batch_source(dataloader)
    try:
        total = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        if max_batches is None and fraction < 1.0:
            raise ValueError(
                f"The dataloader has no length, so fraction={fraction} of it cannot be taken (and an endless "
                "iterator would never stop): pass `max_batches`, or fraction=1.0 to score every batch it yields."
            ) from None
        planned = "every batch" if max_batches is None else f"up to {max_batches} batches (the data has no length)"
        return islice(dataloader, max_batches), planned
    n = max(1, math.ceil(fraction * total)) if total else 0
    if max_batches is not None and max_batches < n:
        return islice(dataloader, max_batches), f"{max_batches} of {total} batches (max_batches={max_batches})"
    return islice(dataloader, n), f"{n} of {total} batches (fraction={fraction})"


def check_batch_source(dataloader: Any) -> None:
    """Refuse the containers that have a length and can be iterated but do not yield batches.

    A single batch dict has a length (its keys) and would be taken as a dataloader of key names; a dataset (a
    `datasets.Dataset` or `IterableDataset`, a torch `Dataset` or `IterableDataset`) yields single examples, which
    fail deep inside the model (lists, tensors without a batch dimension) or would be scored one example at a time.
    A dataset that yields whole batches itself goes through `DataLoader(dataset, batch_size=None)`, which the
    message names too.
    """
    if isinstance(dataloader, Mapping):
        raise ValueError(
            f"select_parameters takes an iterable of batches, got a single dict ({type(dataloader).__name__}) with "
            f"keys {sorted(map(str, dataloader))}: pass [batch] to score one batch, or a DataLoader."
        )
    hf_datasets = sys.modules.get("datasets")  # loaded wherever a user holds one of its datasets
    hf_kinds = (hf_datasets.Dataset, hf_datasets.IterableDataset) if hf_datasets is not None else ()
    if isinstance(dataloader, (Dataset, *hf_kinds)):
        kind = (
            f"datasets.{type(dataloader).__name__}" if isinstance(dataloader, hf_kinds) else type(dataloader).__name__
        )
        raise ValueError(
            f"select_parameters got a {kind}, which yields single examples, not batches. Pass "
            "DataLoader(dataset, batch_size=..., collate_fn=...) with the collator you train with (for tokenized "
            "text, transformers.DataCollatorWithPadding(tokenizer); for tensors of one size, "
            "transformers.default_data_collator); a dataset that yields whole batches, DataLoader(dataset, "
            "batch_size=None)."
        )


def asks_for_loss(batch: Any) -> bool:
    """Whether a batch makes the model return its loss: it carries `labels`, a question-answering model's answer spans
    (`start_positions` and `end_positions`, its labels in `Trainer`), or CLIP's `return_loss=True`."""
    if not isinstance(batch, Mapping):
        return False
    spans = batch.get("start_positions") is not None and batch.get("end_positions") is not None
    return batch.get("labels") is not None or spans or batch.get("return_loss") is True


def peek(batches: Iterator[Any]) -> tuple[Any, Iterator[Any]]:
    """The first batch (None when there is none) and an iterator that still yields it."""
    first = next(batches, None)
    return first, (iter(()) if first is None else chain([first], batches))


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device`, also those nested in lists, tuples and dicts (as `Trainer` moves them); tensors
    made under `torch.inference_mode()` are copied into normal ones, which autograd can save for the backward pass."""
    return {key: _moved(value, device) for key, value in batch.items()}


def _moved(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return (value.clone() if value.is_inference() else value).to(device)
    if isinstance(value, Mapping):
        return type(value)({key: _moved(item, device) for key, item in value.items()})
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):  # a named tuple keeps its own fields
        return type(value)(_moved(item, device) for item in value)
    return value


def objective(outputs: Any, score: str) -> torch.Tensor:
    """The scalar a gradient score differentiates: the output's mean squared row norm, or the model's loss.

    A model that returns one tensor (a plain `nn.Module`) returns its main output, or its loss when that is a scalar.
    A tuple says nothing about which element is which (a transformers model with `return_dict=False` puts the loss
    first only when it has labels), so it is refused.
    """
    if isinstance(outputs, tuple) and not hasattr(outputs, "keys"):  # a ModelOutput is a tuple with keys
        raise ValueError(
            f"The model returned a tuple, whose elements score={score!r} cannot tell apart. Return a dict or a "
            "ModelOutput with `loss` and `logits` (for a transformers model, `return_dict=True`, its default)."
        )
    if isinstance(outputs, torch.Tensor):
        if score == "output_norm" and outputs.dim() == 0:
            raise ValueError(
                "score='output_norm' got a scalar from the model, which has no rows to take the norm of; when it is "
                "the loss, use score='task_loss' (or 'fisher')."
            )
        outputs = {"loss" if outputs.dim() == 0 else "logits": outputs}
    if score == "output_norm":
        for key in ("logits_per_image", "logits", "last_hidden_state"):
            main = getattr(outputs, key, None) if not isinstance(outputs, Mapping) else outputs.get(key)
            if main is not None:
                return main.float().pow(2).sum(-1).mean()
        raise ValueError(
            "score='output_norm' needs a model output with `logits_per_image`, `logits` or `last_hidden_state` "
            "(or a tensor: the model's main output)."
        )
    loss = getattr(outputs, "loss", None) if not isinstance(outputs, Mapping) else outputs.get("loss")
    if loss is None:
        raise ValueError(
            f"score={score!r} needs the model to return `loss`; include labels in the batches "
            "(for `CLIPModel`, `return_loss=True`)."
        )
    return loss.float()


def scoring_forward(model: nn.Module, batch: Mapping[str, Any], model_name: str) -> Any:
    """The model's forward on a scoring batch. A batch the forward cannot take (a CLIP batch without `pixel_values`
    fails deep inside transformers) is refused naming its keys."""
    try:
        return model(**batch)
    except (AttributeError, TypeError, KeyError, IndexError) as error:
        raise ValueError(
            f"{model_name}'s forward failed on a scoring batch with keys {sorted(batch)} ({type(error).__name__}: "
            f"{error}). {_uncollated(batch) or _NEEDS}"
        ) from error
    except ValueError as error:  # T5's says "input_ids or inputs_embeds" of its decoder, where the batch has them
        if not _lacks_decoder_inputs(model, batch):
            raise
        raise ValueError(
            f"{model_name}'s forward failed on a scoring batch with keys {sorted(batch)} (ValueError: {error}). An "
            "encoder-decoder model's batch needs `labels` (which score='task_loss' differentiates) or "
            "`decoder_input_ids` for its decoder: T5 does not make them from `input_ids`."
        ) from error


def _lacks_decoder_inputs(model: nn.Module, batch: Mapping[str, Any]) -> bool:
    """Whether `batch` gives an encoder-decoder model nothing to feed its decoder."""
    is_encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return is_encoder_decoder is True and not {"labels", "decoder_input_ids", "decoder_inputs_embeds"} & set(batch)


_NEEDS = (
    "A batch holds every input the forward needs: for CLIP, `pixel_values` and the captions' `input_ids` (and "
    "`attention_mask`); for a language model, `input_ids` (`labels` for score='task_loss')."
)


def _uncollated(batch: Mapping[str, Any]) -> str:
    """What to say when a batch holds lists of numbers or tensors where the forward wants one tensor: a DataLoader's
    default collation of examples whose fields are lists (a `datasets.Dataset` without a tensor format)."""
    lists = [
        key
        for key, value in batch.items()
        if isinstance(value, list) and value and all(isinstance(v, (torch.Tensor, int, float)) for v in value)
    ]
    if not lists:
        return ""
    return (
        f"`{lists[0]}` is a list, not a tensor: the examples were not collated into batches. Build the DataLoader "
        "with collate_fn= the collator you train with (transformers.DataCollatorWithPadding(tokenizer) for "
        "tokenized text, transformers.default_data_collator for tensors of one size), or give the dataset a tensor "
        'format (`dataset.with_format("torch")`).'
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode (no dropout) inside, and afterwards every module back in the mode the caller had it in.

    `model.train(mode)` alone would set every submodule to the model's mode, so a part kept in eval mode inside a
    training model (a frozen tower, batch norms) would come back training. `train()` runs first for modules that
    override it; the flags it got wrong are then set one by one.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        model.train(modes[model])
        for module, training in modes.items():
            if module.training != training:
                module.training = training
