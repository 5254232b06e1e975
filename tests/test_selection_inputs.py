"""What users hand to select_parameters: the container of batches, the model's mode and output, and what a refused
selection leaves behind."""

import warnings

import pytest
import torch
from conftest import make_batch, make_tiny_clip
from datasets import Dataset
from peft import get_peft_model
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from spu_peft import SPUConfig, SPULayer, select_parameters


def clip(**kwargs):
    return get_peft_model(make_tiny_clip(), SPUConfig(**kwargs))


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SPULayer)}


def adapter_state(model):
    return {
        (n, part): getattr(m, part)["default"].detach().clone()
        for n, m in layers(model).items()
        for part in ("spu_indices", "spu_values", "spu_frozen_indices", "spu_frozen_values")
    }


class TwoBranches(nn.Module):
    """A plain module: `branch` picks which of two target layers runs; it returns what `output` says."""

    def __init__(self, output="dict"):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)
        self.output = output

    def forward(self, x, labels=None, scale=None, branch="both"):
        hidden = self.a(x) + self.b(x) if branch == "both" else getattr(self, branch)(x)
        if scale is not None:
            hidden = hidden * scale[0]
        logits = self.head(hidden)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        if self.output == "tensor":
            return logits if loss is None else loss
        if self.output == "tuple":
            return (logits,) if loss is None else (loss, logits)
        return {"logits": logits, "loss": loss}


def branches(output="dict", **kwargs):
    torch.manual_seed(0)
    return get_peft_model(TwoBranches(output), SPUConfig(target_modules=["a", "b"], **kwargs))


def x_batches(n=3, labels=False):
    generator = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(5, 4, generator=generator)} for _ in range(n)]
    if labels:
        for batch in batches:
            batch["labels"] = torch.randint(0, 3, (5,), generator=generator)
    return batches


def supports(model):
    return {n: m.spu_indices["default"].clone() for n, m in layers(model).items()}


def test_selection_puts_back_the_mode_of_every_submodule_not_only_the_models():
    """A frozen tower kept in eval mode inside a training model (or the reverse) stays as the user set it."""
    model = clip()
    model.train()
    model.base_model.model.text_model.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    select_parameters(model, [make_batch(0)])
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_a_selection_refused_at_one_layers_scores_leaves_every_layer_as_it_was():
    """The last layer's scores are infinite: no earlier layer may have been re-selected and consolidated already."""
    model = clip()
    select_parameters(model, [make_batch(0)])
    for layer in layers(model).values():
        with torch.no_grad():
            layer.spu_values["default"].add_(0.5)  # something learned, which a consolidation would fold away
    before = adapter_state(model)
    record = dict(model.peft_config["default"].selection)
    last = list(layers(model).values())[-1]
    with torch.no_grad():
        last.get_base_layer().weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="are not finite"):
        select_parameters(model, score="magnitude")
    after = adapter_state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before), [k for k in before if not torch.equal(
        after[k], before[k])]  # fmt: skip
    assert model.peft_config["default"].selection == record


def test_a_single_batch_dict_is_refused_saying_to_put_it_in_a_list():
    """A dict has a length (its keys), so it was taken as a dataloader of its keys: 'got str'."""
    batch = make_batch(0)
    with pytest.raises(ValueError) as refused:
        select_parameters(clip(), batch)
    message = str(refused.value)
    assert "a single dict" in message and "['input_ids', 'pixel_values']" in message and "[batch]" in message
    assert select_parameters(clip(), [batch]).num_batches == 1  # what the message says to do


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda: Dataset.from_dict({"x": torch.randn(8, 4).tolist()}), "datasets.Dataset"),
        (lambda: Dataset.from_dict({"x": torch.randn(8, 4).tolist()}).with_format("torch"), "datasets.Dataset"),
        (lambda: TensorDataset(torch.randn(8, 4)), "TensorDataset"),
    ],
)
def test_a_dataset_of_examples_is_refused_saying_to_batch_it_in_a_dataloader(make, kind):
    """Iterated directly, a dataset gives single examples (lists, or tensors without a batch dimension), which failed
    deep inside the model, or were scored one by one."""
    with pytest.raises(ValueError) as refused:
        select_parameters(branches(), make())
    message = str(refused.value)
    assert kind in message and "examples, not batches" in message and "DataLoader(dataset, batch_size=" in message


class Examples(IterableDataset):
    """A streamed torch dataset of single examples (or of whole batches, `batched=True`), never batched by a
    DataLoader."""

    def __init__(self, batched=False):
        self.batched = batched

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for _ in range(8):
            yield {"x": torch.randn(*((4,) if self.batched else ()), 4, generator=generator)}


@pytest.mark.parametrize("max_batches", [None, 2])
@pytest.mark.parametrize(
    "make, kind",
    [
        (Examples, "Examples"),
        (
            lambda: Dataset.from_dict({"x": torch.randn(8, 4).tolist()}).to_iterable_dataset().with_format("torch"),
            "datasets.IterableDataset",
        ),
    ],
)
def test_a_streamed_dataset_of_examples_is_refused_saying_to_batch_it_in_a_dataloader(make, kind, max_batches):
    """An iterable dataset has no length: with the default `fraction` the refusal asked for `max_batches`, and with it
    single examples went to the model (a linear layer takes a vector: scored one example at a time, in silence)."""
    with pytest.raises(ValueError) as refused:
        select_parameters(branches(), make(), max_batches=max_batches)
    message = str(refused.value)
    assert f"got a {kind}, which yields single examples, not batches" in message
    assert "DataLoader(dataset, batch_size=" in message and "DataLoader(dataset, batch_size=None)" in message
    # what the message says to do
    assert select_parameters(branches(), DataLoader(make(), batch_size=4), fraction=1.0).num_batches == 2
    assert (
        select_parameters(branches(), DataLoader(Examples(batched=True), batch_size=None), fraction=1.0).num_batches
        == 8
    )


def test_batches_that_were_not_collated_are_named_with_the_collator_to_use():
    """A DataLoader without a collator over a dataset without a tensor format yields lists of tensors."""
    data = Dataset.from_dict({"x": torch.randn(8, 4).tolist()})
    with pytest.raises(ValueError) as refused:
        select_parameters(branches(), DataLoader(data, batch_size=4))
    message = str(refused.value)
    assert "`x` is a list, not a tensor" in message and "collate_fn=" in message and "default_data_collator" in message


def test_a_plain_module_that_returns_a_tensor_is_scored_by_its_output_norm_or_its_scalar_loss():
    plain, reference = branches("tensor"), branches("dict")
    assert select_parameters(plain, x_batches()).score == "output_norm"
    select_parameters(reference, x_batches())
    assert all(torch.equal(a, b) for a, b in zip(supports(plain).values(), supports(reference).values()))

    plain, reference = branches("tensor"), branches("dict")
    assert select_parameters(plain, x_batches(labels=True)).score == "task_loss"  # the module returns its loss
    select_parameters(reference, x_batches(labels=True))
    assert all(torch.equal(a, b) for a, b in zip(supports(plain).values(), supports(reference).values()))


@pytest.mark.parametrize("labels", [False, True])
def test_a_model_that_returns_a_tuple_is_refused_saying_to_return_a_dict(labels):
    with pytest.raises(ValueError) as refused:
        select_parameters(branches("tuple"), x_batches(labels=labels))
    message = str(refused.value)
    assert "returned a tuple" in message and "return_dict=True" in message and "dict" in message


def test_a_scalar_output_is_not_taken_for_the_main_output_of_output_norm():
    with pytest.raises(ValueError, match="a scalar .*score='task_loss'"):
        select_parameters(branches("tensor"), x_batches(labels=True), score="output_norm")


def test_a_target_layer_the_batches_never_run_is_warned_about_by_name():
    """Its scores are all zero, so its support is its first entries: not chosen by the data."""
    batches = [dict(batch, branch="a") for batch in x_batches()]
    with pytest.warns(UserWarning) as caught:
        select_parameters(branches(), batches)
    said = [str(w.message) for w in caught if "no gradient" in str(w.message)]
    assert len(said) == 1 and "['b']" in said[0] and "exclude_modules" in said[0] and "`a`" not in said[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no gradient")
        select_parameters(branches(), x_batches())


def test_tensors_nested_in_a_batch_made_under_inference_mode_are_taken():
    with torch.inference_mode():
        batches = [dict(batch, scale=[torch.full((6,), 2.0)]) for batch in x_batches()]
    assert select_parameters(branches(), batches, fraction=1.0).num_batches == 3


def bert_classifier():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=48, num_labels=3)  # fmt: skip
    return get_peft_model(BertForSequenceClassification(config), SPUConfig(task_type="SEQ_CLS"))


@pytest.mark.parametrize("key", ["label", "label_ids"])
def test_labels_under_a_name_the_forward_does_not_read_are_refused_for_a_loss_score_naming_the_rename(key):
    """A torch DataLoader keeps a `datasets` column `label` (transformers' collators rename it); the model's `**kwargs`
    swallowed it, and the refusal said to include labels, which the batches did."""
    batch = {"input_ids": torch.randint(1, 50, (4, 6)), key: torch.tensor([0, 1, 2, 0])}
    with pytest.raises(ValueError) as refused:
        select_parameters(bert_classifier(), [batch], score="task_loss")
    assert str(refused.value) == (
        f"The batches carry their labels as `{key}`, which BertForSequenceClassification's forward does not read: it "
        "takes `labels`. Rename the key to `labels` (transformers' DataCollatorWithPadding and default_data_collator "
        "do)."
    )
    with pytest.warns(UserWarning) as caught:  # the default score: the output norm, and the warning says the rename
        assert select_parameters(bert_classifier(), [batch]).score == "output_norm"
    (said,) = [str(w.message) for w in caught if "ignores" in str(w.message)]
    assert f"rename `{key}` to `labels`" in said and "score='task_loss'" in said


@pytest.mark.parametrize("wrong", ["parameters", "scheduler"])
def test_something_else_passed_as_the_optimizer_is_refused_before_the_selection_changes_anything(wrong):
    """A parameter generator or a scheduler failed with an AttributeError after the supports were replaced."""
    model = clip()
    select_parameters(model, [make_batch(0)])
    before = adapter_state(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    given = model.parameters() if wrong == "parameters" else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1)
    with pytest.raises(ValueError) as refused:
        select_parameters(model, [make_batch(1)], optimizer=given)
    assert str(refused.value) == (
        "`optimizer` must be the optimizer that holds the adapter's values (a torch.optim.Optimizer, whose state is "
        f"dropped for them), got {type(given).__name__}."
    )
    after = adapter_state(model)
    assert all(torch.equal(after[key], before[key]) for key in before)
