"""Which base model an adapter belongs to: what its folder says it was made on, checked.

An adapter folder names its base twice, in the saved recipe (the model as trained, quantization
included) and in peft's adapter_config.json (`base_model_name_or_path`); the recipe wins. `merge`,
`eval`, `combine` and `export` start here, and so does every check that adapters given together
were made on one base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from peftctl.core.errors import UserError
from peftctl.export.adapter_files import CONFIG_FILE, RECIPE_FILE, read_adapter_config, saved_recipe
from peftctl.model.loading import resolve_dtype, resolve_source
from peftctl.recipe.schema import ModelSpec

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
    known = [(folder, found) for folder in folders if (found := base_identity(saved_base(folder, named))) is not None]
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


def base_identity(base: dict[str, Any]) -> dict[str, Any] | None:
    """What makes two bases one model, from a `saved_base` mapping (None where it names none):
    its name (a local folder by its resolved path, so ./base and /abs/base are one model),
    revision, GGUF file and quantization (for 4-bit, which 4-bit weights)."""
    if not isinstance(base["name_or_path"], str) or not base["name_or_path"]:
        return None
    local = Path(base["name_or_path"]).expanduser()
    found = {"name_or_path": str(local.resolve()) if local.exists() else base["name_or_path"],
             "revision": base["revision"], "gguf_file": base["gguf_file"],
             "quantization": base.get("quantization", "none")}
    if found["quantization"] == "4bit":  # which 4-bit weights; the compute precision is not the base's
        found.update({key: base.get(key, ModelSpec.model_fields[key].default) for key in ("quant_type", "double_quant")})
    return found


def base_model_spec(folder: Path, base: str | None = None, trust_remote_code: bool = False):
    """The ModelSpec an adapter was trained on: `base` if given, else its recipe, else its config.

    `trust_remote_code` comes from the person running the command (a flag, or a recipe they run),
    never from the adapter folder: an adapter downloaded from anywhere must not be able to make
    peftctl run a model's Python code, so the saved recipe's setting is ignored.
    """
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


def base_precision(config: Any, spec: Any) -> str:
    """The precision the base's weights are published in (its config's dtype); for a config that
    does not say (GGUF files, configs built in code), the one the adapter trained it in."""
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(found, str):
        found = getattr(torch, found, None)
    if found not in (torch.float32, torch.bfloat16, torch.float16):
        found = resolve_dtype(spec.dtype)
    return str(found).removeprefix("torch.")
