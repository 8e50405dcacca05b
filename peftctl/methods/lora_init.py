"""How LoRA's A and B start (peft's `init_lora_weights`), and the LoRA+ learning rates.

  * default: A Kaiming-uniform, B zero (Hu et al.); gaussian: A ~ N(0, (1/r)²), B zero. Both
    leave the model computing what it computed before.
  * PiSSA (Meng et al., 2024) and OLoRA (Büyükakyüz, 2024) start from the base weight's
    principal part instead: PiSSA from its top-r singular triplets (B₀ = U_r·√(S_r/s),
    A₀ = √(S_r/s)·V_rᵀ), OLoRA from the first r columns of a QR factorisation (B₀ = Q_r,
    A₀ = R_r), the maths of peft's `pissa_init` and `olora_init`. That part leaves the base
    weight, W_res = W - s·B₀A₀, so the model still computes W at the start.
After training W_res + s·BA = W + ΔW with ΔW = s·(BA - B₀A₀) = s·[B | -B₀]·[A ; A₀]: a plain
LoRA of rank 2r on the *unmodified* base. That is what peft writes with
`save_pretrained(path_initial_model_for_weight_conversion=...)` and what peftctl exports, so the
adapter is served, merged and shared like any LoRA. A₀ and B₀ stay on each layer as buffers
for that; they are neither trained nor exported as themselves.

LoRA+ (Hayou et al., 2024) is an optimizer setting, not an adapter: B learns `ratio` times the
learning rate of A. peft has it as `peft.optimizers.create_loraplus_optimizer`, which also puts
every 1-D tensor (DoRA's magnitude) in B's group; nothing of it is saved with the adapter.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from peftctl.arch.layers import dense_weight
from peftctl.core.errors import UserError

# Initialisations that move part of the base weight into A and B (the others leave it alone).
BASE_CHANGING = ("pissa", "olora")
# peft's init_lora_weights values that only choose starting values for weights a saved adapter
# then overwrites: any of them loads as a plain LoRA. The base-changing ones are handled apart.
INIT_ONLY = (True, False, None, "eva", "orthogonal", "mica")
CONVERSION_FIX = ("save it from peft as a plain LoRA: model.save_pretrained(out, "
                  "path_initial_model_for_weight_conversion=<the adapter saved before training>)")


@torch.no_grad()
def initialise(layer: nn.Module, init: str, rank: int) -> None:
    """Set a fresh LoRA layer's A and B (for PiSSA / OLoRA also its base weight and A₀, B₀).

    `rank` is r, also for expert weights, whose A stacks r rows per expert (peft's std is 1/r).
    """
    a, b = layer.lora_A.weight, layer.lora_B.weight
    if init in BASE_CHANGING:
        a0, b0 = principal_part(layer, init)
        a.copy_(a0)
        b.copy_(b0)
        # Persistent, so they travel with the model's state where accelerate moves it whole.
        layer.register_buffer("lora_A_initial", a0.clone())
        layer.register_buffer("lora_B_initial", b0.clone())
        return
    if init == "gaussian":
        nn.init.normal_(a, std=1 / rank)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(b)


def principal_part(layer: nn.Module, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀, B₀) from the base weight, which becomes W_res = W - s·B₀A₀ (as peft does it, in fp32).

    On the weightless skeleton (meta device) nothing can be decomposed: shapes only.
    """
    a, b = layer.lora_A.weight, layer.lora_B.weight
    base = layer.base_layer
    if base.weight.device.type == "meta":
        return torch.empty_like(a), torch.empty_like(b)
    r, scaling = a.shape[0], layer.scaling  # a LoraLinear: A has r rows
    weight = dense_weight(base).to(torch.float32)  # [out, in] whatever the layout (GPT-2's Conv1D)
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(s[:r] / scaling)
        a0, b0 = root[:, None] * vh[:r], u[:, :r] * root[None, :]
    else:
        # peft's olora_init decomposes the stored weight, which for GPT-2's Conv1D is [in, out]
        # and gives A, B of the wrong shapes; here it is always the [out, in] weight.
        q, upper = torch.linalg.qr(weight)
        a0, b0 = upper[:r].contiguous(), q[:, :r].contiguous()
    residual = weight - scaling * (b0 @ a0)
    base.weight.copy_((residual.T if layer.fan_in_fan_out else residual).to(base.weight.dtype))
    return a0.to(a.dtype), b0.to(b.dtype)


def exported_state(state: dict[str, torch.Tensor], layers: dict[str, nn.Module], prefix: str) -> dict[str, torch.Tensor]:
    """A PiSSA / OLoRA adapter's weights as the rank-2r LoRA of the unmodified base: [A ; A₀], [B | -B₀]."""
    converted = dict(state)
    for name, layer in layers.items():
        key = prefix + name
        converted[f"{key}.lora_A.weight"] = torch.cat([layer.lora_A.weight, layer.lora_A_initial]).detach()
        converted[f"{key}.lora_B.weight"] = torch.cat([layer.lora_B.weight, -layer.lora_B_initial], dim=1).detach()
    return converted


def exported_rank_options(cfg: Any) -> dict[str, Any]:
    """The adapter_config.json fields that depend on the initialisation: r, lora_alpha and
    init_lora_weights as peft writes them (for PiSSA / OLoRA: its converted rank-2r LoRA, with
    alpha doubled, or times √2 under rsLoRA, so the scale s stays the same)."""
    rank, alpha, extra = cfg.r, cfg.alpha, {}
    if cfg.init in BASE_CHANGING:
        rank, alpha = 2 * cfg.r, cfg.alpha * (math.sqrt(2) if cfg.use_rslora else 2)
        extra = {"init_lora_weights": True}
    elif cfg.init == "gaussian":
        extra = {"init_lora_weights": "gaussian"}
    return {"r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, **extra}


def init_from_peft(peft_config: dict[str, Any], source: str) -> str:
    """The `init` that reproduces what a peft adapter_config.json's init_lora_weights did to the base.

    An unconverted PiSSA / OLoRA adapter was trained on W_res: its initialisation is redone here
    on the base (deterministic, as peft itself does when loading one). Initialisations that
    changed the base in a way that cannot be redone from it are refused.
    """
    value = peft_config.get("init_lora_weights", True)
    if value in INIT_ONLY:
        return "default"
    if value in ("gaussian", "pissa") or (value == "olora" and not peft_config.get("fan_in_fan_out", False)):
        return value
    reason = ("peft's OLoRA on GPT-2's Conv1D layers decomposes their transposed weight"
              if value == "olora" else "it changed the base weights in a way peftctl cannot redo from the base")
    raise UserError(f"adapter option 'init_lora_weights: {value!r}' is not supported by peftctl: {reason}",
                    file=source, where="init_lora_weights",
                    expected="true, 'gaussian', 'pissa', 'olora' (or a converted adapter, which says true)",
                    fix=CONVERSION_FIX)


def loraplus_scales(params: dict[str, nn.Parameter], ratio: float | None) -> dict[str, float]:
    """LoRA+'s multipliers, grouped as peft's create_loraplus_optimizer groups them: every B and
    every 1-D tensor (DoRA's magnitude) learns `ratio` × lr, A learns lr."""
    if ratio is None:
        return {}
    return {name: ratio for name, param in params.items() if "lora_B" in name or param.ndim == 1}
