"""The engine behind `peftctl chat` and `peftctl serve`: every method's adapter on one tiny GPT-2,
all served at once. Requests for the base and every adapter, mixed in one batch, must get
token for token the greedy reply that adapter gives alone, and that `transformers`' generate
gives on a fresh base with the adapter loaded as `peftctl eval` loads it.
"""

from __future__ import annotations

import queue

import pytest
import torch

from method_checks import EXAMPLES
from peftctl.core.errors import UserError
from peftctl.data.tokenize import chat_prompt
from peftctl.export.adapter_files import load_adapter
from peftctl.model.loading import load_model
from peftctl.serve.engine import Busy, Engine, Finished, Refused
from peftctl.serve.pool import ModelPool
from peftctl.serve.replies import Sampling
from serve_helpers import TINY_GPT2, noisy_adapter, with_config

# One example per method: its plain form.
LABELS = list({options["name"]: label for label, options in reversed(EXAMPLES.items())}.values())
BASE = TINY_GPT2.name_or_path
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-engine")
    folders = {label: noisy_adapter(root / label, label, seed) for seed, label in enumerate(LABELS, 1)}
    pool = ModelPool(TINY_GPT2)
    for label, folder in folders.items():
        pool.add(label, folder)
    engine = Engine(pool, max_batch=64)
    engine.start()
    yield engine, folders
    engine.stop(drain=False)


def ask_all(engine, requests, sampling=Sampling(max_tokens=NEW_TOKENS)):
    """Submit every (model, prompt) at once; their Finished in order."""
    events = [queue.Queue() for _ in requests]
    for (name, prompt), box in zip(requests, events):
        engine.submit(name, prompt, sampling, box.put)
    results = []
    for box in events:
        while not isinstance(event := box.get(timeout=60), Finished):
            pass
        results.append(event)
    return results


def prompt_ids(engine, text):
    return chat_prompt(engine.pool.tokenizer, [{"role": "user", "content": text}])


def generate_reference(folder, ids, tokenizer):
    model = load_model(TINY_GPT2)
    if folder is not None:
        load_adapter(model, folder)
    input_ids = torch.tensor([ids])
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=NEW_TOKENS, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    return tokenizer.decode(new, skip_special_tokens=True)


def test_every_method_loads_and_the_layer_replacing_ones_share_the_batch(served):
    engine, _ = served
    unbatched = {name for name, s in engine.pool.served.items() if not s.batched}
    assert unbatched == {"prompt_tuning", "p_tuning", "prefix_tuning"}
    # One base: every adapter's frozen weights are the base's own tensors.
    base = {id(p) for p in engine.pool.base.parameters()}
    for s in engine.pool.served.values():
        if s.folder is not None and not s.batched:
            frozen = [p for n, p in s.model.named_parameters() if "prompt_encoder" not in n]
            assert all(id(p) in base for p in frozen), s.name


def test_mixed_batch_equals_each_alone_and_generate(served):
    engine, folders = served
    names = [BASE, *folders]
    requests = [(names[i % len(names)], prompt_ids(engine, f"question {i}: {'why ' * (i % 5)}?"))
                for i in range(2 * len(names))]
    together = ask_all(engine, requests)
    alone = [ask_all(engine, [request])[0] for request in requests]
    assert [r.text for r in together] == [r.text for r in alone]
    assert {r.reason for r in together} <= {"stop", "length"}
    distinct = {r.text for r in together[:len(names)]}
    assert len(distinct) >= len(names) // 2, distinct  # the adapters answer differently
    for (name, ids), reply in zip(requests[:len(names)], together):
        assert reply.text == generate_reference(folders.get(name), ids, engine.pool.tokenizer), name


def test_sampling_is_seeded_per_request_and_stop_strings_cut(served):
    engine, _ = served
    ids = prompt_ids(engine, "tell me")
    hot = Sampling(max_tokens=NEW_TOKENS, temperature=1.5, top_p=0.9, seed=7)
    first, second = ask_all(engine, [("lora", ids), ("lora", ids)], hot)
    assert first.text == second.text
    greedy = ask_all(engine, [("lora", ids)])[0].text
    stop = greedy[3:5]
    cut = ask_all(engine, [("lora", ids)], Sampling(max_tokens=NEW_TOKENS, stop=(stop,)))[0]
    assert cut.reason == "stop" and cut.text == greedy[:greedy.index(stop)]


def test_refusals(served, tmp_path):
    engine, folders = served
    with pytest.raises(KeyError):
        engine.submit("nope", [1], Sampling(), print)
    with pytest.raises(Refused):
        engine.submit(BASE, [1] * 1000, Sampling(max_tokens=100), print)
    with pytest.raises(UserError, match="already served"):
        engine.pool.add("lora", folders["lora"])
    with pytest.raises(UserError, match="no adapter_config.json"):
        engine.pool.add("empty", tmp_path)
    classifier = with_config(folders["lora"], tmp_path / "classifier", task_type="SEQ_CLS")
    with pytest.raises(UserError, match="task 'sequence_classification'"):
        engine.pool.add("classifier", classifier)
    full = Engine(engine.pool, max_batch=1, max_queue=1)
    full.running = True  # accepting, with no thread taking requests: the queue fills
    full.submit(BASE, [1], Sampling(), print)
    with pytest.raises(Busy):
        full.submit(BASE, [1], Sampling(), print)


def test_unloading_puts_the_base_layers_back(served, tmp_path):
    engine, folders = served
    before = {name for name, _ in engine.pool.router.named_modules()}
    engine.pool.add("extra", folders["lora"])
    ids = prompt_ids(engine, "again")
    assert ask_all(engine, [("extra", ids)])[0].text == ask_all(engine, [("lora", ids)])[0].text
    assert engine.unload("extra")
    assert {name for name, _ in engine.pool.router.named_modules()} == before
    assert engine.pool.get("extra") is None
