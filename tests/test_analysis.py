"""spu_peft.analysis: causal tracing on tiny CLIP, SigLIP, ViT, BERT and LLaMA models, neuron maps, repeat rates."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_clip
from peft import get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipConfig,
    SiglipModel,
    ViTConfig,
    ViTForImageClassification,
)

from spu_peft import SPUConfig, select_parameters
from spu_peft.analysis import (
    CausalTraceResult,
    causal_trace,
    find_towers,
    model_support,
    neuron_maps,
    recommend_target_modules,
    repeat_rates,
    selected_per_row,
    task_supports,
    top_selected_neurons,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)


def _clip():
    model = make_tiny_clip()
    captions = torch.randint(3, 99, (3, 7), generator=torch.Generator().manual_seed(1))
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "input_ids": captions, "labels": torch.tensor([0, 1, 2, 1])}
    return model, batch


def _siglip():
    text = dict(vocab_size=99, max_position_embeddings=16, **SMALL)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=dict(image_size=16, patch_size=4, **SMALL)))
    return model, _clip()[1]


def _vit():
    model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_labels=3, **SMALL))
    return model, {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 1])}


def _bert():
    model = BertForSequenceClassification(BertConfig(vocab_size=99, num_labels=3, **SMALL))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    batch = {"input_ids": torch.randint(3, 99, (4, 6)), "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}
    return model, batch


def _llama():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=99, num_key_value_heads=2, **SMALL))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[2, 3:] = 0  # right padding: the next token follows position 2
    return model, {
        "input_ids": torch.randint(3, 99, (4, 6)),
        "attention_mask": mask,
        "labels": torch.tensor([5, 6, 7, 8]),
    }


# architecture -> (builder, towers it has, attention module, first MLP layer)
ARCHITECTURES = {
    "clip": (_clip, ["text_model", "vision_model"], "self_attn", "mlp.fc1"),
    "siglip": (_siglip, ["text_model", "vision_model"], "self_attn", "mlp.fc1"),
    "vit": (_vit, ["vit"], "attention", "mlp.fc1"),
    "bert": (_bert, ["bert"], "attention.output.dense", "intermediate.dense"),
    "llama": (_llama, ["model"], "self_attn", "mlp.up_proj"),
}


def _build(name):
    torch.manual_seed(0)
    model, batch = ARCHITECTURES[name][0]()
    return model.eval(), batch


def _reference_probability(model, batch, embedding, noise):
    """The labels' mean probability with `noise` added to `embedding`'s output, computed without the library."""
    handle = model.get_submodule(embedding).register_forward_hook(lambda m, i, o: o + noise)
    try:
        with torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            output = model(**inputs)
    finally:
        handle.remove()
    if hasattr(output, "logits_per_image"):
        logits = output.logits_per_image
    elif output.logits.dim() == 3:
        last = batch["attention_mask"].sum(1) - 1
        logits = output.logits[torch.arange(len(last)), last]
    else:
        logits = output.logits
    return logits.softmax(-1)[torch.arange(len(batch["labels"])), batch["labels"]].mean().item()


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_trace_restores_clean_and_leaves_model_untouched(name):
    model, batch = _build(name)
    _, towers, attention, fc1 = ARCHITECTURES[name]
    found = {t.name: t for t in find_towers(model)}
    assert sorted(found) == towers
    assert all(t.kinds["attention"] == attention and t.kinds["fc1"] == fc1 for t in found.values())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    frozen = next(model.children())
    frozen.eval()  # a part (a tower) the caller keeps in eval mode inside a training model
    modes = {m: m.training for m in model.modules()}
    result = causal_trace(model, [batch], progress=False, seed=3)
    assert {m: m.training for m in model.modules()} == modes  # every module's own mode comes back
    assert model.training and not frozen.training
    assert _no_hooks(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    clean = _reference_probability(model.eval(), batch, found[towers[0]].embedding, 0.0)
    assert result.clean == pytest.approx(clean, abs=1e-6)
    for tower in towers:
        # Restoring the last block's output brings back the clean prediction exactly.
        assert result.restored[tower]["block"][-1] == pytest.approx(result.clean, abs=1e-6)
        # Restoring nothing: the corrupted run, as noise drawn by the documented generator gives it.
        shape = model.get_submodule(found[tower].embedding)(
            batch["pixel_values"] if tower in ("vision_model", "vit") else batch["input_ids"]
        ).shape
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * result.noise_std[tower]
        corrupted = _reference_probability(model, batch, found[tower].embedding, noise)
        assert result.corrupted[tower] == pytest.approx(corrupted, abs=1e-6)
        assert result.corrupted[tower] != pytest.approx(result.clean, abs=1e-4)


def test_without_noise_every_restoration_is_the_clean_run():
    model, batch = _build("vit")
    result = causal_trace(model, [batch], noise=0.0, progress=False)
    assert "labels" in batch  # the caller's batches are not changed
    assert result.corrupted["vit"] == result.clean
    assert all(p == result.clean for kinds in result.restored["vit"].values() for p in kinds)


def test_first_layer_restores_what_the_mlp_outputs_and_attention_differs():
    # fc1 -> activation -> fc2 is a chain: restoring fc1's output restores fc2's and the MLP's exactly.
    model, batch = _build("clip")
    result = causal_trace(model, [batch, batch], progress=False)
    for tower in ("vision_model", "text_model"):
        assert result.restored[tower]["fc1"] == result.restored[tower]["fc2"] == result.restored[tower]["mlp"]
        assert result.restored[tower]["attention"] != result.restored[tower]["mlp"]
    assert result.num_inputs == 8


def test_hooks_are_removed_on_error():
    model, batch = _build("bert")
    broken = dict(batch, input_ids=batch["input_ids"][:, :3])  # shorter than its attention mask
    with pytest.raises(Exception):  # noqa: B017 (transformers' own error for mismatched shapes)
        causal_trace(model, [batch, broken], progress=False)
    assert _no_hooks(model) and not model.training


def test_kinds_and_noise_are_checked():
    model, batch = _build("vit")
    with pytest.raises(ValueError, match="kinds: \\['gate'\\]"):
        causal_trace(model, [batch], kinds=["gate"], progress=False)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        causal_trace(model, [batch], noise=-1.0, progress=False)
    with pytest.raises(ValueError, match="inputs: no batch"):
        causal_trace(model, [], progress=False)


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        ([0, 1], r"labels: 2 of them \(shape \(2,\)\) for a batch of 4 inputs"),
        ([0, 1, 2, 9], r"labels: 9 is not a class"),
    ],
)
def test_labels_that_do_not_fit_the_batch_are_refused(labels, problem):
    # Two labels for four images traced only the first two, silently; a label past the classes failed in gather.
    model, batch = _build("clip")
    with pytest.raises(ValueError, match=problem):
        causal_trace(model, [dict(batch, labels=torch.tensor(labels))], progress=False)
    assert _no_hooks(model) and not model.training


def _result(effects, targets):
    """A result with one tower whose restored probabilities are `effects` above a corrupted 0.1."""
    restored = {"t": {k: [0.1 + e for e in v] for k, v in effects.items()}}
    return CausalTraceResult(0.9, {"t": 0.1}, restored, {"t": 1.0}, {"t": targets}, 4)


CLIP_TARGETS = {
    "fc1": ("mlp.fc1",),
    "fc2": ("mlp.fc2",),
    "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
}


def test_recommendation_follows_the_largest_effect_and_breaks_ties_upstream():
    attention_best = _result({"attention": [0.5, 0.3], "fc1": [0.1, 0.1], "fc2": [0.1, 0.1]}, CLIP_TARGETS)
    assert recommend_target_modules(attention_best) == ["q_proj", "k_proj", "v_proj", "out_proj"]
    tie = _result({"attention": [0.1, 0.1], "fc1": [0.3, 0.2], "fc2": [0.3, 0.2]}, CLIP_TARGETS)
    assert recommend_target_modules(tie) == ["fc1"]
    fc2_best = _result({"attention": [0.1, 0.1], "fc1": [0.2, 0.2], "fc2": [0.3, 0.3]}, CLIP_TARGETS)
    assert recommend_target_modules(fc2_best) == ["fc2"]
    assert recommend_target_modules(fc2_best, tolerance=0.2) == ["fc1"]
    # BERT: `dense` names two kinds' layers, so the block-relative path is kept.
    bert = {"attention": ("attention.self.query", "attention.output.dense"), "fc1": ("intermediate.dense",)}
    assert recommend_target_modules(_result({"attention": [0.1], "fc1": [0.4]}, bert)) == ["intermediate.dense"]
    assert recommend_target_modules(_result({"attention": [0.4], "fc1": [0.1]}, bert)) == [
        "query",
        "attention.output.dense",
    ]


def test_recommended_modules_build_an_spu_adapter():
    model, batch = _build("llama")
    names = recommend_target_modules(causal_trace(model, [batch], progress=False))
    adapted = get_peft_model(model, SPUConfig(target_modules=names))
    assert {n.rsplit(".", 1)[-1] for n in model_support(adapted)} == {n.rsplit(".", 1)[-1] for n in names}
    # An adapted model is traced by the same names: PEFT's wrappers are not layers of their own.
    assert recommend_target_modules(causal_trace(adapted, [batch], progress=False)) == names


def test_selected_neurons_are_the_rows_with_most_entries():
    support = {0, 1, 5, 9, 10, 11}  # a (3, 4) weight: rows 0, 0, 1, 2, 2, 2
    assert selected_per_row(support, (3, 4)).tolist() == [2, 1, 3]
    assert top_selected_neurons(support, (3, 4), k=2) == [2, 0]
    with pytest.raises(ValueError, match="k must be in"):
        top_selected_neurons(support, (3, 4), k=4)
    with pytest.raises(ValueError, match="support: indices"):
        selected_per_row({12}, (3, 4))


def test_neuron_map_is_that_neurons_activation_over_the_image():
    model, _ = _build("clip")
    pixels = torch.randn(2, 3, 16, 16)
    layer = "vision_model.encoder.layers.1.mlp.fc1"
    maps = neuron_maps(model, pixels, layer, [3, 7])
    assert maps.shape == (2, 2, 16, 16)
    assert maps[0, 0].std() > 0 and not torch.equal(maps[0], maps[1])
    with torch.no_grad():
        model.get_submodule(layer).weight[7] *= -2
    changed = neuron_maps(model, pixels, layer, [3, 7])
    assert torch.equal(changed[:, 0], maps[:, 0]) and not torch.allclose(changed[:, 1], maps[:, 1])
    assert _no_hooks(model)
    # Through an SPU adapter, by the relative name.
    adapted = get_peft_model(model, SPUConfig())
    assert torch.equal(neuron_maps(adapted, pixels, layer, [3, 7]), changed)


@pytest.mark.parametrize(
    ("layer", "neurons", "message"),
    [
        (
            "text_model.encoder.layers.0.mlp.fc1",
            [3],
            "layer: 'text_model.encoder.layers.0.mlp.fc1' does not run when the model encodes images (a text tower's "
            "layer?); pass a layer of the vision tower, e.g. one named like `vision_model.encoder.layers.0.mlp.fc1`",
        ),
        *[
            (
                "vision_model.encoder.layers.1.mlp.fc1",
                neurons,
                f"neurons: {neurons} for 'vision_model.encoder.layers.1.mlp.fc1', whose rows are 0 to 47; pass one or "
                "more row indices in that range (a negative index is refused, not counted from the end)",
            )
            for neurons in ([], [999], [-1])
        ],
    ],
)
def test_neuron_maps_refuse_a_layer_images_do_not_run_and_neurons_it_does_not_have(layer, neurons, message):
    model, _ = _build("clip")
    with pytest.raises(ValueError) as caught:
        neuron_maps(model, torch.randn(1, 3, 16, 16), layer, neurons)
    assert str(caught.value) == message
    assert _no_hooks(model)


def test_repeat_rates_are_the_shared_share_of_each_pair():
    fc1 = "vision_model.encoder.layers.{}.mlp.fc1"
    a = {fc1.format(0): {1, 2, 3, 4}, fc1.format(1): {10, 11}}
    b = {fc1.format(0): {3, 4, 5, 6}, fc1.format(1): {11, 12}}
    rates = repeat_rates([a, b])
    assert rates[fc1.format(0)].tolist() == [[1.0, 0.5], [0.5, 1.0]]
    assert rates[fc1.format(1)].tolist() == [[1.0, 0.5], [0.5, 1.0]]
    pooled = sum(len(a[n] & b[n]) for n in a) / sum(len(a[n]) for n in a)
    assert rates["vision_model"][0, 1] == pytest.approx(pooled)
    assert "text_model" not in rates


def test_repeat_rates_refuse_supports_of_different_layers():
    # Adapters on different target modules used to fail with a bare KeyError of a layer name.
    fc1 = "vision_model.encoder.layers.{}.mlp.fc1"
    a = {fc1.format(0): {1, 2}, fc1.format(1): {3}}
    b = {fc1.format(0): {1, 5}}
    with pytest.raises(ValueError, match=r"supports\[1\] lacks \['vision_model.encoder.layers.1.mlp.fc1'\]"):
        repeat_rates([a, b])
    with pytest.raises(ValueError, match=r"supports\[1\] has \['vision_model.encoder.layers.1.mlp.fc1'\]"):
        repeat_rates([b, a])


def test_model_support_refuses_an_adapter_the_model_does_not_hold():
    # It returned {} for an adapter name that does not exist, or for a model without SPU layers.
    adapted = get_peft_model(make_tiny_clip(), SPUConfig(density=0.25))
    with pytest.raises(ValueError, match=r"adapter_name: no SPU layer holds 'other'; .*\['default'\]"):
        model_support(adapted, "other")
    with pytest.raises(ValueError, match=r"adapter_name: no SPU layer holds 'default'; .*no SPU adapter"):
        model_support(make_tiny_clip())


def test_task_supports_read_the_saved_adapters(tmp_path):
    saved = []
    for task in range(2):
        model = get_peft_model(make_tiny_clip(), SPUConfig(density=0.25))
        select_parameters(model, score="random", seed=task)
        model.save_pretrained(tmp_path / f"adapter_task{task}")
        saved.append(model_support(model))
    (tmp_path / "task1").mkdir()  # a checkpoint folder, not an adapter
    supports = task_supports(make_tiny_clip(), tmp_path)
    assert supports == saved and supports[0] != supports[1]
    with pytest.raises(ValueError, match="holds no adapter_task"):
        task_supports(make_tiny_clip(), tmp_path / "task1")


@pytest.mark.parametrize("missing", ["runs/spu_replay_lr0.0003", "adapter_task0/adapter_model.safetensors"])
def test_a_run_dir_that_is_no_folder_is_refused_naming_the_run_to_make_first(tmp_path, missing):
    model = get_peft_model(make_tiny_clip(), SPUConfig(density=0.25))
    model.save_pretrained(tmp_path / "adapter_task0")
    with pytest.raises(FileNotFoundError) as refused:
        task_supports(make_tiny_clip(), tmp_path / missing)
    assert str(refused.value) == (
        f"run_dir: {str(tmp_path / missing)!r} is not a folder; make the sequence run first (`run_sequence` or "
        "benchmarks/cl_sequence.py with --output-dir results/<sequence>), then pass its run of an SPU method, "
        "e.g. results/<sequence>/runs/spu_replay_lr0.0003"
    )


def test_benchmark_writes_the_three_figures(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import causal_tracing

    flags = "--num-images 32 --batch-size 32 --num-tasks 2 --score-batches 1 --map-images 2 --neurons 2"
    report = causal_tracing.main([*flags.split(), "--output-dir", str(tmp_path)])
    assert all((tmp_path / f).stat().st_size > 0 for f in ("causal_trace.png", "neuron_maps.png", "repeat_rates.png"))
    assert sorted(report["trace"]["restored"]) == ["text_model", "vision_model"]
    assert len(report["repeat_rates"]["vision_model"]) == 2 and report["trace"]["num_inputs"] == 32
