"""Tiny models and a few training steps, shared by the tests (no downloads, seconds on a CPU)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftctl.methods import Adapter
from peftctl.model.loading import load_model
from peftctl.recipe.schema import ModelSpec
from peftctl.train.loss import CausalLMLoss

TINY_GPT2 = ModelSpec(name_or_path="builtin:tiny-gpt2", dtype="float32")


def tiny_gpt2() -> torch.nn.Module:
    """peftctl's builtin 2-layer GPT-2 (Conv1D layers), fp32, fixed weights."""
    return load_model(TINY_GPT2)


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama (q/k/v/o, gate/up/down nn.Linear layers, GQA), fp32, fixed weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_llama_config()).eval()


def token_batch(vocab_size: int, batch: int = 2, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tokens with every position labelled and the second row right-padded by 3."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size - 1, (batch, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1:, -3:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_steps(adapter: Adapter, batch: dict[str, torch.Tensor], steps: int = 5, lr: float = 1e-2) -> None:
    """A few AdamW steps on `batch`, so the adapter is no longer at its (often identity) init."""
    loss_model = CausalLMLoss(adapter.model).train()
    optimizer = torch.optim.AdamW(adapter.params.values(), lr=lr)
    for _ in range(steps):
        loss_sum, n = loss_model(**batch)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter.model.eval()


def batch_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for `batch` (input_ids and attention_mask), without autograd."""
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def real_difference(a: torch.Tensor, b: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """The greatest |a - b| over real positions (attention_mask == 1) only. Logits at padded
    positions move with anything that touches the mask (a prompt method widening it, say), so an
    "the adapter changed the model" check that looked at them could pass for an adapter that
    changed nothing."""
    real = attention_mask.bool()
    return float((a - b)[real].abs().max())


def random_lora_b(adapter: Adapter, seed: int = 1, std: float = 0.05) -> None:
    """Random non-zero B matrices (a fresh LoRA's B is zero, and a zero B passes any scale: an
    export check needs B ≠ 0 to see whether the update is scaled right)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.params.items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * std)
