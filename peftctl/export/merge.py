"""An adapter folded into its base: `peftctl merge`, and plain base folders (`peftctl export-base`).

The merge runs in fp32 and is measured, not assumed: the merged model's logits are compared with
base + adapter on a probe batch, and the figures are returned with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftctl import methods
from peftctl.arch.tasks import AUTO_CLASSES
from peftctl.core.files import atomic_directory, check_replaceable, writing
from peftctl.export.adapter_base import base_model_spec, base_precision
from peftctl.export.adapter_files import CONFIG_FILE, adapter_head, load_adapter, read_adapter_config
from peftctl.model import quantize
from peftctl.model.loading import base_facts, load_config, load_model, load_skeleton, load_tokenizer, model_files
from peftctl.recipe.schema import ModelSpec

@dataclass
class Merged:
    """A base model with an adapter folded in (fp32), with what writing it needs."""

    model: nn.Module
    tokenizer: Any
    spec: Any  # the base's ModelSpec
    base_dtype: str  # the precision the base is published in
    figures: dict[str, Any]  # the merged model vs base + adapter on a probe batch
    probe: Any  # that batch of token ids [2, 32]
    expected: Any  # base + adapter's logits for it (what a written model is measured against)
    task: str = "causal_lm"  # what the model does (arch/tasks.py): the class that loads it


def merge_adapter(folder: Path, base: str | None = None, trust_remote_code: bool = False,
                  check_output: Callable[[Any], None] = lambda spec: None) -> Merged:
    """Fold the adapter saved in `folder` into its base, in fp32.

    `check_output(spec)` runs once the base is known and before any weights load, so a bad
    output path fails in seconds. The figures are the largest and mean absolute logit difference
    between the merged model and base + adapter on a probe batch, so rounding is shown, not
    discovered. An adapter trained on a quantized base is merged into that base dequantized, and
    compared with the quantized base + adapter (computing in fp32): the model that was trained,
    not the unquantized original, which differs from it by the quantization error.
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    method = methods.by_peft_type(config["peft_type"], str(folder / CONFIG_FILE))
    method.check_mergeable()  # before any weights load
    spec = base_model_spec(folder, base, trust_remote_code)
    check_output(spec)
    head = adapter_head(folder)
    skeleton = load_skeleton(spec, head)
    load_adapter(skeleton, folder, base_facts(spec))  # options, targets and shapes, before the weights load
    base_dtype = base_precision(skeleton.config, spec)
    quantized = spec.quantization != "none"
    if not quantized:
        spec = spec.model_copy(update={"dtype": "float32"})
    tokenizer = load_tokenizer(spec, head.task)
    model = load_model(spec, head)  # a quantized base is quantized from `dtype`, as in training
    if quantized:
        quantize.upcast(model)
    adapter = load_adapter(model, folder, base_facts(spec))
    probe = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))
    # A seq2seq model's decoder reads the probe too; no padding, so a classifier pools the last token.
    inputs = {"input_ids": probe, **({"decoder_input_ids": probe} if head.task == "seq2seq" else {})}
    with torch.no_grad():
        expected = adapter.model(**inputs).logits
        if quantized:
            quantize.dequantize(adapter.model)
        merged = method.merge(adapter).eval()
        if quantized:
            quantize.restore_source_types(merged)
        actual = merged(**inputs).logits
    difference = (actual - expected).abs()
    reference = f"{quantize.describe(spec)} base + adapter" if quantized else "base + adapter"
    figures = {"max_abs_logit_diff": float(difference.max()), "mean_abs_logit_diff": float(difference.mean()),
               "compared_with": reference}
    return Merged(merged, tokenizer, spec, base_dtype, figures, probe, expected, head.task)


def merge_to_folder(folder: Path, out: Path, base: str | None = None, dtype: str | None = None,
                    trust_remote_code: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Fold the adapter into its base and save a plain transformers model folder at `out`.

    The weights are saved in `dtype`, by default the base's own precision (`base_precision`), so
    a merged model is the size its base was. Returns merge_adapter's figures and the dtype.
    """
    folder = Path(folder)

    def check_output(spec: Any) -> None:
        check_replaceable(out, overwrite, "--out", ("config.json",), inputs={
            "the adapter": folder, "the base model": model_files(spec)})

    merged = merge_adapter(folder, base, trust_remote_code, check_output)
    dtype = dtype or merged.base_dtype
    save_model_folder(merged.model.to(getattr(torch, dtype)), merged.tokenizer, out, "the merged model")
    return {**merged.figures, "dtype": dtype, "auto_class": AUTO_CLASSES[merged.task]}


def save_model_folder(model: nn.Module, tokenizer: Any, out: Path, what: str) -> None:
    """A plain transformers model folder (safetensors weights, config, tokenizer), written atomically."""
    with writing(out, what), atomic_directory(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)


def export_base(name: str, out: Path, dtype: str | None = None, trust_remote_code: bool = False,
                overwrite: bool = False) -> dict[str, Any]:
    """Write a base model as a plain transformers folder: what `peft` and other tools load a
    builtin (or a GGUF file) from, since only peftctl knows those names."""
    spec = ModelSpec(name_or_path=name, trust_remote_code=trust_remote_code)
    check_replaceable(out, overwrite, "--out", ("config.json",), inputs={"the model": model_files(spec)})
    dtype = dtype or base_precision(load_config(spec), spec)
    model = load_model(spec.model_copy(update={"dtype": dtype}))
    model.config.name_or_path = str(out)
    save_model_folder(model.to(getattr(torch, dtype)), load_tokenizer(spec), out, "the base model")
    return {"model": name, "folder": str(out), "dtype": dtype}
