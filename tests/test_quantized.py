"""SPU on bitsandbytes-quantized bases (8-bit `Linear8bitLt`, 4-bit `Linear4bit` NF4 and FP4), as QLoRA users run it.

References are float layers holding the dequantized weight, computed here from the codes and scales (not through
`spu_peft`). Everything runs in training mode: in eval mode with gradients off, bitsandbytes repacks 4-bit weights
for its CPU kernel with bfloat16 block scales, which changes the base's own output.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import layers_of
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from spu_peft import SPUConfig, SPULayer, select_parameters
from spu_peft.bnb import Linear4bit, Linear8bitLt, bnb_layer_class

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'spu-peft[test]')")

KINDS = ["int8", "nf4", "fp4"]
IN, OUT = 128, 64  # 4-bit quantization works in blocks of 64 entries


def quantized_linear(linear: nn.Linear, kind: str, device: torch.device) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight quantized (quantization happens on the move to `device`)."""
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, compute_dtype=torch.float32, quant_type=kind)
    layer.load_state_dict(linear.state_dict())
    return layer.to(device)


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The float weight a bitsandbytes layer stands for: int8 codes times their row's scale / 127, or the 4-bit
    codes looked up in the code table and scaled by their block's absmax."""
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear8bitLt):
        scales = layer.state.SCB if layer.state.SCB is not None else weight.SCB
        return weight.data.float() * scales.float().unsqueeze(1) / 127
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


def kernel_error(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """How far the quantized layer's own output is from the float product with its dequantized weight."""
    return (layer(x) - F.linear(x, dequantized(layer), layer.bias)).abs().max()


class Head(nn.Module):
    """One quantizable linear layer and a float one; `labels` weight the output linearly, so the loss's gradient at
    `fc1`'s output is `labels @ fc2.weight` whatever the quantization did (gradient scores must then agree exactly)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, OUT)
        self.fc2 = nn.Linear(OUT, 8)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.fc2(self.fc1(x))
        return {"logits": logits, "loss": None if labels is None else (logits * labels).sum()}


def head(kind: str, device: torch.device, quantize: bool = True, seed: int = 0) -> Head:
    torch.manual_seed(seed)
    model = Head()
    model.fc1 = quantized_linear(model.fc1, kind, device) if quantize else model.fc1
    return model.to(device)


def float_twin(model: nn.Module) -> nn.Module:
    """`model` with every bitsandbytes layer replaced by an `nn.Linear` holding its dequantized weight (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.to(module.weight.device)
            with torch.no_grad():
                linear.weight.copy_(dequantized(module))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_the_quantized_output_plus_the_deltas(kind, device):
    model = get_peft_model(head(kind, device), SPUConfig(target_modules=["fc1"], init_weights=False, density=0.1))
    layer = model.base_model.model.fc1
    assert type(layer) is (Linear8bitLt if kind == "int8" else Linear4bit)
    x = torch.randn(5, IN, device=device)
    delta = layer.get_delta_weight("default")
    delta_out = x @ delta.T + layer.spu_bias["default"]
    base = layer.base_layer
    with torch.no_grad():
        out, base_out, own_error = layer(x), base(x), kernel_error(base, x)
        error = (out - F.linear(x, dequantized(base) + delta, base.bias + layer.spu_bias["default"])).abs().max()
        with model.disable_adapter():
            assert torch.equal(model(x=x)["logits"], model.base_model.model.fc2(base_out))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, base_out + delta_out, rtol=0, atol=1e-5)
    # against the dequantized float layer, SPU adds no error beyond what the quantized kernel makes on its own
    # (LLM.int8() may round the activations to int8 as well; the 4-bit kernel dequantizes and multiplies in float32)
    assert error <= own_error + 1e-5
    if kind != "int8":
        assert own_error < 1e-4
    assert delta_out.abs().max() > 100 * (own_error + 1e-5)  # the deltas' share is far above the tolerance


@pytest.mark.parametrize("kind", KINDS)
def test_training_moves_only_the_adapter_values(kind, device):
    model = get_peft_model(head(kind, device), SPUConfig(target_modules=["fc1"]))
    layer = model.base_model.model.fc1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scales_before = dequantized(layer.base_layer)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        x, labels = torch.randn(4, IN, device=device), torch.randn(4, 8, device=device)
        model(x=x, labels=labels)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model.fc1.spu_values.default", "base_model.model.fc1.spu_bias.default"}
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"base_model.model.fc1.spu_values.default", "base_model.model.fc1.spu_bias.default"}
    assert torch.equal(dequantized(layer.base_layer), scales_before)


def _supports(model) -> dict[str, torch.Tensor]:
    return {name: layer.spu_indices["default"].long().cpu() for name, layer in layers_of(model).items()}


@pytest.mark.parametrize("score", ["task_loss", "magnitude"])
@pytest.mark.parametrize("kind", KINDS)
def test_selection_picks_what_the_dequantized_float_layer_picks(kind, score, device):
    config = SPUConfig(target_modules=["fc1"], density=0.05)
    model = get_peft_model(head(kind, device), config)
    reference = get_peft_model(float_twin(head(kind, device)), SPUConfig(target_modules=["fc1"], density=0.05))
    assert type(reference.base_model.model.fc1.base_layer) is nn.Linear
    generator = torch.Generator().manual_seed(1)
    batches = [
        {"x": torch.randn(4, IN, generator=generator), "labels": torch.randn(4, 8, generator=generator)}
        for _ in range(3)
    ]
    data = None if score == "magnitude" else batches
    select_parameters(model, data, score=score, fraction=1.0)
    select_parameters(reference, data, score=score, fraction=1.0)
    (chosen,), (expected,) = _supports(model).values(), _supports(reference).values()
    assert torch.equal(chosen, expected)
    assert chosen.numel() == round(0.05 * IN * OUT)


# ---- a tiny LLaMA loaded through transformers' BitsAndBytesConfig, as QLoRA users load theirs -----------------------

LLAMA = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
CONFIGS = {
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "nf4": lambda: BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    ),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(path)
    return path


def load_llama(path, kind: str, device: torch.device) -> nn.Module:
    """The quantized model, kept off bitsandbytes' CPU inference format (see `no_cpu_repacking`)."""
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=CONFIGS[kind](), device_map={"": device})
    return no_cpu_repacking(model)


def no_cpu_repacking(model: nn.Module) -> nn.Module:
    """On a CPU with AVX512-BF16, a 4-bit layer's first forward in eval mode on an input that needs no gradient
    repacks its weight for bitsandbytes' CPU inference kernel, for good: block scales become bfloat16 (the output
    moves by about 3% on the tiny LLaMA) and the layer passes no gradient to its input after that. Selection keeps
    it off while it scores (`test_selection_leaves_a_4bit_base_as_loaded_on_a_cpu`); turning it off for good keeps
    these tests' own forward passes on the path GPUs take, where the float twin is the same model."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def llama_batches(device: torch.device, n: int = 2) -> list[dict]:
    generator = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, 64, (2, 8), generator=generator).to(device) for _ in range(n)]
    return [{"input_ids": i, "labels": i} for i in ids]


@pytest.mark.parametrize("kind", CONFIGS)
def test_llama_selects_trains_saves_and_reloads(llama_dir, kind, device, tmp_path):
    model = get_peft_model(load_llama(llama_dir, kind, device), SPUConfig())
    model.train()  # from_pretrained gives an eval-mode base, which selection leaves as it is
    layers = layers_of(model)
    assert len(layers) == 4 and all(
        type(x) is (Linear8bitLt if kind == "int8" else Linear4bit) for x in layers.values()
    )
    batches = llama_batches(device)
    select_parameters(model, batches, score="task_loss", fraction=1.0)
    reference = get_peft_model(float_twin(load_llama(llama_dir, kind, device)), SPUConfig())
    select_parameters(reference, batches, score="task_loss", fraction=1.0)
    chosen, expected = _supports(model), _supports(reference)
    overlap = {
        name: len(set(chosen[name].tolist()) & set(expected[name].tolist())) / len(chosen[name]) for name in layers
    }
    # The 4-bit kernel is the dequantized float product, so the float twin selects the same entries. LLM.int8()
    # in eval mode (as selection runs) also rounds the activations to int8, which moves the logits by about 1%
    # (0.0054 of 0.53 here): a few entries at the threshold change places (measured overlap 0.990 to 0.996).
    assert min(overlap.values()) >= (1.0 if kind == "nf4" else 0.98), overlap
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(layer.spu_values["default"].detach().any() for layer in layers.values())
    with torch.no_grad():
        logits = model(input_ids=batches[0]["input_ids"]).logits
    model.save_pretrained(tmp_path)

    reloaded = PeftModel.from_pretrained(load_llama(llama_dir, kind, device), tmp_path)
    reloaded.train()  # the same mode as the model that made `logits` (see the module docstring)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batches[0]["input_ids"]).logits, logits)


def test_the_readme_qlora_recipe_selects_and_trains(llama_dir):
    """README's recipe: a 4-bit base with bfloat16 compute, `prepare_model_for_kbit_training` (float32 norms,
    gradient checkpointing), SPU's default LLaMA targets, selection and a training step."""
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    base = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=quantization)
    model = get_peft_model(prepare_model_for_kbit_training(no_cpu_repacking(base)), SPUConfig(density=0.01))
    batches = llama_batches(torch.device("cpu"))
    select_parameters(model, batches, score="task_loss", fraction=1.0)
    assert model.peft_config["default"].selection["score"] == "task_loss"
    values = {name: layer.spu_values["default"] for name, layer in layers_of(model).items()}
    assert all(v.dtype == torch.float32 and not v.any() for v in values.values())  # PEFT keeps adapters in float32
    optimizer = torch.optim.Adam(values.values(), lr=1e-2)
    model.train()
    model(**batches[0]).loss.backward()
    optimizer.step()
    assert all(v.detach().count_nonzero() == v.numel() for v in values.values())


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on a CPU with AVX512-BF16"
)
def test_selection_leaves_a_4bit_base_as_loaded_on_a_cpu(llama_dir):
    """Selection scores in eval mode, where bitsandbytes would repack every 4-bit layer whose input needs no gradient
    (those before the first target) for its CPU inference kernel, for good: the base's output moved (by 0.002 of 0.5
    on the tiny LLaMA, so the trained adapter no longer matched a freshly loaded base) and those layers passed no
    gradient to their input in training. A 4-bit base without `prepare_model_for_kbit_training`, as SFTTrainer
    takes one, with SPUSelectionCallback."""
    base = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=CONFIGS["nf4"]())
    model = get_peft_model(base, SPUConfig(task_type="CAUSAL_LM")).train()
    batch = llama_batches(torch.device("cpu"))[0]
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"]).logits
    select_parameters(model, [batch], score="task_loss", fraction=1.0)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantized)
    assert all(m.support_avx512bf16_for_cpu for m in quantized)  # put back: the user's own evaluation is theirs
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, before)  # the new values are zero


def _rounding_bound(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Per entry, the most that rounding `weight` to `layer`'s format may change it. int8: half of the row's step
    (absmax / 127), plus the float16 rounding bitsandbytes applies before quantizing. 4-bit: half the widest gap of
    the code table times the block's absmax, with 5% slack as bitsandbytes stores the absmax itself in 8 bits."""
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return weight.abs().amax(1, keepdim=True) / 127 / 2 + weight.abs() * 2**-11 + 1e-6
    state = layer.weight.quant_state
    gap = state.code.float().sort().values.diff().max()
    blocks = weight.reshape(-1, state.blocksize)
    return (blocks.abs().amax(1, keepdim=True) * gap / 2 * 1.05).expand_as(blocks).reshape(weight.shape)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_rounds_to_the_grid_warns_and_unmerge_restores_exactly(kind, device):
    model = get_peft_model(head(kind, device), SPUConfig(target_modules=["fc1"], init_weights=False))
    layer = model.base_model.model.fc1
    x = torch.randn(6, IN, device=device)
    with torch.no_grad():
        layer.spu_values["default"].normal_(0, 0.05)  # deltas of the size trained ones reach
        unmerged = model(x=x)["logits"]
        hidden = layer(x)
        target = dequantized(layer.base_layer) + layer.get_delta_weight("default")
        codes = layer.base_layer.weight.data.clone()
        before_kernel = kernel_error(layer.base_layer, x)
        with pytest.warns(UserWarning, match=r"into a (8|4)-bit weight rounds `W \+ delta` to the quantization grid"):
            model.merge_adapter()
        merged_weight = dequantized(layer.base_layer)
        bound = _rounding_bound(layer.base_layer, target)
        assert ((merged_weight - target).abs() <= bound).all()
        # outputs change by at most the rounding, |x (W' - W - delta)^T| <= |x| bound^T, plus what the quantized
        # kernel adds on its own before and after (LLM.int8() on a GPU rounds the activations too)
        merged_hidden = layer(x)
        slack = before_kernel + kernel_error(layer.base_layer, x) + 1e-5
        assert ((merged_hidden - hidden).abs() <= x.abs() @ bound.T + slack).all()
        assert not torch.equal(merged_hidden, hidden)
        merged = model(x=x)["logits"]
        model.unmerge_adapter()
        assert torch.equal(layer.base_layer.weight.data, codes)
        assert torch.equal(model(x=x)["logits"], unmerged)

        model.merge_adapter()
        merged_model = model.merge_and_unload()
        assert type(merged_model.fc1) is type(layer.base_layer)
        assert torch.equal(merged_model(x=x)["logits"], merged)


class ScaledLinear(nn.Linear):
    """A linear layer with its own forward, which SPU's `F.linear` on the composed weight would bypass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def int_weight_linear() -> nn.Linear:
    layer = nn.Linear(IN, OUT)
    layer.weight = nn.Parameter(torch.zeros(OUT, IN, dtype=torch.int8), requires_grad=False)
    return layer


@pytest.mark.parametrize(
    ("target", "module", "named"),
    [
        ("emb", nn.Embedding(10, IN), "torch.nn.modules.sparse.Embedding"),
        ("conv", nn.Conv1d(IN, OUT, 1), "torch.nn.modules.conv.Conv1d"),
        ("own", ScaledLinear(IN, OUT), "ScaledLinear \\(a linear layer with its own `forward`"),
        ("int", int_weight_linear(), "torch.nn.modules.linear.Linear with a torch.int8 weight"),
        ("fp16", bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=True), "has_fp16_weights=True"),
    ],
)
def test_a_layer_spu_cannot_compute_is_refused_by_its_type(target, module, named):
    model = nn.Module()
    setattr(model, target, module)
    with pytest.raises(ValueError, match=named):
        get_peft_model(model, SPUConfig(target_modules=[target]))


def test_a_4bit_weight_repacked_for_the_cpu_kernel_is_read_and_merged_right():
    """bitsandbytes repacks a 4-bit weight in place for its CPU inference kernel (see `no_cpu_repacking`); SPU
    reads the repacked weight back, and merges and unmerges it."""
    model = get_peft_model(head("nf4", torch.device("cpu")), SPUConfig(target_modules=["fc1"], init_weights=False))
    layer = model.base_model.model.fc1
    before = layer.dense_base_weight()
    model.eval()
    with torch.no_grad():
        x = torch.randn(3, IN)
        model(x=x)
        if not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False):
            pytest.skip("bitsandbytes did not repack (this machine has no CPU with AVX512-BF16)")
        # the repacking rounds the block scales to bfloat16: each entry moves by at most 2^-8 of itself
        torch.testing.assert_close(layer.dense_base_weight(), before, rtol=2**-8, atol=0)
        unmerged = model(x=x)["logits"]
        with pytest.warns(UserWarning, match="rounds `W \\+ delta`"):
            model.merge_adapter()
        assert ((model(x=x)["logits"] - unmerged).abs() < 0.1).all()
        model.unmerge_adapter()
        assert torch.equal(model(x=x)["logits"], unmerged)
        with pytest.warns(UserWarning, match="rounds `W \\+ delta`"):
            model.merge_adapter()  # the repacked weight is read in the dtype it was quantized from, float32
        assert layer.base_layer.weight.quant_state.dtype == torch.float32


def test_an_8bit_layer_with_float16_master_weights_is_refused_saying_how_to_load_it():
    with pytest.raises(ValueError) as error:
        bnb_layer_class(bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=True))
    assert str(error.value) == (
        "SPU supports bitsandbytes `Linear8bitLt` layers with int8 weights only, not `has_fp16_weights=True` "
        "(float16 master weights); load the model with BitsAndBytesConfig(load_in_8bit=True) and its default "
        "`llm_int8_has_fp16_weight=False`."
    )


def fresh_layer(kind: str, weight: torch.Tensor, bias: torch.Tensor, settings: dict) -> nn.Module:
    """A bitsandbytes layer quantizing the float `weight` itself (on its move to the CPU)."""
    out_features, in_features = weight.shape
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer_settings = {k: v for k, v in settings.items() if k != "blocksize"}  # the weight's alone
        layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32, **layer_settings)
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, module=layer, **settings)
    layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")


FORMATS = {
    "int8": ("int8", torch.float32, {}),
    "nf4-bf16-blocks128-float32-storage": (
        "nf4",
        torch.bfloat16,
        dict(quant_type="nf4", blocksize=128, compress_statistics=False, quant_storage=torch.float32),
    ),
    "fp4-nested": ("fp4", torch.float32, dict(quant_type="fp4", blocksize=64, compress_statistics=True)),
}


@pytest.mark.parametrize("name", FORMATS)
def test_a_merge_quantizes_w_plus_delta_as_bitsandbytes_quantizes_a_float_layer(name):
    """The merged base layer is the layer bitsandbytes makes from the float `W + delta` in the dtype and format the
    base was quantized in: the same codes, scales, settings and outputs; `unmerge` puts the original back."""
    kind, dtype, settings = FORMATS[name]
    torch.manual_seed(0)
    float_weight, bias = torch.randn(OUT, IN).to(dtype), torch.randn(OUT)
    model = Head()
    model.fc1 = fresh_layer(kind, float_weight, bias, settings)
    model = get_peft_model(model, SPUConfig(target_modules=["fc1"], init_weights=False))
    layer = model.base_model.model.fc1
    base, original = layer.base_layer, layer.base_layer.weight
    x = torch.randn(5, IN)
    with torch.no_grad():
        layer.spu_values["default"].normal_(0, 0.05)
        target = layer.dense_base_weight() + layer.get_delta_weight("default")
        with pytest.warns(UserWarning, match="rounds `W \\+ delta`"):
            model.merge_adapter()
        reference = fresh_layer(kind, target.to(dtype), base.bias, settings)
        merged = base.weight
        assert type(merged) is type(reference.weight) and not merged.requires_grad
        assert torch.equal(merged.data, reference.weight.data)
        if kind == "int8":
            assert merged.has_fp16_weights is False and torch.equal(merged.CB, merged.data)
            assert torch.equal(merged.SCB, reference.weight.SCB)
            assert base.state.CB is None and base.state.SCB is None  # the next forward takes the new ones
        else:
            for field in ("blocksize", "compress_statistics", "quant_type", "quant_storage"):
                made = getattr(reference.weight, field)
                assert getattr(merged, field) == settings.get(field, made) == made, field
            assert merged.module is base and base.quant_state is merged.quant_state
            assert merged.quant_state.dtype == dtype
            state, expected = merged.quant_state.as_dict(packed=True), reference.weight.quant_state.as_dict(packed=True)
            assert state.keys() == expected.keys()
            assert all(
                torch.equal(v, expected[k]) if torch.is_tensor(v) else v == expected[k] for k, v in state.items()
            )
        assert torch.equal(base(x), reference(x))
        model.unmerge_adapter()
        assert base.weight is original
        if kind != "int8":
            assert base.quant_state is original.quant_state


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_quantized_new_task_head_warns_how_to_train_it_instead_of_failing_in_torch(kind, tmp_path):
    """SPU trains BART's `classification_head` densely (PEFT's SEQ_CLS model adds only `classifier`/`score`); when
    bitsandbytes quantized it, PEFT's dense copy failed to require gradients deep in torch. It warns with the fix,
    which then trains the head."""
    from transformers import BartConfig, BartForSequenceClassification

    config = BartConfig(vocab_size=50, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_labels=3,
                        max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    BartForSequenceClassification(config).save_pretrained(tmp_path)

    def load(quantization_config):
        model = BartForSequenceClassification.from_pretrained(tmp_path, quantization_config=quantization_config)
        return no_cpu_repacking(prepare_model_for_kbit_training(model))

    with pytest.warns(UserWarning) as caught:
        model = get_peft_model(load(CONFIGS[kind]()), SPUConfig(task_type="SEQ_CLS"))
    assert [str(w.message) for w in caught if "task head" in str(w.message)] == [
        "`classification_head`, the model's new task head, is quantized, so it cannot train: it stays frozen at its "
        "random initialization and is not saved with the adapter. Load the model with "
        "BitsAndBytesConfig(..., llm_int8_skip_modules=['classification_head']) to train it."
    ]
    assert "classification_head" not in model.peft_config["default"].modules_to_save
    skipping = CONFIGS[kind]()
    skipping.llm_int8_skip_modules = ["classification_head"]
    model = get_peft_model(load(skipping), SPUConfig(task_type="SEQ_CLS"))
    assert "classification_head" in model.peft_config["default"].modules_to_save
    assert any(p.requires_grad for n, p in model.named_parameters() if ".classification_head.modules_to_save." in n)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_modules_to_save_naming_a_quantized_module_is_refused_with_the_fix(kind, llama_dir):
    """PEFT's dense copy of a quantized layer failed to require gradients, deep in torch."""
    model = load_llama(llama_dir, kind, torch.device("cpu"))
    with pytest.raises(ValueError) as caught:
        get_peft_model(model, SPUConfig(task_type="CAUSAL_LM", modules_to_save=["o_proj"]))
    dtype = "int8" if kind == "int8" else "uint8"
    assert str(caught.value) == (
        f"`modules_to_save` names 'o_proj', but `model.layers.0.self_attn.o_proj` is quantized ({dtype} weights), so "
        "it cannot train densely. Load the model with BitsAndBytesConfig(..., llm_int8_skip_modules=['o_proj']) to "
        "train it, or leave it out of `modules_to_save`."
    )
    assert not any(isinstance(m, SPULayer) for m in model.modules())  # refused before the model was touched
