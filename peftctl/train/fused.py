"""Faster kernels for layers of the frozen base, used only where they compute the same thing.

transformers' RMSNorm (Llama and the families that copy it) upcasts to fp32, squares, takes the
mean and the reciprocal square root, normalizes, casts back and multiplies by its weight in the
input's dtype; autograd keeps the fp32 copy of the input (twice the bf16 input) and runs a dozen
element-wise kernels backward. `RMSNorm` computes the same: torch's fused kernel normalizes (fp32
inside for 16-bit inputs, the same single rounding), the weight multiplies in the input's dtype,
and the backward pass is autograd's own formula through those ops, in the same order, from the
16-bit input and the [tokens, 1] reciprocal RMS, which is all it keeps. Norms that multiply by
their weight before casting back (OLMo2's) take torch's `F.rms_norm` instead, which does that.

Architectures differ (Gemma scales by 1 + w, some norms upcast the weight too), so each norm
class is probed before it is swapped: its own forward and each candidate on a random input of its
width, with its own weights, must give bit-identical outputs and input gradients, else that class
keeps its own. Norms whose weight trains keep theirs too (the weight's gradient is not computed here).

Element-wise work between the frozen matmuls also keeps more for the backward pass than it needs:
torch's `F.rms_norm` keeps an fp32 copy of its input (twice the bf16 input), a gated MLP keeps the gate,
the up projection and the activated gate (three [tokens, intermediate] tensors). `recomputed`
keeps only the inputs and runs the same kernels again in the backward pass: bit-identical
results. Not used under gradient checkpointing, where the whole layer is recomputed anyway.
(Attention's probabilities, recomputed the same way, saved another ~20 MiB of a SmolLM2 step's
peak RSS for ~7% more step time: they are kept.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def recomputed(fn):
    """`fn`, keeping only its inputs for the backward pass, which runs `fn` again to get its gradients.

    `fn` must be deterministic (no dropout: the RNG state is not replayed)."""

    def run(*args):
        if not torch.is_grad_enabled():
            return fn(*args)
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)

    return run


def fuse_rms_norms(model: nn.Module, recompute: bool = False) -> list[nn.Module]:
    """Give every RMSNorm of `model` the first of `RMSNorm` and `F.rms_norm` (which `recompute`s in
    the backward pass, see `recomputed`) that matches its class exactly; the changed modules."""
    verdicts: dict[type, object] = {}
    swapped = []
    for module in model.modules():
        if "forward" in vars(module) or _epsilon(module) is None:  # swapped already, or not an RMSNorm
            continue
        if module.weight.requires_grad or module.weight.device.type == "meta":
            continue
        kind = type(module)
        if kind not in verdicts:
            verdicts[kind] = next((make for make in (_own_order_forward, _fused_forward)
                                   if _same_as_own(module, make(module, True), width=module.weight.shape[0])), None)
        if verdicts[kind]:
            module.forward = verdicts[kind](module, recompute)
            swapped.append(module)
    return swapped


class RMSNorm(torch.autograd.Function):
    """w · (x / rms(x)) with the normalized x rounded to x's dtype first (transformers' Llama order);
    the backward pass is autograd's through transformers' ops, from x and 1/rms alone."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        normed, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], None, eps)
        ctx.save_for_backward(x, rstd, weight)
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        grad_normed = (grad * weight).to(x.dtype).float()  # through `weight *`, then the cast down
        xf = x.to(torch.float32, copy=True)  # written over below: never the saved x itself (fp32 x)
        # x·rstd: d/drstd sums over the row; rsqrt(var + eps): -0.5·rstd³; mean(x²): 2x/n.
        grad_var = (-0.5 * (grad_normed * xf).sum(-1, keepdim=True)) * rstd.pow(3)
        # grad_normed·rstd + (2·grad_var/n)·x, the same products and sum as out of place, written
        # over the two fp32 tensors: each new [tokens, h] fp32 tensor is a fresh allocation (over
        # glibc's mmap threshold at a few hundred tokens), so this ran in ~0.6 of the time.
        # (g/n)·(2x) as (2g/n)·x: scaling by 2 is exact, so the same bits without a [tokens, h] pass.
        grad_x = grad_normed.mul_(rstd).add_(xf.mul_(grad_var / x.shape[-1] * 2))
        return grad_x.to(x.dtype), None, None


def recompute_gated_mlps(model: nn.Module) -> list[nn.Module]:
    """Let every gated MLP (`down_proj(act_fn(gate_proj(x)) * up_proj(x))`, Llama's and the families
    that copy it) keep only the gate and up projections for the backward pass; the changed modules.

    Each class is probed first: its own forward and the recomputing one (`SiluGate` for SiLU,
    `recomputed` for any other activation) must give bit-identical outputs and input gradients on
    a random input, else the class keeps its own."""
    verdicts: dict[type, object] = {}  # per class: the gate maker that matched, or None
    swapped = []
    for module in model.modules():
        if "forward" in vars(module) or not all(isinstance(getattr(module, name, None), nn.Module)
                                                 for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        kind = type(module)
        if kind not in verdicts:
            verdicts[kind] = next((gate for gate in (_silu_gate, _recomputed_gate) if _same_as_own(
                module, _gated_forward(module, gate), width=_in_features(module.gate_proj))), None)
        if verdicts[kind]:
            module.forward = _gated_forward(module, verdicts[kind])
            swapped.append(module)
    return swapped


def unfuse(modules: list[nn.Module]) -> None:
    for module in modules:
        del module.forward  # the instance attribute: the class's own forward again


def _epsilon(module: nn.Module) -> float | None:
    """The epsilon of an RMSNorm-like module (a 1-D weight, no bias), or None for any other module."""
    if "RMSNorm" not in type(module).__name__:
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or getattr(module, "bias", None) is not None:
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def _own_order_forward(module: nn.Module, recompute: bool = False):
    """`module`'s forward through `RMSNorm` (which keeps only x and 1/rms: `recompute` is moot)."""
    eps = _epsilon(module)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return RMSNorm.apply(hidden, module.weight, eps)

    return forward


def _fused_forward(module: nn.Module, recompute: bool = False):
    """`module`'s forward through F.rms_norm, its width and epsilon read once, not on every call."""
    shape, eps = (module.weight.shape[0],), _epsilon(module)
    norm = recomputed(F.rms_norm) if recompute else F.rms_norm

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return norm(hidden, shape, module.weight, eps)

    return forward


def _gated_forward(module: nn.Module, make_gate):
    gate = make_gate(module)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return module.down_proj(gate(module.gate_proj(hidden), module.up_proj(hidden)))

    return forward


def _recomputed_gate(module: nn.Module):
    return recomputed(lambda gated, up: module.act_fn(gated) * up)


def _silu_gate(module: nn.Module):
    """SiluGate where the two projections agree in dtype (a probe checks it is the module's act_fn)."""
    plain = _recomputed_gate(module)
    return lambda gated, up: SiluGate.apply(gated, up) if gated.dtype == up.dtype else plain(gated, up)


class SiluGate(torch.autograd.Function):
    """silu(gate) · up, keeping gate and up, the same kernels in the same order as `recomputed`
    around `silu(gate) * up` with autograd's backward, so the same bits; but each step writes three
    fresh [tokens, intermediate] tensors per layer instead of seven (the recomputed forward's two,
    each product's gradient, silu's gradient): the gradients go into buffers made for them. Fresh
    tensors of a megabyte or more are new mappings (allocator.release_freed_memory), each page faulted
    in on first write: a bf16 [576, 1536] product took 0.55 ms that way against 0.12 ms in reused memory."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = grad * up  # d/d silu(gate), then through silu in place
            torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        if ctx.needs_input_grad[1]:
            grad_up = F.silu(gate).mul_(grad)  # silu(gate)·grad: the product autograd forms, commuted
        return grad_gate, grad_up


def _in_features(linear: nn.Module) -> int | None:
    """The input width of a linear layer, also when a method wraps it (its `base_layer`)."""
    return next((m.in_features for m in linear.modules() if isinstance(getattr(m, "in_features", None), int)), None)


@torch.enable_grad()
def _same_as_own(module: nn.Module, replacement, width: int | None) -> bool:
    """Whether `replacement` gives `module`'s own outputs and input gradients, bit for bit."""
    # The frozen base's dtype is the activations' (an adapter's fp32 weights may come first).
    weight = next((p for p in module.parameters() if p.is_floating_point() and not p.requires_grad), None)
    if width is None or weight is None or weight.device.type == "meta":
        return False
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(8, width, generator=generator).to(device=weight.device, dtype=weight.dtype)
    results, training = [], module.training
    module.eval()  # an adapter's dropout inside the module would make the two differ by chance
    try:
        for forward in (module.forward, replacement):
            x = probe.clone().requires_grad_(True)
            try:
                out = forward(x)
            except Exception:  # a module with another signature: keep its own
                return False
            (grad,) = torch.autograd.grad(out.float().square().sum(), x)
            results.append((out, grad))
    finally:
        module.train(training)
    (ours, our_grad), (fused, fused_grad) = results
    return ours.dtype == fused.dtype and torch.equal(ours, fused) and torch.equal(our_grad, fused_grad)
