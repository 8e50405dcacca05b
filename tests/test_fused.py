"""peftctl/fused.py: torch's fused RMSNorm kernel replaces a model's own norms only where the two
compute bit-identical outputs and input gradients, on every architecture the contract suite builds."""

from __future__ import annotations

import pytest
import torch

from peftctl import fused
from peftctl.loss import CausalLMLoss
from method_checks import lora_with_random_b
from test_architectures import ARCHITECTURES, build
from tiny_models import token_batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fused_norms_compute_the_same_logits(arch, dtype):
    model = build(arch).to(dtype).requires_grad_(False)  # a method freezes the base first
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


def test_lora_gradients_are_unchanged_on_a_bf16_llama():
    grads = []
    for fuse in (False, True):
        model = build("llama").to(torch.bfloat16)
        adapter = lora_with_random_b(model, ["q_proj", "v_proj"])
        swapped = fused.fuse_rms_norms(model) if fuse else []
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
