"""Prompt tuning, P-tuning and prefix tuning against `peft` (the oracle for logits and the file
format): export → peft logits, peft's own adapters → peftctl, trainable counts, text init, the
recipes. Generation is held to a cache-free greedy loop instead (`greedy_reference`): peft 0.21
prepends prompt-tuning's virtual tokens again at every cached decoding step under transformers
5.24, so agreeing with peft there would mean sharing its bug.

Tolerances: fp32 throughout, logits within atol 1e-5. Every adapter compared is non-trivial:
trained a few steps (its export moved from its init) and its logits at real (unmasked) positions
differ from the base model's by more than 1e-3. peft's prompt / P-tuning logits include the
virtual positions; ours are the real tokens' only, so the comparison takes peft's last `length`
positions.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from pydantic import ValidationError
from transformers import MistralConfig, MistralForCausalLM
from typer.testing import CliRunner

from peftctl.cli.commands import app
from peftctl.core.errors import UserError
from peftctl.export.adapter_files import load_adapter, save_adapter
import peftctl.methods
from peftctl.methods.base import BaseFacts
from peftctl.methods.prompt import PrefixTuningConfig, PromptTuningConfig, PTuningConfig
from peftctl.model.builtins import byte_level_tokenizer
from peftctl.recipe.load import load_recipe
from peftctl.run.pipeline import run
from peftctl.train.loss import CausalLMLoss
from greedy_reference import greedy_without_cache
from hf_folders import save_tiny_llama
from tiny_models import real_difference, tiny_gpt2, tiny_llama, token_batch, train_steps

# peft warns that it drops the position_ids `generate` passes; so do we, to match it.
pytestmark = pytest.mark.filterwarnings("ignore:Position ids are not supported")

ATOL = 1e-5
MAX_NEW = 8
NON_TRIVIAL = 1e-3
N, HIDDEN = 4, 16
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# Hand-derived facts of the tiny models, for the parameter-count formulas: (hidden, layers,
# width of one layer's keys). Llama: 2 KV heads × 16 = 32 (GQA); GPT-2: 4 heads × 16 = 64.
GEOMETRY = {"llama": (64, 2, 32), "gpt2": (64, 2, 64)}

VARIANTS = {
    "prompt": PromptTuningConfig(name="prompt_tuning", num_virtual_tokens=N),
    "p_mlp": PTuningConfig(name="p_tuning", num_virtual_tokens=N, encoder_hidden_size=HIDDEN),
    "p_lstm": PTuningConfig(name="p_tuning", num_virtual_tokens=N, encoder_hidden_size=HIDDEN,
                            encoder_reparameterization_type="LSTM", encoder_num_layers=2, encoder_dropout=0.1),
    "prefix": PrefixTuningConfig(name="prefix_tuning", num_virtual_tokens=N),
    "prefix_proj": PrefixTuningConfig(name="prefix_tuning", num_virtual_tokens=N, prefix_projection=True,
                                      encoder_hidden_size=HIDDEN),
}


def peft_config(variant: str) -> peft.PeftConfig:
    """A fresh peft config per model: peft writes the model's shapes into the object it gets."""
    common = {"task_type": "CAUSAL_LM", "num_virtual_tokens": N}
    return {
        "prompt": lambda: peft.PromptTuningConfig(**common),
        "p_mlp": lambda: peft.PromptEncoderConfig(**common, encoder_hidden_size=HIDDEN),
        "p_lstm": lambda: peft.PromptEncoderConfig(**common, encoder_hidden_size=HIDDEN,
                                                   encoder_reparameterization_type="LSTM", encoder_num_layers=2,
                                                   encoder_dropout=0.1),
        "prefix": lambda: peft.PrefixTuningConfig(**common),
        "prefix_proj": lambda: peft.PrefixTuningConfig(**common, prefix_projection=True, encoder_hidden_size=HIDDEN),
    }[variant]()


def expected_trainable(variant: str, model_key: str) -> int:
    """The papers' (and peft's) parameter counts, written out."""
    d, layers, kv = GEOMETRY[model_key]
    h = HIDDEN
    lstm = sum(2 * (4 * h * (d_in + h) + 8 * h) for d_in in (d, 2 * h))  # 2 layers, 2 directions
    return {
        "prompt": N * d,
        "p_mlp": N * d + (d * h + h) + (h * h + h) + (h * d + d),
        "p_lstm": N * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d),
        "prefix": N * layers * 2 * kv,
        "prefix_proj": N * kv + (kv * h + h) + (h * layers * 2 * kv + layers * 2 * kv),
    }[variant]


def real_logits(model, batch, length: int) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -length:]


def greedy(model, input_ids, attention_mask, pad_id):
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW, do_sample=False,
                          pad_token_id=pad_id)


def first_scores(model, input_ids, attention_mask, pad_id) -> torch.Tensor:
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=1, do_sample=False,
                         pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True)
    return out.logits[0]


def left_padded_prompts(vocab_size: int, pad_id: int):
    """Two 6-token prompts, the second left-padded by 2: generation must respect the mask."""
    ids = token_batch(vocab_size, length=6, seed=3)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = pad_id
    return ids, mask


def assert_generate_is_greedy(model) -> None:
    """`generate` (KV cache, cache positions) gives the tokens of the cache-free greedy loop."""
    pad_id = model.config.pad_token_id
    ids, mask = left_padded_prompts(model.config.vocab_size, pad_id)
    cached = greedy(model, ids, mask, pad_id)
    expected = greedy_without_cache(model, ids, mask, MAX_NEW, model.generation_config.eos_token_id, pad_id)
    assert cached.shape[1] > ids.shape[1] + 1  # several decoding steps, not only the prefill
    assert torch.equal(cached, expected), (cached, expected)


def test_the_cache_keyword_is_read_from_the_decoder_signature():
    """transformers before 5.24 declares `past_key_values`, later releases `cache` behind a
    deprecation shim (functools.wraps): either way the hooks pass the cache under the declared name."""
    from transformers.utils.deprecation import deprecate_kwarg

    from peftctl.arch.kv_cache import cache_keyword, pop_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    class New(torch.nn.Module):
        @deprecate_kwarg("past_key_values", "9.0.0", new_name="cache")
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    assert cache_keyword(Old()) == "past_key_values" and cache_keyword(New()) == "cache"
    marker = object()
    for kwargs in ({"past_key_values": marker}, {"cache": marker}, {"cache": None, "past_key_values": marker}):
        assert pop_cache(kwargs) is marker and not kwargs


@pytest.mark.parametrize("model_key", MODELS)
def test_greedy_reference_agrees_with_generate_on_the_base_model(model_key):
    """The oracle itself: on a model with no adapter its tokens are `generate`'s."""
    assert_generate_is_greedy(MODELS[model_key]())


@pytest.mark.parametrize("model_key", MODELS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_export_loads_in_peft_with_equal_logits_and_generate_is_greedy(tmp_path, model_key, variant):
    make = MODELS[model_key]
    model = make()
    batch = token_batch(model.config.vocab_size)
    length = batch["input_ids"].shape[1]
    base = real_logits(model, batch, length)
    adapter = peftctl.methods.apply(model, VARIANTS[variant])
    initial = adapter.state_dict()["prompt_embeddings"].clone()
    train_steps(adapter, batch)
    assert (adapter.state_dict()["prompt_embeddings"] - initial).abs().max() > 1e-3

    save_adapter(adapter, tmp_path, "tiny")
    theirs_model = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    assert ours.shape[1] == length  # the virtual positions are stripped
    theirs = real_logits(theirs_model, batch, length)
    assert real_difference(ours, base, batch["attention_mask"]) > NON_TRIVIAL
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)

    assert_generate_is_greedy(model)
    pad_id = model.config.pad_token_id
    ids, mask = left_padded_prompts(model.config.vocab_size, pad_id)
    # Generation sees the adapter: the first generated token's scores move (the loop above checks the rest).
    assert (first_scores(model, ids, mask, pad_id) - first_scores(make(), ids, mask, pad_id)).abs().max() > NON_TRIVIAL


@pytest.mark.parametrize("model_key", MODELS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_trainable_count_equals_peft_and_formula(model_key, variant):
    ours = peftctl.methods.apply(MODELS[model_key](), VARIANTS[variant]).trainable_count()
    theirs, _ = peft.get_peft_model(MODELS[model_key](), peft_config(variant)).get_nb_trainable_parameters()
    assert ours == theirs == expected_trainable(variant, model_key)


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_made_adapter_loads_with_equal_logits(tmp_path, variant):
    """peft trains its own adapter (encoders included) a few steps; peftctl loads what it saved."""
    torch.manual_seed(0)
    trainer = peft.get_peft_model(tiny_llama(), peft_config(variant))
    batch = token_batch(128)
    optimizer = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        trainer(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trainer.save_pretrained(tmp_path)

    length = batch["input_ids"].shape[1]
    theirs = real_logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval(), batch, length)
    model = tiny_llama()
    base = real_logits(model, batch, length)
    adapter = load_adapter(model, tmp_path)
    assert adapter.method.name == VARIANTS[variant].name
    ours = real_logits(model, batch, length)
    assert real_difference(ours, base, batch["attention_mask"]) > NON_TRIVIAL
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    # The loaded adapter is peft's saved table; exporting it again gives back the same tensor.
    assert adapter.trainable_count() == adapter.state_dict()["prompt_embeddings"].numel()


@pytest.mark.parametrize("text", ["Hi!", "Answer briefly, please."])  # repeated / cut to 5 tokens
def test_init_text_matches_peft(tmp_path, text):
    byte_level_tokenizer().save_pretrained(tmp_path)
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text=text, tokenizer_name_or_path=str(tmp_path))
    theirs = peft.get_peft_model(tiny_gpt2(), config).prompt_encoder["default"].embedding.weight
    cfg = PromptTuningConfig(name="prompt_tuning", num_virtual_tokens=5, init_text=text)
    tokenizer = BaseFacts(tokenizer=byte_level_tokenizer)  # what the method is told of the base
    ours = peftctl.methods.apply(tiny_gpt2(), cfg, tokenizer).state_dict()["prompt_embeddings"]
    torch.testing.assert_close(ours, theirs.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("variant", ["prefix", "prefix_proj"])
def test_zero_init_prefix_starts_as_peft_init_weights_zero(variant):
    """`init: zero` is peft's `init_weights: "zero"`: the same logits before training (zero keys and
    values are not quite no prefix: they take a share of every softmax), and nearer the base's than
    a random prefix; training moves it off zero."""
    model = tiny_llama()
    batch = token_batch(model.config.vocab_size)
    length = batch["input_ids"].shape[1]
    base = real_logits(model, batch, length)
    random_start = real_logits(peftctl.methods.apply(tiny_llama(), VARIANTS[variant]).model, batch, length)
    adapter = peftctl.methods.apply(model, VARIANTS[variant].model_copy(update={"init": "zero"}))
    assert not adapter.state_dict()["prompt_embeddings"].any()
    ours = real_logits(model, batch, length)
    config = peft_config(variant)
    config.init_weights = "zero"
    theirs = real_logits(peft.get_peft_model(tiny_llama(), config).eval(), batch, length)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert (ours - base).abs().max() < (random_start - base).abs().max()
    train_steps(adapter, batch)
    assert adapter.state_dict()["prompt_embeddings"].abs().max() > 1e-3


def test_init_text_needs_a_known_tokenizer():
    cfg = PromptTuningConfig(name="prompt_tuning", num_virtual_tokens=4, init_text="hello")
    with pytest.raises(UserError) as err:
        peftctl.methods.apply(tiny_llama(), cfg)  # no tokenizer among the facts given
    assert err.value.where == "method.init_text"


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_zero_virtual_tokens_is_a_validation_error(method):
    with pytest.raises(UserError) as err:
        load_recipe(RECIPES / f"{method}-gpt2.yaml", ["method.num_virtual_tokens=0"])
    assert err.value.where.startswith("method.num_virtual_tokens")


def test_options_of_another_encoder_are_refused():
    with pytest.raises(ValidationError, match="prefix_projection"):
        PrefixTuningConfig(name="prefix_tuning", encoder_hidden_size=64)
    with pytest.raises(ValidationError, match="LSTM"):
        PTuningConfig(name="p_tuning", encoder_num_layers=3)


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_merge_is_refused_with_the_reason(method):
    variant = {"prompt_tuning": "prompt", "p_tuning": "p_mlp", "prefix_tuning": "prefix"}[method]
    adapter = peftctl.methods.apply(tiny_llama(), VARIANTS[variant])
    with pytest.raises(UserError, match="cannot be merged.*extra inputs"):
        adapter.method.merge(adapter)


def test_prefix_tuning_refuses_a_sliding_window_cache():
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    with pytest.raises(UserError, match="KV cache.*DynamicSlidingWindowLayer"):
        peftctl.methods.apply(model, VARIANTS["prefix"])


def test_prefix_tuning_refuses_a_static_cache_in_generate():
    model = tiny_llama()
    peftctl.methods.apply(model, VARIANTS["prefix"])
    ids = token_batch(128, batch=1, length=5)["input_ids"]
    with pytest.raises(UserError, match="dynamic KV cache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static", pad_token_id=0)


@pytest.mark.parametrize("variant", ["prompt", "prefix_proj"])
def test_bf16_base_trains_fp32_weights(variant):
    model = tiny_llama().to(torch.bfloat16)
    adapter = peftctl.methods.apply(model, VARIANTS[variant])
    assert all(p.dtype == torch.float32 for p in adapter.params.values())
    loss_sum, count = CausalLMLoss(model)(**token_batch(128))
    (loss_sum / count).backward()
    grads = [p.grad for p in adapter.params.values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_prefix_adapter_changes_the_loss_peftctl_eval_measures(tmp_path, layout):
    """`peftctl eval` runs the exported prefix through the model as a user would: its loss is the
    training loop's validation loss after training, not the base model's."""
    overrides = []
    if layout == "llama":
        overrides.append(f"model.name_or_path={save_tiny_llama(tmp_path / 'base')}")
    summary = run(load_recipe(RECIPES / "prefix_tuning-gpt2.yaml", overrides, output_dir=tmp_path / "run"))
    result = CliRunner().invoke(app, ["eval", str(summary.adapter_dir), "--samples", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # (The loop's loss before training already has the random initial prefix in it.)
    assert report["adapter"]["loss"] == pytest.approx(summary.result.val_loss_after, abs=1e-5)
    assert report["adapter"]["loss"] < report["base"]["loss"] - 0.05
    if layout == "llama":  # (the tiny GPT-2 replies with newlines, prefix or not)
        generation = report["generations"][0]
        assert generation["generated"] != generation["base"]


@pytest.mark.slow
@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_smollm2_recipe_starts(tmp_path, method):
    recipe = load_recipe(RECIPES / f"{method}-smollm2.yaml", ["train.max_steps=2"], output_dir=tmp_path / "run")
    summary = run(recipe)
    assert summary.result.steps == 2
    assert (summary.adapter_dir / "adapter_model.safetensors").is_file()
