"""Model FLOPs and the matmul rates MFU is measured against, for scripts/bench_train.py."""

from __future__ import annotations

import time


def matmul_peak(shapes: list[tuple[int, int]], tokens: int, dtype_name: str, seconds: float = 1.0) -> dict:
    """FLOP/s of F.linear([tokens, in] × [in, out]) in `dtype_name` for each of the model's shapes."""
    import torch
    import torch.nn.functional as F

    dtype, rates = getattr(torch, dtype_name), {}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the contenders trained
    for fan_in, fan_out in sorted(set(shapes)):
        x, w = (torch.randn(*shape, device=device).to(dtype) for shape in ((tokens, fan_in), (fan_out, fan_in)))
        for _ in range(3):
            F.linear(x, w)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(10):
                F.linear(x, w)
            n += 10
            if device == "cuda":
                torch.cuda.synchronize()
        rates[f"{tokens}x{fan_in}x{fan_out}"] = 2 * tokens * fan_in * fan_out * n / (time.perf_counter() - start)
    return rates


def matmuls_alone(shapes: list[tuple[int, int]], tokens: int, dtype_name: str, repeats: int = 3) -> float:
    """FLOP/s of a training step's frozen-base matmuls run alone, as the model runs them: one weight
    of its own per layer and projection (`shapes` lists every one), forward x·Wᵀ layer by layer,
    then the backward's input gradients g·W in reverse. Unlike `matmul_peak`, which repeats one
    matmul on one weight that stays in the core's cache, each weight here comes from memory as in
    training: the most a step of this model at this size reaches if nothing but its matmuls ran."""
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = [torch.randn(fan_out, fan_in, device=device).to(dtype) for fan_in, fan_out in shapes]
    inputs = {n: torch.randn(tokens, n, device=device).to(dtype) for shape in shapes for n in shape}

    def step() -> float:
        start = time.perf_counter()
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
        for w in reversed(weights):
            inputs[w.shape[0]] @ w
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()  # warm-up: the kernels' first calls
    return 4 * tokens * sum(fan_in * fan_out for fan_in, fan_out in shapes) / min(step() for _ in range(repeats))


def flops_per_token(shapes: dict, r: int) -> dict[str, int]:
    """Model FLOPs: per real token through the decoder (frozen base, LoRA), per position through the head."""
    base = 4 * sum(fan_in * fan_out for fan_in, fan_out in shapes["decoder"])
    lora = 6 * r * sum(fan_in + fan_out for fan_in, fan_out in shapes["lora"])
    fan_in, fan_out = shapes["head"]
    return {"decoder": base + lora, "head": 4 * fan_in * fan_out}
