"""The data `select_parameters` scores on: which batches it takes, the keys it lets through, the scalar it
differentiates, and its messages, each against values written out by hand."""

import os
import warnings
from types import SimpleNamespace
from typing import TypedDict, Unpack

import pytest
import torch
from conftest import make_batch, make_tiny_clip
from peft import get_peft_model

from spu_peft import SPUConfig, select_parameters
from spu_peft.selection_data import BatchChecker, asks_for_loss, objective, scoring_batches, scoring_forward, to_device


class _Required(TypedDict):
    needed: int


class Options(_Required, total=False):
    optional: int


class Typed(torch.nn.Module):
    def forward(self, x, *, y=None, **kwargs: Unpack[Options]):
        return x


class Named(torch.nn.Module):
    def forward(self, x, y=None):
        return x


def test_a_typed_kwargs_forward_takes_its_named_arguments_and_every_key_of_its_typed_dict():
    check = BatchChecker(Typed(), "output_norm")
    check({"x": 1, "y": 2, "needed": 3, "optional": 4, "labels": 5})  # labels pass: a Trainer keeps them
    with pytest.raises(ValueError) as error:
        check({"x": 1, "z": 2, "w": 3})
    assert str(error.value) == (
        "The batches have keys ['w', 'z'] that Typed's forward does not take; it takes ['x', 'y'] and the options of "
        "Options. Rename or drop them (a processor's output has the right names)."
    )


def test_a_forward_without_kwargs_takes_only_its_named_arguments():
    check = BatchChecker(Named(), "output_norm")
    check({"x": 1, "y": 2})
    with pytest.raises(ValueError) as error:
        check({"x": 1, "pixel_values": 2})
    assert str(error.value) == (
        "The batches have keys ['pixel_values'] that Named's forward does not take; it takes ['x', 'y']. Rename or "
        "drop them (a processor's output has the right names)."
    )


def test_a_batch_that_is_not_a_dict_is_refused_naming_its_type():
    with pytest.raises(ValueError) as error:
        BatchChecker(Named(), "output_norm")([1, 2])
    assert str(error.value) == (
        "select_parameters expects batches that are dicts of the model's keyword arguments (e.g. a DataLoader over "
        "a processor's output), got list."
    )


def ignored_labels_warning():
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        select_parameters(model, [dict(make_batch(), labels=torch.arange(4))], score="output_norm")
    (warning,) = [w for w in caught if "ignores" in str(w.message)]
    return warning


def test_labels_the_output_norm_ignores_are_warned_about_saying_which_score_reads_them():
    warning = ignored_labels_warning()
    assert warning.category is UserWarning
    assert str(warning.message) == (
        "The batches carry ['labels'], which score='output_norm' ignores (it differentiates the norm of the model's "
        "output); use score='task_loss' or 'fisher' to score the loss of labelled batches."
    )


@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ, reason="mutmut's trampolines add frames to every call")
def test_the_ignored_labels_warning_points_at_the_callers_line():
    assert ignored_labels_warning().filename == __file__


@pytest.mark.parametrize(
    ("count", "fraction", "max_batches", "taken", "planned"),
    [
        (10, 0.05, None, 1, "1 of 10 batches (fraction=0.05)"),  # at least one
        (10, 0.25, None, 3, "3 of 10 batches (fraction=0.25)"),  # rounded up
        (4, 0.5, 2, 2, "2 of 4 batches (fraction=0.5)"),  # max_batches equal to the fraction's count
        (4, 0.5, 1, 1, "1 of 4 batches (max_batches=1)"),
        (0, 0.25, None, 0, "0 of 0 batches (fraction=0.25)"),
    ],
)
def test_scoring_batches_take_the_first_fraction_and_say_how_many(count, fraction, max_batches, taken, planned):
    batches, description = scoring_batches(list(range(count)), fraction, max_batches)
    assert list(batches) == list(range(taken)) and description == planned


def test_an_iterator_without_length_gives_max_batches_or_every_batch():
    batches, description = scoring_batches(iter(range(5)), 1.0, None)
    assert list(batches) == [0, 1, 2, 3, 4] and description == "every batch"
    batches, description = scoring_batches(iter(range(5)), 0.5, 2)
    assert list(batches) == [0, 1] and description == "up to 2 batches (the data has no length)"
    with pytest.raises(ValueError) as error:
        scoring_batches(iter(range(5)), 0.5, None)
    assert str(error.value) == (
        "The dataloader has no length, so fraction=0.5 of it cannot be taken (and an endless iterator would never "
        "stop): pass `max_batches`, or fraction=1.0 to score every batch it yields."
    )


def test_a_batch_asks_for_the_loss_with_labels_answer_spans_or_return_loss_true():
    labels = torch.arange(2)
    assert asks_for_loss({"labels": labels}) and asks_for_loss({"return_loss": True})
    assert not asks_for_loss({"labels": None}) and not asks_for_loss({"return_loss": False})
    assert not asks_for_loss({"label": labels}) and not asks_for_loss([labels])
    assert asks_for_loss({"start_positions": labels, "end_positions": labels})  # a question-answering batch
    assert not asks_for_loss({"start_positions": labels}) and not asks_for_loss({"end_positions": labels})


def test_to_device_moves_tensors_and_makes_inference_tensors_normal():
    with torch.inference_mode():
        made_there = torch.ones(2)
    plain = torch.zeros(3)
    moved = to_device({"a": made_there, "b": plain, "c": "text"}, torch.device("cpu"))
    assert not moved["a"].is_inference() and torch.equal(moved["a"], torch.ones(2))
    assert moved["b"].data_ptr() == plain.data_ptr()  # a normal tensor already there is not copied
    assert moved["c"] == "text"
    assert to_device({"b": plain}, torch.device("meta"))["b"].device.type == "meta"


# (2, 3, 4): the squared norm of each of the 6 rows of 4 values, averaged
HIDDEN = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
HIDDEN_SCORE = sum(float((row**2).sum()) for row in HIDDEN.reshape(6, 4)) / 6


@pytest.mark.parametrize("wrap", [dict, lambda **kw: SimpleNamespace(**kw)], ids=["mapping", "attributes"])
def test_the_output_norm_is_the_mean_squared_row_norm_of_the_first_output_found(wrap):
    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert objective(wrap(last_hidden_state=HIDDEN), "output_norm").item() == pytest.approx(HIDDEN_SCORE)
    assert objective(wrap(logits=logits, last_hidden_state=HIDDEN), "output_norm").item() == 15.0  # (5 + 25) / 2
    assert objective(wrap(logits_per_image=2 * logits, logits=logits), "output_norm").item() == 60.0
    with pytest.raises(ValueError) as error:
        objective(wrap(pooler_output=logits), "output_norm")
    assert str(error.value) == (
        "score='output_norm' needs a model output with `logits_per_image`, `logits` or `last_hidden_state` (or a "
        "tensor: the model's main output)."
    )


@pytest.mark.parametrize("wrap", [dict, lambda **kw: SimpleNamespace(**kw)], ids=["mapping", "attributes"])
def test_a_loss_score_differentiates_the_models_loss_in_float32(wrap):
    loss = torch.tensor(1.5, dtype=torch.float16)
    value = objective(wrap(loss=loss, logits=torch.ones(2, 2)), "task_loss")
    assert value.dtype == torch.float32 and value.item() == 1.5
    with pytest.raises(ValueError) as error:
        objective(wrap(logits=torch.ones(2, 2)), "fisher")
    assert str(error.value) == (
        "score='fisher' needs the model to return `loss`; include labels in the batches (for `CLIPModel`, "
        "`return_loss=True`)."
    )


def test_a_forward_that_fails_on_a_batch_is_named_with_the_batch_keys_and_the_error():
    class Picky(torch.nn.Module):
        def forward(self, **batch):
            return batch["pixel_values"]

    with pytest.raises(ValueError) as error:
        scoring_forward(Picky(), {"input_ids": 1}, "Picky")
    assert str(error.value) == (
        "Picky's forward failed on a scoring batch with keys ['input_ids'] (KeyError: 'pixel_values'). A batch holds "
        "every input the forward needs: for CLIP, `pixel_values` and the captions' `input_ids` (and "
        "`attention_mask`); for a language model, `input_ids` (`labels` for score='task_loss')."
    )
    assert scoring_forward(Picky(), {"pixel_values": 7}, "Picky") == 7


def test_an_encoder_decoder_batch_without_decoder_inputs_is_refused_saying_what_the_decoder_needs():
    """T5 makes no decoder inputs from `input_ids`: its own error named `input_ids`, which the batch had."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, decoder_start_token_id=0)
    model = get_peft_model(T5ForConditionalGeneration(config), SPUConfig(task_type="SEQ_2_SEQ_LM"))
    ids = torch.randint(1, 50, (2, 5))
    with pytest.raises(ValueError) as error:
        select_parameters(model, [{"input_ids": ids}], score="output_norm")
    assert str(error.value) == (
        "T5ForConditionalGeneration's forward failed on a scoring batch with keys ['input_ids'] (ValueError: You must "
        "specify exactly one of input_ids or inputs_embeds). An encoder-decoder model's batch needs `labels` (which "
        "score='task_loss' differentiates) or `decoder_input_ids` for its decoder: T5 does not make them from "
        "`input_ids`."
    )
    select_parameters(model, [{"input_ids": ids, "decoder_input_ids": ids}], score="output_norm")  # and with them


def test_a_value_error_of_a_batch_with_decoder_inputs_is_raised_as_the_model_raised_it():
    class Refusing(torch.nn.Module):
        config = SimpleNamespace(is_encoder_decoder=True)

        def forward(self, **batch):
            raise ValueError("the model's own words")

    with pytest.raises(ValueError, match="^the model's own words$"):
        scoring_forward(Refusing(), {"input_ids": 1, "labels": 1}, "Refusing")
    with pytest.raises(ValueError, match="^Refusing's forward failed on a scoring batch with keys \\['input_ids'\\]"):
        scoring_forward(Refusing(), {"input_ids": 1}, "Refusing")
