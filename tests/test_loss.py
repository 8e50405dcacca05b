"""peftctl/train/loss.py's HeadCrossEntropy: the summed cross-entropy of hidden @ Wᵀ as plain autograd
computes it, with the logits computed a chunk at a time and only the last chunk's kept for the
backward pass (the others recomputed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftctl.train.loss import HeadCrossEntropy


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_equal_plain_cross_entropy(chunks, dtype, monkeypatch):
    """Loss to 1e-5 relative (fp32 log-softmax either way; blocks sum in another order) and the
    hidden states' gradient to fp32 rounding (bf16: within a bf16 ulp of the largest entry). Output-
    layer matmuls: one per chunk forward, one per chunk but the last backward. A second backward
    (retain_graph) gives the same gradient: the kept logits, overwritten by the first, are recomputed."""
    vocab, rows = 300, 40
    monkeypatch.setattr(HeadCrossEntropy, "CHUNK_VALUES", vocab * -(-rows // chunks))
    monkeypatch.setattr(HeadCrossEntropy, "BLOCK_VALUES", vocab * 4)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, 32, generator=g).to(dtype)
    hidden = torch.randn(rows, 32, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)

    calls = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: calls.append(1) or linear(*a))
    loss = HeadCrossEntropy.apply(hidden, weight, targets)
    forward_calls = len(calls)
    (grad,) = torch.autograd.grad(loss * 0.5, hidden, retain_graph=True)
    assert (forward_calls, len(calls) - forward_calls) == (chunks, chunks - 1)
    (again,) = torch.autograd.grad(loss * 0.5, hidden)
    assert torch.equal(grad, again)
    monkeypatch.setattr(F, "linear", linear)

    plain_hidden = hidden.detach().clone().requires_grad_()
    plain = F.cross_entropy(F.linear(plain_hidden, weight).float(), targets, reduction="sum")
    (plain_grad,) = torch.autograd.grad(plain * 0.5, plain_hidden)
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=0)
    scale = plain_grad.abs().max().item()
    tolerance = 1e-6 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(grad.float(), plain_grad.float(), rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize(("threads", "rows"), [(1, 5), (2, 4), (3, 3), (8, 8)])
def test_element_wise_blocks_give_every_thread_whole_rows(threads, rows, monkeypatch):
    """SmolLM2's vocabulary: 1 MiB of fp32 logits is 5 rows; blocks hold a multiple of the threads
    (torch's softmax splits a block by rows), at least one row each."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert HeadCrossEntropy.block_rows(49152) == rows
