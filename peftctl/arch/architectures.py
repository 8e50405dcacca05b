"""What peftctl knows about particular architectures, in one place.

Methods work from generic rules (linear layers by type, decoder layers by `_no_split_modules`, the
KV cache's own layer types); what a rule cannot tell is written here, per architecture family,
and nowhere else. An architecture not listed gets the generic rules, and the methods that need
more than those refuse it with the reason (`peftctl validate` shows what each method targets).
`tests/test_architectures.py` holds every method to these entries on each family.
"""

from __future__ import annotations

from typing import Any

# The model types tests/test_architectures.py runs every method on. Others get the generic rules
# (and `peftctl validate` says so).
TESTED = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "gpt_neox",
          "opt", "falcon", "gpt2", "mixtral", "qwen3_moe")

# (IA)³: the layers whose activations are rescaled (keys, values and the feed-forward output, the
# paper's choice), and which of them are feed-forward (their input is scaled, not their output):
# model_type → (targets, feedforward). peft's defaults where peft has them; Phi-3, OLMo 2 and
# Granite (absent from peft) on the same rule.
IA3_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "phi3": (["qkv_proj", "down_proj"], ["down_proj"]),  # q, k, v fused
    "olmo2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "granite": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    # Encoders and encoder-decoders, as peft's defaults (IA3 was introduced on T0, a T5). "output.dense"
    # matches the attention's output projection too, in peft as here.
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "electra": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
    "modernbert": (["Wqkv", "mlp.Wo"], ["mlp.Wo"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
}

# Bottleneck adapters (Houlsby, Pfeiffer) sit on the output of the linear layer that ends a
# decoder layer's attention or feed-forward block: (block child names, output projection names),
# tried in order; "" is the decoder layer itself (OPT keeps fc2 there).
#   GPT-2: attn.c_proj, mlp.c_proj;  Llama family: self_attn.o_proj, mlp.down_proj;
#   GPT-NeoX: attention.dense, mlp.dense_4h_to_h;  Falcon: self_attention.dense, mlp.dense_4h_to_h;
#   OPT: self_attn.out_proj, fc2.  Mixture-of-experts feed-forward blocks end in no linear layer.
BOTTLENECK_SITES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # After the decoders' names, the encoders' and encoder-decoders': BERT-style attention.output.dense
    # and output.dense (RoBERTa, DeBERTa, ELECTRA too), DistilBERT's out_lin and ffn.lin2, ModernBERT's
    # attn.Wo and mlp.Wo, T5's layer.0.SelfAttention.o and the last sublayer's DenseReluDense.wo.
    "attention": (("self_attn", "attn", "attention", "self_attention", "layer.0"),
                  ("o_proj", "c_proj", "dense", "out_proj", "output.dense", "out_lin", "Wo", "SelfAttention.o")),
    "feed-forward": (("mlp", "", "ffn", "layer.2", "layer.1"),
                     ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "output.dense", "lin2", "Wo", "DenseReluDense.wo")),
}

# BitFit's created biases: the config flags by which Llama-style architectures build a bias on
# every linear layer of a block, so a merged model saved with them loads with them.
BIAS_FLAGS = {"attention_bias": "self_attn", "mlp_bias": "mlp"}


def key_value_heads(config: Any) -> int:
    """The key/value heads a layer caches (prefix tuning feeds that many). Grouped-query attention
    caches fewer than it has query heads; Falcon says so in its own words: the 7B layout shares one
    (multi-query), the 40B one (new_decoder_architecture) has num_kv_heads."""
    heads = config.num_attention_heads
    if config.model_type == "falcon":
        return config.num_kv_heads if config.new_decoder_architecture else 1 if config.multi_query else heads
    return getattr(config, "num_key_value_heads", None) or heads
