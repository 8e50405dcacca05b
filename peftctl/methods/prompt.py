"""Prompt-style methods: prompt tuning (Lester et al., 2021), P-tuning (Liu et al., 2021) and
prefix tuning (Li & Liang, 2021). None of them changes a weight of the model.

  * prompt tuning prepends n trainable "virtual token" embeddings to the input embeddings;
  * P-tuning produces those n embeddings with a small MLP or bidirectional LSTM (trained along)
    from a table of n embeddings: the reparameterisation eases optimisation;
  * prefix tuning gives the attention of every layer n trainable key/value pairs, fed in as a
    prefilled KV cache, optionally produced by a 2-layer MLP (`prefix_projection`).
The encoders (MLP, LSTM, projection) only help training: peft saves, and peftctl exports, their
output as the one tensor `prompt_embeddings`, and loads it back as a plain table.

The training loop calls `model.base_model(input_ids=, attention_mask=)` and expects hidden
states for the real tokens. Two hooks on that decoder keep it so: before its forward they
prepend the virtual tokens (or prefill the cache) and widen the attention mask; after it they
strip the virtual positions, so `model(input_ids).logits` lines up with the real tokens too.
Positions follow peft, so an export gives the same logits under `peft.PeftModel`:
  * prompt / P-tuning: virtual tokens sit at positions 0..n-1, real tokens from n on; explicit
    position_ids (which `generate` computes from the unwidened mask) are dropped, as peft does,
    and the model counts positions from the cache length;
  * prefix tuning: the cache starts n long, and explicit position_ids are shifted by n.
While generating with a KV cache only the first call (empty cache) injects anything; later calls
only widen the mask over the n virtual positions already cached.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from peftctl.architectures import key_value_heads
from peftctl.errors import UserError
from peftctl.kv_cache import cache_keyword, decoder_stack, pop_cache
from peftctl.methods.base import Adapter, Method, MethodConfig, freeze, reject_unsupported
from peftctl.state_dicts import load_strict

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

    @model_validator(mode="after")
    def _width_needs_projection(self) -> PrefixTuningConfig:
        if self.encoder_hidden_size is not None and not self.prefix_projection:
            raise ValueError("encoder_hidden_size is the projection MLP's width: set prefix_projection: true, "
                             "or remove encoder_hidden_size")
        return self


# --- layers -------------------------------------------------------------------------------------


class PromptEncoder(nn.Module):
    """n trainable rows, optionally passed through a reparameterisation network (`head`).

    `forward()` gives the [n, width] virtual tokens, or for prefix tuning the [n, layers·2·kv width]
    flattened keys and values: peft's `prompt_embeddings`.
    """

    def __init__(self, embedding: nn.Embedding, head: nn.Module | None = None):
        super().__init__()
        self.embedding = embedding
        self.head = head

    def forward(self) -> torch.Tensor:
        table = self.embedding.weight
        return table if self.head is None else self.head(table)

    @torch.no_grad()
    def output(self) -> torch.Tensor:
        """What peft saves as `prompt_embeddings`: the output without dropout, detached."""
        was_training = self.training
        self.eval()
        table = self().detach().clone()
        self.train(was_training)
        return table

    def bake(self) -> None:
        """Replace table + head by a table holding their output: the form peft saves and loads."""
        if self.head is not None:
            table = self.output()
            self.head = None
            self.embedding = nn.Embedding.from_pretrained(table, freeze=False)


class LSTMHead(nn.Module):
    """P-tuning's LSTM encoder: a bidirectional LSTM over the n rows, then a 2-layer MLP (peft's layout)."""

    def __init__(self, width: int, hidden: int, num_layers: int, dropout: float, **factory):
        super().__init__()
        self.lstm_head = nn.LSTM(width, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                 batch_first=True, **factory)
        self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **factory), nn.ReLU(),
                                      nn.Linear(2 * hidden, width, **factory))

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.lstm_head(table.unsqueeze(0))[0]).squeeze(0)


# --- the hooks that feed the virtual tokens through the unmodified model ------------------------


def _is_prefill(cache: Any) -> bool:
    """The first call of a forward or a generation: nothing cached yet, so inject the virtual tokens."""
    return cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0)


def _widen(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The attention mask with n leading ones for the virtual positions."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise UserError(
            f"prompt methods need a 2-D attention mask [batch, tokens]; got one of shape {tuple(mask.shape)}",
            fix="pass the tokenizer's attention_mask, or none",
        )
    ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
    return torch.cat((ones, mask), dim=1)


class _DecoderHooks:
    """Shared plumbing: the decoder's positional arguments by name (GPT-2 passes input_ids by position),
    and its KV cache under whichever keyword the decoder declares (see `peftctl.kv_cache`)."""

    def __init__(self, model: nn.Module, encoder: PromptEncoder):
        self.encoder = encoder
        self.n = encoder.embedding.num_embeddings
        self.embed = model.get_input_embeddings()
        self.decoder = decoder_stack(model)
        signature = inspect.signature(self.decoder.forward)
        self.arg_names = [p.name for p in signature.parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.cache_keyword = cache_keyword(self.decoder)

    def install(self, decoder: nn.Module) -> list:
        return [decoder.register_forward_pre_hook(self._before, with_kwargs=True),
                decoder.register_forward_hook(self._after)]

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = {**dict(zip(self.arg_names, args)), **kwargs}
        cache = pop_cache(kwargs)
        # transformers before 5.24 also passes cache positions, counted without the n virtual ones;
        # dropped, the decoder counts them from the cache, which holds the virtual positions too.
        kwargs.pop("cache_position", None)
        kwargs[self.cache_keyword] = self.inject(kwargs, cache)
        kwargs["attention_mask"] = _widen(kwargs.get("attention_mask"), self.n)
        return (), kwargs

    def inject(self, kwargs: dict, cache: Any) -> Any:
        """Feed the virtual tokens into the call's `kwargs`; return the KV cache the decoder gets."""
        raise NotImplementedError

    def _after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return output


class _PrependHooks(_DecoderHooks):
    """Prompt / P-tuning: virtual tokens in front of the input embeddings, stripped from the output."""

    strip = False

    def inject(self, kwargs: dict, cache: Any) -> Any:
        # peft drops explicit positions (and token types, which would no longer line up).
        for key in ("position_ids", "token_type_ids"):
            if kwargs.get(key) is not None:
                kwargs[key] = None
        self.strip = _is_prefill(cache)
        if not self.strip:
            return cache
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = self.embed(kwargs["input_ids"])
        prompts = self.encoder().to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        kwargs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
        kwargs["input_ids"] = None
        return cache

    def _after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self.strip:
            return output
        self.strip = False
        n = self.n
        if isinstance(output, tuple):
            return (output[0][:, n:], *output[1:])
        output.last_hidden_state = output.last_hidden_state[:, n:]
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, n:] for h in output.hidden_states)
        return output


class _PrefixHooks(_DecoderHooks):
    """Prefix tuning: the cache starts with n learned key/value pairs per layer."""

    def __init__(self, model: nn.Module, encoder: PromptEncoder, geometry: _Geometry):
        super().__init__(model, encoder)
        self.geometry = geometry
        self.config = model.config

    def inject(self, kwargs: dict, cache: Any) -> Any:
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + self.n
        if not _is_prefill(cache):
            return cache
        reference = kwargs.get("inputs_embeds")
        if reference is None:
            reference = kwargs["input_ids"]
        return self.prefill(cache, reference.shape[0])

    def prefill(self, cache: Cache | None, batch_size: int) -> Cache:
        if cache is None:
            cache = DynamicCache(config=self.config)
        if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise UserError(
                f"prefix tuning needs a plain dynamic KV cache; this call uses {type(cache).__name__}",
                fix="generate with the default cache (no cache_implementation or static cache)",
            )
        g = self.geometry
        weight = self.embed.weight
        prefix = self.encoder().to(dtype=weight.dtype)
        # [n, layers·2·heads·head] → [layers·2, batch, heads, n, head]: peft's layout (keys first).
        kv = prefix.view(self.n, g.num_layers * 2, g.kv_heads, g.head_dim).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, batch_size, -1, -1, -1).contiguous()
        for layer in range(g.num_layers):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
        return cache


# --- model facts --------------------------------------------------------------------------------


class _Geometry:
    """The attention shapes a prefix must match, read from the model config as peft reads them."""

    def __init__(self, model: nn.Module):
        config = model.config
        try:
            self.num_layers = config.num_hidden_layers
            self.hidden = config.hidden_size
            self.heads = config.num_attention_heads
        except AttributeError as err:
            raise UserError(f"the model config has no {err.name}, which prompt methods need",
                            where="model.name_or_path",
                            expected="a decoder-only transformer config (num_hidden_layers, hidden_size, "
                                     "num_attention_heads)") from None
        self.kv_heads = key_value_heads(config)
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        """One layer's key (or value) width per token: peft's token_dim for prefix tuning."""
        return self.kv_heads * self.head_dim


def _check_cache_layout(model: nn.Module, geometry: _Geometry) -> None:
    """Refuse models whose KV cache is not one plain, full-attention layer per transformer layer."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UserError("prefix tuning in peftctl supports decoder-only models; this one is encoder-decoder",
                        where="name", fix="use prompt_tuning or p_tuning, or another method")
    layers = DynamicCache(config=config).layers
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd or len(layers) != geometry.num_layers:
        kinds = ", ".join(odd) or f"{len(layers)} cache layers for {geometry.num_layers} transformer layers"
        raise UserError(
            f"prefix tuning cannot feed this model's KV cache ({config.model_type}: {kinds})",
            where="name",
            expected="a model whose every layer caches full-attention keys and values (Llama, GPT-2, ...)",
            fix="use prompt_tuning or p_tuning, or another method",
        )


def _tokenizer_of(model: nn.Module):
    from peftctl.model import tokenizer_of

    if not model.config.name_or_path:
        raise UserError("init_text needs the model's tokenizer, and this model was not loaded by peftctl",
                        where="init_text", fix="omit init_text for a random start")
    return tokenizer_of(model)


def _text_embeddings(model: nn.Module, text: str, n: int) -> torch.Tensor:
    """The input embeddings of `text`'s tokens, repeated or cut to n rows (peft's TEXT init)."""
    ids = _tokenizer_of(model)(text)["input_ids"]
    if not ids:
        raise UserError("init_text has no tokens", where="init_text")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    embed = model.get_input_embeddings()
    with torch.no_grad():
        return embed(torch.tensor(ids, device=embed.weight.device)).to(torch.float32).clone()


# --- the methods --------------------------------------------------------------------------------


@dataclass
class PromptApplied:
    geometry: _Geometry  # the model's widths, as the export describes them
    hooks: list  # the decoder hook handles that feed it the virtual tokens


class _PromptMethod(Method):
    """What the three methods share: the encoder in the model, its hooks, peft's config and key."""

    merge_refusal = ("its virtual tokens are extra inputs seen by every forward pass, not a change to any "
                     "weight, so there is nothing to fold into the base model")

    def apply(self, model: nn.Module, cfg: _VirtualTokensConfig) -> Adapter:
        freeze(model)
        if hasattr(model, ENCODER):
            raise UserError("this model already has a prompt method applied", where="name",
                            fix="apply one prompt method to a freshly loaded model")
        geometry = _Geometry(model)
        # Trainable weights are fp32 on the model's device, whatever the base precision.
        factory = {"device": model.get_input_embeddings().weight.device, "dtype": torch.float32}
        encoder = self.encoder(model, cfg, geometry, factory)
        model.add_module(ENCODER, encoder)
        hooks = self.hooks(model, encoder, geometry)
        handles = hooks.install(hooks.decoder)
        return Adapter(self, cfg, model, _encoder_params(model), PromptApplied(geometry, handles))

    def encoder(self, model: nn.Module, cfg: Any, geometry: _Geometry, factory: dict) -> PromptEncoder:
        raise NotImplementedError

    def hooks(self, model: nn.Module, encoder: PromptEncoder, geometry: _Geometry) -> _DecoderHooks:
        return _PrependHooks(model, encoder)

    def token_shape(self, geometry: _Geometry) -> tuple[int, int]:
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

    def encoder_fields(self, cfg: Any, geometry: _Geometry) -> dict[str, Any]:
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

    def encoder(self, model, cfg: PromptTuningConfig, geometry, factory) -> PromptEncoder:
        embedding = nn.Embedding(cfg.num_virtual_tokens, geometry.hidden, **factory)
        if cfg.init_text is not None:
            with torch.no_grad():
                embedding.weight.copy_(_text_embeddings(model, cfg.init_text, cfg.num_virtual_tokens))
        return PromptEncoder(embedding)

    def encoder_fields(self, cfg, geometry) -> dict[str, Any]:
        # The start value is spent once trained; TEXT would make peft require a tokenizer path.
        return {"prompt_tuning_init": "RANDOM"}


class PTuning(_PromptMethod):
    name = "p_tuning"
    Config = PTuningConfig
    peft_type = "P_TUNING"
    examples = {"p_tuning": {"num_virtual_tokens": 4}}

    def encoder(self, model, cfg: PTuningConfig, geometry, factory) -> PromptEncoder:
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
    feeds_kv_cache = True

    def apply(self, model: nn.Module, cfg: PrefixTuningConfig) -> Adapter:
        _check_cache_layout(model, _Geometry(model))
        return super().apply(model, cfg)

    def token_shape(self, geometry: _Geometry) -> tuple[int, int]:
        # Keys and values per layer: on grouped-query attention fewer heads than the queries have.
        return geometry.kv_width, geometry.kv_heads

    def encoder(self, model, cfg: PrefixTuningConfig, geometry, factory) -> PromptEncoder:
        n, width = cfg.num_virtual_tokens, geometry.kv_width
        out = geometry.num_layers * 2 * width
        if not cfg.prefix_projection:
            return PromptEncoder(nn.Embedding(n, out, **factory))
        hidden = cfg.encoder_hidden_size or width
        head = nn.Sequential(nn.Linear(width, hidden, **factory), nn.Tanh(), nn.Linear(hidden, out, **factory))
        return PromptEncoder(nn.Embedding(n, width, **factory), head)

    def hooks(self, model, encoder, geometry) -> _DecoderHooks:
        return _PrefixHooks(model, encoder, geometry)

    def encoder_fields(self, cfg: PrefixTuningConfig, geometry) -> dict[str, Any]:
        return {"prefix_projection": cfg.prefix_projection,
                "encoder_hidden_size": cfg.encoder_hidden_size or geometry.kv_width}

    def options_from_peft(self, peft_config: dict[str, Any]) -> dict[str, Any]:
        projection = bool(peft_config.get("prefix_projection", False))
        return {"prefix_projection": projection,
                "encoder_hidden_size": peft_config.get("encoder_hidden_size") if projection else None}


METHODS_IN_MODULE = (PromptTuning(), PTuning(), PrefixTuning())
