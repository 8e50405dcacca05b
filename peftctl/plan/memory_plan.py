"""Memory arithmetic for a recipe, from the model's config alone (meta device, no weights).

The model is built on the meta device and the recipe's method applied to it, so parameter counts
are exact for any size (a 70B config takes seconds). Memory, per parameter:
  * full fine-tuning in mixed precision: 16-bit weights (2 B) + 16-bit gradients (2 B) + AdamW's
    two fp32 moments (8 B) = 12 B; the usual rule of thumb, which leaves out an fp32 master
    copy (another 4 B) that some trainers keep;
  * PEFT: the frozen base at its storage precision, and for the trainable weights only: weights,
    gradients and AdamW moments. peftctl keeps trainable weights and their gradients in fp32
    (4 B each), so they cost 16 B per trainable parameter.
Activations come on top: what one step keeps for its backward pass, with every row `max_seq_len`
tokens long and every token labelled, as activations.py counts it for the kernels training will
run here (on a GPU: SDPA and 16-bit autocast; on a CPU: `train.attention`'s choice). A quantized
base adds its largest layer dequantized, which bitsandbytes builds for each matmul.

With `shards` > 1 (FSDP2 over that many GPUs, `accelerate launch --use_fsdp`) every figure is per
GPU: weights, gradients and optimizer state are divided among the GPUs, and each GPU holds whole
weights of two transformer blocks while they are in use (the block being computed and the next
one, which FSDP gathers ahead; for full fine-tuning their whole gradients too); activations are
per process as before (`batch_size` is per process).

With `model.quantization` the frozen linear layers are counted at their quantized size, scales
included (`peftctl.model.quantize.stored_bytes`), norms at fp32, and the plan also shows the same method
on the unquantized base, so the saving is a figure, not a claim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from peftctl import methods


from peftctl.arch.layers import linear_layers, linear_shape
from peftctl.core.errors import blame
from peftctl.model import quantize
from peftctl.model.loading import base_facts, load_skeleton, resolve_dtype, transformer_blocks
from peftctl.plan.activations import Kernels, activation_bytes
from peftctl.plan.skeleton import method_config, recipe_head
from peftctl.recipe.schema import Recipe
from peftctl.train.attention_choice import planned_kernel
from peftctl.train.sharding import check_fsdp_recipe

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


@dataclass
class MemoryPlan:
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
    attention: str = "sdpa"  # the attention kernel the activations are counted for
    autocast: bool = False  # counted for a GPU's 16-bit autocast

    def as_dict(self) -> dict:
        data = asdict(self)
        for key in ("peft", "full", "unquantized"):
            if data[key] is not None:
                data[key]["total"] = getattr(self, key).total
        data["trainable_percent"] = 100 * self.trainable_params / self.total_params
        return data


def plan(recipe: Recipe, shards: int = 1, cuda: bool | None = None) -> MemoryPlan:
    """Parameter counts and memory for `recipe`; per GPU of FSDP over `shards` GPUs when > 1.
    `cuda`: activations as training on a GPU keeps them (default: whether this machine has one)."""
    with blame(recipe.source, recipe.locate):
        return _plan(recipe, shards, torch.cuda.is_available() if cuda is None else cuda)


def training_kernels(model: torch.nn.Module, recipe: Recipe, cuda: bool) -> Kernels:
    """The kernels `train` will run the recipe with (train/model_setup.py, loop._mixed_precision)."""
    current = getattr(model.config, "_attn_implementation", None)
    chosen = planned_kernel(recipe.train.attention, current, recipe.data.max_seq_len, cuda)
    dtype = resolve_dtype(recipe.model.dtype)
    return Kernels(chosen, cuda and dtype in (torch.bfloat16, torch.float16), recipe.train.gradient_checkpointing)


def _plan(recipe: Recipe, shards: int, cuda: bool) -> MemoryPlan:
    spec = recipe.model
    if shards > 1:
        check_fsdp_recipe(recipe)
    model = load_skeleton(spec, recipe_head(recipe))
    n_base = sum(p.numel() for p in model.parameters())
    n_quantized, quantized_bytes = quantize.quantized_storage(model, spec)  # before methods add layers
    largest = max((_weights(layer) for layer in linear_layers(model).values()), default=0)
    # A continued adapter (model.adapter) brings its own options; the recipe may name only the method.
    adapter = methods.apply(model, method_config(recipe), base_facts(spec, task=recipe.task))
    # Frozen norm weights, upcast to fp32 on a quantized base (a bias BitFit trains is already counted).
    n_norm = sum(p.numel() for norm in quantize.norm_layers(model).values() for p in norm.parameters(recurse=False))
    n_trainable = adapter.trainable_count()
    # Methods that train existing weights (BitFit) do not add parameters: count what is new.
    n_total = sum(p.numel() for p in model.parameters())
    n_frozen = n_total - n_trainable
    dtype = resolve_dtype(recipe.model.dtype)
    weight_bytes = torch.finfo(dtype).bits / 8
    rows, row_len = recipe.train.batch_size, recipe.data.max_seq_len
    tokens = rows * row_len
    kernels = training_kernels(model, recipe, cuda)
    peft = peft_memory(n_frozen, n_trainable, frozen_bytes=weight_bytes)
    # Every token labelled, as every row is full: the most a step of this shape can keep. Prompt-style
    # methods make each row n positions longer (prefix tuning: n more keys, counted as positions too).
    virtual = getattr(adapter.cfg, "num_virtual_tokens", 0)
    peft.activations = activation_bytes(model, kernels, rows, row_len + virtual, tokens, weight_bytes)
    full = full_finetune_memory(n_base, weight_bytes=weight_bytes)
    # Full fine-tuning keeps every linear layer's input, and trains the output head: whole logits.
    full.activations = activation_bytes(model, kernels, rows, row_len, tokens, weight_bytes, full=True)
    unquantized = None
    if spec.quantization != "none":
        unquantized = peft
        peft = replace(peft, weights=peft.weights - weight_bytes * (n_quantized + n_norm)
                       + quantized_bytes + ADAPTER_BYTES * n_norm,
                       activations=peft.activations + largest * weight_bytes)
    if shards > 1:
        # Gathered at the weights' 16-bit storage size, for full fine-tuning too (full_finetune_memory).
        gathered = 2 * largest_block(model) * weight_bytes
        # Full fine-tuning also holds those blocks' whole gradients until they are reduce-scattered.
        peft, full = peft.sharded(shards, gathered), full.sharded(shards, 2 * gathered)
    return MemoryPlan(recipe.model.name_or_path, recipe.method.name, n_total, n_trainable, str(dtype).removeprefix("torch."),
                tokens, peft, full, quantize.describe(spec), recipe.train.gradient_checkpointing, unquantized,
                shards, kernels.attention, kernels.autocast)


def _weights(layer: torch.nn.Module) -> int:
    in_features, out_features, _ = linear_shape(layer)
    return in_features * out_features


def largest_block(model: torch.nn.Module) -> int:
    """Parameters of the largest transformer block: FSDP's unit."""
    return max((sum(p.numel() for p in block.parameters()) for block in transformer_blocks(model)), default=0)
