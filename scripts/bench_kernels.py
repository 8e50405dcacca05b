#!/usr/bin/env python3
"""What peftctl's kernels for the frozen base do to one training step, measured in one process.

A SmolLM2-135M-shaped Llama (random bf16 weights: the shapes are what matter), LoRA r=8 on
q_proj/v_proj with dropout 0.05, 4 packed rows of 256 tokens; each step is forward + backward as
the loop runs it (peftctl.train.loss.CausalLMLoss). Four variants, alternated in order on every
repeat: transformers' eager attention and RMSNorm, LoRA's dropout as nn.Dropout before two
matmuls; + the fused RMSNorm (peftctl/train/fused.py); + the grouped eager attention
(peftctl/train/attention.py); + the dropout inside the fused low-rank update (methods/low_rank.py);
+ norms and gated MLPs recomputed in the backward pass instead of kept
(fused.recomputed). Prints each variant's median step time, its spread, the speed-up over the
first, and the activations it keeps for the backward pass (distinct tensor storages saved by
autograd in one step, counted by saved-tensor hooks: exact, unlike RSS).

    python scripts/bench_kernels.py                 # 3 repeats × 2 steps of each of 4 variants
    python scripts/bench_kernels.py --repeats 6 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from peftctl import methods
from peftctl.methods import lora
from peftctl.methods.lora import LoraConfig
from peftctl.train import attention
from peftctl.train import fused
from peftctl.train.allocator import kept_for_backward
from peftctl.train.loss import CausalLMLoss

ROWS, LENGTH = 4, 256
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
               tie_word_embeddings=True)


def packed_batch() -> dict[str, torch.Tensor]:
    """Two 128-token examples per row (positions restart), prompts of 40 tokens unlabelled."""
    ids = torch.randint(0, SMOLLM2["vocab_size"], (ROWS, LENGTH))
    labels = ids.clone()
    labels[:, :40] = -100
    labels[:, 128:168] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "position_ids": torch.arange(LENGTH).repeat(ROWS, 1) % 128}


def plain_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout) -> torch.Tensor:
    """LoRA's update as plain modules compute it: nn.Dropout on an fp32 copy, two matmuls, autograd."""
    return F.linear(F.linear(dropout(x.to(a.dtype)), a), b) * scaling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and repeat")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(torch.bfloat16)
    adapter = methods.apply(model, LoraConfig(name="lora", r=8, alpha=16, dropout=0.05,
                                              target_modules=["q_proj", "v_proj"]))
    loss_model, batch = CausalLMLoss(model).train(), packed_batch()
    grouped, fused_update = attention.register(), lora.low_rank_update
    variants = {"transformers' eager + RMSNorm": (False, "eager", False, False),
                "+ fused RMSNorm": (True, "eager", False, False), "+ grouped attention": (True, grouped, False, False),
                "+ dropout in the update": (True, grouped, True, False),
                "+ recomputed element-wise": (True, grouped, True, True)}
    swapped: list = []

    def use(norms: bool, kernel: str, dropout_inside: bool, recompute: bool) -> None:
        nonlocal swapped
        fused.unfuse(swapped)
        swapped = fused.fuse_rms_norms(model, recompute) if norms else []
        swapped += fused.recompute_gated_mlps(model) if recompute else []
        model.set_attn_implementation(kernel)
        lora.low_rank_update = fused_update if dropout_inside else plain_update

    def kept_mib() -> float:
        (loss_sum, count), kept = kept_for_backward(lambda: loss_model(**batch), exclude=model.parameters())
        (loss_sum / count).backward()
        for param in adapter.params.values():
            param.grad = None
        return kept / 2**20

    def step() -> float:
        started = time.perf_counter()
        loss_sum, count = loss_model(**batch)
        (loss_sum / count).backward()
        for param in adapter.params.values():
            param.grad = None
        return time.perf_counter() - started

    kept = {}
    for name, variant in variants.items():  # warm-up, off the clock
        use(*variant)
        step()
        kept[name] = kept_mib()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name in (list(variants) if repeat % 2 == 0 else list(variants)[::-1]):
            use(*variants[name])
            times[name] += [step() for _ in range(args.steps)]
    first = statistics.median(next(iter(times.values())))
    print(f"{torch.get_num_threads()} threads, {args.repeats} repeats × {args.steps} steps, {ROWS}×{LENGTH} tokens")
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"{name:32s} median {median:.3f} s [{min(measured):.3f}–{max(measured):.3f}]  "
              f"{first / median:.2f}×  {ROWS * LENGTH / median:.0f} tokens/s  kept {kept[name]:.0f} MiB")


if __name__ == "__main__":
    main()
