"""Adapters on disk in `peft`'s format: adapter_config.json + adapter_model.safetensors.

What we write loads with `peft.PeftModel.from_pretrained` (for the methods peft has), and what
peft writes loads here. The config holds only keys peft knows, so older and newer peft versions
read it; the resolved recipe is saved beside it for people and for `peftctl eval`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftctl import methods
from peftctl.core.errors import UserError, one_line
from peftctl.core.files import atomic_directory, check_replaceable, writing
from peftctl.methods import Adapter, Method, MethodConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
RECIPE_FILE = "peftctl_recipe.yaml"


def adapter_config(adapter: Adapter, base_model: str, revision: str | None = None) -> dict[str, Any]:
    """peft's config: the base named as the recipe named it (a Hub id, as peft writes it, so that
    peft and `peftctl eval` find the base by name), with its revision."""
    return {
        "peft_type": adapter.method.peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": revision,
        "inference_mode": True,
        **adapter.method.peft_config(adapter),
    }


def save_adapter(adapter: Adapter, folder: Path, base_model: str, recipe_yaml: str | None = None,
                 revision: str | None = None, state: dict | None = None) -> Path:
    """Write the adapter to `folder` atomically: it appears complete or not at all.

    `state` replaces the adapter's own weights where they live elsewhere (an adapter built on a
    meta-device skeleton, such as a combination of adapters, has none of its own).
    """
    state = {key: tensor.detach().to("cpu").contiguous()
             for key, tensor in (adapter.state_dict() if state is None else state).items()}
    with atomic_directory(folder) as staging:
        save_file(state, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        config = adapter_config(adapter, base_model, revision)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if recipe_yaml is not None:
            (staging / RECIPE_FILE).write_text(recipe_yaml)
    return folder


def read_adapter_config(folder: Path) -> dict[str, Any]:
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"no {CONFIG_FILE} in the adapter folder", file=folder,
                        expected="a folder written by peftctl train or peft's save_pretrained")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise UserError(f"not valid UTF-8 JSON: {one_line(err, 200)}", file=config_path,
                        expected="the adapter_config.json that peftctl train or peft's save_pretrained writes") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UserError("the adapter config has no 'peft_type'", file=config_path)
    return config


def adapter_method(folder: Path) -> tuple[Method, MethodConfig]:
    """The method and the options that the adapter saved in `folder` was made with.

    A config from elsewhere (peft, another peft version, a hand edit) may lack a key or hold a
    value peftctl does not accept: both are the adapter's problem, named by its key.
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    source = str(folder / CONFIG_FILE)
    method = methods.by_peft_type(config["peft_type"], source)
    try:
        return method, method.config_from_peft(config, source)
    except KeyError as err:
        key = str(err.args[0])
        raise UserError(f"the {method.peft_type} adapter config has no '{key}'", file=source, where=key,
                        expected=f"an adapter_config.json written by peft or peftctl for {method.peft_type}") from None
    except ValidationError as err:
        first = err.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else None
        raise UserError(f"invalid {method.peft_type} adapter option: {first['msg']}", file=source, where=key,
                        expected=f"an adapter_config.json written by peft or peftctl for {method.peft_type}") from None


def load_adapter(model: nn.Module, folder: Path) -> Adapter:
    """Apply the adapter saved in `folder` to `model` and load its weights, all or nothing."""
    adapter = prepare_adapter(model, folder)
    weights = Path(folder) / WEIGHTS_FILE
    adapter.load_state_dict(read_weights(weights), str(weights))
    return adapter


def prepare_adapter(model: nn.Module, folder: Path) -> Adapter:
    """Apply the adapter saved in `folder` to `model` with its options, not yet its weights: what
    it adapts and the shapes, checked against the model before any weights are read."""
    folder = Path(folder)
    method, cfg = adapter_method(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"no {WEIGHTS_FILE} in the adapter folder", file=folder,
                        fix="peftctl reads safetensors only; re-save the adapter with safe_serialization=True")
    try:
        return method.apply(model, cfg)
    except UserError as err:
        # The options come from the adapter's config, not from a recipe: say so, and that the
        # likely cause is a base model other than the one the adapter was made for.
        if err.file is None:
            err.file = str(folder / CONFIG_FILE)
            err.fix = "use the base model the adapter was trained on (see its base_model_name_or_path)"
            err._changed()
        raise


def read_weights(path: Path) -> dict:
    """A safetensors file's tensors; a truncated, foreign or hostile file is the user's input, named."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise UserError(f"not a readable safetensors file: {one_line(err, 200)}", file=path,
                        fix="copy the file again; peftctl reads only complete safetensors files") from None


def saved_recipe(folder: Path) -> dict[str, Any]:
    """The recipe saved beside an adapter, as a mapping of sections (empty if none is saved).

    It only supplies defaults (which base model, which data); a file that is not a recipe is named.
    """
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return {}
    import yaml

    fix = f"delete {RECIPE_FILE} and pass --base (and --data) yourself"
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise UserError(f"not a readable recipe: {one_line(err, 200)}", file=path, fix=fix) from None
    if not isinstance(recipe, dict):
        raise UserError("not a recipe: the file is not a mapping of sections", file=path, fix=fix)
    for section in ("model", "data"):
        if not isinstance(recipe.get(section) or {}, dict):
            raise UserError(f"not a recipe: its {section} section is not a mapping", file=path, fix=fix)
    return recipe


# --- an adapter's base model, and merging into it ----------------------------------------------

QUANTIZATION_KEYS = ("quantization", "quant_type", "double_quant", "compute_dtype")


def saved_base(folder: Path, named: bool = True) -> dict[str, Any]:
    """The base model the adapter in `folder` says it was made on (its saved recipe, else its
    config), as written, nothing resolved: name_or_path, revision, gguf_file and the quantization
    it trained with. `named`: a missing name is an error (else None, for a caller given --base)."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    options = saved_recipe(folder).get("model") or {}
    name = options.get("name_or_path") or config.get("base_model_name_or_path")
    if named and not isinstance(name, str):
        raise UserError(f"the base model's name is {name!r}, not a string", file=folder / RECIPE_FILE,
                        where="model.name_or_path", fix="pass --base MODEL")
    if named and not name:
        raise UserError("the adapter does not say which base model it belongs to", file=folder / CONFIG_FILE,
                        where="base_model_name_or_path", fix="pass --base MODEL")
    return {"name_or_path": name, "revision": options.get("revision", config.get("revision")),
            "gguf_file": options.get("gguf_file"), **{key: options[key] for key in QUANTIZATION_KEYS if key in options}}


def check_same_base(folders: list[Path], what: str, named: bool = True) -> None:
    """Refuse adapters made on different base models (another model, revision, GGUF file or
    quantization): `what` they are to do together (be combined, be evaluated on one base) needs one.
    A local folder counts by its resolved path, so ./base and /abs/base are one model. Without
    `named` (the user passed --base) an adapter that names no base is not compared."""
    from peftctl.recipe.schema import ModelSpec

    def identity(folder: Path) -> dict[str, Any] | None:
        base = saved_base(folder, named)
        if not isinstance(base["name_or_path"], str) or not base["name_or_path"]:
            return None
        local = Path(base["name_or_path"]).expanduser()
        found = {"name_or_path": str(local.resolve()) if local.exists() else base["name_or_path"],
                 "revision": base["revision"], "gguf_file": base["gguf_file"],
                 "quantization": base.get("quantization", "none")}
        if found["quantization"] == "4bit":  # which 4-bit weights; the compute precision is not the base's
            found.update({key: base.get(key, ModelSpec.model_fields[key].default) for key in ("quant_type", "double_quant")})
        return found

    known = [(folder, found) for folder in folders if (found := identity(folder)) is not None]
    if not known:
        return
    (first, expected), *others = known
    for folder, found in others:
        if found != expected:
            differ = ", ".join(f"{key} {found.get(key)!r} (not {expected.get(key)!r})"
                               for key in sorted(set(found) | set(expected)) if found.get(key) != expected.get(key))
            raise UserError(f"this adapter was made on another base model than {first}: {differ}", file=folder,
                            expected=f"adapters trained on one base model, to {what}",
                            fix="pass only adapters of the same base model (see each adapter_config.json's "
                                "base_model_name_or_path)")


def base_model_spec(folder: Path, base: str | None = None, trust_remote_code: bool = False):
    """The ModelSpec an adapter was trained on: `base` if given, else its recipe, else its config.

    `trust_remote_code` comes from the person running the command (a flag, or a recipe they run),
    never from the adapter folder: an adapter downloaded from anywhere must not be able to make
    peftctl run a model's Python code, so the saved recipe's setting is ignored.
    """
    from peftctl.recipe.schema import ModelSpec

    folder = Path(folder)
    own = saved_base(folder, named=base is None)
    options = saved_recipe(folder).get("model") or {}
    name = base or own["name_or_path"]
    revision = None if base else own["revision"]
    gguf_file = None if base else own["gguf_file"]
    # The base as it was trained: a quantized one is quantized again, the same way.
    quantization = {key: own[key] for key in QUANTIZATION_KEYS if key in own}
    try:
        spec = ModelSpec(name_or_path=name, revision=revision, gguf_file=gguf_file, dtype=options.get("dtype", "auto"),
                         trust_remote_code=trust_remote_code, **quantization)
    except ValidationError as err:
        problem = err.errors()[0]
        raise UserError(f"invalid saved model option: {problem['msg']}", file=folder / RECIPE_FILE,
                        where="model." + ".".join(map(str, problem["loc"])),
                        fix="pass --base MODEL, or correct the saved recipe") from None
    from peftctl.model.loading import resolve_source

    try:
        resolve_source(spec)  # a Hub id: its config and tokenizer, from the cache or the Hub
    except UserError as err:
        if base:
            raise UserError(err.problem, where="--base", expected=err.expected, fix=err.fix) from None
        named_in = (f"{RECIPE_FILE}: model.name_or_path" if options.get("name_or_path")
                    else f"{CONFIG_FILE}: base_model_name_or_path")
        raise UserError(f"the adapter's base model '{name}' (from {named_in}) cannot be loaded: {err.problem}",
                        file=folder, expected=err.expected,
                        fix=(err.fix + "; or " if err.fix else "") + "pass --base with a copy of that model") from None
    return spec


@dataclass
class Merged:
    """A base model with an adapter folded in (fp32), with what writing it needs."""

    model: nn.Module
    tokenizer: Any
    spec: Any  # the base's ModelSpec
    base_dtype: str  # the precision the base is published in
    figures: dict[str, Any]  # the merged model vs base + adapter on a probe batch
    probe: Any  # that batch of token ids [2, 32]
    expected: Any  # base + adapter's logits for it (what a written model is measured against)


def merge_adapter(folder: Path, base: str | None = None, trust_remote_code: bool = False,
                  check_output: Callable[[Any], None] = lambda spec: None) -> Merged:
    """Fold the adapter saved in `folder` into its base, in fp32.

    `check_output(spec)` runs once the base is known and before any weights load, so a bad
    output path fails in seconds. The figures are the largest and mean absolute logit difference
    between the merged model and base + adapter on a probe batch, so rounding is shown, not
    discovered. An adapter trained on a quantized base is merged into that base dequantized, and
    compared with the quantized base + adapter (computing in fp32): the model that was trained,
    not the unquantized original, which differs from it by the quantization error.
    """
    import torch

    from peftctl.model import quantize
    from peftctl.model.loading import load_model, load_skeleton, load_tokenizer

    folder = Path(folder)
    config = read_adapter_config(folder)
    method = methods.by_peft_type(config["peft_type"], str(folder / CONFIG_FILE))
    method.check_mergeable()  # before any weights load
    spec = base_model_spec(folder, base, trust_remote_code)
    check_output(spec)
    skeleton = load_skeleton(spec)
    load_adapter(skeleton, folder)  # options, targets and shapes, before the weights load
    base_dtype = base_precision(skeleton.config, spec)
    quantized = spec.quantization != "none"
    if not quantized:
        spec = spec.model_copy(update={"dtype": "float32"})
    tokenizer = load_tokenizer(spec)
    model = load_model(spec)  # a quantized base is quantized from `dtype`, as in training
    if quantized:
        quantize.upcast(model)
    adapter = load_adapter(model, folder)
    probe = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapter.model(probe).logits
        if quantized:
            quantize.dequantize(adapter.model)
        merged = method.merge(adapter).eval()
        if quantized:
            quantize.restore_source_types(merged)
        actual = merged(probe).logits
    difference = (actual - expected).abs()
    reference = f"{quantize.describe(spec)} base + adapter" if quantized else "base + adapter"
    figures = {"max_abs_logit_diff": float(difference.max()), "mean_abs_logit_diff": float(difference.mean()),
               "compared_with": reference}
    return Merged(merged, tokenizer, spec, base_dtype, figures, probe, expected)


def merge_to_folder(folder: Path, out: Path, base: str | None = None, dtype: str | None = None,
                    trust_remote_code: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Fold the adapter into its base and save a plain transformers model folder at `out`.

    The weights are saved in `dtype`, by default the base's own precision (`base_precision`), so
    a merged model is the size its base was. Returns merge_adapter's figures and the dtype.
    """
    import torch

    from peftctl.model.loading import model_files

    folder = Path(folder)

    def check_output(spec: Any) -> None:
        check_replaceable(out, overwrite, "--out", ("config.json",), inputs={
            "the adapter": folder, "the base model": model_files(spec)})

    merged = merge_adapter(folder, base, trust_remote_code, check_output)
    dtype = dtype or merged.base_dtype
    save_model_folder(merged.model.to(getattr(torch, dtype)), merged.tokenizer, out, "the merged model")
    return {**merged.figures, "dtype": dtype}


def save_model_folder(model: nn.Module, tokenizer: Any, out: Path, what: str) -> None:
    """A plain transformers model folder (safetensors weights, config, tokenizer), written atomically."""
    with writing(out, what), atomic_directory(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)


def export_base(name: str, out: Path, dtype: str | None = None, trust_remote_code: bool = False,
                overwrite: bool = False) -> dict[str, Any]:
    """Write a base model as a plain transformers folder: what `peft` and other tools load a
    builtin (or a GGUF file) from, since only peftctl knows those names."""
    import torch

    from peftctl.model.loading import load_config, load_model, load_tokenizer, model_files
    from peftctl.recipe.schema import ModelSpec

    spec = ModelSpec(name_or_path=name, trust_remote_code=trust_remote_code)
    check_replaceable(out, overwrite, "--out", ("config.json",), inputs={"the model": model_files(spec)})
    dtype = dtype or base_precision(load_config(spec), spec)
    model = load_model(spec.model_copy(update={"dtype": dtype}))
    model.config.name_or_path = str(out)
    save_model_folder(model.to(getattr(torch, dtype)), load_tokenizer(spec), out, "the base model")
    return {"model": name, "folder": str(out), "dtype": dtype}


def base_precision(config: Any, spec: Any) -> str:
    """The precision the base's weights are published in (its config's dtype); for a config that
    does not say (GGUF files, configs built in code), the one the adapter trained it in."""
    import torch

    from peftctl.model.loading import resolve_dtype

    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(found, str):
        found = getattr(torch, found, None)
    if found not in (torch.float32, torch.bfloat16, torch.float16):
        found = resolve_dtype(spec.dtype)
    return str(found).removeprefix("torch.")
