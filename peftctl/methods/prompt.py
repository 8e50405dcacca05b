"""Prompt-style methods: prompt tuning (Lester et al., 2021), P-tuning (Liu et al., 2021) and
prefix tuning (Li & Liang, 2021). None of them changes a weight of the model.

  * prompt tuning prepends n trainable "virtual token" embeddings to the input embeddings;
  * P-tuning produces those n embeddings with a small MLP or bidirectional LSTM (trained along)
    from a table of n embeddings: the reparameterisation eases optimisation;
  * prefix tuning gives the attention of every layer n trainable key/value pairs, fed in as a
    prefilled KV cache, optionally produced by a 2-layer MLP (`prefix_projection`).
The encoders (MLP, LSTM, projection) only help training: peft saves, and peftctl exports, their
output as the one tensor `prompt_embeddings`, and loads it back as a plain table.

How the virtual tokens reach an unmodified model (decoder hooks, KV-cache prefill, the
attention geometry) is in virtual_tokens.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from peftctl.core.errors import UserError
from peftctl.core.state_dicts import load_strict
from peftctl.methods.base import Adapter, BaseFacts, Method, MethodConfig, freeze, reject_unsupported
from peftctl.methods.virtual_tokens import (
    DecoderHooks, Geometry, LSTMHead, PrefixHooks, PrependHooks, PromptEncoder, check_cache_layout, text_embeddings,
)

# Where the trainable encoder lives in the model, so that moving the model moves it too.
ENCODER = "prompt_encoder"
# peft's single saved key for all three methods (no `base_model.model.` prefix).
STATE_KEY = "prompt_embeddings"


# --- recipe options -----------------------------------------------------------------------------


class _VirtualTokensConfig(MethodConfig):
    # Declared here only so that `name` comes first in recipes and the schema; each method narrows it.
    name: str = Field(description="The method.")
    num_virtual_tokens: int = Field(
        20, gt=0, description="Number of virtual tokens (n). They take n positions of the context window."
    )


class PromptTuningConfig(_VirtualTokensConfig):
    name: Literal["prompt_tuning"] = Field(
        description="Prompt tuning: n trainable embeddings prepended to every input (a soft prompt)."
    )
    init_text: str | None = Field(
        None,
        min_length=1,
        description="Start the virtual tokens as the embeddings of this text's tokens (repeated or cut to "
        "num_virtual_tokens), e.g. a task instruction. Omitted: random normal values, as peft's RANDOM.",
    )


class PTuningConfig(_VirtualTokensConfig):
    name: Literal["p_tuning"] = Field(
        description="P-tuning: n virtual-token embeddings, produced by a small trained MLP or LSTM, prepended to "
        "every input."
    )
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field(
        "MLP",
        description="The prompt encoder: 'MLP' (3 linear layers with ReLU) or 'LSTM' (a bidirectional LSTM then a "
        "2-layer MLP).",
    )
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="Hidden width of the prompt encoder. Omitted: the model's hidden size."
    )
    encoder_num_layers: int = Field(2, gt=0, description="Layers of the LSTM encoder (LSTM only).")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout between the LSTM's layers (LSTM only).")

    @model_validator(mode="after")
    def _lstm_options_need_lstm(self) -> PTuningConfig:
        if self.encoder_reparameterization_type == "MLP" and (self.encoder_num_layers != 2 or self.encoder_dropout):
            raise ValueError("encoder_num_layers and encoder_dropout apply to the LSTM encoder only; "
                             "the MLP encoder always has 3 linear layers and no dropout")
        return self


class PrefixTuningConfig(_VirtualTokensConfig):
    name: Literal["prefix_tuning"] = Field(
        description="Prefix tuning: n trainable key/value pairs prepended to the attention of every layer."
    )
    prefix_projection: bool = Field(
        False,
        description="Produce the prefixes with a 2-layer MLP from n smaller embeddings during training (more "
        "trainable weights, often steadier training). The export holds the MLP's output either way.",
    )
    encoder_hidden_size: int | None = Field(
        None, gt=0,
        description="Hidden width of the projection MLP (prefix_projection only). Omitted: the width of one "
        "layer's keys (heads × head size).",
    )
    init: Literal["random", "zero"] = Field(
        "random",
        description="How the prefixes start: 'random' (normal values, peft's default) or 'zero' (zero keys and "
        "values, as peft's init_weights: zero; with prefix_projection the MLP's last layer starts at zero), which "
        "leaves the model close to the base at the first step, where random keys and values can raise the "
        "loss several-fold.",
    )
    # The start value is spent once trained: a continued adapter takes the recipe's (unused) value.
    training_only: ClassVar[frozenset[str]] = frozenset({"init"})

    @model_validator(mode="after")
    def _width_needs_projection(self) -> PrefixTuningConfig:
        if self.encoder_hidden_size is not None and not self.prefix_projection:
            raise ValueError("encoder_hidden_size is the projection MLP's width: set prefix_projection: true, "
                             "or remove encoder_hidden_size")
        return self


# --- the methods --------------------------------------------------------------------------------


@dataclass
class PromptApplied:
    geometry: Geometry  # the model's widths, as the export describes them
    hooks: list  # the decoder hook handles that feed it the virtual tokens


class _PromptMethod(Method):
    """What the three methods share: the encoder in the model, its hooks, peft's config and key."""

    merge_refusal = ("its virtual tokens are extra inputs seen by every forward pass, not a change to any "
                     "weight, so there is nothing to fold into the base model")
    comparable_options = {"num_virtual_tokens": "virtual tokens"}
    head_key_prefix = "base_model."  # peft's prompt-learning models hold the model itself as base_model

    def apply(self, model: nn.Module, cfg: _VirtualTokensConfig, base: BaseFacts = BaseFacts()) -> Adapter:
        freeze(model)
        if base.task == "seq2seq":
            # peft prepends the tokens to the encoder's input; peftctl's hooks sit on a decoder-only
            # stack and would be wrong there: refused rather than half done.
            raise UserError(f"{self.name} is not implemented for seq2seq models in peftctl (its virtual tokens "
                            "are fed to decoder-only and encoder-only stacks)", where="name",
                            fix="use lora, ia3 or a bottleneck adapter for seq2seq")
        if hasattr(model, ENCODER):
            raise UserError("this model already has a prompt method applied", where="name",
                            fix="apply one prompt method to a freshly loaded model")
        geometry = Geometry(model)
        # Trainable weights are fp32 on the model's device, whatever the base precision.
        factory = {"device": model.get_input_embeddings().weight.device, "dtype": torch.float32}
        encoder = self.encoder(model, cfg, geometry, factory, base)
        model.add_module(ENCODER, encoder)
        hooks = self.hooks(model, encoder, geometry)
        handles = hooks.install(hooks.decoder)
        return Adapter(self, cfg, model, _encoder_params(model), PromptApplied(geometry, handles))

    def encoder(self, model: nn.Module, cfg: Any, geometry: Geometry, factory: dict, base: BaseFacts) -> PromptEncoder:
        raise NotImplementedError

    def hooks(self, model: nn.Module, encoder: PromptEncoder, geometry: Geometry) -> DecoderHooks:
        return PrependHooks(model, encoder)

    def token_shape(self, geometry: Geometry) -> tuple[int, int]:
        """peft's (token_dim, num_attention_heads): the width of one virtual token, and its heads."""
        return geometry.hidden, geometry.heads

    def peft_config(self, adapter: Adapter) -> dict[str, Any]:
        geometry = adapter.applied.geometry
        token_dim, heads = self.token_shape(geometry)
        return {
            "num_virtual_tokens": adapter.cfg.num_virtual_tokens,
            "token_dim": token_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": heads,
            "num_layers": geometry.num_layers,
            **self.encoder_fields(adapter.cfg, geometry),
        }

    def encoder_fields(self, cfg: Any, geometry: Geometry) -> dict[str, Any]:
        return {}

    def config_from_peft(self, peft_config: dict[str, Any], source: str) -> MethodConfig:
        reject_unsupported(peft_config, {"num_transformer_submodules": 1, "modules_to_save": None}, source)
        return self.Config(name=self.name, num_virtual_tokens=peft_config["num_virtual_tokens"],
                           **self.options_from_peft(peft_config))

    def options_from_peft(self, peft_config: dict[str, Any]) -> dict[str, Any]:
        return {}

    def export_state(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        return {STATE_KEY: getattr(adapter.model, ENCODER).output()}

    def import_state(self, adapter: Adapter, state: dict[str, torch.Tensor], source: str) -> None:
        # What is saved is the encoder's output; the loaded adapter holds it as its table (as peft).
        encoder: PromptEncoder = getattr(adapter.model, ENCODER)
        encoder.bake()
        adapter.params.clear()
        adapter.params.update(_encoder_params(adapter.model))
        load_strict({STATE_KEY: encoder.embedding.weight}, state, source)


def _encoder_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{ENCODER}.{name}": p for name, p in getattr(model, ENCODER).named_parameters()}


class PromptTuning(_PromptMethod):
    name = "prompt_tuning"
    Config = PromptTuningConfig
    peft_type = "PROMPT_TUNING"
    examples = {"prompt_tuning": {"num_virtual_tokens": 4}}
    suggested_lr = 1e-3
    lr_source = ("peft's method comparison (MetaMathQA, Llama-3.2-3B): prompt tuning at 1e-3; Lester et al. "
                 "(2021): 0.3 with Adafactor")

    def encoder(self, model, cfg: PromptTuningConfig, geometry, factory, base) -> PromptEncoder:
        embedding = nn.Embedding(cfg.num_virtual_tokens, geometry.hidden, **factory)
        if cfg.init_text is not None:
            with torch.no_grad():
                embedding.weight.copy_(text_embeddings(model, base.tokenizer, cfg.init_text, cfg.num_virtual_tokens))
        return PromptEncoder(embedding)

    def encoder_fields(self, cfg, geometry) -> dict[str, Any]:
        # The start value is spent once trained; TEXT would make peft require a tokenizer path.
        return {"prompt_tuning_init": "RANDOM"}


class PTuning(_PromptMethod):
    name = "p_tuning"
    Config = PTuningConfig
    peft_type = "P_TUNING"
    examples = {"p_tuning": {"num_virtual_tokens": 4}}

    def encoder(self, model, cfg: PTuningConfig, geometry, factory, base) -> PromptEncoder:
        width, hidden = geometry.hidden, cfg.encoder_hidden_size or geometry.hidden
        if cfg.encoder_reparameterization_type == "LSTM":
            head = LSTMHead(width, hidden, cfg.encoder_num_layers, cfg.encoder_dropout, **factory)
        else:
            head = nn.Sequential(nn.Linear(width, hidden, **factory), nn.ReLU(),
                                 nn.Linear(hidden, hidden, **factory), nn.ReLU(),
                                 nn.Linear(hidden, width, **factory))
        return PromptEncoder(nn.Embedding(cfg.num_virtual_tokens, width, **factory), head)

    def encoder_fields(self, cfg: PTuningConfig, geometry) -> dict[str, Any]:
        return {
            "encoder_reparameterization_type": cfg.encoder_reparameterization_type,
            "encoder_hidden_size": cfg.encoder_hidden_size or geometry.hidden,
            "encoder_num_layers": cfg.encoder_num_layers,
            "encoder_dropout": cfg.encoder_dropout,
        }

    def options_from_peft(self, peft_config: dict[str, Any]) -> dict[str, Any]:
        kind = str(peft_config.get("encoder_reparameterization_type", "MLP"))
        options = {"encoder_reparameterization_type": kind,
                   "encoder_hidden_size": peft_config.get("encoder_hidden_size")}
        if kind == "LSTM":  # peft ignores these for the MLP; so must we, not refuse them
            options["encoder_num_layers"] = peft_config.get("encoder_num_layers", 2)
            options["encoder_dropout"] = peft_config.get("encoder_dropout", 0.0)
        return options


class PrefixTuning(_PromptMethod):
    name = "prefix_tuning"
    Config = PrefixTuningConfig
    peft_type = "PREFIX_TUNING"
    examples = {"prefix_tuning": {"num_virtual_tokens": 4}}
    # A random prefix of 20 key/value pairs took the quickstart's validation loss from 1.79 to 11.8
    # before training; 50 steps left it above the base's (2.11).
    suggested_options = {"init": "zero"}
    suggested_lr = 5e-3
    lr_source = "peft's method comparison (MetaMathQA, Llama-3.2-3B): zero-initialised prefix tuning at 5e-3"
    feeds_kv_cache = True

    def apply(self, model: nn.Module, cfg: PrefixTuningConfig, base: BaseFacts = BaseFacts()) -> Adapter:
        if base.task == "sequence_classification":
            # Encoders take no KV cache at all, and peft (with transformers 5) refuses prefix tuning on
            # every classifier, so there is no oracle for a decoder's either.
            raise UserError("prefix tuning feeds a KV cache, which classifiers do not take (peft refuses them "
                            "too)", where="name", fix="use p_tuning or prompt_tuning, or lora, on a classifier")
        check_cache_layout(model, Geometry(model))
        return super().apply(model, cfg, base)

    def token_shape(self, geometry: Geometry) -> tuple[int, int]:
        # Keys and values per layer: on grouped-query attention fewer heads than the queries have.
        return geometry.kv_width, geometry.kv_heads

    def encoder(self, model, cfg: PrefixTuningConfig, geometry, factory, base) -> PromptEncoder:
        n, width = cfg.num_virtual_tokens, geometry.kv_width
        out = geometry.num_layers * 2 * width
        if not cfg.prefix_projection:
            encoder = PromptEncoder(nn.Embedding(n, out, **factory))
            last = encoder.embedding
        else:
            hidden = cfg.encoder_hidden_size or width
            head = nn.Sequential(nn.Linear(width, hidden, **factory), nn.Tanh(), nn.Linear(hidden, out, **factory))
            encoder, last = PromptEncoder(nn.Embedding(n, width, **factory), head), head[-1]
        if cfg.init == "zero":  # what produces the keys and values outputs zeros (peft's init_weights: zero)
            for tensor in last.parameters():
                nn.init.zeros_(tensor)
        return encoder

    def hooks(self, model, encoder, geometry) -> DecoderHooks:
        return PrefixHooks(model, encoder, geometry)

    def encoder_fields(self, cfg: PrefixTuningConfig, geometry) -> dict[str, Any]:
        return {"prefix_projection": cfg.prefix_projection,
                "encoder_hidden_size": cfg.encoder_hidden_size or geometry.kv_width}

    def options_from_peft(self, peft_config: dict[str, Any]) -> dict[str, Any]:
        projection = bool(peft_config.get("prefix_projection", False))
        return {"prefix_projection": projection,
                "encoder_hidden_size": peft_config.get("encoder_hidden_size") if projection else None}


METHODS_IN_MODULE = (PromptTuning(), PTuning(), PrefixTuning())
