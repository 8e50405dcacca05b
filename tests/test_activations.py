"""plan's activation figures (peftctl/plan/activations.py) against what autograd really keeps.

The count is exact: saved-tensor hooks list every storage autograd holds from a training step's
forward pass for its backward pass (allocator.kept_for_backward), on a 3-layer Llama with GQA in
bf16, prepared by peftctl's own prepare_model as the loop prepares it. Tolerance 2.5%: what the
estimate leaves out is per-row (the rotary tables), and a storage two steps share (the grouped
kernel's last output) which it counts twice; a per-layer term wrong by one [tokens, hidden]
tensor would be ~8% off here.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftctl import methods
from peftctl.data.tokenize import Example, TokenizedData, collate
from peftctl.methods.lora import LoraConfig
from peftctl.methods.prompt import PromptTuningConfig
from peftctl.model.loading import transformer_blocks
from peftctl.plan.activations import Kernels, activation_bytes, layer_bytes, adapted_readers
from peftctl.recipe.schema import TrainSpec
from peftctl.train import attention
from peftctl.train.allocator import kept_for_backward
from peftctl.train.loss import CausalLMLoss, HeadCrossEntropy
from peftctl.train.model_setup import prepare_model

ROWS, ROW_LEN, LAYERS = 2, 128, 3
QV, ALL = ["q_proj", "v_proj"], "all-linear"
# Chunk logits exist only while the head's loss runs, never across the step: not a saved tensor.
LOGITS = ROWS * (ROW_LEN - 1) * 1000  # labelled tokens × vocabulary: less than one chunk here
CHUNK = LOGITS * 2 + 3 * min(HeadCrossEntropy.block_rows(1000), ROWS * (ROW_LEN - 1)) * 1000 * 4


def config(layers: int = LAYERS) -> LlamaConfig:
    return LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=layers, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=1000, max_position_embeddings=1024)


def lora(targets, dropout: float = 0.0) -> LoraConfig:
    return LoraConfig(name="lora", r=8, target_modules=targets, dropout=dropout)


def measured(targets, attn: str, checkpointed: bool = False, autocast: bool = False, dropout: float = 0.0,
             layers: int = LAYERS, method=None) -> tuple[int, str]:
    """Bytes kept by one training forward of the tiny Llama as peftctl prepares it; the kernel it ran.
    `method`: another method's config instead of LoRA on `targets`."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(config(layers)).to(torch.bfloat16)
    methods.apply(model, method or lora(targets, dropout))
    loss_model = CausalLMLoss(model)
    g = torch.Generator().manual_seed(1)
    rows = [Example(ids, list(ids)) for ids in torch.randint(3, 999, (ROWS, ROW_LEN), generator=g).tolist()]
    data = TokenizedData(rows, [], 0, False, ROW_LEN)
    prepare_model(model, loss_model, TrainSpec(gradient_checkpointing=checkpointed, attention=attn), data, 0,
                  torch.device("cpu"))
    loss_model.train()
    batch = collate(rows, 0)
    # CPU autocast stands in for a GPU's: LoRA takes the same plain-module path under either.
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with cast:
        (loss_sum, _), kept = kept_for_backward(lambda: loss_model(**batch), exclude=model.parameters())
    loss_sum.backward()
    return kept, model.config._attn_implementation


def planned(targets, kernels: Kernels, dropout: float = 0.0, method=None, row_len: int = ROW_LEN,
            frozen: bool = False) -> float:
    """The plan's figure for the tiny Llama's skeleton; `frozen`: with every weight frozen after the
    method is applied."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config())
    methods.apply(model, method or lora(targets, dropout))
    if frozen:
        model.requires_grad_(False)
    return activation_bytes(model, kernels, ROWS, row_len, ROWS * (ROW_LEN - 1), 2) - CHUNK


@pytest.mark.parametrize("targets", [QV, ALL], ids=["q-v", "all-linear"])
@pytest.mark.parametrize("attn, kernel", [("auto", attention.NAME), ("sdpa", "sdpa"), ("eager", "eager")])
def test_plan_counts_what_a_cpu_step_keeps(targets, attn, kernel):
    kept, ran = measured(targets, attn)
    assert ran == kernel  # auto: peftctl's grouped kernel, as plan assumes for CPU rows up to 512 tokens
    estimate = planned(targets, Kernels(kernel, autocast=False, checkpointed=False))
    assert estimate == pytest.approx(kept, rel=0.025), (estimate, kept)


@pytest.mark.parametrize("targets", [QV, ALL], ids=["q-v", "all-linear"])
def test_plan_counts_what_autocast_keeps_as_on_a_gpu(targets):
    kept, _ = measured(targets, "sdpa", autocast=True)
    estimate = planned(targets, Kernels("sdpa", autocast=True, checkpointed=False))
    assert estimate == pytest.approx(kept, rel=0.025), (estimate, kept)
    # Each adapter keeps its own cast input: more than the shared 16-bit input of the CPU path.
    assert estimate > planned(targets, Kernels("sdpa", autocast=False, checkpointed=False))


def test_plan_counts_lora_dropout_masks():
    kept, _ = measured(QV, "sdpa", dropout=0.1)
    no_dropout = planned(QV, Kernels("sdpa", False, False))
    estimate = planned(QV, Kernels("sdpa", False, False), dropout=0.1)
    assert estimate - no_dropout == LAYERS * 2 * 256 * ROWS * ROW_LEN  # a byte per input value, q and v each
    assert estimate == pytest.approx(kept, rel=0.025), (estimate, kept)


def test_plan_keeps_the_first_norms_input_where_virtual_tokens_train():
    """Under LoRA layer 0's first norm reads the frozen embeddings and keeps nothing; prompt tuning's
    virtual tokens train, so there it keeps its input and 1/rms: h·e + 4 bytes a token more, and
    the plan meets the count (rows 4 virtual tokens longer; the plan is given the longer rows)."""
    prompt = PromptTuningConfig(name="prompt_tuning", num_virtual_tokens=4)
    grouped = Kernels(attention.NAME, autocast=False, checkpointed=False)
    kept, ran = measured(None, "auto", method=prompt)
    assert ran == attention.NAME
    estimate = planned(None, grouped, method=prompt, row_len=ROW_LEN + 4)
    assert estimate == pytest.approx(kept, rel=0.025), (estimate, kept)
    # Nothing trains before the layers: the norm's input is not kept.
    less = planned(None, grouped, method=prompt, row_len=ROW_LEN + 4, frozen=True)
    assert estimate - less == ROWS * (ROW_LEN + 4) * (256 * 2 + 4)


@pytest.mark.parametrize("targets", [QV, ALL], ids=["q-v", "all-linear"])
def test_plan_under_gradient_checkpointing_is_the_layer_inputs_and_one_layer_rebuilt(targets):
    """The forward pass keeps each layer's input (hooks see that much); the backward pass rebuilds one
    layer at a time with the recompute levers off, which a 2- minus a 1-layer model without
    checkpointing but prepared as for it (prepare_model under gradient checkpointing) measures."""
    kernels = Kernels("sdpa", autocast=False, checkpointed=True)
    forward_kept, _ = measured(targets, "sdpa", checkpointed=True)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config())
    methods.apply(skeleton, lora(targets))
    block = transformer_blocks(skeleton)[0]
    rebuilt = layer_bytes(block, skeleton.config, kernels, ROW_LEN, 2, adapted_readers(block), recompute=False)
    assert planned(targets, kernels) - rebuilt * ROWS * ROW_LEN == pytest.approx(forward_kept, rel=0.025)
    one, two = (_unrecomputed(targets, layers) for layers in (1, 2))
    assert rebuilt * ROWS * ROW_LEN == pytest.approx(two - one, rel=0.025)


def _unrecomputed(targets, layers: int) -> int:
    """What a model prepared for gradient checkpointing keeps without checkpointing: one rebuilt layer's."""
    from peftctl.train import model_setup

    enable = model_setup.model_loading.enable_gradient_checkpointing
    model_setup.model_loading.enable_gradient_checkpointing = lambda model: None
    try:
        return measured(targets, "sdpa", checkpointed=True, layers=layers)[0]
    finally:
        model_setup.model_loading.enable_gradient_checkpointing = enable


def test_grouped_eager_keeps_the_probabilities_per_row_length():
    """Korthikanti et al.'s attention-score term: heads × row length values per token, which SDPA
    does not keep (it keeps one fp32 log-sum-exp per head)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config())
    block = transformer_blocks(model)[0]
    grouped, sdpa = (Kernels(kernel, False, False) for kernel in (attention.NAME, "sdpa"))
    per_len = [layer_bytes(block, model.config, grouped, n, 2, [], True) for n in (128, 256)]
    assert per_len[1] - per_len[0] == 8 * 128 * 2
    assert layer_bytes(block, model.config, sdpa, 256, 2, [], True) == layer_bytes(block, model.config, sdpa, 128, 2,
                                                                                   [], True)
