"""Each package's public names, listed exactly: a name joins or leaves `__all__` by a decision, made here too."""

import importlib

import pytest

PUBLIC = {
    "spu_peft.analysis": [
        "CausalTraceResult",
        "KIND_MODULES",
        "LAYER_KINDS",
        "TraceTower",
        "adapter_support",
        "causal_trace",
        "find_towers",
        "forward_hooks",
        "model_support",
        "neuron_maps",
        "plot_causal_trace",
        "plot_neuron_maps",
        "plot_repeat_rates",
        "recommend_target_modules",
        "repeat_rates",
        "selected_per_row",
        "target_probabilities",
        "task_adapter_dirs",
        "task_supports",
        "top_selected_neurons",
    ],
    "spu_peft": [
        "Linear",
        "MODEL_TAGS",
        "SCORES",
        "SPUAdapterFileError",
        "SPUConfig",
        "SPULayer",
        "SPUModel",
        "SPUPeftType",
        "SPUSelectionCallback",
        "SelectionReport",
        "__version__",
        "dense_deltas",
        "fold_adapters",
        "load_adapter",
        "model_card_section",
        "save_adapter",
        "scalar_parameters",
        "select_parameters",
        "subtract_adapter",
        "update_model_card",
    ],
    "spu_peft.continual": [
        "CAPTION_TEMPLATE",
        "ContinualLearningMetric",
        "ContinualMethod",
        "DEFAULT_METHODS",
        "DataSource",
        "METHOD_GROUPS",
        "FingerprintMismatchError",
        "MethodHooks",
        "NUMERICS_MODES",
        "PROTOCOLS",
        "SelectionHooks",
        "SequenceSettings",
        "Step",
        "TARGET_LAYERS",
        "TaskAdapterHooks",
        "TaskBalancedReplayBuffer",
        "TaskContext",
        "class_incremental_split",
        "class_text_features",
        "continual_metrics",
        "get_method",
        "load_sequence_data",
        "numerics_report",
        "pin_cpu_numerics",
        "prepare_sequence_data",
        "protocol_settings",
        "register_method",
        "registered_methods",
        "run_sequence",
        "task_indices",
        "tokenize_prompts",
        "train_task",
        "training_step",
        "write_outputs",
        "zero_shot_accuracy",
        "zero_shot_predictions",
    ],
    "spu_peft.embedded": [
        "ANIMAL_CLASSES",
        "CAPTION_TEMPLATES",
        "EMBEDDED_FAMILY",
        "HELD_OUT_TEMPLATES",
        "PRETRAINING_CLASSES",
        "PRETRAINING_DEFAULTS",
        "PRETRAINING_DOMAINS",
        "build_processor",
        "build_tokenizer",
        "class_names_of",
        "embedded_clip_path",
        "embedded_model_path",
        "labelled_batches",
        "load_animal_shapes",
        "load_embedded_clip",
        "load_embedded_processor",
        "load_pretraining_data",
        "load_reference_data",
        "pixel_values_from_images",
        "pretrain_embedded_clip",
        "pretraining_recipe",
        "read_pretraining_metrics",
        "recipe_hash",
        "shipped_model_path",
    ],
    "spu_peft.studies": [
        "LR_GRIDS",
        "StudyDesign",
        "advantage",
        "analyse",
        "capped",
        "curves_of",
        "drop_at",
        "learning_rate_grid",
        "load_control",
        "load_member",
        "markdown",
        "measure_overlap",
        "per_doubling",
        "plot",
        "score_methods",
        "selection_overlaps",
        "shared",
        "spread",
        "study_methods",
        "supports",
    ],
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_all_lists_exactly_the_public_names(package):
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(PUBLIC[package])
    assert len(set(module.__all__)) == len(module.__all__)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


def test_the_engine_keeps_one_zero_shot_evaluation():
    """Zero-shot accuracy exists once, in percent, in the engine; the embedded package no longer has its own."""
    import spu_peft.continual
    import spu_peft.embedded

    assert not {"zero_shot_accuracy", "zero_shot_predictions", "class_text_embeddings"} & set(dir(spu_peft.embedded))
    assert spu_peft.continual.zero_shot_accuracy.__module__ == "spu_peft.continual.evaluation"


def test_spu_registers_by_hand_because_peft_refuses_outside_names():
    """PEFT's public `register_peft_method` accepts only names of its closed `PeftType` enum, so `import spu_peft`
    writes SPU into PEFT's three mapping tables itself. If this fails, PEFT opened registration: use it instead."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    import spu_peft

    with pytest.raises(ValueError, match="Unknown PEFT type SPU"):
        register_peft_method(name="spu", config_cls=spu_peft.SPUConfig, model_cls=spu_peft.SPUModel, prefix="spu_")
    assert PEFT_TYPE_TO_CONFIG_MAPPING[spu_peft.SPUPeftType.SPU] is spu_peft.SPUConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[spu_peft.SPUPeftType.SPU] is spu_peft.SPUModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[spu_peft.SPUPeftType.SPU] == "spu_"
