"""A model folder's safetensors files against the model its config describes, before they load.

transformers finds a weight whose shape disagrees with the config only after it has allocated the
model (and reports it as its own RuntimeError), and fills weights the files lack with random
values, so a config that claims more layers than were saved would train partly random layers. The
headers (names, shapes, dtypes: a few kilobytes, no weights) say all of this first: the index
must name shards that are there, each tensor whose name the model has must have its shape, and the
files must hold at least as many values as the model has parameters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn

from peftctl.arch.tasks import inside
from peftctl.core.errors import UserError, one_line

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
FIX_FILES = "download the model's files again (a file was cut short, edited or left out)"
# Packed quantized storage (GPTQ, AWQ, bitsandbytes) holds several values per stored element.
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _refusal(file: Path, problem: str, expected: str, fix: str = FIX_FILES) -> UserError:
    return UserError(f"{file}: {problem}", where="model.name_or_path", expected=expected, fix=fix)


def stored_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], str, Path]] | None:
    """Each stored tensor's shape, dtype and file, from the headers; None: no safetensors here."""
    index = folder / INDEX
    if index.is_file():
        shards = _index_shards(index)
    elif (folder / WEIGHTS).is_file():
        shards = {folder / WEIGHTS: None}
    else:
        return None
    found: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for shard, names in shards.items():
        try:
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    found[name] = (tuple(piece.get_shape()), piece.get_dtype(), shard)
        except (SafetensorError, OSError, ValueError) as err:
            raise _refusal(shard, f"not a readable safetensors file: {one_line(err)}",
                           "a safetensors file, whole") from None
        for name in sorted(names or ()):
            if name not in found:
                raise _refusal(index, f"names tensor '{name}' in {shard.name}, which does not hold it",
                               "an index whose every tensor is in the shard it names")
    return found


def _index_shards(index: Path) -> dict[Path, set[str]]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not an object of tensor name → file name")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise _refusal(index, f"not a readable safetensors index: {one_line(err)}",
                       'a JSON object with "weight_map": {tensor name: shard file name}') from None
    shards: dict[Path, set[str]] = {}
    for name, shard in weight_map.items():
        path = index.parent / shard
        if not path.is_file():
            raise _refusal(index, f"names shard '{shard}' (for '{name}'), which is not in {index.parent}",
                           "every shard the index names, beside it")
        shards.setdefault(path, set()).add(name)
    return shards


def check_weights_fit(skeleton: nn.Module, folder: Path, config_file: Path, head: list[str] = ()) -> None:
    """The stored tensors against `skeleton` (the model the config describes, on the meta device).
    A task's `head` modules (a classifier's, new) are left out: theirs may be missing or of other sizes."""
    stored = stored_tensors(folder)
    if stored is None:
        return  # no safetensors: transformers says what it expected when it loads
    prefix = getattr(skeleton, "base_model_prefix", "") + "."
    wanted = dict(skeleton.state_dict(keep_vars=True))
    differ = []
    for name, (shape, _, file) in stored.items():
        # Checkpoints saved from the bare model lack the prefix (GPT-2's own: h.0.attn...); renamed
        # layouts (fused experts) match no name here and are left to transformers' conversions.
        own = name if name in wanted else prefix + name if prefix + name in wanted else None
        if own is not None and inside(own, head):
            continue
        if own is not None and tuple(wanted[own].shape) != shape:
            differ.append(f"'{name}' in {file.name} is {list(shape)}, the config makes it {list(wanted[own].shape)}")
    if differ:
        raise UserError(
            f"{config_file} disagrees with the weights: " + "; ".join(differ[:3])
            + (f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""),
            where="model.name_or_path", expected="the sizes in the config that the weights were saved with",
            fix="restore the model's original config.json (or the weights it describes); sizes such as "
                "vocab_size and hidden_size must match the stored tensors")
    if any(dtype not in _FLOATS for _, dtype, _ in stored.values()):
        return  # packed storage: the values are not countable from shapes
    params = sum(p.numel() for name, p in skeleton.named_parameters()
                 if not inside(name, head))
    held = sum(math.prod(shape) for shape, _, _ in stored.values())
    if params > held:
        raise UserError(
            f"{config_file} describes {params:,} parameters, but the weights files hold {held:,} values: "
            "the rest would be random (the config claims more layers or experts than were saved?)",
            where="model.name_or_path", expected="a config that describes the saved weights",
            fix="restore the model's original config.json (num_hidden_layers and the other sizes as saved)")
