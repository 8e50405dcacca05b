"""Memory arithmetic for a recipe, from the model's config alone (meta device, no weights).

The model is built on the meta device and the recipe's method applied to it, so parameter counts
are exact for any size (a 70B config takes seconds). Memory, per parameter:
  * full fine-tuning in mixed precision: 16-bit weights (2 B) + 16-bit gradients (2 B) + AdamW's
    two fp32 moments (8 B) = 12 B; the usual rule of thumb, which leaves out an fp32 master
    copy (another 4 B) that some trainers keep;
  * PEFT: the frozen base at its storage precision, and for the trainable weights only: weights,
    gradients and AdamW moments. peftctl keeps trainable weights and their gradients in fp32
    (4 B each), so they cost 16 B per trainable parameter.
Activations come on top: see `activation_bytes`.

With `shards` > 1 (FSDP2 over that many GPUs, `accelerate launch --use_fsdp`) every figure is per
GPU: weights, gradients and optimizer state are divided among the GPUs, and each GPU holds whole
weights of two transformer blocks while they are in use (the block being computed and the next
one, which FSDP gathers ahead; for full fine-tuning their whole gradients too); activations are
per process as before (`batch_size` is per process).

With `model.quantization` the frozen linear layers are counted at their quantized size, scales
included (`peftctl.quantize.stored_bytes`), norms at fp32, and the plan also shows the same method
on the unquantized base, so the saving is a figure, not a claim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from peftctl import methods, quantize
from peftctl.errors import blame
from peftctl.loss import HeadCrossEntropy
from peftctl.model import load_skeleton, resolve_dtype, transformer_blocks
from peftctl.recipe import Recipe
from peftctl.sharding import check_fsdp_recipe
from peftctl.skeleton import method_options

ADAMW_STATE_BYTES = 8  # two fp32 moments per trainable parameter
MIXED_PRECISION_BYTES = 2  # bf16 / fp16 weights and gradients
ADAPTER_BYTES = 4  # peftctl trains adapters in fp32


@dataclass
class Memory:
    weights: float
    gradients: float
    optimizer: float
    activations: float = 0.0
    gathered: float = 0.0  # under FSDP: whole weights of the blocks being computed and prefetched

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.gathered

    def sharded(self, shards: int, gathered: float) -> Memory:
        """Per GPU when FSDP divides weights, gradients and optimizer state among `shards` GPUs."""
        return Memory(self.weights / shards, self.gradients / shards, self.optimizer / shards,
                      self.activations, gathered)


def full_finetune_memory(n_params: int, weight_bytes: float = MIXED_PRECISION_BYTES) -> Memory:
    return Memory(n_params * weight_bytes, n_params * weight_bytes, n_params * ADAMW_STATE_BYTES)


def peft_memory(n_frozen: int, n_trainable: int, frozen_bytes: float = MIXED_PRECISION_BYTES,
                trainable_bytes: float = ADAPTER_BYTES) -> Memory:
    return Memory(
        weights=n_frozen * frozen_bytes + n_trainable * trainable_bytes,
        gradients=n_trainable * trainable_bytes,
        optimizer=n_trainable * ADAMW_STATE_BYTES,
    )


def activation_bytes(config, tokens: int, labelled_tokens: int, activation_bytes_per_value: float,
                     checkpointed: bool = False, chunked_head: bool = False) -> float:
    """Activations kept for the backward pass, estimated per token.

    Per decoder layer and token a transformer keeps about 34·h values for the backward pass
    (Korthikanti et al., 2022, without their 5·a·s/h attention-score term). Even with a frozen
    base these are needed: the gradient flows back through every layer to reach the adapters.
    With gradient checkpointing each layer keeps only its input (h values per token), and one
    layer's 34·h are rebuilt at a time in the backward pass. The loss adds fp32 logits (and
    their gradient) for the labelled tokens only, which is all peftctl computes; with a frozen
    bias-free output head (`chunked_head`, see loss.HeadCrossEntropy) only one chunk of them
    exists at a time. Checked against a real run: for SmolLM2 LoRA with full 256-token rows the
    estimate was within a few percent of the measured peak resident memory above the runtime's
    own (tests/test_plan.py, slow).
    """
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    per_layer = 34 * hidden * tokens * activation_bytes_per_value
    # Chunked: a chunk's logits in the activations' dtype (their gradient overwrites them) and one
    # block's fp32 log-probabilities and gradient. Else the labelled logits and their gradient, in fp32.
    chunk = HeadCrossEntropy.CHUNK_VALUES * activation_bytes_per_value + 3 * HeadCrossEntropy.BLOCK_VALUES * 4
    logits = chunk if chunked_head else 2 * labelled_tokens * config.vocab_size * 4
    if checkpointed:
        return layers * hidden * tokens * activation_bytes_per_value + per_layer + logits
    return layers * per_layer + logits


@dataclass
class Plan:
    model: str
    method: str
    total_params: int
    trainable_params: int
    weight_dtype: str
    tokens_per_step: int
    peft: Memory
    full: Memory
    quantization: str = "none"
    gradient_checkpointing: bool = False
    # The same method on the unquantized base (`weight_dtype`), when the plan is for a quantized one.
    unquantized: Memory | None = None
    shards: int = 1  # GPUs FSDP shards over; the memories are per GPU

    def as_dict(self) -> dict:
        data = asdict(self)
        for key in ("peft", "full", "unquantized"):
            if data[key] is not None:
                data[key]["total"] = getattr(self, key).total
        data["trainable_percent"] = 100 * self.trainable_params / self.total_params
        return data


def plan(recipe: Recipe, shards: int = 1) -> Plan:
    """Parameter counts and memory for `recipe`; per GPU of FSDP over `shards` GPUs when > 1."""
    with blame(recipe.source, recipe.locate):
        return _plan(recipe, shards)


def _plan(recipe: Recipe, shards: int) -> Plan:
    spec = recipe.model
    if shards > 1:
        check_fsdp_recipe(recipe)
    model = load_skeleton(spec)
    n_base = sum(p.numel() for p in model.parameters())
    n_quantized, quantized_bytes = quantize.quantized_storage(model, spec)  # before methods add layers
    # A continued adapter (model.adapter) brings its own options; the recipe may name only the method.
    adapter = methods.apply(model, method_options(recipe))
    # Frozen norm weights, upcast to fp32 on a quantized base (a bias BitFit trains is already counted).
    n_norm = sum(p.numel() for norm in quantize.norm_layers(model).values() for p in norm.parameters(recurse=False))
    n_trainable = adapter.trainable_count()
    # Methods that train existing weights (BitFit) do not add parameters: count what is new.
    n_total = sum(p.numel() for p in model.parameters())
    n_frozen = n_total - n_trainable
    dtype = resolve_dtype(recipe.model.dtype)
    weight_bytes = torch.finfo(dtype).bits / 8
    tokens = recipe.train.batch_size * recipe.data.max_seq_len
    config = model.config
    peft = peft_memory(n_frozen, n_trainable, frozen_bytes=weight_bytes)
    chunked = HeadCrossEntropy.takes(model.get_output_embeddings())
    peft.activations = activation_bytes(config, tokens, tokens, weight_bytes, recipe.train.gradient_checkpointing,
                                        chunked)
    full = full_finetune_memory(n_base, weight_bytes=weight_bytes)
    # Full fine-tuning trains the output head, so its logits are kept whole.
    full.activations = activation_bytes(config, tokens, tokens, weight_bytes, recipe.train.gradient_checkpointing)
    unquantized = None
    if spec.quantization != "none":
        unquantized = peft
        peft = replace(peft, weights=peft.weights - weight_bytes * (n_quantized + n_norm)
                       + quantized_bytes + ADAPTER_BYTES * n_norm)
    if shards > 1:
        # Gathered at the weights' 16-bit storage size, for full fine-tuning too (full_finetune_memory).
        gathered = 2 * largest_block(model) * weight_bytes
        # Full fine-tuning also holds those blocks' whole gradients until they are reduce-scattered.
        peft, full = peft.sharded(shards, gathered), full.sharded(shards, 2 * gathered)
    return Plan(recipe.model.name_or_path, recipe.method.name, n_total, n_trainable, str(dtype).removeprefix("torch."),
                tokens, peft, full, quantize.describe(spec), recipe.train.gradient_checkpointing, unquantized,
                shards)


def largest_block(model: torch.nn.Module) -> int:
    """Parameters of the largest transformer block: FSDP's unit."""
    return max((sum(p.numel() for p in block.parameters()) for block in transformer_blocks(model)), default=0)
