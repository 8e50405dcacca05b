"""`peftctl export --format gguf`: llama.cpp LoRA adapters, merged GGUF models, Ollama Modelfiles.

Every file is read back with the `gguf` package's GGUFReader and interpreted as llama.cpp does:
a LoRA tensor pair adds (alpha / r) · B·A to the base tensor of the same name, r from B's shape,
in llama.cpp's layout (Llama's q/k rows permuted; undone here with transformers' own inverse,
the one its GGUF loader uses). That must reproduce peftctl's merged weights within 1e-5 (fp32)
for plain LoRA, rsLoRA at r=16 (which llama.cpp's own converter scales wrongly by √r) and
per-layer scales, on a Llama (GQA), a Qwen2 (biases, no permutation) and GPT-2 (Conv1D, fused
c_attn). A merged GGUF holds peftctl's merge, and transformers loads it back with the same
logits. Adapters have random non-zero B: a zero B would pass any scale. llama.cpp itself runs in
tests/test_gguf_llama_cpp.py (slow).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from peftctl import methods
from peftctl.export.adapter_files import save_adapter
from peftctl.export.gguf import write_lora_gguf, write_model_gguf
from peftctl.export.gguf_tensors import architecture, gguf_name, lora_tensors, name_map
from peftctl.export.ollama import CHATML, LLAMA3, modelfile, translate
from peftctl.methods.ia3 import IA3Config
from peftctl.methods.lora import LoraConfig
from peftctl.methods.prompt import PromptTuningConfig
from peftctl.model.builtins import tiny_gpt2_config
from peftctl.model.loading import load_model, load_tokenizer
from peftctl.recipe.schema import ModelSpec
from cli_checks import assert_refused, invoke, snapshot
from hf_folders import SMOLLM2_TEMPLATE, chatml_bpe_tokenizer, save_tiny_llama
from tiny_models import random_lora_b

ATOL = 1e-5


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def tensors_of(reader: GGUFReader) -> dict[str, np.ndarray]:
    """Every tensor as fp32 in its GGUF layout ([out, in] for matrices)."""
    from gguf import quants

    return {t.name: np.array(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
        tuple(reversed([int(n) for n in t.shape]))) for t in reader.tensors}


def hf_layout(config, gguf_tensor_name: str, values: np.ndarray) -> torch.Tensor:
    """A GGUF tensor back in transformers' row order, by transformers' GGUF loader's own inverse."""
    if architecture(config).rope_rows_permuted and ".attn_q." in gguf_tensor_name:
        values = LlamaTensorProcessor()._reverse_permute_weights(values, config.num_attention_heads)
    elif architecture(config).rope_rows_permuted and ".attn_k." in gguf_tensor_name:
        values = LlamaTensorProcessor()._reverse_permute_weights(values, config.num_attention_heads,
                                                                  config.num_key_value_heads)
    return torch.from_numpy(np.ascontiguousarray(values))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny bases as local folders with a ChatML BPE tokenizer: a Llama (GQA), a Qwen2 and
    peftctl's builtin GPT-2 layout."""
    root = tmp_path_factory.mktemp("bases")
    llama = save_tiny_llama(root / "llama", tokenizer=chatml_bpe_tokenizer())
    vocab = len(chatml_bpe_tokenizer())
    qwen2 = Qwen2ForCausalLM, Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    gpt2 = GPT2LMHeadModel, tiny_gpt2_config()
    gpt2[1].vocab_size = vocab
    for name, (model_class, config) in {"qwen2": qwen2, "gpt2": gpt2}.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model_class(config).save_pretrained(root / name)
        chatml_bpe_tokenizer().save_pretrained(root / name)
    return {"llama": str(llama), "qwen2": str(root / "qwen2"), "gpt2": str(root / "gpt2")}


# label: (base, LoRA options, per-layer scalings to set: module suffix → scaling)
LORA_CASES = {
    "llama-lora": ("llama", {"r": 4, "alpha": 8}, {}),
    "llama-rslora-r16": ("llama", {"r": 16, "alpha": 8, "use_rslora": True}, {}),
    "llama-per-module-alpha": ("llama", {"r": 4, "alpha": 8}, {"k_proj": 0.75, "down_proj": 5.0}),
    "qwen2-lora": ("qwen2", {"r": 4, "alpha": 16}, {}),
    "gpt2-lora": ("gpt2", {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"]}, {}),
}


@pytest.fixture(scope="module", params=LORA_CASES)
def lora_export(request, bases, tmp_path_factory):
    """A LoRA with random B, written by lora_tensors + write_lora_gguf (per-layer scales are
    set on the layers, as a per-module alpha makes them), and its f32 base GGUF."""
    base, options, scalings = LORA_CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    spec = ModelSpec(name_or_path=bases[base], dtype="float32")
    torch.manual_seed(0)
    adapter = methods.apply(load_model(spec), LoraConfig(name="lora", **{"target_modules": "all-linear", **options}))
    random_lora_b(adapter)
    for name in adapter.applied.targets:
        for suffix, scaling in scalings.items():
            if name.endswith(suffix):
                adapter.model.get_submodule(name).scaling = scaling
    tensors, alpha = lora_tensors(adapter, adapter.state_dict())
    write_lora_gguf(tensors, alpha, architecture(adapter.model.config).name, root / "adapter.gguf")
    write_model_gguf(load_model(spec), load_tokenizer(spec), root / "base.gguf", "f32")
    return {"adapter": adapter, "options": options, "file": GGUFReader(root / "adapter.gguf"),
            "base": GGUFReader(root / "base.gguf")}


def test_lora_gguf_names_shapes_types_and_baked_scale(lora_export):
    adapter, reader = lora_export["adapter"], lora_export["file"]
    config, r = adapter.model.config, lora_export["options"]["r"]
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    assert field(reader, "general.architecture") == architecture(config).name
    assert field(reader, "adapter.lora.alpha") == r
    names = name_map(config)
    expected = {gguf_name(names, f"{layer}.weight") + part for layer in adapter.applied.targets
                for part in (".lora_a", ".lora_b")}
    found = {t.name: t for t in reader.tensors}
    assert set(found) == expected and len(expected) == 2 * len(adapter.applied.targets)
    values = tensors_of(reader)
    for layer_name in adapter.applied.targets:
        layer, target = adapter.model.get_submodule(layer_name), gguf_name(names, f"{layer_name}.weight")
        assert found[target + ".lora_a"].tensor_type == GGMLQuantizationType.F32
        assert values[target + ".lora_a"].shape == (r, layer.lora_A.in_features)
        assert values[target + ".lora_b"].shape == (layer.lora_B.out_features, r)
        torch.testing.assert_close(torch.from_numpy(values[target + ".lora_a"]), layer.lora_A.weight, atol=0, rtol=0)
        # llama.cpp's alpha / r is 1: B carries the layer's whole scaling.
        baked = hf_layout(config, target, values[target + ".lora_b"])
        torch.testing.assert_close(baked, layer.lora_B.weight * layer.scaling, atol=1e-7, rtol=1e-6)
    if lora_export["options"].get("use_rslora"):
        layer = adapter.model.get_submodule(adapter.applied.targets[0])
        assert layer.scaling == pytest.approx(8 / math.sqrt(16))  # not lora_alpha / r, which llama.cpp's converter uses


def test_lora_gguf_as_llama_cpp_adds_it_reproduces_peftctls_merge(lora_export):
    """W + (alpha / r) · B·A on the base GGUF's own tensor, permutation undone = peftctl's merged W."""
    adapter, reader, base = lora_export["adapter"], lora_export["file"], tensors_of(lora_export["base"])
    config, names = adapter.model.config, name_map(adapter.model.config)
    values, alpha = tensors_of(reader), field(reader, "adapter.lora.alpha")
    for layer_name in adapter.applied.targets:
        target = gguf_name(names, f"{layer_name}.weight")
        a, b = values[target + ".lora_a"], values[target + ".lora_b"]
        served = base[target] + (alpha / b.shape[1]) * (b @ a)  # llama.cpp: user scale 1.0 × alpha / r
        layer = adapter.model.get_submodule(layer_name)
        merged = layer.merged_base().weight.detach()
        merged = merged.T if layer.fan_in_fan_out else merged
        torch.testing.assert_close(hf_layout(config, target, served), merged, atol=ATOL, rtol=0)
        assert float((b @ a).__abs__().max()) > 1e-3  # a non-trivial update


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    """LoRA and DoRA adapter folders on the tiny Llama, with what peftctl computes for them."""
    root = tmp_path_factory.mktemp("adapters")
    spec = ModelSpec(name_or_path=bases["llama"], dtype="float32")
    found = {}
    for label, cfg in {"lora": LoraConfig(name="lora", r=4, alpha=8),
                       "dora": LoraConfig(name="lora", r=4, alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "down_proj"]),
                       "ia3": IA3Config(name="ia3"),
                       "prompt": PromptTuningConfig(name="prompt_tuning", num_virtual_tokens=2)}.items():
        torch.manual_seed(0)
        adapter = methods.apply(load_model(spec), cfg)
        random_lora_b(adapter)
        if label == "ia3":
            with torch.no_grad():
                for param in adapter.params.values():
                    param.uniform_(0.5, 1.5)
        save_adapter(adapter, root / label, spec.name_or_path)
        found[label] = {"folder": root / label, "adapter": adapter}
    return found


@pytest.mark.parametrize("label", ["lora", "dora", "ia3"])
def test_merged_gguf_holds_peftctls_merge_and_loads_in_transformers(adapters, label, tmp_path):
    case, out = adapters[label], tmp_path / "merged.gguf"
    result = invoke("export", case["folder"], "--format", "gguf", *(["--merged"] if label == "lora" else []),
                    "--quant", "f32", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["kind"] == "merged" and figures["metadata_from"] == "the base's config and tokenizer"
    assert (figures["why_merged"] is None) == (label == "lora")
    assert figures["gguf_max_abs_logit_diff"] < 1e-4
    adapter = case["adapter"]
    probe = torch.randint(0, 263, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = adapter.model(probe).logits
    merged = adapter.method.merge(adapter)
    reader = GGUFReader(out)
    values, names = tensors_of(reader), name_map(merged.config)
    assert set(values) == {gguf_name(names, key) for key in merged.state_dict()}
    for key, tensor in merged.state_dict().items():
        target = gguf_name(names, key)
        torch.testing.assert_close(hf_layout(merged.config, target, values[target]), tensor, atol=ATOL, rtol=0)
    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(adapter.model.config.name_or_path)))
    assert field(reader, "tokenizer.ggml.tokens") == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert field(reader, "tokenizer.ggml.merges") == ["Ġ t", "h e", "Ġt he", "i n"]
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.chat_template") == SMOLLM2_TEMPLATE
    assert field(reader, "llama.attention.head_count_kv") == 2 and field(reader, "llama.block_count") == 2
    # An independent reader: transformers' GGUF loader (its own inverse permutation and hyperparameters).
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(probe).logits, expected, atol=1e-4, rtol=0)


def test_q8_0_merged_gguf_and_its_rounding_report(adapters, tmp_path):
    out = tmp_path / "q8.gguf"
    result = invoke("export", adapters["lora"]["folder"], "--merged", "--quant", "q8_0", "--out", out)
    assert result.exit_code == 0, result.output
    assert "as written" in result.output and "q8_0" in result.output  # the rounding report (table cells wrap)
    for tensor in GGUFReader(out).tensors:  # matrices in q8_0 (rows of 64 or 96: whole 32-value blocks), 1-D in f32
        assert tensor.tensor_type == (GGMLQuantizationType.Q8_0 if len(tensor.shape) == 2 else GGMLQuantizationType.F32)


def test_modelfile_for_an_adapter_on_a_chatml_base(adapters, bases, tmp_path):
    out = tmp_path / "smol-merged.gguf"
    result = invoke("export", adapters["lora"]["folder"], "--merged", "--ollama", "--out", out)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "Modelfile").read_text()
    assert text == (
        "# Written by peftctl export: the ChatML chat template the adapter was trained with.\n"
        "FROM ./smol-merged.gguf\n"
        f'TEMPLATE """{CHATML.go_template}"""\n'
        'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""\n'
        'PARAMETER stop "<|im_end|>"\n')
    assert CHATML.go_template.startswith("{{- range $i, $_ := .Messages }}")
    # The LoRA case names the base GGUF it applies to and the adapter beside the Modelfile.
    translation = translate(load_tokenizer(ModelSpec(name_or_path=bases["llama"])))
    text = modelfile("/models/base.gguf", translation, adapter="./adapter.gguf")
    assert "FROM /models/base.gguf\nADAPTER ./adapter.gguf\n" in text


def test_chat_templates_are_translated_only_when_they_render_alike(bases):
    tokenizer = load_tokenizer(ModelSpec(name_or_path=bases["llama"]))
    tokenizer.chat_template = (  # Llama 3's template
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    translation = translate(tokenizer)
    assert translation.family is LLAMA3 and translation.default_system is None
    assert translation.stops == ["<|eot_id|>", "<|im_end|>"]  # end of turn, then this tokenizer's EOS
    tokenizer.chat_template = SMOLLM2_TEMPLATE.replace("'\n' + message['content']", "': ' + message['content']")
    with pytest.raises(Exception, match="cannot translate the base's chat template"):
        translate(tokenizer)


def test_bad_inputs_exit_2_and_write_nothing(adapters, adapter_files, tmp_path):
    lora, prompt = adapters["lora"]["folder"], adapters["prompt"]["folder"]
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    out = outputs / "a.gguf"
    cases = [
        (("--format", "onnx"), ("--format", "unknown export format 'onnx'", "expected: gguf")),
        (("--merged", "--quant", "q4_k"), ("--quant", "unknown GGUF type 'q4_k'", "q8_0")),
        (("--quant", "q8_0"), ("--quant", "add --merged")),
        (("--ollama",), ("--ollama", "needs the base as a GGUF file", "add --merged")),
        (("--out", lora / "x.gguf"), ("--out", "inside the adapter")),
        (("--out", outputs), ("--out", "is a folder")),
    ]
    for options, phrases in cases:
        assert_refused(invoke("export", lora, "--out", out, *options), *phrases)
    assert_refused(invoke("export", prompt, "--out", out, "--json"),
                   "cannot be exported as GGUF", "llama.cpp applies only LoRA", "adapter_config.json")
    no_merges = save_tiny_llama(tmp_path / "bytes-llama")  # peftctl's byte-level tokenizer: BPE without merges
    assert_refused(invoke("export", lora, "--base", no_merges, "--merged", "--out", out),
                   "BPE tokenizer without merges", "convert_hf_to_gguf.py")
    assert_refused(invoke("export", tmp_path / "missing", "--out", out), "no adapter_config.json")
    assert list(outputs.iterdir()) == [] and snapshot(lora) == adapter_files


@pytest.fixture
def adapter_files(adapters):
    return snapshot(adapters["lora"]["folder"])


def test_an_unsupported_architecture_is_refused_before_anything_loads(tmp_path, monkeypatch):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(vocab_size=257, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                             word_embed_proj_dim=32)).save_pretrained(tmp_path / "opt")
    chatml_bpe_tokenizer().save_pretrained(tmp_path / "opt")
    spec = ModelSpec(name_or_path=str(tmp_path / "opt"), dtype="float32")
    adapter = methods.apply(load_model(spec), LoraConfig(name="lora", r=2, target_modules=["q_proj"]))
    save_adapter(adapter, tmp_path / "adapter", spec.name_or_path)
    monkeypatch.setattr("peftctl.model.loading.load_model", lambda spec: pytest.fail("weights loaded"))
    assert_refused(invoke("export", tmp_path / "adapter"), "does not support the base's architecture 'opt'",
                   "llama, mistral, qwen2, gpt2", str(tmp_path / "opt"))


def test_existing_out_needs_overwrite_and_is_replaced_whole(adapters, tmp_path):
    out = tmp_path / "lora.gguf"
    out.write_bytes(b"not yet")
    assert_refused(invoke("export", adapters["lora"]["folder"], "--out", out), "--out", "already exists", "--overwrite")
    assert out.read_bytes() == b"not yet"
    result = invoke("export", adapters["lora"]["folder"], "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert field(GGUFReader(out), "general.type") == "adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.gguf"]  # no temporary file left
    message = " ".join(result.output.split())
    assert "LoRA adapter for llama.cpp's llama: 14 layers" in message and f"--lora {out}" in message


def test_a_qlora_adapter_merges_into_its_dequantized_4bit_base(bases, tmp_path):
    """The merged GGUF is the model that was trained (4-bit base + adapter), with merge's report."""
    import yaml

    spec = ModelSpec(name_or_path=bases["llama"], dtype="float32", quantization="4bit")
    torch.manual_seed(0)
    adapter = methods.apply(load_model(spec), LoraConfig(name="lora", r=4, alpha=8))
    random_lora_b(adapter)
    save_adapter(adapter, tmp_path / "adapter", spec.name_or_path, yaml.safe_dump({"model": spec.model_dump(mode="json")}))
    result = invoke("export", tmp_path / "adapter", "--merged", "--quant", "bf16", "--out", tmp_path / "m.gguf", "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["compared_with"] == "4bit nf4, double quant base + adapter"
    assert figures["max_abs_logit_diff"] < 1e-4 < figures["gguf_max_abs_logit_diff"] < 0.1  # bf16's rounding, shown
    for tensor in GGUFReader(tmp_path / "m.gguf").tensors:
        assert tensor.tensor_type == (GGMLQuantizationType.BF16 if len(tensor.shape) == 2 else GGMLQuantizationType.F32)
