"""The pipeline a recipe runs: data → model → method → train → export.

Everything that can be checked without weights (recipe, output folder, data rows, target
modules on a weightless skeleton of the model) is checked before the weights load.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from peftctl import methods
from peftctl.data import load_data
from peftctl.errors import blame
from peftctl.export import save_adapter
from peftctl.files import check_replaceable
from peftctl.model import load_model, load_skeleton, load_tokenizer
from peftctl.recipe import Recipe
from peftctl.train import Reporter, TrainResult, train


@dataclass
class RunSummary:
    output_dir: Path
    adapter_dir: Path
    trainable_params: int
    total_params: int
    train_rows: int
    validation_rows: int
    dropped_rows: int
    result: TrainResult


def run(recipe: Recipe, reporter: Reporter | None = None, overwrite: bool = False) -> RunSummary:
    with blame(recipe.source, recipe.locate):
        out = recipe.output.dir
        check_output_dir(recipe, overwrite)
        tokenizer = load_tokenizer(recipe.model)
        data = load_data(recipe.data, tokenizer, recipe.train.seed)
        methods.apply(load_skeleton(recipe.model), recipe.method)  # target errors before weights load

        model = load_model(recipe.model)
        torch.manual_seed(recipe.train.seed)
        adapter = methods.apply(model, recipe.method)

        fresh_output_dir(out)
        result = train(adapter, data, recipe.train, out, tokenizer.pad_token_id, reporter)
        adapter_dir = save_adapter(adapter, out / "adapter", recipe.model.name_or_path, recipe.to_yaml())
    return RunSummary(
        output_dir=out,
        adapter_dir=adapter_dir,
        trainable_params=adapter.trainable_count(),
        total_params=sum(p.numel() for p in model.parameters()),
        train_rows=len(data.train),
        validation_rows=len(data.validation),
        dropped_rows=data.dropped,
        result=result,
    )


# What a peftctl run leaves in its output folder: --overwrite only ever deletes such a folder.
RUN_MARKERS = ("metrics.jsonl", "adapter")


def check_output_dir(recipe: Recipe, overwrite: bool) -> None:
    check_replaceable(recipe.output.dir, overwrite, "output.dir", RUN_MARKERS, protected={
        "the current directory": Path.cwd(), "the recipe": recipe.source,
        "the training data": recipe.data.train, "the validation data": recipe.data.validation})


def fresh_output_dir(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
