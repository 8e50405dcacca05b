"""The pipeline a recipe runs: data → model → method (or the saved adapter `model.adapter`
names, continued) → train (or resume it from a checkpoint) → export.

Everything that can be checked without weights (recipe, output folder, data rows, target
modules on a weightless skeleton of the model) is checked before the weights load.
"""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from peftctl import checkpoint, methods
from peftctl.architectures import TESTED
from peftctl.data import load_data
from peftctl.errors import ErrorGroup, UserError, blame
from peftctl.export import CONFIG_FILE, WEIGHTS_FILE, adapter_method, load_adapter, save_adapter
from peftctl.files import check_replaceable, output_lock, writing
from peftctl.methods import Method, MethodConfig
from peftctl.model import load_model, load_skeleton, load_tokenizer, model_files, prefilled_cache_refusal
from peftctl.quantize import parameter_count
from peftctl.recipe import Recipe
from peftctl.train import Reporter, TrainResult, loop_fingerprint, train

if TYPE_CHECKING:
    from accelerate.utils import DistributedType


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
    main_process: bool = True  # False in the other processes of `accelerate launch`: they print nothing


def run(recipe: Recipe, reporter: Reporter | None = None, overwrite: bool = False,
        resume: str | Path | None = None) -> RunSummary:
    """Train the recipe's adapter and export it; `resume`: 'latest' or a checkpoint folder to continue.

    Under `accelerate launch` every process runs this; only the main one writes the output folder.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Under `accelerate launch` (or torchrun) this joins the other processes. accelerate only
    # forms a group of CPU processes (gloo) when told it runs on the CPU: without a GPU, it is.
    processes = PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        check_fsdp(recipe, processes.distributed_type)
    with blame(recipe.source, recipe.locate), ExitStack() as held:
        out = recipe.output.dir
        tokenizer, data = _first_checks(recipe, overwrite, resume)
        if processes.is_main_process:  # one run at a time in an output folder; the others of a launch join it
            held.enter_context(output_lock(out, "output.dir"))
        continued = recipe.model.adapter
        skeleton = load_skeleton(recipe.model)
        method_cfg = continued_method(recipe) if continued is not None else recipe.method
        check_context(skeleton.config, data, getattr(method_cfg, "num_virtual_tokens", 0))
        on_skeleton(recipe, skeleton, method_cfg)  # target, shape and size errors before weights load
        if recipe.train.gradient_checkpointing and methods.get(method_cfg.name).feeds_kv_cache:
            raise prefilled_cache_refusal()  # as the model would at the first step, before weights load
        fingerprint = run_fingerprint(recipe, method_cfg, len(data.train))
        saved = None
        if resume is not None:  # a checkpoint of another recipe is refused before the weights load
            saved = checkpoint.read(find_checkpoint(out, resume), named_by="--resume")
            checkpoint.check_compatible(saved, {**fingerprint, **loop_fingerprint(recipe.train, processes.num_processes)})

        model = load_model(recipe.model)
        torch.manual_seed(recipe.train.seed)
        adapter = load_adapter(model, continued) if continued is not None else methods.apply(model, recipe.method)

        if processes.is_main_process:
            with writing(out, "the output folder"):
                if saved is None:
                    fresh_output_dir(out)
                else:
                    out.mkdir(parents=True, exist_ok=True)
        processes.wait_for_everyone()
        result = train(adapter, data, recipe.train, out, tokenizer.pad_token_id, reporter,
                       resume=saved, fingerprint=fingerprint)
        adapter_dir = out / "adapter"
        if processes.is_main_process:
            # The saved recipe holds the options the adapter has, also those taken from a continued one.
            recipe_yaml = recipe.model_copy(update={"method": method_cfg}).to_yaml()
            with writing(adapter_dir, "the adapter"):
                save_adapter(adapter, adapter_dir, recipe.model.name_or_path, recipe_yaml,
                             revision=recipe.model.revision)
        processes.wait_for_everyone()  # every process ends the run together
    return RunSummary(
        output_dir=out,
        adapter_dir=adapter_dir,
        trainable_params=adapter.trainable_count(),
        total_params=parameter_count(model),
        train_rows=len(data.train),
        validation_rows=len(data.validation),
        dropped_rows=data.dropped,
        result=result,
        main_process=processes.is_main_process,
    )


DDP_LAUNCH = "accelerate launch --multi_gpu --num_processes N -m peftctl train RECIPE"


def check_fsdp(recipe: Recipe, distributed_type: DistributedType) -> None:
    """Refuse the FSDP launches that would not train what the user asked for, before weights load."""
    from accelerate.utils import DistributedType

    where = "accelerate config (distributed_type: FSDP)"
    if distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU):
        # accelerate keeps CPU processes (and a single unlaunched one) on DDP under an FSDP config.
        raise UserError(f"accelerate runs FSDP only on GPUs; these processes ({distributed_type.value}) would "
                        "silently train with DDP instead", where=where, fix=f"on CPUs launch DDP: {DDP_LAUNCH}")
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("FSDP version 1 is not supported: peftctl shards with FSDP2, whose weights stay "
                        "addressable by name", where=where,
                        fix="set fsdp_version: 2 in the accelerate config (or pass --fsdp_version 2)")
    check_fsdp_recipe(recipe)


def check_fsdp_recipe(recipe: Recipe) -> None:
    """Refuse what of a recipe FSDP cannot shard (for `train` under FSDP and `plan --fsdp`)."""
    if recipe.model.quantization != "none":
        with blame(recipe.source, recipe.locate):
            raise UserError("FSDP with a quantized base (model.quantization) is not supported: accelerate leaves "
                            "4-bit weights unsharded", where="model.quantization",
                            fix=f"drop FSDP and launch DDP ({DDP_LAUNCH}): a 4-bit 7-8B base fits one 24 GB "
                                "GPU; or shard a 16-bit base with FSDP")


def describe_targets(recipe: Recipe) -> str:
    """For `peftctl validate`: what the recipe's method trains on this model, counted, from a
    weightless copy (a method that cannot work on the layout is refused here, with its reason)."""
    import re
    from collections import Counter

    with blame(recipe.source, recipe.locate):
        skeleton = load_skeleton(recipe.model)
        method_cfg = continued_method(recipe) if recipe.model.adapter is not None else recipe.method
        adapter = on_skeleton(recipe, skeleton, method_cfg)
    # Layer numbers folded, so 30 layers' q_proj read as one line: "model.layers.N.self_attn.q_proj.lora_A.weight ×30".
    kinds = Counter(re.sub(r"\.\d+\.", ".N.", name) for name in adapter.params)
    listed = ", ".join(f"{kind} ×{count}" if count > 1 else kind for kind, count in kinds.items())
    model_type = getattr(skeleton.config, "model_type", None)
    untested = "" if model_type in TESTED else (
        f" (model_type '{model_type}' is not among the architectures peftctl's contract suite tests: generic rules)")
    return (f"method {method_cfg.name}: {adapter.trainable_count():,} trainable parameters in "
            f"{len(adapter.params)} tensors: {listed}{untested}")


def on_skeleton(recipe: Recipe, skeleton: Any, method_cfg: MethodConfig) -> methods.Adapter:
    """The recipe's method on the weightless `skeleton`: the adapter to continue loaded (its
    targets and shapes checked), or a new one applied and sized."""
    if recipe.model.adapter is not None:
        return load_adapter(skeleton, recipe.model.adapter)
    adapter = methods.apply(skeleton, method_cfg)
    check_size(adapter)
    return adapter


def _first_checks(recipe: Recipe, overwrite: bool, resume: str | Path | None) -> tuple[Any, Any]:
    """The model's tokenizer and the data, after the checks that need neither the other nor any
    weights: every one of them runs, and all their errors come in one message."""
    checks = ErrorGroup(recipe.source, recipe.locate)
    tokenizer = data = None
    with checks.check():
        tokenizer = load_tokenizer(recipe.model)  # a Hub model: config and tokenizer files only
    with checks.check():
        if resume is None:
            check_output_dir(recipe, overwrite, tokenizer is not None)
        elif overwrite:
            raise UserError("--resume continues the run in its output folder, which --overwrite would delete first",
                            where="--resume", fix="drop --overwrite to resume, or drop --resume to start again")
    with checks.check():
        if tokenizer is not None:
            data = load_data(recipe.data, tokenizer, recipe.train.seed)
    checks.raise_if_any()
    return tokenizer, data


def find_checkpoint(out: Path, resume: str | Path) -> Path:
    """The checkpoint `--resume` names: 'latest' is the newest under the output folder."""
    if str(resume) != "latest":
        return Path(resume)
    found = checkpoint.latest(out / checkpoint.CHECKPOINTS)
    if found is None:
        raise UserError(f"nothing to resume: {out / checkpoint.CHECKPOINTS} holds no checkpoint", where="--resume",
                        expected="a run of this recipe (same output folder) that wrote a checkpoint",
                        fix="train without --resume, or pass --resume PATH with a checkpoint folder (.../checkpoints/step-N)")
    return found


def run_fingerprint(recipe: Recipe, method_cfg: MethodConfig, train_rows: int) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it, by recipe key: the model, the
    adapter's options and the data (its order and token layout decide each step's batches).
    Optimisation settings (lr, schedule, max_steps) may change: they act from the checkpoint on."""
    m, d = recipe.model, recipe.data
    found = {f"model.{key}": getattr(m, key) for key in ("name_or_path", "revision", "gguf_file", "dtype",
                                                         "quantization", "quant_type", "double_quant", "compute_dtype")}
    found.update({f"method.{key}": value for key, value in method_cfg.model_dump(mode="json").items()})
    found.update({f"data.{key}": str(value) if isinstance(value, Path) else value for key, value in
                  d.model_dump(include={"train", "validation", "subset", "split", "validation_split", "revision",
                                        "format", "columns", "roles", "max_seq_len", "train_on_inputs",
                                        "packing"}).items()})
    found["data.train rows"] = train_rows
    return found


# What a peftctl run leaves in its output folder: --overwrite only ever deletes such a folder.
RUN_MARKERS = ("metrics.jsonl", "adapter", checkpoint.CHECKPOINTS)


def check_size(adapter: Any) -> None:
    """A parameter-efficient adapter larger than its base model is a mistake in its sizes (a rank or
    width of 10^9 would otherwise surface as a failed allocation of hundreds of GB)."""
    trainable, base = adapter.trainable_count(), parameter_count(adapter.model) - adapter.trainable_count()
    if trainable > base:
        raise UserError(f"the adapter would have {trainable:,} trainable parameters, more than the "
                        f"{base:,} of the base model", where="method",
                        expected="an adapter a small fraction of the model's size",
                        fix="lower the method's rank, width or number of tokens")


def check_context(config: Any, data: Any, virtual_tokens: int) -> None:
    """Every row, with a prompt method's virtual tokens in front, must fit the positions the model
    has (learned position tables, GPT-2's say, cannot go past them at all)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    if virtual_tokens >= limit:
        raise UserError(f"{virtual_tokens} virtual tokens fill the model's whole context ({limit} positions)",
                        where="method.num_virtual_tokens", expected=f"fewer than {limit}, leaving room for the rows")
    longest = max((len(e.input_ids) for e in [*data.train, *data.validation]), default=0)
    if longest + virtual_tokens > limit:
        room = limit - virtual_tokens
        extra = f" + {virtual_tokens} virtual tokens" if virtual_tokens else ""
        raise UserError(f"the longest row is {longest} tokens{extra}, more than the model's {limit} positions",
                        where="data.max_seq_len", expected=f"max_seq_len of at most {room}",
                        fix=f"set data.max_seq_len: {room} (longer rows are cut to it)")


def check_output_dir(recipe: Recipe, overwrite: bool, model_found: bool = True) -> None:
    """`model_found`: the base model resolved, so its files are an input to spare."""
    validation = recipe.data.validation
    check_replaceable(recipe.output.dir, overwrite, "output.dir", RUN_MARKERS, inputs={
        "the recipe": recipe.source,
        "the training data": recipe.data.train if isinstance(recipe.data.train, Path) else None,
        "the validation data": validation if isinstance(validation, Path) else None,
        "the base model": model_files(recipe.model) if model_found else None, "the adapter to continue": recipe.model.adapter})


def continued_method(recipe: Recipe) -> MethodConfig:
    """The options of the adapter that `model.adapter` continues, checked against `method`.

    `method.name` must be the adapter's method. Options the recipe writes must equal the
    adapter's, as the weights' shapes and meaning depend on them; options it leaves out are the
    adapter's. Values spelt differently that select the same thing ('all-linear' and the list
    of layers it resolves to) agree: both configs are compared as they would be exported.
    """
    folder = recipe.model.adapter
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"no adapter to continue at {folder}: it has no {CONFIG_FILE}", where="model.adapter",
                        expected=f"a folder with {CONFIG_FILE} and {WEIGHTS_FILE} (peftctl train's <output>/adapter, "
                        "or peft's save_pretrained)",
                        fix="check the path; a relative path is resolved from the recipe's folder")
    method, saved = adapter_method(folder)
    ours = recipe.method
    if ours.name != method.name:
        raise UserError(f"the recipe's method is '{ours.name}' but the adapter to continue ({folder}) is "
                        f"'{method.name}'", where="method.name", expected=f"name: {method.name}",
                        fix=f"set method.name: {method.name}, or remove model.adapter to train a new adapter")
    written = [key for key in type(ours).model_fields if key in ours.model_fields_set and key != "name"]
    differing = [key for key in written if _canonical(getattr(ours, key)) != _canonical(getattr(saved, key))]
    if not differing:
        return saved
    try:
        chosen = type(saved).model_validate({**saved.model_dump(), **{key: getattr(ours, key) for key in written}})
        agree = _exported(recipe, method, chosen) == _exported(recipe, method, saved)
    except (ValidationError, UserError):
        agree = False
    if agree:
        return saved
    key = differing[0]
    raise UserError(
        f"{key} is {getattr(ours, key)!r} in the recipe, but the adapter to continue ({folder}) has "
        f"{getattr(saved, key)!r}", where=f"method.{key}",
        expected=f"{key}: {getattr(saved, key)!r}, or no {key} (the adapter's is used)",
        fix=f"remove method.{key} from the recipe, or remove model.adapter to train a new adapter")


def _exported(recipe: Recipe, method: Method, cfg: MethodConfig) -> dict:
    """The adapter_config.json fields `cfg` resolves to on the recipe's model (no weights load)."""
    return {key: _canonical(value) for key, value in
            method.peft_config(methods.apply(load_skeleton(recipe.model), cfg)).items()}


def _canonical(value):
    return sorted(map(str, value)) if isinstance(value, list) else value


def fresh_output_dir(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
