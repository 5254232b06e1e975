"""A user's own image classification data, in the forms `datasets` users bring it: each works as documented or is
refused before any training in one line naming the problem and the fix (never an error from deep inside datasets,
PIL or torch, and never silently other labels, classes or images).

Each test names what the earlier code did with that input.
"""

import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from spu_peft.continual import DataSource, SequenceSettings, load_sequence_data, prepare_sequence_data
from spu_peft.embedded import load_embedded_processor
from spu_peft.embedded.cache import shipped_model_path

NAMES = ["red_fox", "cat", "dog", "bird"]
SETTINGS = SequenceSettings(num_tasks=2, buffer_size=1)


@pytest.fixture(scope="module")
def processor():
    return load_embedded_processor(shipped_model_path())


def images(count: int) -> list[Image.Image]:
    return [Image.fromarray(np.full((8, 8), 20 * i % 256, dtype=np.uint8), "L") for i in range(count)]


def split(labels, names=NAMES, image_column="image", label_column="label", pictures=None) -> datasets.Dataset:
    dataset = datasets.Dataset.from_dict(
        {image_column: pictures if pictures is not None else images(len(labels)), label_column: labels}
    )
    return dataset.cast_column(label_column, datasets.ClassLabel(names=names)) if names else dataset


LABELS = [0, 1, 2, 3] * 3


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def paths(tmp_path) -> list[str]:
    found = []
    for i, image in enumerate(images(len(LABELS))):
        found.append(str(tmp_path / f"{i}.png"))
        image.save(found[-1])
    return found


@pytest.mark.parametrize("stored_as", ["path", "bytes"])
def test_an_image_column_of_paths_or_bytes_is_read_as_images(processor, paths, stored_as):
    """Was: AttributeError: 'str' object has no attribute 'get' (and 'bytes'), from inside the preprocessing."""
    pictures = paths if stored_as == "path" else [png(Image.open(p)) for p in paths]
    data = prepare_sequence_data(
        split(LABELS, pictures=pictures), split(LABELS, pictures=pictures), processor, SETTINGS
    )
    reference = prepare_sequence_data(split(LABELS), split(LABELS), processor, SETTINGS)
    assert data.class_names == ["red fox", "cat", "dog", "bird"]
    assert torch.equal(data.train[:]["pixel_values"], reference.train[:]["pixel_values"])


def test_an_image_column_of_arrays_is_refused_naming_the_column_and_the_fix(processor):
    """Was: AttributeError: 'list' object has no attribute 'get'."""
    arrays = [np.asarray(image) for image in images(len(LABELS))]
    with pytest.raises(ValueError, match=r"the train split: column 'img' holds .*not images.*datasets\.Image"):
        prepare_sequence_data(
            split(LABELS, image_column="img", pictures=arrays), split(LABELS), processor, SETTINGS, image_column="img"
        )


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["red fox", "cat", "dog", "bird"] * 3, r"column 'label' holds strings.*class_encode_column\('label'\)"),
        ([[label] for label in LABELS], r"column 'label' holds .*not one class id per image"),
        ([float(label) for label in LABELS], r"column 'label' holds float64.*not one class id per image"),
    ],
    ids=["strings", "lists", "floats"],
)
def test_labels_that_are_not_class_ids_are_refused_naming_the_fix(processor, labels, message):
    """Was: strings were blamed on `class_names` ("4 names for the labels ['bird', ...]"), lists crashed with
    TypeError: unhashable type, floats were taken and crashed in torch at the first evaluation."""
    with pytest.raises(ValueError, match=message):
        prepare_sequence_data(split(labels, None), split(labels, None), processor, SETTINGS, class_names=NAMES)


def test_an_unlabelled_test_split_is_named_as_such(processor):
    """Was: "`class_names` of the dataset: 4 names for the labels [-1, 0, ...]", though no names were given."""
    with pytest.raises(ValueError, match=r"the test split holds label -1.*no label.*use a labelled split"):
        prepare_sequence_data(split(LABELS), split([-1] * 12), processor, SETTINGS)


@pytest.mark.parametrize("kind", ["iterable", "dict"])
@pytest.mark.parametrize("where", ["train", "control"])
def test_a_streamed_dataset_or_a_datasetdict_in_place_of_a_split_is_refused(processor, kind, where):
    """Was: TypeError: object of type 'IterableDataset' has no len(); a DatasetDict was said to lack its columns."""
    odd = split(LABELS).to_iterable_dataset() if kind == "iterable" else datasets.DatasetDict(train=split(LABELS))
    message = "IterableDataset.*streaming" if kind == "iterable" else r"DatasetDict.*pass one split"
    train, control = (odd, None) if where == "train" else (split(LABELS), odd)
    with pytest.raises(ValueError, match=message):
        prepare_sequence_data(train, split(LABELS), processor, SETTINGS, control=control)


def test_capped_tasks_keep_every_class_of_a_dataset_sorted_by_class(processor):
    """Was: the first `max_train_per_task` images of a task, so on data sorted by class (an image folder) `--quick`
    trained and tested each task on one of its classes only."""
    labels = sorted(LABELS * 4)
    settings = SequenceSettings(num_tasks=2, buffer_size=1, max_train_per_task=6, max_test_per_task=4)
    data = prepare_sequence_data(split(labels), split(labels), processor, settings)
    for task, train, test in zip(data.tasks, data.train_indices, data.test_indices):
        assert [sorted(labels[i] for i in found) for found in (train, test)] == [sorted(task * 3), sorted(task * 2)]


def test_a_cap_below_the_classes_of_a_task_is_refused(processor):
    settings = SequenceSettings(num_tasks=2, buffer_size=1, max_test_per_task=1)
    with pytest.raises(ValueError, match=r"`max_test_per_task` 1 leaves classes \[.*\] without test images"):
        prepare_sequence_data(split(LABELS), split(LABELS), processor, settings)


def test_a_loaded_dataset_or_datasetdict_is_a_source(processor):
    """Was: AttributeError: 'Dataset' object has no attribute 'name'."""
    whole = datasets.DatasetDict(train=split(LABELS), test=split(LABELS))
    assert load_sequence_data(processor, SETTINGS, whole, control=None).class_names == ["red fox", "cat", "dog", "bird"]
    data = load_sequence_data(processor, SETTINGS, split(LABELS * 2), control=DataSource(split(LABELS)))
    assert data.control_class_names == ["red fox", "cat", "dog", "bird"] and (len(data.train), len(data.test)) == (
        20,
        4,
    )


def test_a_saved_dataset_without_splits_is_the_training_split(processor, tmp_path):
    """Was: "dataset '...' has no split 'train'", though a control set saved the same way was taken."""
    split(LABELS * 2).save_to_disk(str(tmp_path / "plain"))
    data = load_sequence_data(processor, SETTINGS, str(tmp_path / "plain"), control=None)
    assert len(data.train) + len(data.test) == 24


def test_a_missing_training_split_names_the_splits_there_are(processor, tmp_path):
    datasets.DatasetDict(training=split(LABELS)).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match=r"no split 'train'; its splits: training"):
        load_sequence_data(processor, SETTINGS, str(tmp_path / "d"), control=None)


def test_a_validation_split_left_unused_is_named_in_a_warning(processor, tmp_path, caplog):
    datasets.DatasetDict(train=split(LABELS), validation=split(LABELS)).save_to_disk(str(tmp_path / "d"))
    with caplog.at_level("WARNING", logger="spu_peft.continual.sources"):
        load_sequence_data(processor, SETTINGS, str(tmp_path / "d"), control=None)
    assert "no split 'test' (its splits: train, validation)" in caplog.text and "test_split" in caplog.text


@pytest.mark.parametrize("labels", ["ints", "strings"])
def test_a_control_set_without_class_names_says_how_to_name_its_classes(processor, labels):
    """Was: "pass `class_names`", the sequence's own names (and the script's --class-names), not the control set's."""
    control = split(LABELS if labels == "ints" else [NAMES[label] for label in LABELS], None)
    message = "control_class_names" if labels == "ints" else "class_encode_column"
    with pytest.raises(ValueError, match=f"the control set: .*{message}"):
        prepare_sequence_data(split(LABELS), split(LABELS), processor, SETTINGS, control=control)
    if labels == "ints":
        named = prepare_sequence_data(
            split(LABELS), split(LABELS), processor, SETTINGS, control=control, control_class_names=list("pqrs")
        )
        assert named.control_class_names == list("pqrs")


def test_a_control_source_may_name_its_classes(processor):
    control = DataSource(split(LABELS, None), class_names=("p", "q", "r", "s"))
    assert load_sequence_data(processor, SETTINGS, split(LABELS * 2), control=control).control_class_names == list(
        "pqrs"
    )


def test_the_script_names_a_control_sets_integer_labels():
    """Was: no flag could name them, and the refusal pointed at --class-names, the sequence's own."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cl_sequence

    args = cl_sequence.parse_args(["--control-dataset", "folder", "--control-class-names", "p, q,r"])
    assert cl_sequence._side_source(args, "control").class_names == ("p", "q", "r")
    assert "--control-class-names" in cl_sequence._flagged("pass `control_class_names` (one name per label")


def test_rows_without_an_image_or_a_label_are_refused_naming_the_fix(processor):
    """Was: AttributeError: 'NoneType' object has no attribute 'get', and TypeError: '<' not supported between
    instances of 'NoneType' and 'int'."""
    pictures = images(len(LABELS))
    pictures[5] = None
    with pytest.raises(ValueError, match=r"the train split, image 5: no image.*filter"):
        prepare_sequence_data(split(LABELS, pictures=pictures), split(LABELS), processor, SETTINGS)
    with pytest.raises(ValueError, match=r"the test split: 1 example\(s\) without a label.*filter"):
        prepare_sequence_data(split(LABELS), split([*LABELS[:-1], None]), processor, SETTINGS)


def test_an_empty_control_set_is_refused(processor):
    """Was: transformers' "Unable to convert output 'pixel_values' (type: list) to tensor"."""
    with pytest.raises(ValueError, match="the control set has no images"):
        prepare_sequence_data(split(LABELS), split(LABELS), processor, SETTINGS, control=split(LABELS).select([]))
