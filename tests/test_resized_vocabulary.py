"""A model whose vocabulary was resized before training (a pad token added, a chat template's tokens) saves its token
embeddings beside the adapter, as LoRA's does (`save_embedding_layers`): the file's digest covers them, and they load
back onto a base resized to the same vocabulary, or are refused, with the fix, on any other."""

import copy
import os

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import spu_peft
from spu_peft import SPUConfig, SPULayer, select_parameters
from spu_peft.integrity import DIGEST_KEY, SPUAdapterFileError, cover_added_tensors, digest_entry

LLAMA = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, pad_token_id=0)  # fmt: skip
RESIZED = 53  # a pad token and two chat-template tokens
WEIGHTS = "adapter_model.safetensors"
EMBEDDINGS = {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
IDS = torch.tensor([[1, 50, 7, 51, 52, 3]])  # the added tokens among the old ones


def base(vocabulary: int | None = RESIZED, seed: int = 0, path=None, **config) -> LlamaForCausalLM:
    """The tiny LLaMA (from `path`, else built from its config under one seed: the same weights every time), resized
    as a user does after adding tokens; the new rows are drawn at random, so two bases resized under different
    seeds differ there."""
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(path) if path else LlamaForCausalLM(LlamaConfig(**LLAMA, **config))
    torch.manual_seed(seed)
    if vocabulary is not None:
        model.resize_token_embeddings(vocabulary)
    return model.eval()


def trained(model: LlamaForCausalLM, adapter_name: str = "default", **config):
    """An SPU adapter on `model` as training leaves it: values away from zero, dense modules moved."""
    peft_model = get_peft_model(model, SPUConfig(task_type="CAUSAL_LM", **config), adapter_name=adapter_name)
    select_parameters(peft_model, score="random", adapter_name=adapter_name)
    with torch.no_grad():
        for _, layer in peft_model.named_modules():
            if isinstance(layer, SPULayer):
                layer.spu_values[adapter_name].normal_(0, 0.5)
        for name, parameter in peft_model.named_parameters():
            if ".modules_to_save." in name:
                parameter.add_(0.1)
    return peft_model.eval()


def file_keys(folder) -> set[str]:
    with safe_open(os.path.join(folder, WEIGHTS), framework="pt") as handle:
        return set(handle.keys())  # noqa: SIM118 (safe_open is no dict)


def saved(tmp_path, save_embedding_layers=True, **config):
    model = trained(base(**config))
    model.save_pretrained(tmp_path, save_embedding_layers=save_embedding_layers)
    return model, model(input_ids=IDS).logits


@pytest.mark.parametrize("tied", [False, True])
def test_resized_vocabulary_round_trips_exactly_onto_a_base_resized_alike(tmp_path, tied):
    model, expected = saved(tmp_path, tie_word_embeddings=tied)
    assert file_keys(tmp_path) > EMBEDDINGS
    fresh = base(seed=1, tie_word_embeddings=tied)
    assert not torch.equal(fresh.get_input_embeddings().weight, model.get_input_embeddings().weight)  # new rows
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(loaded(input_ids=IDS).logits, expected)
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(loaded.get_output_embeddings().weight, model.get_output_embeddings().weight)


def test_load_adapter_into_a_peft_model_loads_the_embeddings_too(tmp_path):
    model, expected = saved(tmp_path)
    for load, name in (
        (lambda peft_model: peft_model.load_adapter(tmp_path, adapter_name="task"), "task"),
        (lambda peft_model: spu_peft.load_adapter(peft_model, tmp_path, adapter_name="task"), "task"),
        (lambda peft_model: spu_peft.load_adapter(peft_model, tmp_path), "default"),  # into the adapter it holds
    ):
        peft_model = get_peft_model(base(seed=2), SPUConfig(task_type="CAUSAL_LM"))
        load(peft_model)
        peft_model.set_adapter(name)
        assert torch.equal(peft_model.eval()(input_ids=IDS).logits, expected)


def test_auto_saves_the_embeddings_of_a_base_read_from_a_folder_and_resized(tmp_path):
    """`save_embedding_layers="auto"` (the default) compares the vocabulary with the base's own config.json: offline
    that works for a base read from a folder, not for one built from a config (no name to look up; PEFT then saves
    no embeddings, for LoRA as for SPU)."""
    folder = tmp_path / "base"
    base(vocabulary=None).save_pretrained(folder)
    model = trained(base(path=folder))
    expected = model(input_ids=IDS).logits
    with pytest.warns(UserWarning, match="resized"):
        model.save_pretrained(tmp_path / "adapter")
    assert file_keys(tmp_path / "adapter") > EMBEDDINGS
    loaded = PeftModel.from_pretrained(base(path=folder, seed=3), tmp_path / "adapter")
    assert torch.equal(loaded(input_ids=IDS).logits, expected)


def test_an_untouched_vocabulary_saves_no_embeddings(tmp_path):
    model = trained(base(vocabulary=None))
    model.save_pretrained(tmp_path)
    keys = file_keys(tmp_path)
    spu_keys = {key for key in keys if ".spu_" in key}
    assert spu_keys and keys == spu_keys | {DIGEST_KEY}


def test_explicit_save_embedding_layers_round_trips_an_untouched_vocabulary(tmp_path):
    """`save_embedding_layers=True` saves the embeddings whatever the vocabulary (what users pass where "auto" cannot
    tell that it changed); the file loads, as LoRA's does."""
    model = trained(base(vocabulary=None))
    model.save_pretrained(tmp_path, save_embedding_layers=True)
    assert file_keys(tmp_path) > EMBEDDINGS
    loaded = PeftModel.from_pretrained(base(vocabulary=None), tmp_path)
    assert torch.equal(loaded(input_ids=IDS % 50).logits, model(input_ids=IDS % 50).logits)


@pytest.mark.parametrize("save_embedding_layers", [False, True])
def test_embeddings_trained_densely_round_trip_and_name_the_vocabulary(tmp_path, save_embedding_layers):
    """`modules_to_save=["embed_tokens", "lm_head"]` trains copies of the embeddings; with the embedding layers saved
    too, PEFT also saves the originals and the copies under the wrappers' own names (the copies without the adapter
    name, as LoRA's, or PEFT's load would put the dense tensor in their place): the originals load (the output with
    the adapter disabled is the trained model's), and a base with another vocabulary is refused."""
    model = trained(base(), modules_to_save=["embed_tokens", "lm_head"])
    model.save_pretrained(tmp_path, save_embedding_layers=save_embedding_layers)
    wrapped = {
        f"{key.rpartition('.')[0]}.{part}.weight"
        for key in EMBEDDINGS
        for part in ("original_module", "modules_to_save")
    }
    assert (wrapped < file_keys(tmp_path)) == save_embedding_layers
    loaded = PeftModel.from_pretrained(base(seed=1), tmp_path)
    assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
    with loaded.disable_adapter(), model.disable_adapter():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits) == save_embedding_layers
    with pytest.raises(SPUAdapterFileError, match=rf"vocabulary of {RESIZED} tokens, but the model has 50"):
        PeftModel.from_pretrained(base(vocabulary=None), tmp_path)


def test_a_named_adapter_saved_atomically_round_trips_its_embeddings(tmp_path):
    model = trained(base(), adapter_name="task")
    spu_peft.save_adapter(model, tmp_path, save_embedding_layers=True)
    assert file_keys(tmp_path / "task") > EMBEDDINGS
    loaded = PeftModel.from_pretrained(base(seed=1), tmp_path, subfolder="task", adapter_name="task")
    assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_an_spu_layer_on_the_output_embeddings_round_trips_their_base_weight(tmp_path):
    """With `lm_head` among the targets PEFT saves its base weight whatever the vocabulary (as for LoRA), which SPU
    refused as altered and as a tensor the adapter does not have."""
    model = trained(base(vocabulary=None), target_modules=["up_proj", "lm_head"])
    with pytest.warns(UserWarning, match="embedding layers found in `target_modules`"):
        model.save_pretrained(tmp_path)
    assert "base_model.model.lm_head.base_layer.weight" in file_keys(tmp_path)
    loaded = PeftModel.from_pretrained(base(vocabulary=None), tmp_path)
    assert torch.equal(loaded(input_ids=IDS % 50).logits, model(input_ids=IDS % 50).logits)
    with pytest.raises(SPUAdapterFileError, match=r"`lm_head.base_layer.weight`: .*resize_token_embeddings\(50\)"):
        PeftModel.from_pretrained(base(), tmp_path)


def test_a_tampered_or_truncated_embedding_is_refused(tmp_path):
    model, _ = saved(tmp_path)
    path = tmp_path / WEIGHTS
    intact = path.read_bytes()
    tensors = load_file(path)
    tensors["base_model.model.model.embed_tokens.weight"][51, 0] += 1.0
    save_file(tensors, path, metadata={"format": "pt"})  # the digest kept, one embedding entry changed
    fresh = base(seed=1)
    before = fresh.get_input_embeddings().weight.clone()
    with pytest.raises(SPUAdapterFileError, match="do not match the digest"):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(fresh.get_input_embeddings().weight, before)
    assert not any(isinstance(module, SPULayer) for module in fresh.modules())
    path.write_bytes(intact[: len(intact) - 100])
    with pytest.raises(SPUAdapterFileError, match="truncated or damaged"):
        PeftModel.from_pretrained(base(seed=1), tmp_path)


@pytest.mark.parametrize("vocabulary", [None, 51, 60])
def test_a_base_with_another_vocabulary_is_refused_with_the_size_to_resize_to(tmp_path, vocabulary):
    saved(tmp_path)
    other = base(vocabulary=vocabulary, seed=1)
    before = {key: value.clone() for key, value in other.state_dict().items()}
    with pytest.raises(SPUAdapterFileError, match=rf"vocabulary of {RESIZED} tokens.*resize_token_embeddings\(53\)"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(module, SPULayer) for module in other.modules())
    assert all(torch.equal(value, before[key]) for key, value in other.state_dict().items())


def test_a_state_dict_taken_with_the_embeddings_is_refused_naming_the_save(tmp_path):
    """`get_peft_model_state_dict(save_embedding_layers=True)` adds the embeddings after SPU's hook digested the rest:
    only `save_pretrained` extends the digest, so the state dict itself is refused, saying so, not as damaged."""
    model = trained(base())
    state_dict = get_peft_model_state_dict(model, save_embedding_layers=True)
    assert state_dict.keys() > EMBEDDINGS
    with pytest.raises(SPUAdapterFileError, match="outside its digest.*save_pretrained"):
        set_peft_model_state_dict(get_peft_model(base(seed=1), SPUConfig(task_type="CAUSAL_LM")), state_dict)
    state_dict["base_model.model.model.layers.0.mlp.up_proj.spu_values"][0] += 1.0
    with pytest.raises(SPUAdapterFileError, match="altered or damaged"):
        set_peft_model_state_dict(get_peft_model(base(seed=1), SPUConfig(task_type="CAUSAL_LM")), state_dict)


def test_a_file_the_save_did_not_digest_is_not_sealed(tmp_path):
    """Only the file the save hook digested gets its added tensors covered: one whose recorded digest does not match
    the keys given is left as it is, and a load refuses it."""
    path = tmp_path / WEIGHTS
    tensors = {"base_model.model.fc1.spu_values": torch.ones(3)}
    extra = {"base_model.model.model.embed_tokens.weight": torch.ones(4, 2)}
    save_file({**tensors, **extra, DIGEST_KEY: digest_entry({"other": torch.ones(3)})}, path)
    before = path.read_bytes()
    assert cover_added_tensors(path, tensors, digest_entry(tensors)) == []
    assert path.read_bytes() == before
    save_file({**tensors, **extra, DIGEST_KEY: digest_entry(tensors)}, path)
    other = {"base_model.model.fc1.spu_values": torch.zeros(3)}  # the same keys: another adapter's digest
    assert cover_added_tensors(path, tensors, digest_entry(other)) == []
    assert cover_added_tensors(path, tensors, digest_entry(tensors)) == sorted(extra)
    assert torch.equal(load_file(path)[DIGEST_KEY], digest_entry({**tensors, **extra}))


def card_code(folder) -> str:
    text = (folder / "README.md").read_text()
    return text.split(spu_peft.hub.SECTION_HEADING)[1].split("```python\n")[1].split("```")[0]


def test_the_model_card_s_code_resizes_the_base_before_loading_the_adapter(tmp_path):
    """The card's code runs as written on a resized adapter: it resizes the freshly loaded base to the vocabulary the
    file's embeddings have, which loading needs (without it the load is refused, naming the size)."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(tmp_path / "base")
    model = trained(base(path=tmp_path / "base"))
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    spu_peft.update_model_card(model, tmp_path / "adapter")
    code = card_code(tmp_path / "adapter")
    assert f"base.resize_token_embeddings({RESIZED})" in code and str(tmp_path / "base") in code
    scope = {}
    exec(code.replace("<this repo>", str(tmp_path / "adapter")), scope)
    with torch.no_grad():
        assert torch.equal(scope["model"].eval()(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_the_model_card_of_an_untouched_vocabulary_resizes_nothing(tmp_path):
    model = trained(base(vocabulary=None))
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    spu_peft.update_model_card(model, tmp_path)
    assert "resize_token_embeddings" not in card_code(tmp_path)


def test_the_model_card_of_embeddings_trained_densely_resizes_to_their_rows_a_no_op_here(tmp_path):
    """Embeddings trained densely travel in every file, resized or not: the card resizes to their rows, which changes
    nothing on a base that has them, and its code loads the adapter."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(tmp_path / "base")
    model = trained(base(vocabulary=None, path=tmp_path / "base"), modules_to_save=["embed_tokens", "lm_head"])
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    spu_peft.update_model_card(model, tmp_path / "adapter")
    code = card_code(tmp_path / "adapter")
    assert "base.resize_token_embeddings(50)" in code
    scope = {}
    exec(code.replace("<this repo>", str(tmp_path / "adapter")), scope)
    ids = IDS[:, IDS[0] < 50]  # the base's own tokens
    with torch.no_grad():
        assert torch.equal(scope["model"].eval()(input_ids=ids).logits, model(input_ids=ids).logits)


def _unsealed_file(folder, model, adapter_name: str) -> None:
    """The adapter's state dict with its embeddings as `get_peft_model_state_dict` returns it (outside the digest),
    one embedding entry then edited, written as a save stopped before the config would leave it."""
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=True)
    state_dict = {key: value.detach().clone().contiguous() for key, value in state_dict.items()}
    state_dict["base_model.model.model.embed_tokens.weight"][51, 0] += 1.0
    os.makedirs(folder, exist_ok=True)
    save_file(state_dict, os.path.join(folder, WEIGHTS), metadata={"format": "pt"})


def test_a_config_seals_only_the_file_its_own_save_hook_digested(tmp_path):
    """Two adapters of one model have the same keys: the record one adapter's hook left on its config (a state dict
    taken, no save followed) must not seal the other adapter's unsealed, edited file when that config is saved
    into its folder; the file stays as it was and loading it is refused."""
    model = trained(base())
    model.add_adapter("other", SPUConfig(task_type="CAUSAL_LM", seed=3))
    select_parameters(model, score="random", adapter_name="other")
    _unsealed_file(tmp_path, model, "other")
    before = (tmp_path / WEIGHTS).read_bytes()
    get_peft_model_state_dict(model, save_embedding_layers=True)  # the default adapter's hook runs; no save follows
    model.peft_config["default"].save_pretrained(tmp_path, auto_mapping_dict=None)  # as PeftModel.save_pretrained
    assert (tmp_path / WEIGHTS).read_bytes() == before
    with pytest.raises(SPUAdapterFileError, match="do not match the digest"):
        PeftModel.from_pretrained(base(seed=1), tmp_path)


def test_a_refused_save_a_copied_config_or_a_config_saved_alone_seals_nothing(tmp_path):
    """A save refused before the config was written (`safe_serialization=False`) and a deep copy of a config keep no
    record of what the hook digested, so their config saves, called as `PeftModel.save_pretrained` calls them, seal
    nothing; nor does a save of the config alone, even of the file of the state dict its hook just digested."""
    model = trained(base())
    config = model.peft_config["default"]
    _unsealed_file(tmp_path / "old", model, "default")
    copied = copy.deepcopy(config)  # taken while the hook's record of that state dict is held
    model.save_pretrained(tmp_path / "done")  # the record is spent here
    before = (tmp_path / "old" / WEIGHTS).read_bytes()
    copied.save_pretrained(tmp_path / "old", auto_mapping_dict=None)
    with pytest.raises(ValueError, match="safe_serialization=False"):
        model.save_pretrained(tmp_path / "pickled", safe_serialization=False, save_embedding_layers=True)
    config.save_pretrained(tmp_path / "old", auto_mapping_dict=None)
    assert (tmp_path / "old" / WEIGHTS).read_bytes() == before
    get_peft_model_state_dict(model, save_embedding_layers=True)  # the record of this very state dict, then
    config.save_pretrained(tmp_path / "old")  # a save of the config alone
    assert (tmp_path / "old" / WEIGHTS).read_bytes() == before


def test_an_untied_adapter_file_is_refused_on_a_base_that_ties_its_embeddings(tmp_path):
    """A base that ties its input and output embeddings holds one tensor for both: loading a file whose two
    embeddings differ would keep only one of them (the logits changed in silence); it is refused, naming the tie, and
    the base's embeddings stay as they were."""
    model, _ = saved(tmp_path, tie_word_embeddings=False)
    tied = base(seed=1, tie_word_embeddings=True)
    before = tied.get_input_embeddings().weight.clone()
    with pytest.raises(SPUAdapterFileError, match="tie_word_embeddings"):
        PeftModel.from_pretrained(tied, tmp_path)
    assert torch.equal(tied.get_input_embeddings().weight, before)
    assert not any(isinstance(module, SPULayer) for module in tied.modules())
