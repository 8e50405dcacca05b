"""Facts about a model's layers that methods, quantization and planning all need.

A leaf module: it imports no other part of peftctl, so the methods (which wrap layers) and
quantization (which replaces them) can both build on it without importing each other.
"""

from __future__ import annotations

import re
import sys

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftctl.arch.tasks import in_own_head

# The layer types an adapter may target: GPT-2 stores its linear layers as Conv1D ([in, out]).
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' is bf16 where the hardware multiplies it natively, fp16 on older GPUs, else fp32."""
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32


def layer_kind(name: str) -> str:
    """A module or parameter name with its layer numbers folded ("model.layers.N.self_attn.q_proj"):
    what 30 layers' q_proj have in common, for listing them once and for matching one layer's names
    against another's."""
    return re.sub(r"\.\d+\.", ".N.", name)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer an adapter may target, without the output head (as peft's all-linear) and
    without a classifier's head, which trains whole (arch/tasks.py)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    trained_whole = in_own_head(model)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LINEAR_TYPES) and module is not head and not trained_whole(name)
    }


def expert_tensors(model: nn.Module) -> dict[str, int]:
    """Mixture-of-experts weights stored as 3-D parameters [experts, out, in] (transformers 5 fuses
    them: Mixtral's `experts.gate_up_proj`), by their name as the unwrapped model has it, with their
    sizes. They are no linear layers, so 'all-linear' never reaches them. Only parameters under an
    `experts` module count: other 3-D weights (the convolutions of Mamba-style hybrids) are no experts.
    """
    found = {}
    for name, param in model.named_parameters():
        plain = name.replace(".base_layer", "")  # as the model is before a method wraps the module
        if param.dim() == 3 and ".experts." in f".{plain}":
            found[plain] = param.numel()
    return found


def linear_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out): GPT-2's Conv1D stores its weight as [in, out]."""
    if isinstance(layer, Conv1D):
        in_features, out_features = layer.weight.shape
        return in_features, out_features, True
    return layer.in_features, layer.out_features, False


def quantized_kind(layer: nn.Module) -> str | None:
    """'4bit' or '8bit' for a bitsandbytes layer, else None (without importing bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")  # not imported: no layer can be one of its
    if bnb is None:
        return None
    if isinstance(layer, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def dequantized_weight(layer: nn.Module) -> torch.Tensor | None:
    """A quantized layer's weight as a dense [out, in] tensor; None for a layer that is not quantized."""
    kind = quantized_kind(layer)
    if kind is None:
        return None
    functional = sys.modules["bitsandbytes"].functional
    if kind == "4bit":
        return functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    # The first forward moves the row scales from the weight into the layer's matmul state.
    scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    return functional.int8_vectorwise_dequant(layer.weight.data, scales)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a plain [out, in] tensor, whatever its storage layout.

    A 4-bit or 8-bit layer (`model.quantization`) is dequantized: a new tensor each call, so
    writing to it does not change the layer.
    """
    weight = dequantized_weight(layer)
    if weight is not None:
        return weight
    _, _, fan_in_fan_out = linear_shape(layer)
    return layer.weight.T if fan_in_fan_out else layer.weight
