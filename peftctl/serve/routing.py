"""One forward pass, each row with its own adapter: the layers adapters replace, routed per row.

Every adapter is applied to its own *view* of the base (pool.py): a copy of the module tree that
shares every weight tensor with the base, so the base is in memory once. For the methods that
replace layers (every `WrappingMethod`: the LoRA family, DoRA, IA3, BitFit, bottleneck adapters,
LoHa, LoKr, OFT, VeRA, AdaLoRA, Compacter), the serving model puts a `RowRouter` where any adapter
replaced a layer. The router holds the base's layer and each adapter's replacement by slot; a
forward reads which slot each row uses from the shared `RowSlots` and computes each row with its
own layer. A batch whose rows all use one slot calls that layer on the whole batch: exactly the
computation of that adapter's view alone.

Methods that change what the decoder is fed (prompt, P- and prefix tuning put virtual tokens or a
prefilled cache in front of every sequence) cannot share a batch this way; the engine runs their
requests on their own view, one sequence per forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from peftctl.methods.base import Adapter, WrappingMethod
from peftctl.methods.lora import LoraLinear
from peftctl.methods.low_rank import add_update, low_rank_update


class RowSlots:
    """Which slot (0: the base, else an adapter) each row of the current batch uses, as the
    groups of rows per slot, computed once per forward and read by every router."""

    def __init__(self) -> None:
        self.groups: list[tuple[int, torch.Tensor]] = []
        self.single: int | None = 0  # the one slot every row uses, or None for a mixed batch

    @contextmanager
    def rows(self, slots: list[int], device: torch.device) -> Iterator[None]:
        """Route the forward passes inside to `slots` (one per batch row)."""
        distinct = sorted(set(slots))
        self.single = distinct[0] if len(distinct) == 1 else None
        self.groups = [] if self.single is not None else [
            (slot, torch.tensor([i for i, s in enumerate(slots) if s == slot], device=device)) for slot in distinct]
        try:
            yield
        finally:
            self.groups, self.single = [], 0


class RowRouter(nn.Module):
    """The base's layer plus, by slot, the layers adapters replaced it with (each wrapping its own
    view's copy of the same weights). Slots without a layer here compute the base's."""

    def __init__(self, base_layer: nn.Module, slots: RowSlots):
        super().__init__()
        self.base_layer = base_layer
        self.adapted = nn.ModuleDict()
        self._slots = slots

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        slots = self._slots
        if slots.single is not None:
            return self.layer(slots.single)(x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        for slot, rows in slots.groups:
            layer = self.adapted[str(slot)] if str(slot) in self.adapted else None
            if layer is None:
                continue
            mine = x.index_select(0, rows)
            if _plain_lora(layer, x):
                # The base's output for these rows is already there: add the low-rank update as
                # LoraLinear.forward adds it, instead of running the base layer on them again.
                update = low_rank_update(mine, layer.lora_A.weight, layer.lora_B.weight, layer.scaling, layer.dropout)
                out = out.index_copy(0, rows, add_update(out.index_select(0, rows), update))
            else:
                out = out.index_copy(0, rows, layer(mine, *args, **kwargs).to(out.dtype))
        return out

    def layer(self, slot: int) -> nn.Module:
        return self.adapted[str(slot)] if str(slot) in self.adapted else self.base_layer


def _plain_lora(layer: nn.Module, x: torch.Tensor) -> bool:
    """A LoRA layer whose forward is base(x) + low_rank_update(x) (not DoRA, not under autocast)."""
    return (type(layer) is LoraLinear and layer.lora_magnitude_vector is None
            and not torch.is_autocast_enabled(x.device.type))


def batchable_refusal(adapter: Adapter) -> str | None:
    """Why an adapter's rows cannot share a batch with others (None: they can)."""
    if not isinstance(adapter.method, WrappingMethod):
        return f"{adapter.method.name} feeds every sequence virtual tokens or a prefilled cache"
    if getattr(adapter.applied, "experts", None):
        return "LoRA on expert parameters computes all rows' tokens in one flattened matmul"
    return None


def install(model: nn.Module, slots: RowSlots, slot: int, adapter: Adapter) -> None:
    """Route `slot`'s rows of `model` (the serving copy of the base) through the layers `adapter`
    replaced in its view."""
    for name in adapter.applied.targets:
        current = model.get_submodule(name)
        if not isinstance(current, RowRouter):
            current = RowRouter(current, slots)
            model.set_submodule(name, current)
        current.adapted[str(slot)] = adapter.model.get_submodule(name)


def uninstall(model: nn.Module, slot: int) -> None:
    """Take `slot`'s layers out of every router; a router left with none becomes its base layer again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RowRouter):
            if str(slot) in module.adapted:
                del module.adapted[str(slot)]
            if not len(module.adapted):
                model.set_submodule(name, module.base_layer)
