"""Packing, length grouping and the attention switch: faster batches that train the same."""

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from peftctl import methods
from peftctl.core.errors import UserError
from peftctl.data.tokenize import IGNORE, Example, batches, collate, collate_packed, load_data, pack
from peftctl.methods.lora import LoraConfig
from peftctl.methods.prompt import PromptTuningConfig
from peftctl.model.loading import load_tokenizer
from peftctl.recipe.schema import DataSpec, TrainSpec
from peftctl.train import attention
from peftctl.train.loop import train
from peftctl.train.loss import CausalLMLoss, packing_problem
from tiny_models import TINY_GPT2, tiny_gpt2, tiny_llama, token_batch, train_steps

TINY_DATA = "recipes/data/tiny"


def random_examples(vocab_size: int, lengths: list[int], seed: int = 3) -> list[Example]:
    """Random token rows; the first third of each is a masked prompt."""
    g = random.Random(seed)
    examples = []
    for n in lengths:
        ids = [g.randrange(3, vocab_size - 1) for _ in range(n)]
        prompt = n // 3
        examples.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return examples


def per_example_losses(loss_model: CausalLMLoss, batch: dict, layout: list[Example]) -> list[torch.Tensor]:
    """Summed token losses of each example, in `layout` order (the order rows hold them)."""
    logits, targets = loss_model.labelled_logits(**batch)
    losses = F.cross_entropy(logits, targets, reduction="none")
    counts = [sum(label != IGNORE for label in e.labels[1:]) for e in layout]
    return [part.sum() for part in losses.split(counts)]


@pytest.mark.parametrize("build, target", [(tiny_llama, "q_proj"), (tiny_gpt2, "c_attn")])
def test_packed_and_unpacked_per_example_losses_agree(build, target):
    model = build()
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    adapter = methods.apply(model, LoraConfig(name="lora", r=4, target_modules=[target]))
    train_steps(adapter, token_batch(vocab))  # a non-trivial adapter, not the identity at init
    loss_model = CausalLMLoss(model)
    examples = random_examples(vocab, [5, 17, 9, 30, 12, 3, 22, 8])
    rows = pack(examples, max_len=40)
    assert len(rows) < len(examples)  # several examples really share rows
    with torch.no_grad():
        alone = per_example_losses(loss_model, collate(examples, pad_id=0), examples)
        packed_layout = [e for row in rows for e in row]
        packed = per_example_losses(loss_model, collate_packed(rows, pad_id=0), packed_layout)
    by_example = {id(e): loss for e, loss in zip(packed_layout, packed)}
    for example, loss in zip(examples, alone):
        torch.testing.assert_close(by_example[id(example)], loss, rtol=1e-5, atol=1e-5)
    # Without restarting positions (one sequence per row as far as the model knows) they differ.
    leaky = collate_packed(rows, pad_id=0)
    leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1]).expand_as(leaky["input_ids"])
    with torch.no_grad():
        mixed = per_example_losses(loss_model, leaky, packed_layout)
    assert max(abs(float(a - b)) for a, b in zip(mixed, packed)) > 1e-2


def test_pack_keeps_every_example_once_in_rows_that_fit():
    examples = random_examples(100, [5, 17, 9, 30, 12, 3, 22, 8])
    rows = pack(examples, max_len=40)
    assert sorted(id(e) for row in rows for e in row) == sorted(id(e) for e in examples)
    widths = [sum(len(e.input_ids) for e in row) for row in rows]
    assert max(widths) <= 40
    assert len(rows) * max(widths) < len(examples) * 30  # fewer tokens than padding to the longest
    # An example longer than max_len still gets a row of its own.
    assert [len(row) for row in pack(examples[:2], max_len=3)] == [1, 1]


def test_collate_packed_restarts_positions_and_drops_each_first_label():
    rows = [[Example([5, 6, 7], [IGNORE, 6, 7]), Example([8, 9], [8, 9])], [Example([4], [4])]]
    full = collate_packed(rows, pad_id=0)
    assert full["input_ids"].shape == (2, 16)  # widths are rounded up to 16 (data.WIDTH_MULTIPLE)
    assert full["position_ids"][:, 5:].tolist() == [list(range(11)), list(range(4, 15))]
    assert (full["labels"][:, 5:] == IGNORE).all() and not full["attention_mask"][:, 5:].any()
    batch = {key: value[:, :5] for key, value in full.items()}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    # 8 would be the target of 7, the previous example's last token: it is not learned.
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9], [IGNORE] * 5]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_GPT2)


def tiny_data(tokenizer, packing):
    spec = DataSpec(train=f"{TINY_DATA}/train.jsonl", validation=f"{TINY_DATA}/validation.jsonl", packing=packing)
    return load_data(spec, tokenizer, seed=0)


def trained(tokenizer, tmp_path, method_cfg, packing, **options):
    torch.manual_seed(0)
    adapter = methods.apply(tiny_gpt2(), method_cfg)
    spec = TrainSpec(batch_size=4, max_steps=3, lr=1e-2, scheduler="constant", seed=1, **options)
    result = train(adapter, tiny_data(tokenizer, packing), spec, tmp_path, tokenizer.pad_token_id)
    return adapter, result


def test_packed_training_takes_the_same_steps_as_padded(tokenizer, tmp_path):
    """Packing changes the layout of each batch, not its examples: the same updates."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    lora = LoraConfig(name="lora", r=4, target_modules=["c_attn"])
    packed, packed_result = trained(tokenizer, tmp_path / "a", lora, packing=True)
    padded, padded_result = trained(tokenizer, tmp_path / "b", lora, packing=False)
    assert packed_result.packed and not padded_result.packed
    assert packed_result.tokens == padded_result.tokens  # real tokens: the same examples
    for name, param in packed.params.items():
        assert param.abs().max() > 0
        torch.testing.assert_close(param, padded.params[name], rtol=1e-4, atol=1e-5)
    assert packed_result.val_loss_after == pytest.approx(padded_result.val_loss_after, rel=1e-5)


def test_packing_is_refused_for_a_method_that_prepends_tokens(tokenizer, tmp_path):
    prompt = PromptTuningConfig(name="prompt_tuning", num_virtual_tokens=4)
    model = tiny_gpt2()
    methods.apply(model, prompt)
    data = tiny_data(tokenizer, packing=True)
    reason = packing_problem(CausalLMLoss(model), data.train, tokenizer.pad_token_id, torch.device("cpu"))
    assert reason is not None and "attend to each other" in reason
    with pytest.raises(UserError, match="cannot be packed"):
        trained(tokenizer, tmp_path, prompt, packing=True)
    _, result = trained(tokenizer, tmp_path, prompt, packing="auto")  # falls back to padding
    assert not result.packed


def test_group_by_length_batches_similar_lengths_in_random_order():
    rng = random.Random(7)
    lengths = [rng.randrange(4, 60) for _ in range(64)]
    examples = random_examples(100, lengths)

    def padding(grouped, seed):
        fed = real = 0
        seen = []
        for batch in batches(examples, 4, pad_id=0, shuffle_seed=seed, group_by_length=grouped):
            lengths = batch["attention_mask"].sum(1)
            fed += len(lengths) * int(lengths.max())  # padded to the longest row (before rounding to 16)
            real += int(lengths.sum())
            seen.append(batch["input_ids"][0, :3].tolist())
        return 1 - real / fed, seen

    plain, _ = padding(False, 1)
    grouped, order1 = padding(True, 1)
    _, order2 = padding(True, 2)
    assert len(order1) == 16  # every example once: 64 / 4 batches
    assert grouped < plain / 3
    assert order1 != order2 and sorted(order1) != order1  # batch order is shuffled, and by the seed


def test_auto_attention_trains_eager_on_cpu_and_restores_the_models(tokenizer, tmp_path):
    lora = LoraConfig(name="lora", r=4, target_modules=["c_attn"])
    adapter, result = trained(tokenizer, tmp_path, lora, packing=False)
    # On CPU: eager attention, as peftctl's grouped kernel (bit-identical on GPT-2, attention.py).
    assert result.attention == ("sdpa" if torch.cuda.is_available() else attention.NAME)
    assert adapter.model.config._attn_implementation == "sdpa"


def test_the_packing_probe_runs_without_autograd(tokenizer):
    """The probe's forward passes build no graph: their losses carry no grad_fn, and reading them
    as numbers warns of nothing (it did: `probing`'s no_grad did not reach the caller's body)."""
    model = tiny_gpt2()
    methods.apply(model, LoraConfig(name="lora", r=4, target_modules=["c_attn"]))
    data = tiny_data(tokenizer, packing=True)
    seen = []
    hook = model.transformer.h[0].register_forward_hook(lambda module, args, out: seen.append(torch.is_grad_enabled()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert packing_problem(CausalLMLoss(model), data.train, tokenizer.pad_token_id, torch.device("cpu")) is None
    hook.remove()
    assert seen and not any(seen)
