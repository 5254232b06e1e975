"""The tables SPU reads per transformers `model_type` and PEFT task type, as PEFT keeps its own in
`peft.utils.constants`."""

from peft import peft_model as _peft_model

# The first linear layer of each MLP block, per transformers `model_type`. Other model types may join.
# Gated MLPs (LLaMA-style SwiGLU) have two first layers, `gate_proj` and `up_proj`, both mapping the hidden state
# into the MLP's intermediate space; SPU's "fc1" is that input side, so both are targeted (`down_proj` is fc2).
# Phi-3 fuses both into `gate_up_proj`, targeted whole; gated T5 (mT5 and UMT5 are gated) names them `wi_0` and
# `wi_1`. Left out on purpose: GPT-2's `c_fc` is a transformers `Conv1D` and Falcon's `dense_h_to_4h` a linear layer
# with its own `forward`, both of which SPU refuses; MoE models keep their experts in fused tensors, not linear layers.
TRANSFORMERS_MODELS_TO_SPU_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "clip": ["fc1"],
    "clip_vision_model": ["fc1"],
    "clip_text_model": ["fc1"],
    "siglip": ["fc1"],
    "siglip_vision_model": ["fc1"],
    "siglip_text_model": ["fc1"],
    "vit": ["fc1"],
    "dinov2": ["fc1", "gate_proj", "up_proj"],  # the SwiGLU variant: gate_proj, up_proj
    "bert": ["intermediate.dense"],
    "roberta": ["intermediate.dense"],
    "xlm-roberta": ["intermediate.dense"],
    "deberta-v2": ["intermediate.dense"],
    "distilbert": ["lin1"],
    "bart": ["fc1"],
    "mbart": ["fc1"],
    "whisper": ["fc1"],
    "t5": ["wi", "wi_0", "wi_1"],
    "mt5": ["wi", "wi_0", "wi_1"],
    "umt5": ["wi", "wi_0", "wi_1"],
    "opt": ["fc1"],
    "phi": ["fc1"],
    "phi3": ["gate_up_proj"],
    "gpt_neox": ["dense_h_to_4h"],
    "bloom": ["dense_h_to_4h"],
    "gptj": ["fc_in"],
    "codegen": ["fc_in"],
    "gpt_bigcode": ["c_fc"],
    "starcoder2": ["c_fc"],
    "llama": ["gate_proj", "up_proj"],
    "mistral": ["gate_proj", "up_proj"],
    "qwen2": ["gate_proj", "up_proj"],
    "qwen3": ["gate_proj", "up_proj"],
    "gemma": ["gate_proj", "up_proj"],
    "gemma2": ["gate_proj", "up_proj"],
    "gemma3_text": ["gate_proj", "up_proj"],
    "gemma3": ["gate_proj", "up_proj"],  # Gemma 3 from 4B on: the language model's MLPs, not the SigLIP tower's fc1
}

# Modules trained densely beside the sparse deltas (the paper trains CLIP's visual projection).
TRANSFORMERS_MODELS_TO_SPU_MODULES_TO_SAVE_MAPPING: dict[str, list[str]] = {
    "clip": ["visual_projection"],
}

# The heads PEFT's classification task models add themselves: `classifier` and `score`, and from PEFT 0.22 on also
# DistilBERT's new `pre_classifier` (read from PEFT where it says).
PEFT_CLASSIFIER_HEADS: tuple[str, ...] = tuple(getattr(_peft_model, "CLASSIFIER_MODULE_NAMES", ("classifier", "score")))

# The heads PEFT's task models put into `modules_to_save` themselves (`PeftModelForSequenceClassification` and its
# kin), whichever of them the model has: so a classifier named `score` (LLaMA) or `classifier` (BERT) trains densely.
# Only the names a user gave must match a module.
PEFT_TASK_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": PEFT_CLASSIFIER_HEADS,
    "TOKEN_CLS": PEFT_CLASSIFIER_HEADS,
    "QUESTION_ANS": ("qa_outputs",),
}

# Task heads PEFT's task models leave out: BART's, mBART's and T5's sequence classifiers are `classification_head`,
# audio classifiers (Whisper's, wav2vec 2.0's) put a new `projector` before `classifier`, and DistilBERT a new
# `pre_classifier` (which PEFT adds itself only from 0.22 on). They would stay frozen at their random initialization
# and be missing from the saved adapter. SPU adds the ones the model has to `modules_to_save`.
SPU_TASK_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classification_head", "projector", "pre_classifier"),
}

# The same per model type: DeBERTa's sequence classifier puts a new dense `pooler` (which its backbone's checkpoints
# lack) before `classifier`. BERT's `pooler` is pretrained and stays frozen, as with LoRA.
TRANSFORMERS_MODELS_TO_SPU_TASK_MODULES_TO_SAVE: dict[str, dict[str, tuple[str, ...]]] = {
    "deberta": {"SEQ_CLS": ("pooler",)},
    "deberta-v2": {"SEQ_CLS": ("pooler",)},
}
