"""`peftctl export --format gguf`: an adapter for llama.cpp and Ollama.

Two files llama.cpp loads:
  * a LoRA adapter GGUF (`llama-cli -m BASE.gguf --lora adapter.gguf`), for plain LoRA and
    rsLoRA: the base's tensor names, each layer's scaling baked into B (gguf_tensors);
  * the base with the adapter folded in, one GGUF model file (`--merged`), for every mergeable
    method: DoRA, IA3, BitFit and the rest cannot be expressed as llama.cpp's LoRA, so an adapter
    of theirs is exported this way, saying why. The merge is merge.merge_adapter's (fp32; a
    quantized base dequantized); the weights are then written as --quant, and what the file's
    rounded weights compute is measured against base + adapter, as `peftctl merge` measures.
With --ollama, a Modelfile beside it (ollama.py). Every file is written atomically, never over
an input, and over an existing file only with --overwrite.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_VERSION, GGUFReader, GGUFType, GGUFWriter, Keys, LlamaFileType

from peftctl import methods
from peftctl.arch.tasks import task_of_peft_type
from peftctl.core.errors import UserError
from peftctl.core.files import atomic_file, atomic_write_text, check_new_file, writing
from peftctl.export import ollama
from peftctl.export.adapter_base import base_model_spec
from peftctl.export.adapter_files import CONFIG_FILE, WEIGHTS_FILE, load_adapter, read_adapter_config, read_weights
from peftctl.export.gguf_metadata import copy_source_metadata, write_hyperparameters, write_tokenizer
from peftctl.export.gguf_tensors import CONVERT_FIX, QUANT_TYPES, GgufTensor, architecture, is_plain_lora, load_gguf_values, \
    lora_tensors, model_tensors
from peftctl.export.merge import Merged, merge_adapter
from peftctl.model.loading import base_facts

DEFAULT_QUANT = "f16"
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
              "q8_0": LlamaFileType.MOSTLY_Q8_0}
MODELFILE = "Modelfile"


def export_gguf(folder: Path, out: Path | None = None, merged: bool = False, quant: str | None = None,
                with_ollama: bool = False, base: str | None = None, trust_remote_code: bool = False,
                overwrite: bool = False) -> dict[str, Any]:
    """Write the adapter in `folder` as a GGUF file (and a Modelfile); returns what was written."""
    from peftctl.model.loading import load_config, load_tokenizer, model_files

    folder = Path(folder)
    adapter_config = read_adapter_config(folder)
    task = task_of_peft_type(adapter_config.get("task_type"))
    if task != "causal_lm":
        raise UserError(f"a {task} adapter cannot be exported as GGUF: llama.cpp runs text generators (causal LMs)",
                        file=folder / CONFIG_FILE,
                        fix="peftctl merge writes a plain transformers folder of the model, which transformers and peft serve")
    why_merged = None if merged else is_plain_lora(adapter_config)
    merged = merged or why_merged is not None
    method = methods.by_peft_type(adapter_config["peft_type"], str(folder / CONFIG_FILE))
    if merged and method.merge_refusal:
        raise UserError(f"method '{method.name}' cannot be exported as GGUF: llama.cpp applies only LoRA adapters, "
                        f"and it cannot be merged into the base: {method.merge_refusal}", file=folder / CONFIG_FILE,
                        fix="serve the base model with the adapter loaded instead (peftctl eval, or peft)")
    if quant is not None and quant not in QUANT_TYPES:
        raise UserError(f"unknown GGUF type '{quant}'", where="--quant", expected=", ".join(QUANT_TYPES))
    if quant is not None and not merged:
        raise UserError("--quant sets the precision of a merged model; a LoRA adapter GGUF is written in f32",
                        where="--quant", fix="add --merged, or leave out --quant")
    quant = quant or DEFAULT_QUANT
    spec = base_model_spec(folder, base, trust_remote_code)
    config = load_config(spec)
    with _naming_the_base(spec):
        architecture(config)  # before anything is loaded
    out = Path(out) if out is not None else default_out(folder, merged, quant)
    base_file = model_files(spec)
    inputs = {"the adapter": folder, "the base model": base_file}
    check_new_file(out, overwrite, "--out", inputs)
    base_gguf = base_file if base_file is not None and base_file.suffix == ".gguf" else None
    builds_metadata = merged and base_gguf is None
    tokenizer = load_tokenizer(spec) if with_ollama or builds_metadata else None
    if builds_metadata:
        with _naming_the_base(spec):
            check_metadata(config, tokenizer)  # a tokenizer llama.cpp cannot take: before the merge
    translation = modelfile = None
    if with_ollama:
        modelfile = out.parent / MODELFILE
        check_new_file(modelfile, overwrite, "--ollama", inputs)
        if not merged and base_gguf is None:
            raise UserError("an Ollama ADAPTER needs the base as a GGUF file, and this base is a transformers folder",
                            where="--ollama", fix="add --merged for one GGUF file with the adapter folded in")
        translation = ollama.translate(tokenizer)
    if merged:
        figures = write_merged(merge_adapter(folder, base, trust_remote_code), out, quant, base_gguf)
    else:
        figures = write_adapter(folder, spec, out)
    figures.update(gguf=str(out), base_model=spec.name_or_path, base_gguf=str(base_gguf) if base_gguf else None,
                   why_merged=why_merged, modelfile=None)
    if translation is not None:
        model, adapter = (f"./{out.name}", None) if merged else (str(base_gguf.resolve()), f"./{out.name}")
        with writing(modelfile, "the Modelfile"):
            atomic_write_text(modelfile, ollama.modelfile(model, translation, adapter))
        figures.update(modelfile=str(modelfile), chat_template=translation.family.name)
    return figures


def default_out(folder: Path, merged: bool, quant: str) -> Path:
    """Beside the adapter folder: `adapter.gguf`, or `adapter-merged-f16.gguf`."""
    folder = folder.resolve()
    return folder.with_name(f"{folder.name}-merged-{quant}.gguf" if merged else f"{folder.name}.gguf")


def write_adapter(folder: Path, spec: Any, out: Path) -> dict[str, Any]:
    """The LoRA GGUF of the adapter in `folder`: its layers found on the base's weightless
    skeleton (names, scaling), its A and B read from the file; no base weights load."""
    from peftctl.model.loading import load_skeleton

    adapter = load_adapter(load_skeleton(spec), folder, base_facts(spec))
    with _naming_the_base(spec):
        tensors, alpha = lora_tensors(adapter, read_weights(folder / WEIGHTS_FILE))
    arch = architecture(adapter.model.config).name
    write_lora_gguf(tensors, alpha, arch, out)
    return {"kind": "lora", "architecture": arch, "layers": len(tensors) // 2, "alpha": alpha,
            "bytes": out.stat().st_size}


def write_lora_gguf(tensors: dict[str, Any], alpha: float, arch: str, out: Path) -> None:
    """A llama.cpp LoRA adapter file: general.type=adapter, adapter.type=lora, its alpha, tensors."""
    with writing(out, "the GGUF adapter"), atomic_file(out) as staging:
        writer = GGUFWriter(staging, arch)
        writer.add_type(GGUFType.ADAPTER)
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha)
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        _write(writer)


def write_merged(merged: Merged, out: Path, quant: str, base_gguf: Path | None) -> dict[str, Any]:
    """The merged model as one GGUF file; then its rounded weights' logits vs base + adapter."""
    import torch

    with _naming_the_base(merged.spec):
        tensors = write_model_gguf(merged.model, merged.tokenizer, out, quant, base_gguf)
    load_gguf_values(merged.model, tensors)
    with torch.no_grad():
        difference = (merged.model(merged.probe).logits - merged.expected).abs()
    return {"kind": "merged", "architecture": architecture(merged.model.config).name, "quant": quant,
            "tensors": len(tensors), "metadata_from": "the base's GGUF file" if base_gguf else "the base's config "
            "and tokenizer", **merged.figures, "gguf_max_abs_logit_diff": float(difference.max()),
            "gguf_mean_abs_logit_diff": float(difference.mean()), "bytes": out.stat().st_size}


def write_model_gguf(model: Any, tokenizer: Any, out: Path, quant: str, base_gguf: Path | None = None) -> list[GgufTensor]:
    """`model` (fp32, transformers layout) as a llama.cpp GGUF model file: tensors as `quant`,
    metadata copied from `base_gguf` (the file the base came from) or built from the config and
    tokenizer; the chat template is the tokenizer's, which training used. Returns the tensors."""
    config = model.config
    tensors = list(model_tensors(model, quant))
    reader = GGUFReader(base_gguf) if base_gguf is not None else None
    if reader is not None:
        check_same_tensors(reader, tensors, base_gguf)
    with writing(out, "the GGUF model"), atomic_file(out) as staging:
        writer = GGUFWriter(staging, architecture(config).name)
        if reader is not None:
            copy_source_metadata(writer, reader)
        else:
            writer.add_type(GGUFType.MODEL)
            write_hyperparameters(writer, config)
            write_tokenizer(writer, tokenizer, config.vocab_size)
        writer.add_chat_template(tokenizer.chat_template)
        writer.add_file_type(FILE_TYPES[quant])
        writer.add_quantization_version(GGML_QUANT_VERSION)
        for tensor in tensors:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.qtype)
        _write(writer)
    return tensors


def check_metadata(config: Any, tokenizer: Any) -> None:
    """Build a transformers base's GGUF metadata in memory: what it cannot hold is refused now."""
    writer = GGUFWriter(None, architecture(config).name)
    write_hyperparameters(writer, config)
    write_tokenizer(writer, tokenizer, config.vocab_size)


def check_same_tensors(reader: GGUFReader, tensors: list[GgufTensor], source: Path) -> None:
    """The merged model must hold the tensors its source file held, no more, no fewer: llama.cpp
    checks the set, and a difference means a layout this module does not know."""
    ours, theirs = {t.name for t in tensors}, {t.name for t in reader.tensors}
    if ours != theirs:
        differ = sorted(ours ^ theirs)
        raise UserError(f"the merged model's tensors differ from its base GGUF's: {', '.join(differ[:4])}"
                        + (f" and {len(differ) - 4} more" if len(differ) > 4 else ""), file=source, fix=CONVERT_FIX)


def _write(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@contextmanager
def _naming_the_base(spec: Any) -> Iterator[None]:
    """A refusal about the base's layout or tokenizer names the base, which the user chose."""
    try:
        yield
    except UserError as err:
        if err.file is None:
            err.file = f"the base model {spec.name_or_path}"
            err._changed()
        raise
