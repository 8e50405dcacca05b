"""Checks shared by the method tests: a recipe's smoke run, and base models with non-zero biases."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from peftctl.methods import METHODS
from peftctl.recipe.load import load_recipe
from peftctl.run import pipeline

ROOT = Path(__file__).resolve().parent.parent
# Every registered method's examples (Method.examples), by label, with the method's name: the
# cross-method tests run these, so a method is covered everywhere by registering it.
EXAMPLES: dict[str, dict] = {label: {"name": method.name, **options}
                             for method in METHODS.values() for label, options in method.examples.items()}


def example_config(label: str, **overrides):
    """The recipe options of example `label` (with `overrides`), as the method's config."""
    options = {**EXAMPLES[label], **overrides}
    return METHODS[options["name"]].Config(**options)


# Methods the installed peft cannot load on GPT-2, whose linear layers are Conv1D: its OFT and
# LyCORIS (LoHa, LoKr) layers take torch's nn.Linear only. peftctl trains, reloads and merges them.
PEFT_REFUSES_CONV1D = {"oft", "loha", "lokr"}

# The tiny Llamas have no biases: BitFit's example needs its answer to that.
LLAMA_OVERRIDES = {"bitfit": {"create_missing_biases": True}}


def on_llama(label: str):
    """Example `label`'s options for a bias-free Llama."""
    return example_config(label, **LLAMA_OVERRIDES.get(label, {}))


def examples_where(keep) -> list[str]:
    """The example labels whose method passes `keep(method)`."""
    return [label for label, options in EXAMPLES.items() if keep(METHODS[options["name"]])]


def assert_smoke_run(recipe: str, tmp_path: Path, overrides: list[str] = (), check_loss: bool = True,
                     peft_loads: bool = False) -> pipeline.RunSummary:
    """Train `recipe` (relative to the repository) into `tmp_path`; the last logged training loss
    must be below the first, and the adapter folder must be complete (and load in peft, if asked)."""
    summary = pipeline.run(load_recipe(ROOT / recipe, list(overrides), output_dir=tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses, "no training loss was logged"
    if check_loss:
        assert len(losses) >= 2 and losses[-1] < losses[0], losses
    adapter_dir = summary.adapter_dir
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    if peft_loads:
        import peft

        from peftctl.model.loading import load_model

        peft.PeftModel.from_pretrained(load_model(load_recipe(ROOT / recipe).model), adapter_dir)
    return summary


def assert_peft_save_loads(reference, fresh: nn.Module, folder: Path, batch: dict | None = None,
                           atol: float = 1e-5, non_trivial: float = 1e-3) -> None:
    """peft's adapter `reference` (made non-trivial), saved to `folder` and loaded by peftctl onto
    the base `fresh`, gives peft's logits (atol, fp32) and not the base's."""
    from peftctl.export.adapter_files import load_adapter
    from tiny_models import batch_logits, real_difference, token_batch

    batch = batch if batch is not None else token_batch(reference.config.vocab_size)
    theirs = batch_logits(reference, batch)
    reference.save_pretrained(folder)
    assert real_difference(theirs, batch_logits(fresh, batch), batch["attention_mask"]) > non_trivial
    torch.testing.assert_close(batch_logits(load_adapter(fresh, folder).model.eval(), batch), theirs,
                               atol=atol, rtol=0)


def with_random_biases(model: nn.Module, seed: int = 2) -> nn.Module:
    """`model` with every bias drawn at random: GPT-2 initialises them to zero, which would hide
    any mistake in how a method treats an existing bias (scaling it, copying it, merging it)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def lora_with_random_b(model: nn.Module, targets: list[str], r: int = 4):
    """LoRA on `model` (A from seed 0) with every B drawn at random (seed 1): a real update, so a
    kernel that mishandles the adapter's path changes the loss and its gradients."""
    from peftctl import methods
    from peftctl.methods.lora import LoraConfig

    torch.manual_seed(0)
    adapter = methods.apply(model, LoraConfig(name="lora", r=r, target_modules=targets))
    with torch.no_grad():
        for name, param in adapter.params.items():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return adapter
