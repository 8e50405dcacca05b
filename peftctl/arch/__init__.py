"""What peftctl knows of a transformers model's structure, before and without its weights.

Facts about layers that methods, quantization and planning all need (layers.py: which modules are
linear, their shapes, dense weights, precision), what generic rules cannot tell per architecture
family (architectures.py), and under which keyword a decoder takes its KV cache (kv_cache.py).

May import: peftctl.core.
"""
