"""What `all-linear` reaches on mixture-of-experts models (issue 42), on a tiny Qwen2-MoE: its
`mlp.shared_expert_gate` (64 × 1) is skipped, not refused, and said so; the expert tensors it
cannot reach are counted by `validate` and the training header, with a fix that works.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers as T

from peftctl import methods
from peftctl.core.errors import UserError
from peftctl.export.adapter_files import save_adapter
from peftctl.methods.lora import LoraConfig
from peftctl.model.builtins import byte_level_tokenizer
from cli_checks import invoke
from tiny_models import batch_logits, real_difference, token_batch, train_steps

VOCAB = 257  # the byte-level tokenizer's, so that a saved folder also trains through the CLI
GATE = "mlp.shared_expert_gate"


def qwen2_moe_config() -> T.Qwen2MoeConfig:
    return T.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                            shared_expert_intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                            max_position_embeddings=256, bos_token_id=256, eos_token_id=256, pad_token_id=256)


def qwen2_moe() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T.AutoModelForCausalLM.from_config(qwen2_moe_config()).eval()


def test_all_linear_skips_the_gate_narrower_than_r_and_peft_loads_the_export(tmp_path):
    torch.manual_seed(0)
    adapter = methods.apply(qwen2_moe(), LoraConfig(name="lora", r=8))
    assert adapter.skipped == [f"model.layers.{i}.{GATE}" for i in (0, 1)]
    assert not any(GATE in name for name in adapter.params)
    batch = token_batch(VOCAB)
    base = batch_logits(qwen2_moe(), batch)
    train_steps(adapter, batch, steps=3)
    ours = batch_logits(adapter.model, batch)
    assert real_difference(ours, base, batch["attention_mask"]) > 1e-3
    save_adapter(adapter, tmp_path, base_model="qwen2_moe")
    exported = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert "shared_expert_gate" not in exported and "q_proj" in exported
    theirs = peft.PeftModel.from_pretrained(qwen2_moe(), tmp_path).eval()
    torch.testing.assert_close(batch_logits(theirs, batch), ours, atol=1e-5, rtol=0)


def test_a_named_gate_narrower_than_r_is_refused_with_a_fix_that_works():
    with pytest.raises(UserError) as refused:
        methods.apply(qwen2_moe(), LoraConfig(name="lora", r=8, target_modules=["q_proj", "shared_expert_gate"]))
    message = str(refused.value)
    assert "method.r" in message and "leave shared_expert_gate out of target_modules" in message
    # The fix, as written: the list without the gate, or all-linear (which skips it).
    assert methods.apply(qwen2_moe(), LoraConfig(name="lora", r=8, target_modules=["q_proj"])).params
    assert methods.apply(qwen2_moe(), LoraConfig(name="lora", r=1, target_modules=["shared_expert_gate"])).params


def save_folder(folder: Path) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        T.AutoModelForCausalLM.from_config(qwen2_moe_config()).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def recipe(tmp_path: Path, method: dict, model: Path) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) + "\n" for i in range(8)))
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(json.dumps({
        "model": {"name_or_path": str(model), "dtype": "float32"}, "method": method,
        "data": {"train": str(data), "validation": str(data), "format": "alpaca", "max_seq_len": 64},
        "train": {"max_steps": 1, "batch_size": 2, "log_every": 1},
        "output": {"dir": str(tmp_path / "run"), "samples": 0, "report": False}}))
    return path


def test_validate_and_the_training_header_count_the_experts_and_name_the_fix(tmp_path):
    model = save_folder(tmp_path / "qwen2_moe")
    result = invoke("validate", recipe(tmp_path, {"name": "lora", "r": 8}, model))
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    experts = 2 * 4 * (96 * 64 + 64 * 48)  # 2 layers × 4 experts × (gate_up [2·48, 64] + down [64, 48])
    assert f"experts: {experts:,} parameters" in said
    assert "add them to method.target_parameters: [experts.down_proj, experts.gate_up_proj]" in said
    assert f"skipped: 'all-linear' leaves out 2 linear layers narrower than the rank (routers and gates): " \
           f"model.layers.N.{GATE} (64 × 1) ×2" in said

    # The fix, as said: with target_parameters, nothing is left to report.
    fixed = {"name": "lora", "r": 8, "target_parameters": ["experts.down_proj", "experts.gate_up_proj"]}
    result = invoke("validate", recipe(tmp_path, fixed, model))
    assert result.exit_code == 0, result.output
    assert "experts:" not in result.stderr

    # A method without target_parameters points to the one that has it.
    result = invoke("validate", recipe(tmp_path, {"name": "prompt_tuning", "num_virtual_tokens": 4}, model))
    assert "method lora adapts them: name: lora, target_parameters: [experts.down_proj, experts.gate_up_proj]" \
        in " ".join(result.stderr.split())

    result = invoke("train", recipe(tmp_path, {"name": "lora", "r": 8}, model))
    assert result.exit_code == 0, result.output
    assert f"experts: {experts:,} parameters" in " ".join(result.stderr.split())
