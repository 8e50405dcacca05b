"""QLoRA: adapters on a 4-bit (or 8-bit) bitsandbytes base, gradient checkpointing, merge and plan.

bitsandbytes runs its 4-bit and 8-bit layers on CPUs (slowly), so everything here runs without a
GPU on tiny models; tests/test_gpu_proof.py covers the GPU proof's CPU behaviour.
Tolerances: our layers and peft's compute the same fp32 operations on the same quantized bytes,
so logits agree to 1e-5; a merge into the dequantized base differs from the quantized base +
adapter by fp32 rounding only (< 1e-4 on these models' logits).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from typer.testing import CliRunner

from method_checks import EXAMPLES, ROOT, assert_smoke_run, examples_where, on_llama
from peftctl import methods
from peftctl.cli.commands import app
from peftctl.core.errors import UserError
from peftctl.export.adapter_files import RECIPE_FILE, load_adapter, save_adapter
from peftctl.export.merge import merge_to_folder
from peftctl.model import quantize
from peftctl.model.loading import enable_gradient_checkpointing, load_model
from peftctl.recipe.schema import ModelSpec
from peftctl.train.loss import CausalLMLoss
from tiny_models import batch_logits, real_difference, tiny_gpt2, tiny_llama, token_batch, train_steps

QLORA_GPT2 = "recipes/qlora-gpt2.yaml"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """The tiny Llama as a model folder, so it loads like any local model (and in transformers)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    return folder


def spec(path, quantization: str = "4bit", **options) -> ModelSpec:
    return ModelSpec(name_or_path=str(path), dtype="float32", quantization=quantization, **options)


def method_cfg(name: str, **options):
    return methods.get(name).Config(name=name, **options)


# --- loading: the bytes transformers would make, counted exactly ----------------------------------


@pytest.mark.parametrize("model, options", [
    ("llama", {"quantization": "4bit"}),  # nf4 + double quantization: the defaults
    ("llama", {"quantization": "4bit", "quant_type": "fp4", "double_quant": False}),
    ("llama", {"quantization": "8bit"}),
    ("gpt2", {"quantization": "4bit"}),  # Conv1D layers, transposed before quantization
])
def test_quantized_layers_equal_transformers_bitsandbytes_loading(model, options, llama_dir, tmp_path):
    """Our layers hold the same bytes as from_pretrained(quantization_config=BitsAndBytesConfig(...)),
    and plan's per-layer byte count is what bitsandbytes stores."""
    folder = llama_dir
    if model == "gpt2":
        folder = tmp_path / "gpt2"
        tiny_gpt2().save_pretrained(folder)
    model_spec = spec(folder, **options)
    ours = dict(load_model(model_spec).named_modules())
    four_bit = model_spec.quantization == "4bit"
    config = BitsAndBytesConfig(load_in_4bit=four_bit, load_in_8bit=not four_bit,
                                bnb_4bit_quant_type=model_spec.quant_type,
                                bnb_4bit_use_double_quant=model_spec.double_quant)
    theirs = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32,
                                                  device_map="cpu")
    compared = 0
    for name, layer in theirs.named_modules():
        kind = quantize.quantized_kind(layer)
        if kind is None:
            continue
        mine = ours[name]
        assert quantize.quantized_kind(mine) == kind == model_spec.quantization, name
        assert torch.equal(mine.weight.data, layer.weight.data), name
        if kind == "4bit":
            state, reference = mine.weight.quant_state, layer.weight.quant_state
            assert torch.equal(state.absmax, reference.absmax) and state.nested == model_spec.double_quant
            stored = mine.weight.data.nbytes + state.absmax.nbytes
            if state.nested:
                assert torch.equal(state.state2.absmax, reference.state2.absmax)
                stored += state.state2.absmax.nbytes + state.offset.nbytes
        else:
            assert torch.equal(mine.weight.SCB, layer.weight.SCB)
            stored = mine.weight.data.nbytes + mine.weight.SCB.nbytes
        out_features, in_features = quantize.dequantized_weight(mine).shape
        assert quantize.stored_bytes(out_features, in_features, model_spec) == stored, name
        compared += 1
    assert compared == len(quantize.linear_layers(theirs)) == (14 if model == "llama" else 8)
    # The output head stays as it was; norms are upcast to fp32.
    assert quantize.quantized_kind(ours["lm_head"]) is None


@pytest.mark.parametrize("options", [{"quantization": "4bit"}, {"quantization": "4bit", "double_quant": False},
                                     {"quantization": "8bit"}])
@pytest.mark.parametrize("shape", [(333, 100), (1000, 300)])  # blocks that do not divide evenly
def test_stored_bytes_formula_matches_bitsandbytes_for_any_shape(options, shape):
    model_spec = ModelSpec(name_or_path="x", dtype="float32", **options)
    out_features, in_features = shape
    layer = quantize.quantized_layer(nn.Linear(in_features, out_features), model_spec)
    weight = layer.weight
    if model_spec.quantization == "4bit":
        state = weight.quant_state
        stored = weight.data.nbytes + state.absmax.nbytes
        stored += state.state2.absmax.nbytes + state.offset.nbytes if state.nested else 0
    else:
        stored = weight.data.nbytes + weight.SCB.nbytes
    assert quantize.stored_bytes(out_features, in_features, model_spec) == stored


# --- training on a quantized base ------------------------------------------------------------------


def test_gradients_flow_through_4bit_layers_like_through_their_dequantized_weights(llama_dir):
    """Loss and every LoRA gradient on the 4-bit base equal those on a plain fp32 copy of its
    dequantized weights, after a no-grad forward (validation) has run first: bitsandbytes repacks
    4-bit weights for CPU inference there unless told not to, which stops gradients."""
    batch = token_batch(128)
    cfg = method_cfg("lora", r=4, target_modules="all-linear")
    results = []
    for dequantized in (False, True):
        model = load_model(spec(llama_dir))
        if dequantized:
            quantize.dequantize(model)
        torch.manual_seed(0)
        adapter = methods.apply(model, cfg)
        with torch.no_grad():
            for name, param in adapter.params.items():
                if "lora_B" in name:  # B != 0: gradients reach A, and the base output changes
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        loss_model = CausalLMLoss(model).eval()
        with torch.no_grad():
            loss_model(**batch)
        loss_model.train()
        loss_sum, n = loss_model(**batch)
        (loss_sum / n).backward()
        results.append((float(loss_sum.detach() / n), {k: p.grad for k, p in adapter.params.items()}))
    (loss_q, grads_q), (loss_d, grads_d) = results
    assert loss_q == pytest.approx(loss_d, abs=1e-5)
    for name, grad in grads_q.items():
        assert grad is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(grad, grads_d[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("quantization, use_dora", [("4bit", False), ("4bit", True), ("8bit", False)])
def test_adapter_trained_on_quantized_base_loads_in_peft_with_the_same_logits(quantization, use_dora, llama_dir,
                                                                              tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import bnb as peft_bnb

    model_spec = spec(llama_dir, quantization)
    batch = token_batch(128)
    adapter = methods.apply(load_model(model_spec), method_cfg("lora", r=4, target_modules="all-linear",
                                                                 use_dora=use_dora))
    train_steps(adapter, batch, steps=3)
    assert all(p.abs().max() > 0 for n, p in adapter.params.items() if "lora_B" in n)
    save_adapter(adapter, tmp_path / "adapter", str(llama_dir))

    theirs = PeftModel.from_pretrained(load_model(model_spec), tmp_path / "adapter").eval()
    layer_type = peft_bnb.Linear4bit if quantization == "4bit" else peft_bnb.Linear8bitLt
    assert isinstance(theirs.base_model.model.model.layers[0].self_attn.q_proj, layer_type)  # peft's bnb path
    ours = batch_logits(adapter.model, batch)
    torch.testing.assert_close(ours, batch_logits(theirs, batch), atol=1e-5, rtol=0)
    assert real_difference(ours, batch_logits(load_model(model_spec), batch), batch["attention_mask"]) > 1e-2  # the adapter does something
    # peftctl's own loader gives the same model back.
    torch.testing.assert_close(batch_logits(load_adapter(load_model(model_spec), tmp_path / "adapter").model, batch), ours,
                               atol=1e-6, rtol=0)


# Examples that cannot work on a quantized base, and the words of their refusal: PiSSA and OLoRA
# subtract the principal part from the weight, which a 4-bit weight cannot hold exactly.
REFUSED_ON_4BIT = {"pissa": "this base is quantized", "olora": "this base is quantized"}


@pytest.mark.parametrize("label", [label for label in EXAMPLES if label != "lora"])
def test_every_other_method_trains_on_a_4bit_base(label, llama_dir):
    model = load_model(spec(llama_dir))
    if label in REFUSED_ON_4BIT:
        with pytest.raises(UserError, match=REFUSED_ON_4BIT[label]):
            methods.apply(model, on_llama(label))
        return
    adapter = methods.apply(model, on_llama(label))
    before = {k: p.detach().clone() for k, p in adapter.params.items()}
    batch = token_batch(128)
    loss_model = CausalLMLoss(model)
    first, _ = loss_model(**batch)
    train_steps(adapter, batch, steps=3)
    for key, param in adapter.params.items():
        assert not torch.equal(param, before[key]), f"{key} was not trained"
    last, _ = loss_model(**batch)
    assert float(last.detach()) < float(first.detach())
    assert all(quantize.quantized_kind(m) in (None, "4bit") for m in model.modules())


# --- gradient checkpointing ------------------------------------------------------------------------

# Prefix tuning feeds a prefilled KV cache, which checkpointed layers drop: it is refused instead.
CHECKPOINTED_METHODS = examples_where(lambda method: not method.feeds_kv_cache)


def loss_and_grads(model: nn.Module, cfg, checkpointing: bool, batch) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    adapter = methods.apply(model, cfg)
    with torch.no_grad():  # away from the init (LoRA's B = 0 would leave A without a gradient)
        generator = torch.Generator().manual_seed(1)
        for param in adapter.params.values():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    if checkpointing:
        enable_gradient_checkpointing(model)
    loss_sum, n = CausalLMLoss(model).train()(**batch)
    (loss_sum / n).backward()
    return float(loss_sum.detach() / n), {k: p.grad for k, p in adapter.params.items()}


@pytest.mark.parametrize("label", CHECKPOINTED_METHODS + ["lora-4bit"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(label, llama_dir):
    batch = token_batch(128)
    quantized = label.endswith("-4bit")
    cfg = on_llama(label.removesuffix("-4bit"))
    runs = [loss_and_grads(load_model(spec(llama_dir)) if quantized else tiny_llama(), cfg, checkpointing, batch)
            for checkpointing in (False, True)]
    (loss, grads), (loss_ckpt, grads_ckpt) = runs
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    for key, grad in grads.items():
        assert grads_ckpt[key] is not None and grads_ckpt[key].abs().max() > 0, f"{key} got no gradient"
        torch.testing.assert_close(grads_ckpt[key], grad, atol=1e-6, rtol=1e-5)


def test_checkpointed_layers_really_recompute():
    """The flag reaches the decoder layers (so the equality above is not two identical plain runs)."""
    model = tiny_llama()
    methods.apply(model, method_cfg("lora", r=4))
    enable_gradient_checkpointing(model)
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    loss_sum, _ = CausalLMLoss(model).train()(**token_batch(128))
    loss_sum.backward()
    assert len(calls) == 2  # the forward, and its recomputation in the backward pass


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])  # the cache is dropped per layer / per model
def test_prefix_tuning_with_gradient_checkpointing_is_refused(make_model):
    """transformers drops the prefix's KV cache under checkpointing: training would silently leave it out."""
    model = make_model()
    methods.apply(model, method_cfg("prefix_tuning", num_virtual_tokens=4))
    enable_gradient_checkpointing(model)
    with pytest.raises(UserError, match="gradient_checkpointing") as err:
        CausalLMLoss(model).train()(**token_batch(model.config.vocab_size))
    assert err.value.where == "train.gradient_checkpointing" and "false" in err.value.fix


def test_qlora_recipe_loss_falls_and_matches_without_checkpointing(tmp_path, monkeypatch):
    """The smoke recipe through the pipeline (4-bit GPT-2, checkpointing on) and again with it off."""
    import peftctl.model.loading

    checkpointed = []
    enable = peftctl.model.loading.enable_gradient_checkpointing
    monkeypatch.setattr(peftctl.model.loading, "enable_gradient_checkpointing",
                        lambda model: (checkpointed.append(model), enable(model)))
    overrides = ["train.max_steps=10"]
    with_ckpt = assert_smoke_run(QLORA_GPT2, tmp_path / "on", overrides)
    assert len(checkpointed) == 1 and checkpointed[0].transformer.gradient_checkpointing
    without = assert_smoke_run(QLORA_GPT2, tmp_path / "off", overrides + ["train.gradient_checkpointing=false"])
    assert len(checkpointed) == 1
    losses = [[row["loss"] for row in run.result.history if "loss" in row] for run in (with_ckpt, without)]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert with_ckpt.result.val_loss_after < with_ckpt.result.val_loss_before
    assert with_ckpt.trainable_params == 2 * 8 * (64 + 192)  # r=8 on c_attn [64 → 192], 2 layers
    # 4-bit weights count as the weights they hold, not as their packed bytes.
    assert with_ckpt.total_params == sum(p.numel() for p in tiny_gpt2().parameters()) + with_ckpt.trainable_params


# --- merge -------------------------------------------------------------------------------------


def trained_gpt2_adapter(folder: Path, quantization: str, name: str, **options) -> Path:
    """An adapter trained a few steps on the 4-bit / 8-bit builtin GPT-2, saved with its recipe."""
    model_spec = ModelSpec(name_or_path="builtin:tiny-gpt2", dtype="float32", quantization=quantization)
    adapter = methods.apply(load_model(model_spec), method_cfg(name, **options))
    train_steps(adapter, token_batch(257), steps=3)
    recipe = yaml.safe_dump({"model": model_spec.model_dump(mode="json")})
    return save_adapter(adapter, folder, model_spec.name_or_path, recipe)


def test_merge_of_a_4bit_adapter_prints_its_difference_to_the_4bit_base(tmp_path):
    adapter_dir = trained_gpt2_adapter(tmp_path / "adapter", "4bit", "lora", r=4, target_modules="all-linear")
    out = tmp_path / "merged"
    table = run_cli("merge", str(adapter_dir), "--out", str(out))
    assert table.exit_code == 0, table.output
    assert "vs 4bit nf4, double quant base" in table.output and "max |Δlogit|" in table.output
    figures = json.loads(run_cli("merge", str(adapter_dir), "--out", str(out), "--overwrite", "--json").output)
    assert figures["compared_with"] == "4bit nf4, double quant base + adapter"
    assert 0 < figures["mean_abs_logit_diff"] <= figures["max_abs_logit_diff"] < 1e-4
    assert f"{figures['max_abs_logit_diff']:.2e}" in table.output  # the same figure was printed

    # The saved model is plain GPT-2 (Conv1D again) and equals the 4-bit base + adapter.
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert not any(quantize.quantized_kind(m) for m in merged.modules())
    model_spec = ModelSpec(name_or_path="builtin:tiny-gpt2", dtype="float32", quantization="4bit")
    trained = load_adapter(quantize.upcast(load_model(model_spec)), adapter_dir).model
    batch = token_batch(257, length=32)
    expected = batch_logits(trained, batch)
    torch.testing.assert_close(batch_logits(merged, batch), expected, atol=1e-4, rtol=0)
    # ... and not the unquantized base + adapter, which differs by the quantization error.
    unquantized = load_adapter(load_model(model_spec.model_copy(update={"quantization": "none"})), adapter_dir).model
    assert real_difference(batch_logits(unquantized, batch), expected, batch["attention_mask"]) > 1e-3


@pytest.mark.parametrize("quantization, label", [("4bit", label) for label in
                                                examples_where(lambda method: method.merge_refusal is None)
                                                if label not in REFUSED_ON_4BIT]
                         + [("8bit", "lora")])
def test_merge_figures_are_small_for_every_mergeable_method(quantization, label, tmp_path):
    adapter_dir = trained_gpt2_adapter(tmp_path / "adapter", quantization, **EXAMPLES[label])
    figures = merge_to_folder(adapter_dir, tmp_path / "merged")
    assert figures["compared_with"].startswith(quantization)
    # 8-bit: the int8 matmul also quantizes activations, which the merged fp32 model does not.
    limit = 1e-4 if quantization == "4bit" else 5e-2
    assert 0 <= figures["mean_abs_logit_diff"] <= figures["max_abs_logit_diff"] < limit, figures


# --- bad input ---------------------------------------------------------------------------------


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args), terminal_width=200)


def test_4bit_options_with_8bit_quantization_are_refused():
    result = run_cli("validate", str(ROOT / QLORA_GPT2), "--set", "model.quantization=8bit",
                     "--set", "model.quant_type=fp4")
    assert result.exit_code == 2
    assert "model.quant_type" in result.output and "4-bit quantization only" in result.output


def test_quantization_without_a_usable_bitsandbytes_exits_2_before_loading(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    result = run_cli("train", str(ROOT / QLORA_GPT2), "--output", str(tmp_path / "run"))
    assert result.exit_code == 2, result.output
    assert "model.quantization" in result.output and "pip install -U bitsandbytes" in result.output
    assert "quantization: none" in result.output and "Traceback" not in result.output


def test_a_bitsandbytes_build_that_cannot_run_the_layers_exits_2(monkeypatch, tmp_path):
    def broken(layer, model_spec):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(quantize, "quantized_layer", broken)
    result = run_cli("train", str(ROOT / QLORA_GPT2), "--output", str(tmp_path / "run"))
    assert result.exit_code == 2, result.output
    assert "cannot run 4bit layers on this machine: no kernel for this device" in result.output


def test_a_model_without_linear_layers_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(UserError, match="no linear layers to quantize") as err:
        quantize.quantize(model, ModelSpec(name_or_path="x", quantization="4bit"))
    assert err.value.where == "model.quantization" and "none" in err.value.fix


@pytest.mark.slow
def test_qlora_smollm2_recipe_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "peftctl", "train", "recipes/qlora-smollm2.yaml", "--set",
                           "train.max_steps=2", "--output", str(tmp_path / "run"), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["steps"] == 2 and figures["tokens_per_s"] > 0
    assert (tmp_path / "run" / "adapter" / RECIPE_FILE).is_file()
