"""The activations a training step keeps for its backward pass, from the model's layout (memory_plan.py).

What follows was counted, not assumed: saved-tensor hooks list every tensor autograd holds from
the forward pass to the backward pass (distinct storages; tests/test_activations.py checks these
figures against such a count on Llama-shaped models trained as peftctl trains them). Per decoder
layer and token, with e the activations' width (2 bytes in bf16), h the hidden size, q and kv the
widths of the query and of the key/value projections, i the MLP's:
  * RMSNorms keep their input and an fp32 1/rms, h·e + 4 each, as `fused.RMSNorm` runs them (the
    first layer's first norm nothing: its input, the frozen embeddings, needs no gradient). Other
    norms (LayerNorm): input, mean and 1/std (estimated).
  * SDPA (on GPUs; on CPUs for rows over 512 tokens) keeps q, k, v, its output and an fp32
    log-sum-exp per head: (2·q + 2·kv)·e + 4·heads. peftctl's grouped eager kernel (CPU rows up to
    512, `train.attention: auto`) keeps q, k, v and the probabilities, heads·s values for rows of s
    tokens (Korthikanti et al.'s a·s term); transformers' eager also repeats k and v for every query
    head and keeps an fp32 copy of the probabilities.
  * A gated MLP keeps its gate and up projections, 2·i·e (3·i·e without `fused.recomputed`); another
    MLP (GPT-2's) is estimated at 2·i·e, not counted.
  * A frozen linear layer keeps nothing (its weight is all its input's gradient needs; bitsandbytes'
    4-bit layers likewise). An adapted one keeps its input, a rank-wide intermediate (fp32) and,
    with dropout, a one-byte mask. Layers reading one tensor (q/k/v, gate/up) share that input, and
    o_proj's input is SDPA's own output; under a GPU's autocast (train/loop.py) each adapter instead
    keeps its own 16-bit cast of its input, its intermediate in 16 bits, and autocast holds a
    16-bit copy of every trainable weight for the step (counted under CPU autocast, which takes LoRA
    down the same path; scripts/gpu_proof.py measures it on a GPU). Full fine-tuning keeps every
    linear layer's input.
For a Llama-2-7B with LoRA on q/v under SDPA that is about 25·h bytes per layer and token (27·h
under autocast), where
Korthikanti et al. (2022) count 34·h bytes (plus 5·a·s) for a layer whose every weight trains,
with dropout. With gradient checkpointing each layer keeps only its input, and one layer at a
time is rebuilt in the backward pass with everything above. Outside the layers: the final norm's
input, the output head's input and targets at the labelled tokens, and the logits (with a frozen
bias-free head, see loss.HeadCrossEntropy, one chunk at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftctl.arch.layers import LINEAR_TYPES, linear_shape
from peftctl.model.loading import transformer_blocks
from peftctl.train import attention
from peftctl.train import fused
from peftctl.train.loss import HeadCrossEntropy

FP32 = 4
# Layers that read the same input tensor within their parent module (one storage kept for all).
SAME_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


@dataclass(frozen=True)
class Kernels:
    """What the loop runs that decides what is kept."""

    attention: str  # "sdpa" (or another fused kernel), attention.NAME (peftctl's grouped eager), "eager"
    autocast: bool  # a GPU's 16-bit autocast (train._mixed_precision)
    checkpointed: bool  # train.gradient_checkpointing


def activation_bytes(model: nn.Module, kernels: Kernels, rows: int, row_len: int, labelled: int, value_bytes: float,
                     full: bool = False) -> float:
    """Bytes kept for the backward pass by one step of `rows` rows of `row_len` tokens, `labelled` of
    them with a label; `model` carries the method (its skeleton will do); `full`: every weight trains."""
    config, e = model.config, value_bytes
    tokens = rows * row_len
    blocks = transformer_blocks(model)
    layers = len(blocks) or config.num_hidden_layers
    block = blocks[0] if blocks else model
    readers = _every_linear(block) if full else adapted_readers(block)
    if kernels.checkpointed:  # each layer's input, and one layer rebuilt whole (no recompute levers)
        per_token = layers * config.hidden_size * e + layer_bytes(block, config, kernels, row_len, e, readers, False)
    else:
        per_token = layers * layer_bytes(block, config, kernels, row_len, e, readers, True)
        if not full and _has_rms_norm(block) and not _trains_before_blocks(model, blocks):
            per_token -= config.hidden_size * e + FP32  # layer 0's first norm reads the frozen embeddings
    head = model.get_output_embeddings()
    chunked = not full and HeadCrossEntropy.takes(head)
    # Chunked: a chunk's logits in the activations' dtype (their gradient overwrites them) and one
    # block's fp32 log-probabilities and gradient. Else the labelled logits and their gradient, in fp32.
    values = labelled * config.vocab_size
    block = min(HeadCrossEntropy.block_rows(config.vocab_size), labelled) * config.vocab_size
    chunk = min(HeadCrossEntropy.CHUNK_VALUES, values) * e + 3 * block * FP32
    logits = chunk if chunked else 2 * values * FP32
    final_norm = config.hidden_size * e + FP32
    # The head's input and int64 targets at the labelled tokens, and the one-byte mask that picked them.
    head_input = labelled * (config.hidden_size * e + 8) + tokens
    # Autocast's 16-bit copies of the trainable weights, held for the step.
    casts = e * sum(p.numel() for p in model.parameters() if p.requires_grad) if kernels.autocast and not full else 0
    return tokens * (per_token + final_norm) + head_input + logits + casts


def layer_bytes(block: nn.Module, config, kernels: Kernels, row_len: int, e: float, readers: list,
                recompute: bool) -> float:
    """Bytes one decoder layer keeps per token; `recompute`: fused.recomputed's levers are on."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    if _has_rms_norm(block):
        norms = 2 * (h * e + FP32)
    else:
        norms = 2 * (h * e + 2 * FP32)
    if kernels.attention == attention.NAME:
        scores = (q + 2 * kv) * e + heads * row_len * e
    elif kernels.attention == "eager":
        scores = 3 * q * e + heads * row_len * (FP32 + e)
    else:
        scores = (2 * q + 2 * kv) * e + heads * FP32
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    gated = any(all(isinstance(getattr(m, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
                for m in block.modules())
    mlp = (2 if recompute else 3) * intermediate * e if gated else 2 * intermediate * e
    return norms + scores + mlp + _reader_bytes(readers, kernels, e)


def _has_rms_norm(block: nn.Module) -> bool:
    return any(fused._epsilon(module) is not None for module in block.modules())


def _trains_before_blocks(model: nn.Module, blocks: list[nn.Module]) -> bool:
    """Whether a trainable weight outside the decoder layers and the output head may feed layer 0's
    input, which then needs its gradient: trained embeddings, prompt tuning's virtual tokens.
    (Prefix tuning's, which feed the attention instead, are counted too: one norm's input over.)"""
    inside = {id(p) for module in [*blocks, model.get_output_embeddings()] if module is not None
              for p in module.parameters()}
    return any(p.requires_grad and id(p) not in inside for p in model.parameters())


@dataclass(frozen=True)
class _Reader:
    """A layer whose input autograd keeps: an adapted one, or any under full fine-tuning."""

    name: str  # its name within the block
    width: int  # input features
    rank: int  # the adapter's intermediate width (0: none)
    mask: bool  # dropout on the adapter's input


def _reader_bytes(readers: list[_Reader], kernels: Kernels, e: float) -> float:
    seen, total = set(), 0.0
    for reader in readers:
        total += reader.rank * (e if kernels.autocast else FP32) + (reader.width if reader.mask else 0)
        parent, _, leaf = reader.name.rpartition(".")
        if kernels.autocast and reader.rank:  # each adapter casts its input for itself
            total += reader.width * e
            continue
        if leaf == "o_proj" and kernels.attention not in (attention.NAME, "eager"):
            continue  # SDPA's output, already kept
        key = (parent, SAME_INPUT.get(leaf, leaf))
        if key not in seen:
            seen.add(key)
            total += reader.width * e
    return total


def adapted_readers(block: nn.Module) -> list[_Reader]:
    readers = []
    for name, module in block.named_modules():
        base = getattr(module, "base_layer", None)
        if not isinstance(base, LINEAR_TYPES):
            continue
        a = getattr(module, "lora_A", None)
        rank = a.out_features if isinstance(a, nn.Linear) else 0
        dropout = getattr(module, "dropout", None)
        readers.append(_Reader(name, linear_shape(base)[0], rank, isinstance(dropout, nn.Dropout) and dropout.p > 0))
    return readers


def _every_linear(block: nn.Module) -> list[_Reader]:
    return [_Reader(name.removesuffix(".base_layer"), linear_shape(module)[0], 0, False)
            for name, module in block.named_modules() if isinstance(module, LINEAR_TYPES)
            and not name.endswith(("lora_A", "lora_B"))]
