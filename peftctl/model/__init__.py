"""A base model with its tokenizer, as every command gets it.

loading.py reads `model.name_or_path` (a Hub id through the Hugging Face cache, a local folder, a
GGUF file, a builtin), weightless skeletons on the meta device for the checks that need no
weights, and the tokenizer; builtins.py finds the builtin models that ship as Python packages
(SmolLM2's GGUF file, all-MiniLM-L6-v2 extracted once from its zip); quantize.py stores the
frozen linear layers in 4 or 8 bits with bitsandbytes (QLoRA).

May import: peftctl.recipe (its ModelSpec), peftctl.methods, peftctl.arch, peftctl.core.
"""
