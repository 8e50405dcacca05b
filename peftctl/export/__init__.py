"""What leaves a run: adapters on disk and the formats other tools read.

adapter_files.py writes and reads adapters in peft's format (adapter_config.json +
adapter_model.safetensors); adapter_base.py finds the base an adapter belongs to; merge.py folds an
adapter into its base (`peftctl merge`); combine.py combines LoRA adapters of one base; gguf.py is
`peftctl export --format gguf` for llama.cpp (with gguf_tensors.py and gguf_metadata.py) and
ollama.py its Modelfile. A new export format is a module here and a case of the `export` command.

May import: peftctl.data, peftctl.model, peftctl.recipe, peftctl.methods, peftctl.arch,
peftctl.core.
"""
