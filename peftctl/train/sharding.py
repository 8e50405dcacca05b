"""Whole trainable tensors under FSDP2, where each process holds only its shard.

accelerate's FSDP2 (`fully_shard`) replaces every parameter of the model with a sharded one (a
`DTensor`) under the same name, and AdamW's state follows. Checkpoints and the exported adapter
hold whole tensors, the same files as a one-process or DDP run writes, so a run can resume
with another launch and peft reads the export. Gathering is a collective: every process calls
these functions in the same order. Without FSDP they return what they are given.

Before any of that, `check_fsdp` refuses the FSDP launches and recipes that would not train what
the user asked for (`peftctl train` under FSDP, and `peftctl plan --fsdp`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from peftctl.core.errors import UserError, blame
from peftctl.methods import Adapter

if TYPE_CHECKING:
    from accelerate.utils import DistributedType

    from peftctl.recipe.schema import Recipe

DDP_LAUNCH = "accelerate launch --multi_gpu --num_processes N -m peftctl train RECIPE"


def check_fsdp(recipe: Recipe, distributed_type: DistributedType) -> None:
    """Refuse the FSDP launches that would not train what the user asked for, before weights load."""
    from accelerate.utils import DistributedType

    where = "accelerate config (distributed_type: FSDP)"
    if distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU):
        # accelerate keeps CPU processes (and a single unlaunched one) on DDP under an FSDP config.
        raise UserError(f"accelerate runs FSDP only on GPUs; these processes ({distributed_type.value}) would "
                        "silently train with DDP instead", where=where, fix=f"on CPUs launch DDP: {DDP_LAUNCH}")
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("FSDP version 1 is not supported: peftctl shards with FSDP2, whose weights stay "
                        "addressable by name", where=where,
                        fix="set fsdp_version: 2 in the accelerate config (or pass --fsdp_version 2)")
    check_fsdp_recipe(recipe)


def check_fsdp_recipe(recipe: Recipe) -> None:
    """Refuse what of a recipe FSDP cannot shard (for `train` under FSDP and `plan --fsdp`)."""
    if recipe.model.quantization != "none":
        with blame(recipe.source, recipe.locate):
            raise UserError("FSDP with a quantized base (model.quantization) is not supported: accelerate leaves "
                            "4-bit weights unsharded", where="model.quantization",
                            fix=f"drop FSDP and launch DDP ({DDP_LAUNCH}): a 4-bit 7-8B base fits one 24 GB "
                                "GPU; or shard a 16-bit base with FSDP")


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (an all-gather), or the tensor itself when it is not sharded."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of a whole `tensor`, laid out as `like` is (no communication: every
    process holds the whole tensor)."""
    if not isinstance(like, DTensor):
        return tensor
    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def rebind_trainable(adapter: Adapter) -> None:
    """Point `adapter.params` at the parameters the model holds now: after accelerate prepares
    the model, FSDP2 ones are new objects, and the old ones are neither trained nor read."""
    adapter.params.update({name: adapter.model.get_parameter(name) for name in adapter.params})


def unshard_trainable(adapter: Adapter) -> None:
    """Put whole trainable parameters back in their modules, in every process.

    After FSDP2 training the export (including methods that run part of the model, as P-tuning's
    prompt encoder) then reads whole weights. The frozen base stays sharded; the model is for
    export only afterwards: FSDP's hooks would gather the old shards on its next forward.
    """
    for name, param in adapter.params.items():
        if isinstance(param, DTensor):
            module_name, _, leaf = name.rpartition(".")
            setattr(adapter.model.get_submodule(module_name), leaf, nn.Parameter(whole(param.detach())))
    rebind_trainable(adapter)
