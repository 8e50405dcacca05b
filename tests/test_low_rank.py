"""LoRA's fused update (peftctl/methods/low_rank.py): the same arithmetic as plain autograd through
nn.Dropout and two matmuls, with less kept for the backward pass and a cheaper dropout mask."""

import math

import pytest
import torch

from peftctl.methods import low_rank
from peftctl.methods.lora import LoraConfig, LoraLinear


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_rank_update_matches_plain_autograd(dtype, dropout, monkeypatch):
    """Output and gradients of x, A and B equal plain autograd through (x ⊙ keep)/(1-p) @ Aᵀ @ Bᵀ · s
    in fp32, added to the base's output as peft adds it, given the same mask: equal to 1e-6 without dropout (the same products; s scales the
    r-wide x·Aᵀ: fp32 rounding), to 1e-5 with it (1/(1-p) joins s instead of scaling x), absolute
    errors relative to the largest entry (x's gradient sums base and update terms that cancel).
    Nothing input-sized is kept in fp32 for a 16-bit x."""
    base = torch.nn.Linear(24, 16).to(dtype)
    layer = LoraLinear(base, LoraConfig(name="lora", r=4, alpha=8, dropout=dropout)).train()
    torch.nn.init.normal_(layer.lora_B.weight)  # B ≠ 0: a real update
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    masks = []
    drawing = low_rank.keep_mask
    monkeypatch.setattr(low_rank, "keep_mask", lambda like, p: masks.append(drawing(like, p)) or masks[-1])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert not [t for t in saved if t.shape == x.shape and t.dtype not in (dtype, torch.bool)]
    out.float().square().sum().backward()
    fast = [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None

    xf = x.to(torch.float32)
    if dropout:
        (keep, keep_scale), = masks
        assert 0 < keep.sum() < keep.numel()  # the mask drops some and keeps some
        xf = xf * keep * keep_scale
    else:
        assert not masks
    # peft's order: the fp32 update added to the base's output in fp32, rounded to x's dtype once.
    expected = (base(x) + (xf @ layer.lora_A.weight.T) @ layer.lora_B.weight.T * layer.scaling).to(dtype)
    expected.float().square().sum().backward()
    tolerance = 1e-5 if dropout else 1e-6
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    for got, want in zip(fast, (x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item())


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_the_mask_drops_p_of_the_elements_and_keeps_the_expectation(p):
    """Over 4M draws the dropped fraction is p within 5 standard deviations (p itself rounded to
    1/65536), and the kept values' scale is 1/(1-p) for that rounded p, so E[x ⊙ keep · scale] = x."""
    torch.manual_seed(0)
    keep, scale = low_rank.keep_mask(torch.empty(2000, 2000), p)
    assert keep.dtype == torch.bool and keep.shape == (2000, 2000)
    rounded = round(p * 65536) / 65536
    assert abs(rounded - p) <= 0.5 / 65536 and scale == pytest.approx(1 / (1 - rounded), rel=1e-12)
    dropped = 1 - keep.float().mean().item()
    assert abs(dropped - rounded) < 5 * math.sqrt(p * (1 - p) / keep.numel())
    # Every 16-bit lane of the random words is used: the four columns a word fills drop alike.
    lanes = (~keep).reshape(-1, 4).float().mean(0)
    assert (lanes - rounded).abs().max() < 5 * math.sqrt(p * (1 - p) / (keep.numel() / 4))


def test_the_mask_follows_torch_seed_and_odd_sizes():
    torch.manual_seed(3)
    first, _ = low_rank.keep_mask(torch.empty(7, 13), 0.5)
    torch.manual_seed(3)
    again, _ = low_rank.keep_mask(torch.empty(7, 13), 0.5)
    different, _ = low_rank.keep_mask(torch.empty(7, 13), 0.5)
    assert torch.equal(first, again) and not torch.equal(first, different)


def test_no_dropout_in_eval_mode():
    """An eval-mode layer with dropout computes the plain update: equal to a dropout-free layer's."""
    base = torch.nn.Linear(24, 16)
    dropping = LoraLinear(base, LoraConfig(name="lora", r=4, alpha=8, dropout=0.5)).eval()
    torch.nn.init.normal_(dropping.lora_B.weight)
    plain = LoraLinear(base, LoraConfig(name="lora", r=4, alpha=8)).eval()
    plain.load_state_dict(dropping.state_dict())
    x = torch.randn(2, 24)
    assert torch.equal(dropping(x), plain(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_masking_by_bits_equals_where(dtype):
    """low_rank._kept masks by a bitwise AND: the values torch.where gives, -0, inf and NaN included."""
    from peftctl.methods.low_rank import _kept

    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, :4] = torch.tensor([-0.0, float("inf"), float("-inf"), float("nan")], dtype=dtype)
    keep = torch.rand(64, 33, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[0, :4] = True
    for tensor in (x, x.t()):  # also a non-contiguous view
        mask = keep if tensor is x else keep.t()
        ours, where = _kept(tensor, mask), torch.where(mask, tensor, 0)
        assert ours.dtype == dtype and ours.shape == tensor.shape
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        assert torch.equal(ours.view(bits), where.view(bits))  # bit for bit
