"""peftctl/train/fused.py: peftctl's RMSNorm (or torch's F.rms_norm) replaces a model's own norms, and gated
MLPs recompute their activation in the backward pass, only where the two compute bit-identical
outputs and input gradients, on every architecture the contract suite builds. Norm weights are
drawn at random first: a model built from its config has norms of ones, which hide the order in
which a norm multiplies by its weight and casts (a real checkpoint's do not)."""

from __future__ import annotations

import pytest
import torch

from peftctl.train import fused
from peftctl.train.loss import CausalLMLoss
from method_checks import lora_with_random_b
from test_architectures import ARCHITECTURES, build
from tiny_models import token_batch


def with_trained_norms(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every norm weight drawn from U(0.5, 1.5) (or, for Gemma's 1 + w, U(-0.5, 0.5))."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), torch.Tensor):
                drawn = torch.rand(module.weight.shape, generator=generator)
                module.weight.copy_(drawn - 0.5 if "gemma" in type(module).__module__ else drawn + 0.5)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fused_norms_compute_the_same_logits(arch, dtype):
    model = with_trained_norms(build(arch)).to(dtype).requires_grad_(False)  # a method freezes the base first
    batch = token_batch(128)
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    swapped = fused.fuse_rms_norms(model)
    with torch.no_grad():
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(before, after)
    rms_norms = {type(m).__name__ for m in model.modules() if "RMSNorm" in type(m).__name__}
    if arch in ("gemma2", "gemma3"):  # their norms scale by 1 + w: the probe keeps them
        assert not swapped and rms_norms
    elif rms_norms:
        assert {type(m).__name__ for m in swapped} == rms_norms
    fused.unfuse(swapped)
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_recomputed_mlps_compute_the_same_logits_and_gradients(arch, dtype):
    results = []
    for recompute in (False, True):
        model = build(arch).to(dtype)
        adapter = lora_with_random_b(model, "all-linear")
        swapped = fused.recompute_gated_mlps(model) if recompute else []
        loss_sum, count = CausalLMLoss(model).train()(**token_batch(128))
        (loss_sum / count).backward()
        results.append((loss_sum.detach(), {name: p.grad for name, p in adapter.params.items()}, swapped))
    (loss, grads, _), (loss_recomputed, grads_recomputed, swapped) = results
    assert torch.equal(loss, loss_recomputed)
    assert grads.keys() == grads_recomputed.keys() and all(torch.equal(grads[n], grads_recomputed[n]) for n in grads)
    gated = {type(m).__name__ for m in swapped}
    if arch in ("llama", "mistral", "qwen2"):  # down_proj(act(gate_proj(x)) * up_proj(x))
        assert len(gated) == 1 and len(swapped) == model.config.num_hidden_layers
    fused.unfuse(swapped)
    assert not any("forward" in vars(m) for m in model.modules())


def _backward_nodes(output: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("arch, silu", [("llama", True), ("gemma2", False)])
def test_silu_mlps_take_the_silu_gate_and_others_the_recomputed_one(arch, silu):
    """SiLU gated MLPs get SiluGate (its gradients in buffers of their own); Gemma's GELU the generic
    recomputation; both are held to the same bits by the test above."""
    model = build(arch).to(torch.bfloat16)
    lora_with_random_b(model, "all-linear")
    assert fused.recompute_gated_mlps(model)
    mlp = next(m for m in model.modules() if "forward" in vars(m))
    hidden = torch.randn(2, 8, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    nodes = _backward_nodes(mlp(hidden))
    assert ("SiluGateBackward" in nodes) is silu
    assert ("GeluBackward0" in nodes) is not silu  # Gemma's activation, under autograd (recomputed)


def test_recomputing_keeps_less_for_the_backward_pass():
    """peftctl's RMSNorm keeps the bf16 input and 1/rms either way; recomputing gated MLPs drops the
    activated gate, [tokens, intermediate] per layer, exactly."""
    kept = []
    for recompute in (False, True):
        model = with_trained_norms(build("llama")).to(torch.bfloat16)
        lora_with_random_b(model, ["q_proj", "v_proj"])
        fused.fuse_rms_norms(model, recompute)
        if recompute:
            fused.recompute_gated_mlps(model)
        storages = {}

        def keep(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            CausalLMLoss(model).train()(**token_batch(128))
        frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept.append(sum(size for ptr, size in storages.items() if ptr not in frozen))
    config, tokens = model.config, token_batch(128)["input_ids"].numel()
    assert kept[0] - kept[1] == config.num_hidden_layers * tokens * config.intermediate_size * 2


def test_a_gated_mlp_that_computes_otherwise_keeps_its_own_forward():
    model = build("llama").to(torch.bfloat16).requires_grad_(False)
    mlp = model.model.layers[0].mlp

    def scaled(hidden):  # an MLP class whose forward is not down(act(gate(x)) * up(x))
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(hidden)) * mlp.up_proj(hidden) * 2)

    type(mlp).forward, own = (lambda self, hidden: scaled(hidden)), type(mlp).forward
    try:
        assert fused.recompute_gated_mlps(model) == []
    finally:
        type(mlp).forward = own


def test_lora_gradients_are_unchanged_on_a_bf16_llama():
    grads = []
    for fuse in (False, True):
        model = with_trained_norms(build("llama")).to(torch.bfloat16)
        adapter = lora_with_random_b(model, ["q_proj", "v_proj"])
        swapped = fused.fuse_rms_norms(model, recompute=True) if fuse else []
        assert bool(swapped) == fuse
        loss_sum, count = CausalLMLoss(model).train()(**token_batch(128))
        (loss_sum / count).backward()
        grads.append({name: p.grad for name, p in adapter.params.items()})
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0])


def test_a_trainable_norm_keeps_its_own_kernel():
    model = build("llama").to(torch.bfloat16).requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)  # the fused kernel rounds the weight's gradient differently
    swapped = fused.fuse_rms_norms(model)
    assert model.model.norm not in swapped and len(swapped) == 4


def test_a_norm_keeps_its_16_bit_input_and_the_reciprocal_rms():
    """What peftctl's RMSNorm holds for the backward pass: x as it came and a [tokens, 1] fp32 1/rms,
    where transformers' own keeps an fp32 copy of x; and on the real model's norm arithmetic
    (weights not ones) it is the one the probe picks."""
    model = with_trained_norms(build("llama")).to(torch.bfloat16).requires_grad_(False)
    norm = model.model.norm
    assert norm in fused.fuse_rms_norms(model)
    assert norm.forward.__qualname__.startswith("_own_order_forward")
    x = torch.randn(3, 7, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x)
    assert sorted((tuple(t.shape), t.dtype) for t in saved if t is not norm.weight) == [
        ((3, 7, 1), torch.float32), (tuple(x.shape), torch.bfloat16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_norms_backward_leaves_its_input_as_it_was(dtype):
    """The backward pass writes over its fp32 temporaries: never over the input it saved, which in
    fp32 is the same tensor as its fp32 view (the residual stream's hidden state in a model)."""
    model = with_trained_norms(build("llama")).to(dtype).requires_grad_(False)
    norm = model.model.norm
    assert norm in fused.fuse_rms_norms(model)
    x = torch.randn(3, 7, model.config.hidden_size, dtype=dtype, requires_grad=True)
    before = x.detach().clone()
    norm(x).backward(torch.randn(3, 7, model.config.hidden_size, dtype=dtype))
    assert torch.equal(x.detach(), before) and x.grad is not None
