"""The SPU section of an adapter's model card, whole, and how `update_model_card` places it."""

import pytest
from conftest import make_tiny_clip
from huggingface_hub import ModelCard
from peft import get_peft_model

from spu_peft import MODEL_TAGS, SPUConfig, model_card_section, update_model_card
from spu_peft.hub import SECTION_HEADING

INTRO = (
    "This adapter was trained with Selective Parameter Update (Zhang et al., CVPR 2024) using "
    "[spu-peft](https://pypi.org/project/spu-peft/): only a sparse set of entries of each target matrix changed."
)


def _loading(base):
    return [
        "Load it (import `spu_peft` first: it registers SPU with PEFT):",
        "",
        "```python",
        "import spu_peft",
        "from peft import PeftModel",
        "from transformers import AutoModel",
        "",
        f'base = AutoModel.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "<this repo>")',
        "```",
    ]


def test_the_section_of_a_selected_adapter_says_how_it_was_made():
    config = SPUConfig(target_modules=["fc2", "fc1"], density=0.25, budget="per_row", bias="none")
    config.modules_to_save = ["visual_projection"]
    config.selection = {
        "score": "output_norm",
        "fraction": 0.5,
        "num_batches": 3,
        "num_selections": 2,
        "description": "two animal classes",
    }
    lines = [
        SECTION_HEADING,
        "",
        INTRO,
        "",
        "- base model: `org/clip`",
        "- target modules: `['fc1', 'fc2']`; dense modules: `['visual_projection']`; bias: `none`",
        "- density: 0.25 (per_row)",
        "- selection score: `output_norm`, share of batches: 0.5, batches: 3, selections so far: 2",
        "- selection data: two animal classes",
        "",
        *_loading("org/clip"),
    ]
    assert model_card_section(config, "org/clip") == "\n".join(lines) + "\n"


def test_the_section_of_an_unselected_adapter_without_a_base_name_says_so():
    config = SPUConfig(target_modules=r".*\.fc1")
    lines = [
        SECTION_HEADING,
        "",
        INTRO,
        "",
        "- base model: `unknown`",
        r"- target modules: `.*\.fc1`; dense modules: `[]`; bias: `spu_only`",
        "- density: 0.1 (per_tensor)",
        "- selection score: `none (seeded random support)`, share of batches: None, batches: None, "
        "selections so far: 0",
        "",
        *_loading("<base model>"),
    ]
    assert model_card_section(config) == "\n".join(lines) + "\n"
    config.base_model_name_or_path = "org/base"
    assert "- base model: `org/base`\n" in model_card_section(config)
    assert "- base model: `org/other`\n" in model_card_section(config, "org/other")


def test_a_named_adapter_s_section_goes_into_the_one_card_peft_writes_once_with_the_tags(tmp_path):
    """PEFT writes the card in the save folder only, not in a named adapter's subfolder (where it was looked for)."""
    model = get_peft_model(make_tiny_clip(), SPUConfig(modules_to_save=[]))
    model.add_adapter("other", SPUConfig(modules_to_save=[], density=0.3))
    model.save_pretrained(tmp_path, selected_adapters=["default", "other"])
    assert not (tmp_path / "other" / "README.md").exists()
    update_model_card(model, tmp_path)
    card = update_model_card(model, str(tmp_path), adapter_name="other")
    text = (tmp_path / "README.md").read_text()
    assert text.count(SECTION_HEADING) == 1 and "- density: 0.3 (per_tensor)" in text
    section = model_card_section(model.peft_config["other"], None, adapter_name="other", model_class="CLIPModel")
    assert text.endswith("\n\n" + section)
    assert not text.split(SECTION_HEADING)[0].endswith("\n\n\n")
    assert set(MODEL_TAGS) <= set(card.data["tags"]) and card.data["tags"] == sorted(card.data["tags"])
    assert "base_model:adapter:" not in card.data["tags"]


def test_update_model_card_refuses_an_unknown_adapter_or_a_folder_without_a_card(tmp_path):
    model = get_peft_model(make_tiny_clip(), SPUConfig(modules_to_save=[]))
    with pytest.raises(ValueError) as caught:
        update_model_card(model, tmp_path, adapter_name="missing")
    assert str(caught.value) == "'missing' is not an SPU adapter of this model; adapters: ['default']"
    with pytest.raises(ValueError) as caught:
        update_model_card(model, tmp_path)
    assert str(caught.value) == (
        f"No model card at {tmp_path / 'README.md'}; call `model.save_pretrained({str(tmp_path)!r})` first."
    )


def test_the_card_s_named_base_model_is_kept_and_shown_in_the_section(tmp_path):
    model = get_peft_model(make_tiny_clip(), SPUConfig(modules_to_save=[]))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    card.data.base_model = "org/clip"
    card.save(tmp_path / "README.md")
    card = update_model_card(model, tmp_path)
    assert card.data.base_model == "org/clip"
    assert "- base model: `org/clip`\n" in (tmp_path / "README.md").read_text()
    assert 'CLIPModel.from_pretrained("org/clip")' in (tmp_path / "README.md").read_text()


def test_refreshing_the_card_changes_nothing_and_keeps_peft_s_tags(tmp_path):
    model = get_peft_model(make_tiny_clip(), SPUConfig(modules_to_save=[]))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    card.data.tags = [*(card.data.tags or []), "my-tag"]
    card.save(tmp_path / "README.md")
    peft_tags = set(card.data.tags) - {"base_model:adapter:"}
    update_model_card(model, tmp_path)
    first = (tmp_path / "README.md").read_text()
    card = update_model_card(model, tmp_path)
    assert (tmp_path / "README.md").read_text() == first
    assert card.data.tags == sorted(peft_tags | set(MODEL_TAGS)) and "my-tag" in card.data.tags


def _card_code(folder) -> str:
    text = (folder / "README.md").read_text()
    return text.split(SECTION_HEADING)[1].split("```python\n")[1].split("```")[0]


def _bert_seq_cls(path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, num_labels=3)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(path)
    return BertForSequenceClassification.from_pretrained(path), SPUConfig(task_type="SEQ_CLS", init_weights=False)


def _llama_without_task_type(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return LlamaForCausalLM.from_pretrained(path), SPUConfig(init_weights=False)


@pytest.mark.parametrize("build", [_bert_seq_cls, _llama_without_task_type])
@pytest.mark.parametrize("adapter_name", ["default", "other"])
def test_the_card_s_loading_code_loads_the_adapter_it_describes(build, adapter_name, tmp_path):
    """The code in the card runs as written: it builds the base with the class the adapter was trained on (a task
    model's head and key prefix; `AutoModel` gave a bare `BertModel` / `LlamaModel`, whose layers the file does not
    name) and reads a named adapter from its subfolder (it read `default`'s files)."""
    import torch
    from peft import PeftModel

    base, config = build(tmp_path / "base")
    model = get_peft_model(base, config, adapter_name=adapter_name).eval()
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    update_model_card(model, tmp_path / "adapter", adapter_name=adapter_name)
    scope = {}
    exec(_card_code(tmp_path / "adapter").replace("<this repo>", str(tmp_path / "adapter")), scope)
    loaded = scope["model"].eval()
    assert isinstance(loaded, PeftModel) and list(loaded.peft_config) == [adapter_name]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_the_section_names_the_task_s_model_class_the_revision_and_the_subfolder():
    config = SPUConfig(task_type="CAUSAL_LM", revision="v2")
    code = model_card_section(config, "org/llama", adapter_name="math")
    assert "from transformers import AutoModelForCausalLM\n" in code
    assert 'base = AutoModelForCausalLM.from_pretrained("org/llama", revision="v2")\n' in code
    assert 'model = PeftModel.from_pretrained(base, "<this repo>", subfolder="math", adapter_name="math")\n' in code
    code = model_card_section(SPUConfig(), "org/clip", model_class="CLIPModel")
    assert "from transformers import CLIPModel\n" in code and 'base = CLIPModel.from_pretrained("org/clip")\n' in code
    assert 'model = PeftModel.from_pretrained(base, "<this repo>")\n' in code
