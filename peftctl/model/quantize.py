"""Quantized base models with bitsandbytes: 4-bit (QLoRA, Dettmers et al., 2023) and 8-bit (LLM.int8).

`model.quantization: 4bit | 8bit` stores every frozen linear layer an adapter may target (all but
the output head, as transformers' `BitsAndBytesConfig` does) quantized, as bitsandbytes'
`Linear4bit` / `Linear8bitLt`. Both subclass `nn.Linear`, so methods wrap them like any linear
layer; `dense_weight` dequantizes them where a method needs the weight itself (DoRA's norm).

How: the model loads as without quantization (plain layers in `model.dtype`), then each layer is
replaced by a quantized copy made with the same bitsandbytes calls and block size that
transformers uses (a test checks the bytes are identical), so an adapter trained here loads onto
a base that transformers quantized. Quantizing loaded layers, rather than handing transformers a
BitsAndBytesConfig, is one path for every source: a GGUF model's config already carries a
quantization_config (gguf) that makes transformers refuse a second one, and the builtin models
have no folder. The cost is one copy of the model at `dtype` in host memory before quantization.

Training, as in QLoRA: the quantized weights are frozen, norms hold fp32 weights and compute in
fp32 (handing on their input's dtype), adapters train in fp32 (every method's layers already do),
the quantized layers compute in `compute_dtype`, embeddings and output head stay in `dtype`
(peft's prepare_model_for_kbit_training upcasts those too, at 4 B per weight; QLoRA's reference
script casts them back to 16-bit, as here, which also keeps the trainer's autocast on for GPUs).

Storage, per quantized [out, in] weight (what `peftctl plan` counts; bias and norms are not quantized):
  * 4-bit: 2 weights per byte, plus one absmax scale per block of 64 weights: fp32 (4 B / 64
    weights), or with double quantization 8-bit (1 B / 64) plus one fp32 scale per 256 blocks
    and one fp32 offset: ≈ 0.5625 or ≈ 0.5159 B per weight;
  * 8-bit: 1 B per weight plus one fp32 scale per output row.
The 4-bit code tables (64 B, and 1 KB with double quantization, per layer) are left out.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftctl.arch.layers import dense_weight, dequantized_weight, linear_layers, linear_shape, quantized_kind, resolve_dtype
from peftctl.core.errors import UserError, one_line

if TYPE_CHECKING:
    from peftctl.recipe.schema import ModelSpec

BLOCKSIZE = 64  # 4-bit: weights per absmax scale (bitsandbytes' and transformers' default)
NESTED_BLOCKSIZE = 256  # double quantization: 8-bit scales per fp32 second-level scale
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold on activations (transformers' default)
FIX = "set model.quantization: none to train on the unquantized model"


def import_bitsandbytes():
    """bitsandbytes, or a UserError saying how to get a build that runs here."""
    # bitsandbytes logs at import (a missing optional CPU kernel) and on every 8-bit CPU matmul;
    # peftctl's own tables are the output, and quantization problems surface as UserErrors.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except Exception as err:  # ImportError, or a native library that fails to load
        raise UserError(
            f"quantization needs bitsandbytes, which cannot be imported here: {one_line(err)}",
            where="model.quantization",
            fix=f"pip install -U bitsandbytes (recent releases also run on CPUs), or {FIX}",
        ) from None
    return bitsandbytes


def check_quantization(spec: ModelSpec) -> None:
    """Quantize and run one small layer, so a build that cannot do it fails before the weights load."""
    bnb = import_bitsandbytes()
    try:
        probe = quantized_layer(nn.Linear(BLOCKSIZE, BLOCKSIZE, dtype=resolve_dtype(spec.dtype)), spec)
        with torch.no_grad():
            probe(torch.ones(2, BLOCKSIZE, dtype=resolve_dtype(spec.dtype)))
    except Exception as err:
        raise UserError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run {spec.quantization} layers on this "
            f"machine: {one_line(err)}",
            where="model.quantization",
            fix=f"install a bitsandbytes build for this machine (pip install -U bitsandbytes), or {FIX}",
        ) from None


def quantize(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Replace the model's linear layers (not the output head) by quantized copies, in place."""
    layers = linear_layers(model)
    if not layers:
        raise UserError(
            f"{type(model).__name__} has no linear layers to quantize (the output head is never quantized)",
            where="model.quantization",
            expected="a transformer with nn.Linear or Conv1D projection layers",
            fix=FIX,
        )
    for name, layer in layers.items():
        model.set_submodule(name, quantized_layer(layer, spec))
    with torch.no_grad():
        for norm in norm_layers(model).values():
            norm.float()
            norm.register_forward_hook(_output_in_input_dtype)
    # How transformers marks a bitsandbytes model; peft reads it to pick its quantized LoRA layers.
    model.is_loaded_in_4bit = spec.quantization == "4bit"
    model.is_loaded_in_8bit = spec.quantization == "8bit"
    return model


def quantized_layer(layer: nn.Module, spec: ModelSpec) -> nn.Module:
    """A bitsandbytes layer holding `layer`'s weight quantized (its bias as it is), frozen."""
    bnb = import_bitsandbytes()
    in_features, out_features, _ = linear_shape(layer)
    weight = dense_weight(layer).detach().contiguous()  # [out, in] in the model's dtype
    has_bias = layer.bias is not None
    if spec.quantization == "4bit":
        compute = spec.dtype if spec.compute_dtype == "auto" else spec.compute_dtype
        quantized = bnb.nn.Linear4bit(in_features, out_features, bias=has_bias, compute_dtype=resolve_dtype(compute),
                                      compress_statistics=spec.double_quant, quant_type=spec.quant_type,
                                      quant_storage=torch.uint8, device="meta")
        quantized.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, blocksize=BLOCKSIZE, compress_statistics=spec.double_quant,
            quant_type=spec.quant_type, quant_storage=torch.uint8, module=quantized,
        ).to(weight.device)
        # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks the weight on the first no-grad
        # forward (validation) into a layout its backward and dequantize_4bit do not handle:
        # gradients stop flowing through the layer and dequantized weights come out wrong.
        quantized.support_avx512bf16_for_cpu = False
    else:
        quantized = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias, has_fp16_weights=False,
                                        threshold=INT8_THRESHOLD, device="meta")
        quantized.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(weight.device)
        quantized.register_forward_pre_hook(_int8_state_follows_weight)
    if has_bias:
        quantized.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    quantized.source_cls = type(layer)  # transformers' name for it; `dequantize` restores Conv1D
    quantized.train(layer.training)
    return quantized


def _output_in_input_dtype(norm: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """An fp32 norm hands on its input's dtype, as under autocast where the next matmul would cast
    it anyway; without autocast (CPUs) a 16-bit output head would refuse an fp32 input."""
    if args and torch.is_tensor(args[0]) and torch.is_tensor(output) and output.dtype != args[0].dtype:
        return output.to(args[0].dtype)
    return None


def _int8_state_follows_weight(layer: nn.Module, args: tuple) -> None:
    """Keep an 8-bit layer's int8 matrix and row scales on its weight's device.

    The model is quantized where it loads (the CPU) and the trainer moves it to the GPU with
    model.to(), which moves the weight's data but not the copies bitsandbytes keeps beside it
    (weight.CB / weight.SCB, then the matmul state's): re-point them before each forward.
    (4-bit layers move whole: Params4bit.to moves its quantization state.)
    """
    weight = layer.weight
    for holder in (weight, layer.state):
        if holder.CB is not None and holder.CB.device != weight.device:
            holder.CB = weight.data
        if holder.SCB is not None and holder.SCB.device != weight.device:
            holder.SCB = holder.SCB.to(weight.device)


@torch.no_grad()
def dequantize(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every quantized layer by a plain nn.Linear in `dtype`, in place.

    nn.Linear, whatever the layer was before quantization: the methods' wrappers recorded the
    quantized layer's [out, in] layout and merge into that. `restore_source_types` then turns
    the layers that were GPT-2 Conv1Ds back into Conv1Ds, so the saved model loads as its type.
    """
    for name, layer in list(model.named_modules()):
        weight = dequantized_weight(layer)
        if weight is None:
            continue
        out_features, in_features = weight.shape
        plain = nn.Linear(in_features, out_features, bias=layer.bias is not None, device=weight.device, dtype=dtype)
        plain.weight.copy_(weight)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
        plain.requires_grad_(False)
        plain.source_cls = getattr(layer, "source_cls", nn.Linear)
        model.set_submodule(name, plain.train(layer.training))
    model.is_loaded_in_4bit = model.is_loaded_in_8bit = False
    return model


@torch.no_grad()
def restore_source_types(model: nn.Module) -> nn.Module:
    """Turn the dequantized layers that were Conv1Ds before quantization back into Conv1Ds."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, nn.Linear) and getattr(layer, "source_cls", None) is Conv1D:
            conv = Conv1D(layer.out_features, layer.in_features).to(device=layer.weight.device, dtype=layer.weight.dtype)
            conv.weight.copy_(layer.weight.T)
            if layer.bias is not None:
                conv.bias.copy_(layer.bias)
            else:  # a Conv1D always has one; BitFit may have taken it and not given it back
                conv.bias.zero_()
            model.set_submodule(name, conv.requires_grad_(False).train(layer.training))
    return model


@torch.no_grad()
def upcast(model: nn.Module) -> nn.Module:
    """Run a quantized model in fp32: the same quantized weights, everything else in fp32.

    The reference a merge is compared against: the trained model with no 16-bit rounding on top.
    """
    model.float()  # floating-point tensors only: the packed 4-bit and int8 weights are untouched
    for layer in model.modules():
        if quantized_kind(layer) == "4bit":
            layer.compute_dtype = torch.float32
            layer.weight.quant_state.dtype = torch.float32  # what dequantize_4bit returns
    return model


def parameter_count(model: nn.Module) -> int:
    """The model's parameters, a 4-bit weight counted as the weights it holds (its tensor packs two a byte)."""
    total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        total += math.prod(state.shape) if state is not None else param.numel()
    return total


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The normalisation layers (LayerNorm, RMSNorm and their variants), by name."""
    return {name: module for name, module in model.named_modules()
            if type(module).__name__.lower().endswith("norm") and next(module.children(), None) is None}


def stored_bytes(out_features: int, in_features: int, spec: ModelSpec) -> int:
    """Bytes bitsandbytes stores for one quantized [out, in] weight, its scales included."""
    n = out_features * in_features
    if spec.quantization == "8bit":
        return n + 4 * out_features
    blocks = math.ceil(n / BLOCKSIZE)
    packed = math.ceil(n / 2)
    if not spec.double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4


def quantized_storage(model: nn.Module, spec: ModelSpec) -> tuple[int, int]:
    """(weights `quantize` would quantize, the bytes they take quantized): works on the meta device."""
    shapes = [linear_shape(layer)[:2] for layer in linear_layers(model).values()]
    return sum(i * o for i, o in shapes), sum(stored_bytes(o, i, spec) for i, o in shapes)


def describe(spec: ModelSpec) -> str:
    """The quantization in a few words, for tables: '4bit nf4, double quant', '8bit' or 'none'."""
    if spec.quantization == "4bit":
        return f"4bit {spec.quant_type}" + (", double quant" if spec.double_quant else "")
    return spec.quantization
