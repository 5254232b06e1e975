"""A user's own image classification data, in the forms `datasets` users bring it: each works as documented or is
refused before any training in one line naming the problem and the fix (never an error from deep inside datasets,
PIL or torch, and never silently other labels, classes or images).

Each test names what the earlier code did with that input.
"""

import io

import datasets
import numpy as np
import pytest
from PIL import Image

from spu_peft.continual import SequenceSettings, prepare_sequence_data
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
