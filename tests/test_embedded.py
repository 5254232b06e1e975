"""Tests of the embedded foundation model and its offline datasets (fast: no full pretraining)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Image
from PIL import Image as PILImage
from transformers import AutoProcessor, AutoTokenizer, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from spu_peft.continual import class_text_features, tokenize_prompts, zero_shot_accuracy, zero_shot_predictions
from spu_peft.continual.numerics import numerics_pinned
from spu_peft.embedded import (
    ANIMAL_CLASSES,
    CAPTION_TEMPLATES,
    PRETRAINING_CLASSES,
    build_processor,
    build_tokenizer,
    embedded_clip_path,
    embedded_model_path,
    labelled_batches,
    load_animal_shapes,
    load_embedded_clip,
    load_pretraining_data,
    pixel_values_from_images,
    pretrain_embedded_clip,
    pretraining_recipe,
    read_pretraining_metrics,
    recipe_hash,
    shipped_model_path,
)
from spu_peft.embedded import cache as embedded_cache
from spu_peft.embedded.data import ANIMAL_PRETRAINING_PER_CLASS, captions_for, domain_of
from spu_peft.embedded.images import build_image_processor
from spu_peft.embedded.pretraining import embedded_clip_config
from spu_peft.embedded.tokenizer import english_words

SMALL = {"rendered_per_class": 12, "control_per_class": 4}
TINY_RUN = {"max_steps": 2, "limit": 96, "batch_size": 32}


def class_features(model, tokenizer, names, templates):
    """The engine's class text features of `names` (the zero-shot classifier's rows)."""
    return class_text_features(model, tokenize_prompts(tokenizer, names, templates), len(names))


def tiny_recipe(small_data, seed=0):
    return pretraining_recipe(seed, data=small_data, **TINY_RUN)


def _digests(split) -> set[str]:
    """Hashes of the stored PNG bytes (no decoding; one deterministic encoder writes every image)."""
    encoded = split.data.column("image").combine_chunks().field("bytes").to_pylist()
    return {hashlib.sha1(b).hexdigest() for b in encoded}


@pytest.fixture(scope="module")
def small_data():
    return load_pretraining_data(seed=0, **SMALL)


@pytest.fixture(scope="module")
def animals():
    return load_animal_shapes(seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def cached_root(tmp_path_factory, small_data) -> Path:
    """A cache root holding a tiny (2-step) embedded model for seed 0."""
    root = tmp_path_factory.mktemp("cache")
    path = embedded_clip_path(root, seed=0, recipe=tiny_recipe(small_data))
    pretrain_embedded_clip(path, seed=0, data=small_data, progress_bar=False, **TINY_RUN)
    return root


# ---------------------------------------------------------------------------------------------- data


def test_pretraining_data_features_and_sizes(small_data):
    assert set(small_data) == {"train", "control"}
    assert small_data["train"].features["label"].names == list(PRETRAINING_CLASSES + ANIMAL_CLASSES)
    assert small_data["control"].features["label"].names == list(PRETRAINING_CLASSES)  # never an animal
    for split in small_data.values():
        assert isinstance(split.features["image"], Image)
        assert isinstance(split.features["label"], ClassLabel)
        image = split[0]["image"]
        assert image.mode == "L" and image.size == (28, 28)
    assert len(PRETRAINING_CLASSES) == 48 and len(set(PRETRAINING_CLASSES)) == 48
    assert {domain_of(c) for c in PRETRAINING_CLASSES} == {"digits", "letters", "shapes"}
    n_rendered = 26 + 12
    assert len(small_data["control"]) == 48 * SMALL["control_per_class"]
    n_animals = 10 * ANIMAL_PRETRAINING_PER_CLASS
    assert len(small_data["train"]) == 10 * (500 - SMALL["control_per_class"]) + n_rendered * 12 + n_animals
    assert np.bincount(small_data["control"]["label"], minlength=48).tolist() == [4] * 48
    train_counts = np.bincount(small_data["train"]["label"], minlength=58)
    assert train_counts[48:].tolist() == [ANIMAL_PRETRAINING_PER_CLASS] * 10


def test_pretraining_without_animals():
    data = load_pretraining_data(seed=0, animals_per_class=0, **SMALL)
    assert data["train"].features["label"].names == list(PRETRAINING_CLASSES)
    assert len(data["train"]) == 10 * (500 - SMALL["control_per_class"]) + 38 * 12
    with pytest.raises(ValueError, match="animals_per_class"):
        load_pretraining_data(animals_per_class=ANIMAL_PRETRAINING_PER_CLASS + 1)


def test_default_pretraining_sizes():
    data = load_pretraining_data(seed=0)
    assert (len(data["train"]), len(data["control"])) == (12_500, 1_440)


def test_control_is_disjoint_from_train(small_data):
    assert not _digests(small_data["train"]) & _digests(small_data["control"])


def test_pretraining_data_is_deterministic(small_data):
    again = load_pretraining_data(seed=0, **SMALL)
    other = load_pretraining_data(seed=1, **SMALL)
    for name in ("train", "control"):
        assert again[name]["label"] == small_data[name]["label"]
        assert _digests(again[name]) == _digests(small_data[name])
    assert _digests(other["control"]) != _digests(small_data["control"])


def test_animal_shapes(animals):
    assert (len(animals["train"]), len(animals["test"])) == (7_840, 1_960)  # 200 images reserved for pretraining
    assert animals["test"].features["label"].names == list(ANIMAL_CLASSES)
    assert np.bincount(animals["test"]["label"]).tolist() == [196] * 10
    image = animals["train"][0]["image"]
    assert image.mode == "L" and image.size == (28, 28)
    assert not _digests(animals["train"]) & _digests(animals["test"])
    assert load_animal_shapes(seed=0)["test"]["label"] == animals["test"]["label"]


@pytest.mark.parametrize("seed", [0, 1])
def test_pretraining_animals_never_appear_in_the_continual_splits(small_data, seed):
    pretraining = _digests(small_data["train"])
    for split in load_animal_shapes(seed=seed).values():
        assert not pretraining & _digests(split)


def test_captions_for():
    assert captions_for(["cat", "dog"], "a photo of a {}.") == ["a photo of a cat.", "a photo of a dog."]
    assert len(CAPTION_TEMPLATES) >= 8 and all("{}" in t for t in CAPTION_TEMPLATES)


# ------------------------------------------------------------------------------- tokenizer, processor


@pytest.mark.parametrize("text", ["giraffe", "zebra", "axolotl", "Quokka 🦘 naïve", "a photo of a letter Q."])
def test_tokenizer_encodes_unseen_words_without_unknown(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == text.lower()


def test_tokenizer_round_trips_through_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    captions = captions_for(list(ANIMAL_CLASSES), CAPTION_TEMPLATES[0])
    assert loaded(captions)["input_ids"] == tokenizer(captions)["input_ids"]
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
    )
    assert loaded.eos_token_id != 2  # transformers' legacy CLIP pooling would kick in


def test_tokenizer_is_deterministic(tokenizer):
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_processor_matches_fast_pixel_path(small_data):
    images = small_data["control"][:16]["image"]
    expected = build_processor()(images=images, return_tensors="pt")["pixel_values"]
    fast = pixel_values_from_images(images)
    assert fast.shape == expected.shape == (16, 3, 28, 28)
    assert torch.equal(fast, expected)
    arrays = np.stack([np.asarray(im) for im in images])
    assert torch.equal(pixel_values_from_images(arrays), expected)
    all_levels = [PILImage.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).resize((28, 28))]
    expected_levels = build_image_processor()(images=all_levels, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixel_values_from_images(all_levels), expected_levels)


def test_fast_pixel_path_falls_back_for_other_images():
    rgb = [PILImage.new("RGB", (40, 32), (200, 10, 30))]
    expected = build_processor()(images=rgb, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values_from_images(rgb), expected)


def test_config_is_small_clip_with_fc1(tokenizer):
    config = embedded_clip_config(tokenizer)
    assert config.vision_config.image_size == 28 and config.vision_config.patch_size == 4
    assert config.text_config.vocab_size == len(tokenizer)
    model = CLIPModel(config)
    names = {n for n, _ in model.named_modules()}
    for tower, cfg in (("vision_model", config.vision_config), ("text_model", config.text_config)):
        for i in range(cfg.num_hidden_layers):
            assert f"{tower}.encoder.layers.{i}.mlp.fc1" in names
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


# --------------------------------------------------------------------------------- pretraining, cache


def test_cache_path(monkeypatch, tmp_path):
    suffix = recipe_hash(pretraining_recipe(3))
    tag = "pinned" if numerics_pinned() else f"native-{torch.backends.cpu.get_cpu_capability().lower()}"
    assert embedded_clip_path(tmp_path, seed=3) == tmp_path / f"embedded-clip-v3-seed3-{suffix}-{tag}"
    monkeypatch.setenv("SPU_PEFT_CACHE", str(tmp_path / "env"))
    assert embedded_clip_path(seed=0).parent == tmp_path / "env"
    monkeypatch.delenv("SPU_PEFT_CACHE")
    assert embedded_clip_path().parent == Path.home() / ".cache" / "spu_peft"


def test_other_cpu_numerics_get_another_cache_folder(monkeypatch, tmp_path):
    """The same recipe pretrains other weights with and without pinned kernels, so a cache made by one is not the
    other's (a cache made before the pinning kept its old seed 1 and 2 models)."""
    monkeypatch.setattr("spu_peft.embedded.cache.numerics_pinned", lambda: True)
    pinned = embedded_clip_path(tmp_path, seed=1)
    monkeypatch.setattr("spu_peft.embedded.cache.numerics_pinned", lambda: False)
    native = embedded_clip_path(tmp_path, seed=1)
    assert pinned.name.endswith("-pinned")
    assert native.name.endswith("-native-" + torch.backends.cpu.get_cpu_capability().lower())
    assert pinned.name.rsplit("-", 1)[0] == native.name.rsplit("-", 2)[0]  # the same recipe hash


def test_a_changed_recipe_gets_another_cache_folder(tmp_path, small_data):
    assert embedded_clip_path(tmp_path, recipe=pretraining_recipe(0)) == embedded_clip_path(tmp_path)
    assert recipe_hash(pretraining_recipe(0, epochs=10)) == recipe_hash(pretraining_recipe(0))  # 10 is the default
    others = [pretraining_recipe(0, epochs=3), pretraining_recipe(1), tiny_recipe(small_data)]
    folders = {embedded_clip_path(tmp_path, recipe=r) for r in [pretraining_recipe(0), *others]}
    assert len(folders) == 4
    with pytest.raises(TypeError, match="unknown pretraining argument"):
        pretraining_recipe(0, epoch=3)


def test_a_model_built_with_a_recipe_records_its_hash(cached_root, small_data):
    path = embedded_clip_path(cached_root, seed=0, recipe=tiny_recipe(small_data))
    assert read_pretraining_metrics(path)["recipe_hash"] == recipe_hash(tiny_recipe(small_data))
    assert f"-{recipe_hash(tiny_recipe(small_data))}-" in path.name


def test_the_default_model_is_shipped_and_loads_without_pretraining(monkeypatch, tmp_path):
    def must_not_train(*args, **kwargs):
        raise AssertionError("the shipped model should have been used")

    monkeypatch.setattr(embedded_cache, "pretrain_embedded_clip", must_not_train)
    monkeypatch.setenv("SPU_PEFT_CACHE", str(tmp_path))
    shipped = shipped_model_path()
    assert embedded_model_path() == shipped
    metrics = read_pretraining_metrics(shipped)
    assert metrics["recipe_hash"] == recipe_hash(pretraining_recipe(0))  # the shipped weights follow the recipe
    assert metrics["numerics"]["mode"] == "reproducible" and metrics["control_accuracy"] > 0.85
    assert (shipped / "model.safetensors").stat().st_size < 1_300_000
    model, processor = load_embedded_clip()
    assert sum(p.numel() for p in model.parameters()) == metrics["num_parameters"]
    assert processor.tokenizer("zebra")["input_ids"][-1] == processor.tokenizer.eos_token_id
    assert list(tmp_path.iterdir()) == []  # nothing was cached


def test_word_list_is_package_data():
    words = english_words()
    assert len(words) == len(set(words)) > 500 and "giraffe" in words and words[0] == "aardvark"


def test_tiny_pretraining_saves_a_loadable_clip(cached_root, small_data):
    path = embedded_clip_path(cached_root, seed=0, recipe=tiny_recipe(small_data))
    metrics = read_pretraining_metrics(path)
    assert metrics["steps"] == TINY_RUN["max_steps"] and 0.0 <= metrics["control_accuracy"] <= 1.0
    assert set(metrics["control_accuracy_by_domain"]) <= {"digits", "letters", "shapes"}
    assert 0.0 <= metrics["animal_zero_shot_accuracy"] <= 1.0
    processor = AutoProcessor.from_pretrained(path)
    model = CLIPModel.from_pretrained(path)
    control = small_data["control"].select(range(TINY_RUN["limit"]))  # what the metrics evaluated
    features = class_features(model, processor.tokenizer, PRETRAINING_CLASSES, CAPTION_TEMPLATES)
    percent = zero_shot_accuracy(model, labelled_batches(control), features)  # the engine's, in percent
    assert metrics["control_accuracy"] == pytest.approx(percent / 100, abs=1e-12)
    batch = small_data["control"][:4]
    captions = captions_for(PRETRAINING_CLASSES[:3], "a {}.")
    inputs = processor(text=captions, images=batch["image"], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (4, 3)


def test_load_embedded_clip_reuses_cache(cached_root, small_data, monkeypatch):
    def must_not_train(*args, **kwargs):
        raise AssertionError("the cached model should have been reused")

    monkeypatch.setattr(embedded_cache, "pretrain_embedded_clip", must_not_train)
    weights = embedded_clip_path(cached_root, seed=0, recipe=tiny_recipe(small_data)) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    model, processor = load_embedded_clip(
        cache_dir=cached_root, seed=0, pretrain_kwargs={"data": small_data, **TINY_RUN}
    )
    assert weights.stat().st_mtime_ns == mtime
    assert not model.training
    control = small_data["control"].select(range(32))
    features = class_features(model, processor.tokenizer, PRETRAINING_CLASSES, CAPTION_TEMPLATES[:2])
    acc = zero_shot_accuracy(model, labelled_batches(control, processor), features)
    assert acc == zero_shot_accuracy(model, labelled_batches(control), features)  # the fast path, same pixels
    assert 0.0 <= acc <= 100.0


def test_class_text_features_truncate_long_class_names(cached_root, small_data):
    model, processor = load_embedded_clip()
    names = ["cat", " ".join(["a very long animal name"] * 20)]
    text = class_features(model, processor.tokenizer, names, CAPTION_TEMPLATES[:2])
    assert text.shape == (2, model.config.projection_dim)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))


def test_zero_shot_uses_a_foreign_image_processor(cached_root, small_data):
    """A processor that is not the embedded one (e.g. a hub CLIP's) must be used as is, not the fast path."""
    model, processor = load_embedded_clip()
    other = CLIPImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_mean=[0.2] * 3, image_std=[0.3] * 3
    )
    foreign = CLIPProcessor(image_processor=other, tokenizer=processor.tokenizer)
    control = small_data["control"].select(range(16))
    text = class_features(model, processor.tokenizer, PRETRAINING_CLASSES, CAPTION_TEMPLATES[:1])
    preds, labels = zero_shot_predictions(model, labelled_batches(control, foreign), text)
    with torch.no_grad():
        pixels = other(images=list(control["image"]), return_tensors="pt")["pixel_values"]
        features = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    assert preds.tolist() == (features @ text.T).argmax(dim=-1).tolist()
    assert labels.tolist() == control["label"]


def test_load_embedded_clip_trains_on_first_use(tmp_path, small_data):
    model, processor = load_embedded_clip(cache_dir=tmp_path, seed=1, pretrain_kwargs={"data": small_data, **TINY_RUN})
    assert isinstance(model, CLIPModel)
    assert [p.name for p in tmp_path.iterdir()] == [embedded_clip_path(tmp_path, 1, tiny_recipe(small_data, 1)).name]
    assert processor.tokenizer("zebra")["input_ids"][-1] == processor.tokenizer.eos_token_id


def test_interrupted_pretraining_leaves_no_cache(tmp_path, monkeypatch):
    def killed(output_dir, **kwargs):
        (Path(output_dir) / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded_cache, "pretrain_embedded_clip", killed)
    with pytest.raises(KeyboardInterrupt):
        load_embedded_clip(cache_dir=tmp_path, seed=1)
    assert list(tmp_path.iterdir()) == []


def test_pretraining_is_deterministic(tmp_path, small_data):
    first = pretrain_embedded_clip(tmp_path / "a", seed=0, data=small_data, **TINY_RUN)
    second = pretrain_embedded_clip(tmp_path / "b", seed=0, data=small_data, **TINY_RUN)
    assert first["final_loss"] == second["final_loss"]
    a = CLIPModel.from_pretrained(tmp_path / "a").state_dict()
    b = CLIPModel.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
