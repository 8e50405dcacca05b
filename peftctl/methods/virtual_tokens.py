"""The machinery of the prompt-style methods (prompt.py): the virtual tokens' encoder, the
attention shapes a prefix must match, and the decoder hooks that feed virtual tokens through an
unmodified model.

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
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from peftctl.arch.architectures import key_value_heads
from peftctl.arch.kv_cache import cache_keyword, decoder_stack, pop_cache
from peftctl.core.errors import UserError


# --- model facts --------------------------------------------------------------------------------


class Geometry:
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


def check_cache_layout(model: nn.Module, geometry: Geometry) -> None:
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


class DecoderHooks:
    """Shared plumbing: the decoder's positional arguments by name (GPT-2 passes input_ids by position),
    and its KV cache under whichever keyword the decoder declares (see `peftctl.arch.kv_cache`)."""

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


class PrependHooks(DecoderHooks):
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


class PrefixHooks(DecoderHooks):
    """Prefix tuning: the cache starts with n learned key/value pairs per layer."""

    def __init__(self, model: nn.Module, encoder: PromptEncoder, geometry: Geometry):
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


# --- prompt tuning's start from a text ----------------------------------------------------------


def text_embeddings(model: nn.Module, tokenizer: Callable[[], Any] | None, text: str, n: int) -> torch.Tensor:
    """The input embeddings of `text`'s tokens, repeated or cut to n rows (peft's TEXT init);
    `tokenizer` loads the base's tokenizer (BaseFacts.tokenizer)."""
    if tokenizer is None:
        raise UserError("init_text needs the model's tokenizer, and none was given with this model",
                        where="init_text", fix="omit init_text for a random start")
    ids = tokenizer()(text)["input_ids"]
    if not ids:
        raise UserError("init_text has no tokens", where="init_text")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    embed = model.get_input_embeddings()
    with torch.no_grad():
        return embed(torch.tensor(ids, device=embed.weight.device)).to(torch.float32).clone()
