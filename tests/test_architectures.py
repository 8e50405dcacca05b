"""The method × architecture contract: every method on tiny random models of 15 architectures.

Each model is built from its architecture's own transformers config class (2 layers, hidden 64,
vocabulary 128; no weights downloaded). For every pair, either the method is refused before any
weights are trained, with its reason (asserted), or: it trains (5 AdamW steps lower the loss),
its effect is real (logits move by more than 1e-4 on unpadded positions), the exported adapter
reloads in peftctl with equal logits, peft loads the export with every key matched and equal
logits (fp32, atol 1e-5) where peft has the method (where peft cannot load a pair, PEFT_REFUSES, its refusal is asserted) and peft's own adapter (non-trivial init) loads here, a merge equals base + adapter (atol 1e-4) where the method merges,
and for the prompt methods `generate` gives the tokens of a cache-free greedy loop.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers as T

from peftctl import methods
from peftctl.core.errors import UserError
from peftctl.export.adapter_files import load_adapter, save_adapter
from peftctl.methods import METHODS
from peftctl.train.loss import CausalLMLoss
from method_checks import EXAMPLES, PEFT_REFUSES_CONV1D, examples_where
from test_prompt import assert_generate_is_greedy
from tiny_models import batch_logits, real_difference, token_batch, train_steps

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GQA = dict(intermediate_size=96, num_key_value_heads=2)
ARCHITECTURES = {
    "llama": (T.LlamaConfig, GQA),
    "qwen2": (T.Qwen2Config, GQA),
    "qwen3": (T.Qwen3Config, {**GQA, "head_dim": 16}),
    "mistral": (T.MistralConfig, GQA),
    "gemma2": (T.Gemma2Config, {**GQA, "head_dim": 16}),
    "gemma3": (T.Gemma3TextConfig, {**GQA, "head_dim": 16}),
    "phi3": (T.Phi3Config, GQA),  # fused qkv_proj and gate_up_proj
    "olmo2": (T.Olmo2Config, GQA),
    "granite": (T.GraniteConfig, GQA),
    "gpt_neox": (T.GPTNeoXConfig, {"intermediate_size": 96}),  # fused query_key_value, biases
    "opt": (T.OPTConfig, {"ffn_dim": 96, "word_embed_proj_dim": 64}),  # learned positions, biases
    "falcon": (T.FalconConfig, {}),  # multi-query attention: one key/value head
    "gpt2": (T.GPT2Config, {}),  # Conv1D layers
    "mixtral": (T.MixtralConfig, {**GQA, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": (T.Qwen3MoeConfig, {**GQA, "moe_intermediate_size": 48, "num_experts": 4, "num_experts_per_tok": 2,
                                     "head_dim": 16, "decoder_sparse_step": 1}),
}
GPT2_NAMES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
              "max_position_embeddings": "n_positions"}
METHOD_OPTIONS = EXAMPLES  # every registered method's examples: a new method is covered by registering it
NO_BIASES = {"llama", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "olmo2", "granite", "mixtral", "qwen3_moe"}
BOTTLENECK_REASON = "cannot find the end of the"
# Pairs that cannot work, and the words of the refusal that says why.
REFUSED = {
    **{(arch, "bitfit"): "has no bias terms" for arch in NO_BIASES},
    **{(arch, "prefix_tuning"): "cannot feed this model's KV cache" for arch in ("mistral", "gemma2", "gemma3")},
    **{(arch, method): BOTTLENECK_REASON for arch in ("mixtral", "qwen3_moe")
       for method in ("houlsby", "pfeiffer", "compacter", "compacter-rank2", "compacter_plus_plus")},
    **{(arch, "ia3"): "has no default layers" for arch in ("mixtral", "qwen3_moe")},
}
# Pairs peftctl trains but the installed peft cannot load, and the words of peft's refusal
# (method_checks.PEFT_REFUSES_CONV1D): asserted, so a peft that learns them shows up here.
PEFT_REFUSES = {("gpt2", label): "Conv1D" for label, options in METHOD_OPTIONS.items()
                if options["name"] in PEFT_REFUSES_CONV1D}
MERGEABLE = set(examples_where(lambda method: method.merge_refusal is None))


def build(arch: str) -> torch.nn.Module:
    config_class, extra = ARCHITECTURES[arch]
    options = {**COMMON, **extra}
    if arch == "gpt2":
        options = {GPT2_NAMES.get(key, key): value for key, value in options.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T.AutoModelForCausalLM.from_config(config_class(**options)).eval()


def apply(arch: str, method: str, **options) -> methods.Adapter:
    config = METHODS[METHOD_OPTIONS[method]["name"]].Config(**{**METHOD_OPTIONS[method], **options})
    torch.manual_seed(0)
    return methods.apply(build(arch), config)


@pytest.mark.parametrize("method", METHOD_OPTIONS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_method_on_architecture(arch, method, tmp_path):
    if (arch, method) in REFUSED:
        with pytest.raises(UserError, match=REFUSED[arch, method]):
            apply(arch, method)
        if method != "bitfit":
            return
        adapter = apply(arch, method, create_missing_biases=True)  # BitFit's answer to bias-free layouts
    else:
        adapter = apply(arch, method)
    batch = token_batch(VOCAB)
    base = batch_logits(build(arch), batch)
    loss = CausalLMLoss(adapter.model)

    def mean_loss() -> float:
        with torch.no_grad():
            return float(torch.div(*loss(**batch)))

    before = mean_loss()
    train_steps(adapter, batch, steps=5)
    assert mean_loss() < before
    ours = batch_logits(adapter.model, batch)
    assert real_difference(ours, base, batch["attention_mask"]) > 1e-4

    save_adapter(adapter, tmp_path, base_model=arch)
    reloaded = load_adapter(build(arch), tmp_path).model
    torch.testing.assert_close(batch_logits(reloaded, batch), ours, atol=1e-5, rtol=0)
    if (arch, method) in PEFT_REFUSES:
        with pytest.raises(TypeError, match=PEFT_REFUSES[arch, method]):
            peft.PeftModel.from_pretrained(build(arch), tmp_path)
    elif adapter.method.in_peft:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            theirs = batch_logits(peft.PeftModel.from_pretrained(build(arch), tmp_path).eval(), batch)
        assert not [str(w.message) for w in caught if "keys" in str(w.message)]  # every key matched
        torch.testing.assert_close(real_positions(theirs, ours), ours, atol=1e-5, rtol=0)
        assert_peft_adapter_loads(arch, tmp_path, batch)
    if method in MERGEABLE:
        merged = adapter.method.merge(load_adapter(build(arch), tmp_path)).eval()
        torch.testing.assert_close(batch_logits(merged, batch), ours, atol=1e-4, rtol=0)
    assert_generate_is_greedy(reloaded)  # transformers' cached generation = a cache-free greedy loop


def real_positions(theirs: torch.Tensor, ours: torch.Tensor) -> torch.Tensor:
    """peft keeps the prompt methods' virtual positions in its logits; ours are the real tokens'."""
    return theirs[:, theirs.shape[1] - ours.shape[1]:]


def assert_peft_adapter_loads(arch: str, exported, batch) -> None:
    """peft's own adapter, made from the exported config with a non-trivial init (random B for
    LoRA, random IA3 vectors, random VeRA λ, OFT entries and LyCORIS factors), loads in peftctl and computes what peft computes."""
    config = peft.PeftConfig.from_pretrained(exported)
    config.base_model_name_or_path = None  # the base is the model given here (peft warns otherwise)
    for option in ("init_lora_weights", "init_ia3_weights", "init_weights"):
        if hasattr(config, option):
            setattr(config, option, False)
    torch.manual_seed(1)
    foreign = peft.get_peft_model(build(arch), config).eval()
    foreign.save_pretrained(exported / "peft")
    expected = batch_logits(foreign, batch)
    loaded = batch_logits(load_adapter(build(arch), exported / "peft").model, batch)
    torch.testing.assert_close(loaded, real_positions(expected, loaded), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_all_linear_adapts_every_linear_layer_of_the_blocks_and_nothing_else(arch):
    """LoRA's `all-linear`: each nn.Linear (or GPT-2 Conv1D) inside the decoder blocks, counted
    against the model's own modules; the output head is never adapted."""
    from transformers.pytorch_utils import Conv1D

    from peftctl.model.loading import transformer_blocks

    model = build(arch)
    expected = sum(4 * (layer.weight.shape[0] + layer.weight.shape[1])
                   for block in transformer_blocks(model) for layer in block.modules()
                   if isinstance(layer, (torch.nn.Linear, Conv1D)))
    adapter = apply(arch, "lora")
    assert adapter.trainable_count() == expected
    assert not any("lm_head" in name for name in adapter.params)


def test_validate_lists_the_targets_and_refuses_a_pair_that_cannot_work(tmp_path):
    """`peftctl validate` applies the method to a weightless copy: it counts what will train, and
    a method that cannot work on the layout is refused there, with exit 2 and the reason."""
    import json

    from cli_checks import assert_refused, invoke

    for arch in ("opt", "mixtral"):
        build(arch).config.save_pretrained(tmp_path / arch)  # a config is all validate reads
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")

    def recipe(method: dict, arch: str = "opt") -> Path:
        path = tmp_path / f"{method['name']}.yaml"
        path.write_text(json.dumps({"model": {"name_or_path": str(tmp_path / arch)}, "method": method,
                                    "data": {"train": str(data)}}))
        return path

    result = invoke("validate", recipe({"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}))
    assert result.exit_code == 0, result.output
    assert ("targets: method lora: 2,048 trainable parameters in 8 tensors: "
            "model.decoder.layers.N.self_attn.v_proj.lora_A.weight ×2") in result.stderr
    assert "generic rules" not in result.stderr
    # A layout the suite does not test is said to get the generic rules.
    T.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4).save_pretrained(tmp_path / "bloom")
    result = invoke("validate", recipe({"name": "lora", "r": 4}, "bloom"))
    assert result.exit_code == 0, result.output
    assert "model_type 'bloom' is not among the architectures peftctl's contract suite tests: generic rules" \
        in " ".join(result.stderr.split())
    assert_refused(invoke("validate", recipe({"name": "houlsby", "bottleneck_size": 8}, "mixtral")),
                   "method 'houlsby' does not support MixtralForCausalLM", BOTTLENECK_REASON)


@pytest.mark.parametrize("arch", [arch for arch in ARCHITECTURES if arch not in ("mixtral", "qwen3_moe")])
def test_ia3_targets_the_architecture_tables_layers_in_every_block(arch):
    """IA3 with no target_modules: exactly the table's layers, once in each of the 2 decoder layers."""
    from peftctl.arch.architectures import IA3_DEFAULTS

    model_type = build(arch).config.model_type
    targets, _ = IA3_DEFAULTS[model_type]
    wrapped = [name.rsplit(".", 1)[0] for name in apply(arch, "ia3").params]
    assert len(wrapped) == 2 * len(targets)
    assert all(sum(name.endswith("." + target) for name in wrapped) == 2 for target in targets), wrapped


@pytest.mark.parametrize("arch", [arch for arch in ARCHITECTURES if arch not in NO_BIASES])
def test_bitfit_trains_exactly_the_models_biases(arch):
    biases = {name for name, _ in build(arch).named_parameters() if name.endswith(".bias")}
    assert set(apply(arch, "bitfit").params) == biases


@pytest.mark.parametrize(("method", "per_layer"), [("houlsby", 2), ("pfeiffer", 1), ("compacter", 2),
                                                   ("compacter_plus_plus", 1)])
@pytest.mark.parametrize("arch", [arch for arch in ARCHITECTURES if (arch, "houlsby") not in REFUSED])
def test_bottlenecks_sit_after_each_blocks_output_projection(arch, method, per_layer):
    """Houlsby and Compacter: after attention and feed-forward in each of the 2 decoder layers;
    Pfeiffer and Compacter++: after the feed-forward block only."""
    adapter = apply(arch, method)
    sites = {name.rsplit(".adapter_down", 1)[0] for name in adapter.params if ".adapter_down." in name}
    assert len(sites) == 2 * per_layer, sites


# --- LoRA on mixture-of-experts expert weights (peft's target_parameters) -----------------------

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.mark.parametrize("modules", [[], "all-linear"], ids=["experts-only", "experts-and-all-linear"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_lora_on_expert_weights_matches_peft(arch, modules, tmp_path):
    """One rank-r update per expert on the fused 3-D weights: trains, exports in peft's layout
    (peft loads it with equal logits; peft's own adapter loads here), merges."""
    options = {"target_modules": modules, "target_parameters": EXPERTS}
    adapter = apply(arch, "lora", **options)
    batch = token_batch(VOCAB)
    base = batch_logits(build(arch), batch)
    train_steps(adapter, batch, steps=5)
    ours = batch_logits(adapter.model, batch)
    assert real_difference(ours, base, batch["attention_mask"]) > 1e-3
    assert not any(".gate." in name or "router" in name for name in adapter.params)  # the router stays frozen

    save_adapter(adapter, tmp_path / "ours", base_model=arch)
    theirs = peft.PeftModel.from_pretrained(build(arch), tmp_path / "ours").eval()
    torch.testing.assert_close(batch_logits(theirs, batch), ours, atol=1e-5, rtol=0)
    reloaded = load_adapter(build(arch), tmp_path / "ours")
    merged = reloaded.method.merge(reloaded).eval()
    torch.testing.assert_close(batch_logits(merged, batch), ours, atol=1e-4, rtol=0)

    if modules == []:  # the same config in peft: the same count, and peft's adapter loads here
        torch.manual_seed(1)
        reference = peft.get_peft_model(build(arch), peft.LoraConfig(
            r=4, lora_alpha=16, target_modules=[], target_parameters=EXPERTS, init_lora_weights=False))
        assert adapter.trainable_count() == sum(p.numel() for p in reference.parameters() if p.requires_grad)
        reference.save_pretrained(tmp_path / "peft")
        expected = batch_logits(reference.eval(), batch)
        torch.testing.assert_close(batch_logits(load_adapter(build(arch), tmp_path / "peft").model, batch),
                                   expected, atol=1e-5, rtol=0)


def test_expert_weight_mistakes_are_named():
    with pytest.raises(UserError, match="(?s)target parameter .experts.gate_proj. matches no parameter.*"
                                        "experts.down_proj, experts.gate_up_proj"):
        apply("mixtral", "lora", target_parameters=["experts.gate_proj"])
    with pytest.raises(UserError, match="this one has none"):
        apply("llama", "lora", target_parameters=["experts.gate_up_proj"])
    with pytest.raises(UserError, match="DoRA on expert parameters"):
        apply("mixtral", "dora", target_parameters=EXPERTS)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_qlora_on_architecture(arch, tmp_path):
    """QLoRA: LoRA on a 4-bit (NF4, bitsandbytes) base: trains, reloads, and peft loads the export
    onto the same quantized base with equal logits."""
    from peftctl.model import quantize
    from peftctl.recipe.schema import ModelSpec

    def quantized() -> torch.nn.Module:
        model = build(arch)
        quantize.quantize(model, ModelSpec(name_or_path=arch, dtype="float32", quantization="4bit"))
        return model

    torch.manual_seed(0)
    adapter = methods.apply(quantized(), METHODS["lora"].Config(name="lora", r=4))
    batch = token_batch(VOCAB)
    base = batch_logits(quantized(), batch)
    train_steps(adapter, batch, steps=5)
    ours = batch_logits(adapter.model, batch)
    assert real_difference(ours, base, batch["attention_mask"]) > 1e-4
    save_adapter(adapter, tmp_path, base_model=arch)
    torch.testing.assert_close(batch_logits(load_adapter(quantized(), tmp_path).model, batch), ours, atol=1e-5, rtol=0)
    theirs = batch_logits(peft.PeftModel.from_pretrained(quantized(), tmp_path).eval(), batch)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


# --- the wider sweep (slow): more steps, a bf16 base, a 4-bit base ------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("base", ["bfloat16", "4bit"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_trains_on_a_bf16_and_a_4bit_base(arch, base, tmp_path):
    """LoRA on all linear layers, 30 steps, on the base as users load it: 16-bit or quantized
    (bitsandbytes 4-bit NF4 on CPU). The loss falls and the export reloads with equal logits."""
    from peftctl.model import quantize
    from peftctl.recipe.schema import ModelSpec

    def base_model() -> torch.nn.Module:
        model = build(arch)
        if base == "4bit":
            quantize.quantize(model, ModelSpec(name_or_path=arch, dtype="float32", quantization="4bit"))
        return model.to(torch.bfloat16) if base == "bfloat16" else model

    torch.manual_seed(0)
    adapter = methods.apply(base_model(), METHODS["lora"].Config(name="lora", r=4))
    batch = token_batch(VOCAB)
    loss = CausalLMLoss(adapter.model)
    with torch.no_grad():
        before = float(torch.div(*loss(**batch)))
    train_steps(adapter, batch, steps=30, lr=5e-3)
    with torch.no_grad():
        after = float(torch.div(*loss(**batch)))
    assert after < before - 0.1, (before, after)
    save_adapter(adapter, tmp_path, base_model=arch)
    ours = batch_logits(adapter.model, batch)
    torch.testing.assert_close(batch_logits(load_adapter(base_model(), tmp_path).model, batch), ours,
                               atol=1e-5, rtol=0)  # the same computation on the same weights


def test_a_named_router_trains_too_and_matches_peft(tmp_path):
    """The router is frozen unless named: a 2-D `gate.weight` in target_parameters is one 'expert'."""
    adapter = apply("mixtral", "lora", target_modules=[], target_parameters=["gate.weight", *EXPERTS])
    assert any(".mlp.gate.lora_A" in name for name in adapter.params)
    batch = token_batch(VOCAB)
    train_steps(adapter, batch, steps=5)
    ours = batch_logits(adapter.model, batch)
    save_adapter(adapter, tmp_path, base_model="mixtral")
    theirs = batch_logits(peft.PeftModel.from_pretrained(build("mixtral"), tmp_path).eval(), batch)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
