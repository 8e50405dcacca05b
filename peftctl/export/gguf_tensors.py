"""A transformers model's tensors, and a LoRA's, under llama.cpp's names and in its layouts.

GGUF files name tensors as llama.cpp does (`blk.0.attn_q.weight`), per architecture; the `gguf`
package's TensorNameMap gives that name for a transformers parameter. Two layouts differ from
transformers', as llama.cpp's convert_hf_to_gguf.py writes them:
  * its "llama" architecture rotates interleaved pairs of a head's dimensions (RoPE "normal"
    mode) where transformers rotates the two halves, so the rows of q_proj and k_proj are
    permuted within each head (LlamaModel.permute); an update of those weights is permuted the
    same way: B's rows, A untouched;
  * GPT-2's Conv1D stores its weight [in, out]; GGUF holds [out, in], as for nn.Linear.
llama.cpp adds a LoRA as  W x + scale · (alpha / r) · B (A x),  scale the user's (1.0 unless
asked), alpha the file's adapter.lora.alpha, r read from B's shape (llama-adapter.h, get_scale).
Its own convert_lora_to_gguf.py writes peft's lora_alpha there, which loses rsLoRA's alpha/√r and
any per-layer scale. Here each layer's own scaling is baked into B, so that llama.cpp at scale
1.0 computes exactly what peftctl trained.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGMLQuantizationType, TensorNameMap, get_tensor_name_map, quants
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftctl.core.errors import UserError
from peftctl.methods import Adapter
from peftctl.methods.base import PEFT_KEY_PREFIX

CONVERT_FIX = ("merge it into a transformers folder (peftctl merge) and convert that with llama.cpp's "
               "convert_hf_to_gguf.py")


@dataclass(frozen=True)
class GgufArchitecture:
    arch: MODEL_ARCH
    rope_rows_permuted: bool  # llama.cpp's "llama" layout: q/k rows permuted within each head

    @property
    def name(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]


# transformers model_type → llama.cpp's architecture, as convert_hf_to_gguf.py maps them (it writes
# Mistral as "llama", with the permutation; Qwen2 rotates halves as transformers does).
ARCHITECTURES = {
    "llama": GgufArchitecture(MODEL_ARCH.LLAMA, True),
    "mistral": GgufArchitecture(MODEL_ARCH.LLAMA, True),
    "qwen2": GgufArchitecture(MODEL_ARCH.QWEN2, False),
    "gpt2": GgufArchitecture(MODEL_ARCH.GPT2, False),
}

# --quant: the GGML type of matrices (norms and biases stay f32, as llama.cpp's converter keeps them).
QUANT_TYPES = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
               "bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}


def architecture(config: Any) -> GgufArchitecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(f"GGUF export does not support the base's architecture '{model_type}'",
                        expected="a base of type " + ", ".join(ARCHITECTURES) + " (SmolLM2 is llama)",
                        fix=CONVERT_FIX)
    return ARCHITECTURES[model_type]


def name_map(config: Any) -> TensorNameMap:
    return get_tensor_name_map(architecture(config).arch, config.num_hidden_layers)


def gguf_name(names: TensorNameMap, hf_name: str) -> str | None:
    """llama.cpp's name for a transformers parameter (`model.layers.0.self_attn.q_proj.weight`)."""
    return names.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def rope_heads(config: Any, tensor_name: str) -> int | None:
    """The heads whose rows the llama layout permutes in this tensor (q or k), else None."""
    if not architecture(config).rope_rows_permuted:
        return None
    kind = tensor_name.split(".")[2] if tensor_name.startswith("blk.") else None
    if kind == "attn_q":
        return config.num_attention_heads
    if kind == "attn_k":
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def rope_permuted(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows, first half then second half,
    become interleaved pairs (row i of each half next to each other)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def rope_unpermuted(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of rope_permuted: llama.cpp's rows back in transformers' order."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def is_plain_lora(adapter_config: dict[str, Any]) -> str | None:
    """None if the adapter is a LoRA that llama.cpp can apply as it is, else why it is not."""
    if adapter_config.get("peft_type") != "LORA":
        return f"{adapter_config.get('peft_type')} is not LoRA, and llama.cpp applies only LoRA adapters"
    if adapter_config.get("use_dora"):
        return "DoRA rescales each output by a learned magnitude, which llama.cpp's LoRA cannot express"
    if adapter_config.get("init_lora_weights") in ("pissa", "olora"):
        return ("the adapter was trained on the base less its principal part (PiSSA/OLoRA, not converted), "
                "which llama.cpp's base is not")
    if adapter_config.get("target_parameters"):
        return "the adapter updates expert parameters (target_parameters), which llama.cpp's LoRA loader does not map"
    return None


def lora_tensors(adapter: Adapter, state: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], float]:
    """(tensors, alpha) of a llama.cpp LoRA file: `<tensor>.lora_a` [r, in] and `.lora_b` [out, r]
    in fp32 for each adapted layer, from `state` (peft's keys; A and B of `adapter`'s layers).

    alpha is the adapter's r; each B is multiplied by its layer's scaling · r_layer / alpha, so
    llama.cpp's alpha / r_layer undoes everything but peftctl's scaling, whatever it is per layer
    (alpha/r, rsLoRA's alpha/√r, a rank-2r PiSSA conversion).
    """
    config = adapter.model.config
    names, alpha = name_map(config), float(adapter.cfg.r)
    tied_head = getattr(config, "tie_word_embeddings", False)
    tensors = {}
    for module_name in adapter.applied.targets:
        layer = adapter.model.get_submodule(module_name)
        target = gguf_name(names, module_name + ".weight")
        if target is None or (tied_head and target == "output.weight"):
            why = ("the output layer shares the token embeddings, which llama.cpp's LoRA does not adapt"
                   if target else f"llama.cpp's {architecture(config).name} architecture has no tensor for it")
            raise UserError(f"the adapter's layer '{module_name}' cannot be written as a llama.cpp LoRA: {why}",
                            fix="pass --merged to fold the adapter into the base instead")
        key = PEFT_KEY_PREFIX + module_name
        a = state[f"{key}.lora_A.weight"].detach().to(torch.float32)
        b = state[f"{key}.lora_B.weight"].detach().to(torch.float32)
        b = b * (layer.scaling * b.shape[1] / alpha)
        if (heads := rope_heads(config, target)) is not None:
            b = rope_permuted(b, heads)
        tensors[f"{target}.lora_a"] = a.cpu().numpy()
        tensors[f"{target}.lora_b"] = b.cpu().contiguous().numpy()
    return tensors, alpha


@dataclass
class GgufTensor:
    name: str  # llama.cpp's
    source: str  # the transformers parameter it holds
    data: np.ndarray  # as GGUFWriter.add_tensor takes it (uint8 bytes for block types)
    qtype: GGMLQuantizationType
    transposed: bool  # a Conv1D weight, stored [in, out] by transformers
    rope_heads: int | None  # q/k rows permuted within this many heads


def model_tensors(model: nn.Module, quant: str) -> Iterator[GgufTensor]:
    """Every tensor of `model` as llama.cpp's GGUF holds it: named, laid out, encoded as `quant`
    (matrices; 1-D tensors stay f32; a q8_0 matrix whose rows are no whole number of 32-value
    blocks is written f16, as llama.cpp's converter does)."""
    config = model.config
    names = name_map(config)
    conv1d = {name + ".weight" for name, module in model.named_modules() if isinstance(module, Conv1D)}
    tied_head = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        target = gguf_name(names, hf_name)
        if target is None:
            raise UserError(f"the base's tensor '{hf_name}' has no name in llama.cpp's "
                            f"{architecture(config).name} architecture", fix=CONVERT_FIX)
        if tied_head and target == "output.weight":
            continue  # llama.cpp uses the token embeddings when the file has no output layer
        data = tensor.detach().to("cpu", torch.float32)
        transposed, heads = hf_name in conv1d, rope_heads(config, target)
        if transposed:
            data = data.T
        if heads is not None:
            data = rope_permuted(data, heads)
        array = data.contiguous().numpy()
        qtype = QUANT_TYPES[quant] if array.ndim > 1 else GGMLQuantizationType.F32
        if qtype == GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
            qtype = GGMLQuantizationType.F16
        yield GgufTensor(target, hf_name, quants.quantize(array, qtype), qtype, transposed, heads)


@torch.no_grad()
def load_gguf_values(model: nn.Module, tensors: list[GgufTensor]) -> None:
    """Give `model` the values `tensors` hold, as llama.cpp computes with them (rounded to their
    type), back in transformers' layout: what the GGUF file's model computes, to measure."""
    state = model.state_dict()
    for tensor in tensors:
        values = torch.from_numpy(np.asarray(quants.dequantize(tensor.data, tensor.qtype), dtype=np.float32))
        if tensor.rope_heads is not None:
            values = rope_unpermuted(values, tensor.rope_heads)
        state[tensor.source].copy_(values.T if tensor.transposed else values)
