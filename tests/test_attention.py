"""peftctl/train/attention.py: the grouped eager kernel gives transformers' eager logits bit for bit where
`train.attention: auto` picks it, and gradients within rounding; models it does not cover keep eager."""

from __future__ import annotations

import pytest
import torch

from peftctl.train import attention
from peftctl.train.loss import CausalLMLoss
from method_checks import lora_with_random_b
from test_architectures import ARCHITECTURES, build
from tiny_models import token_batch


def logits(model, kernel: str, batch) -> torch.Tensor:
    model.set_attn_implementation(kernel)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_grouped_kernel_equals_eager_or_is_not_used(arch, dtype):
    model = build(arch).to(dtype)
    batch = token_batch(128)
    eager = logits(model, "eager", batch)
    try:
        grouped = logits(model, attention.register(), batch)
    except Exception:  # noqa: BLE001 - a model the kernel cannot take: prepare keeps eager there
        return
    same = torch.equal(eager, grouped)
    if arch in ("llama", "qwen2", "qwen3", "mistral", "olmo2", "granite", "mixtral", "qwen3_moe", "phi3"):
        assert same, (eager - grouped).abs().max()


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_lora_gradients_agree_with_eager(dtype, atol):
    grads = []
    for kernel in ("eager", attention.register()):
        model = build("llama").to(dtype)
        adapter = lora_with_random_b(model, ["q_proj", "v_proj"])
        model.set_attn_implementation(kernel)
        loss_sum, count = CausalLMLoss(model).train()(**token_batch(128))
        (loss_sum / count).backward()
        grads.append({name: p.grad.float() for name, p in adapter.params.items()})
    for name, grad in grads[0].items():
        scale = grad.abs().max()
        assert scale > 0 and (grads[1][name] - grad).abs().max() <= atol * max(1.0, float(scale)), name


def test_auto_picks_the_grouped_kernel_on_llama_and_keeps_eager_on_gemma2(tmp_path):
    from peftctl.data.tokenize import Example, TokenizedData
    from peftctl.train.attention_choice import grouped_if_same

    rows = [Example(list(range(3, 40)), [-100] * 10 + list(range(13, 40)))]
    data = TokenizedData(train=rows, validation=[], dropped=0, packing=False, max_seq_len=64)
    for arch, expected in (("llama", attention.NAME), ("gemma2", "eager")):
        model = build(arch).to(torch.bfloat16)
        model.set_attn_implementation("eager")
        assert grouped_if_same(model, CausalLMLoss(model), data, 0, torch.device("cpu")) == expected
        assert model.config._attn_implementation == "eager"  # the probe leaves the model as it was
