"""Models and datasets by their Hub ids, read from a Hugging Face cache the tests lay out on disk.

Nothing here reaches a network (conftest sets HF_HUB_OFFLINE=1): the cache is what `hf download`
or an earlier online run leaves, and peftctl's own resolution reads it through huggingface_hub
and datasets. The end-to-end run is a new process with HF_HOME pointing at the test's cache, as a
user's shell would have it; the messages are checked in-process, with huggingface_hub's and
datasets' cache folders pointed there the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import hf_raise_for_status

from cli_checks import assert_refused, invoke, snapshot
from hf_folders import save_tiny_llama
from hub_cache import cache_repo
from peftctl.core import hub
from peftctl.data.rows import read_source
from peftctl.data.tokenize import IGNORE, load_data
from peftctl.model.loading import load_tokenizer
from peftctl.recipe.schema import DataSpec, ModelSpec

MODEL = "tiny-org/tiny-llama"
DATASET = "tiny-org/qa"
QA = [{"question": f"What is {a} plus {b}?", "answer": f"{a + b}"} for a in range(4) for b in range(3)]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home: the cache folders huggingface_hub and datasets use point into
    it, as HF_HOME does for a new process (both libraries read the variable once, at import)."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    return home


@pytest.fixture
def cached_model(hf_home, tmp_path) -> Path:
    """The tiny Llama, in the cache as MODEL at branch main (its original folder is returned)."""
    source = save_tiny_llama(tmp_path / "tiny-llama-files")
    cache_repo(hf_home / "hub", MODEL, source)
    return source


@pytest.fixture
def cached_dataset(hf_home) -> None:
    cache_repo(hf_home / "hub", DATASET, {"data/train.jsonl": jsonl(QA), "data/validation.jsonl": jsonl(QA[:4])},
               kind="dataset")


def recipe(tmp_path: Path, model: dict | None = None, data: dict | None = None, name: str = "recipe.yaml") -> Path:
    text = json.dumps({  # JSON is YAML
        "model": {"name_or_path": MODEL, "dtype": "float32", **(model or {})},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": DATASET, "validation": DATASET, "columns": {"instruction": "question", "output": "answer"},
                 "max_seq_len": 64, **(data or {})},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 0.01, "save_every": None},
        "output": {"dir": str(tmp_path / "run")},
    }, indent=1)
    path = tmp_path / name
    path.write_text(text)
    return path


# --- training by Hub ids, end to end ------------------------------------------------------------


def test_a_recipe_of_hub_ids_trains_from_the_cache_and_peft_finds_the_base_by_name(tmp_path, cached_dataset):
    hf_home = tmp_path / "hf"
    source = save_tiny_llama(tmp_path / "tiny-llama-files")
    cache_repo(hf_home / "hub", MODEL, source, revision="v1")  # a tag: the recipe names it
    token = "hf_TestTokenThatMustNeverBeShown0123"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_TOKEN": token,
           "OMP_NUM_THREADS": "1"}
    path = recipe(tmp_path, model={"revision": "v1"})
    run = subprocess.run([sys.executable, "-m", "peftctl", "train", str(path), "--json"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    assert (figures["train_rows"], figures["validation_rows"]) == (len(QA), 4)
    assert figures["val_loss_after"] < figures["val_loss_before"]
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (MODEL, "v1")
    # The token is huggingface_hub's to send; peftctl never shows or stores it.
    written = b"".join(p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert token not in run.stdout + run.stderr and token.encode() not in written

    # peft finds the base by the name and revision the adapter records, in the same cache, and
    # computes what peftctl computes with the base read from the original folder.
    ids = [[5, 17, 99, 3, 250, 42]]
    peft_logits = subprocess.run([sys.executable, "-c", (
        "import json, sys, torch; from peft import AutoPeftModelForCausalLM; "
        f"m = AutoPeftModelForCausalLM.from_pretrained({str(adapter)!r}).eval(); "
        f"print(json.dumps(m(torch.tensor({ids})).logits.tolist()))")],
        env=env, capture_output=True, text=True, timeout=300)
    assert peft_logits.returncode == 0, peft_logits.stderr
    from peftctl.export.adapter_files import load_adapter
    from peftctl.model.loading import load_model

    model = load_model(ModelSpec(name_or_path=str(source), dtype="float32"))
    with torch.no_grad():
        base = model(torch.tensor(ids)).logits
        ours = load_adapter(model, adapter).model(torch.tensor(ids)).logits
    assert (ours - base).abs().max() > 1e-4  # the adapter does something (B ≠ 0)
    torch.testing.assert_close(torch.tensor(json.loads(peft_logits.stdout)), ours, atol=1e-5, rtol=0)


def test_eval_finds_an_adapters_hub_base_in_the_cache(tmp_path, cached_model, cached_dataset):
    assert invoke("train", recipe(tmp_path), "--json").exit_code == 0
    data = tmp_path / "held_out.jsonl"
    data.write_bytes(jsonl([{"instruction": row["question"], "output": row["answer"]} for row in QA[:3]]))
    result = invoke("eval", tmp_path / "run" / "adapter", "--data", data, "--samples", "0", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 3


def test_validate_says_where_hub_sources_are(tmp_path, cached_model, cached_dataset):
    result = invoke("validate", recipe(tmp_path))
    assert result.exit_code == 0, result.output
    assert f"source: model '{MODEL}': in the Hugging Face cache" in result.stderr
    assert f"source: dataset '{DATASET}': in the Hugging Face cache" in result.stderr
    assert result.stdout.startswith("task: causal_lm\nmodel:")  # stdout stays the recipe


# --- what cannot be had, and why --------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "validate"])
def test_a_model_not_in_the_cache_while_offline_names_the_fetch_command(tmp_path, hf_home, cached_dataset, command):
    path = recipe(tmp_path, model={"name_or_path": "tiny-org/absent"})
    assert_refused(invoke(command, path), f"{path}: model.name_or_path (line 3)",
                   "model 'tiny-org/absent' is not in the Hugging Face cache", str(hf_home / "hub"),
                   "HF_HUB_OFFLINE is set", "`hf download tiny-org/absent`")
    assert not (tmp_path / "run").exists()


def test_a_revision_the_cache_lacks_is_named_with_those_it_has(tmp_path, cached_model, cached_dataset):
    assert_refused(invoke("train", recipe(tmp_path, model={"revision": "v2"})),
                   "model.revision (line 5)", f"model '{MODEL}' (revision v2) is not in the Hugging Face cache",
                   "expected: a revision the cache has: main", f"`hf download {MODEL} --revision v2`")


def test_a_repo_with_only_pickled_weights_is_refused(tmp_path, hf_home, cached_dataset):
    source = save_tiny_llama(tmp_path / "files")
    files = {"config.json": (source / "config.json").read_bytes(), "pytorch_model.bin": b"\x80\x02pickle"}
    cache_repo(hf_home / "hub", "tiny-org/pickled", files)
    assert_refused(invoke("train", recipe(tmp_path, model={"name_or_path": "tiny-org/pickled"})),
                   "model.name_or_path (line 3)", "has its weights only as pickle files (pytorch_model.bin)",
                   "unpickling a file can run any code")


def test_a_dataset_not_in_the_cache_while_offline_names_the_fetch_command(tmp_path, cached_model):
    assert_refused(invoke("train", recipe(tmp_path, data={"train": "tiny-org/nothing", "validation": None})),
                   "data.train (line 15)", "dataset 'tiny-org/nothing' is not in the Hugging Face cache",
                   "`hf download --repo-type dataset tiny-org/nothing`")


def test_a_column_the_data_lacks_is_named_with_the_ones_it_has(tmp_path, cached_model, cached_dataset):
    columns = {"instruction": "question", "output": "answr"}
    assert_refused(invoke("train", recipe(tmp_path, data={"columns": columns})),
                   "data.columns.output (line", f"{DATASET} (split train) has no column 'answr'",
                   "did you mean 'answer'?", "expected: one of its columns: answer, question")


def test_data_in_other_names_without_a_mapping_is_told_how_to_map_it(tmp_path, cached_model, cached_dataset):
    assert_refused(invoke("train", recipe(tmp_path, data={"columns": {}})),
                   f"{DATASET} (split train): row index 0: missing field 'instruction'",
                   "the data's fields are answer, question", "data.columns ({instruction: COLUMN})")


def test_a_split_the_dataset_lacks_lists_its_splits(tmp_path, cached_model, cached_dataset):
    assert_refused(invoke("train", recipe(tmp_path, data={"validation_split": "test"})),
                   "data.validation_split", f"{DATASET} has no split 'test'", "one of: train, validation")


def test_a_columns_key_the_format_lacks_gets_did_you_mean(tmp_path, hf_home):
    assert_refused(invoke("validate", recipe(tmp_path, data={"columns": {"outptu": "answer"}})),
                   "data.columns", "'outptu' is not a field of the alpaca format (did you mean 'output'?)")


def hub_answer(status: int, code: str) -> Exception:
    """The exception huggingface_hub raises for the Hub's answer (status and X-Error-Code header)."""
    response = httpx2.Response(status, headers={"X-Error-Code": code},
                               request=httpx2.Request("GET", f"https://huggingface.co/api/models/{MODEL}"))
    try:
        hf_raise_for_status(response)
    except Exception as err:  # noqa: BLE001 - whichever it raises is what peftctl must explain
        return err
    raise AssertionError("hf_raise_for_status raised nothing")


@pytest.mark.parametrize(("status", "code", "where", "phrases"), [
    (401, "GatedRepo", "model.name_or_path", ["is gated", f"https://huggingface.co/{MODEL}", "HF_TOKEN"]),
    (404, "RepoNotFound", "model.name_or_path", ["is not on the Hub, or is private", "HF_TOKEN"]),
    (404, "RevisionNotFound", "model.revision", ["no such branch, tag or commit"]),
    (503, "", "model.name_or_path", ["the Hub refused", "HTTP 503", "try again later"]),
])
def test_the_hubs_refusals_become_messages(status, code, where, phrases):
    error = hub.hub_error(hub_answer(status, code), hub.RepoRef(MODEL, "v9"))
    assert error.where == where
    for phrase in phrases:
        assert phrase in error.render(), error.render()


# --- data layouts through data.columns ----------------------------------------------------------


SHAREGPT = [{"id": n, "conversations": [{"from": "system", "value": "Be brief."},
                                        {"from": "human", "value": f"Count to {n}."},
                                        {"from": "gpt", "value": " ".join(map(str, range(1, n + 1)))}]}
            for n in range(1, 7)]


def test_sharegpt_rows_train_through_columns_and_roles(tmp_path):
    data = tmp_path / "sharegpt.jsonl"
    data.write_bytes(jsonl(SHAREGPT))
    spec = DataSpec(train=data, format="chat", columns={"messages": "conversations", "role": "from",
                                                           "content": "value"})
    rows = read_source(data, spec)
    assert rows[2]["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Count to 3."},
                                   {"role": "assistant", "content": "1 2 3"}]
    tokenizer = load_tokenizer(ModelSpec(name_or_path="builtin:tiny-gpt2"))
    example = load_data(spec, tokenizer, seed=0).train[2]
    learned = tokenizer.decode([t for t in example.labels if t != IGNORE])
    assert learned.startswith("1 2 3") and "Count to" not in learned  # the reply is learned, the prompt is not

    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({
        "model": {"name_or_path": "builtin:tiny-gpt2", "dtype": "float32"}, "method": {"name": "lora", "r": 2},
        "data": {"train": data.name, "format": "chat", "columns": spec.columns},
        "train": {"max_steps": 2, "batch_size": 2, "save_every": None}, "output": {"dir": str(tmp_path / "run")}}))
    result = invoke("train", path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["train_rows"] == len(SHAREGPT)


def test_an_unknown_role_name_is_told_to_map_it(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_bytes(jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}]))
    spec = DataSpec(train=data, format="chat")
    with pytest.raises(Exception) as raised:
        read_source(data, spec)
    assert "message 2 has role 'bot'" in str(raised.value) and "data.roles, e.g. {bot: assistant}" in str(raised.value)
    assert read_source(data, DataSpec(train=data, format="chat", roles={"bot": "assistant"}))[0]["messages"][1] == \
        {"role": "assistant", "content": "hello"}


def test_a_local_dataset_folder_reads_its_splits_and_slices(tmp_path):
    folder = tmp_path / "qa"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(jsonl(QA))
    (folder / "test.jsonl").write_bytes(jsonl(QA[:2]))
    spec = DataSpec(train=folder, split="train[:5]", columns={"instruction": "question", "output": "answer"})
    rows = read_source(folder, spec)
    assert [row["output"] for row in rows] == [row["answer"] for row in QA[:5]]
    assert len(read_source(folder, spec, key="data.validation", split="test")) == 2
    before = snapshot(folder)
    with pytest.raises(Exception, match="has no split 'validation'"):
        read_source(folder, spec, key="data.validation", split="validation")
    assert snapshot(folder) == before  # datasets caches elsewhere, never in the user's folder


# --- the shipped Hub recipe, and GGUF files in Hub repos ----------------------------------------


def test_the_shipped_hub_recipe_trains_from_a_cache_under_its_ids(tmp_path, hf_home):
    """recipes/hub-qwen-alpaca.yaml as written, its ids standing for tiny stand-ins in the cache."""
    from peftctl.recipe.load import load_recipe

    shipped = Path(__file__).resolve().parents[1] / "recipes" / "hub-qwen-alpaca.yaml"
    spec = load_recipe(shipped)
    cache_repo(hf_home / "hub", spec.model.name_or_path, save_tiny_llama(tmp_path / "stand-in"))
    alpaca = [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in QA] * 5
    cache_repo(hf_home / "hub", spec.data.train, {"data/train-00000-of-00001.jsonl": jsonl(alpaca)}, kind="dataset")
    result = invoke("train", shipped, "--output", tmp_path / "run", "--set", "train.max_steps=1",
                    "--set", "data.split=train[:40]", "--set", "model.dtype=float32", "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["train_rows"] + figures["validation_rows"] == 40 and figures["validation_rows"] == 1
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"


def test_a_gguf_file_in_a_hub_repo_is_read_from_the_cache(hf_home):
    from peftctl.model.loading import SMOLLM2, SMOLLM2_GGUF, load_config, resolve_source

    gguf = resolve_source(ModelSpec(name_or_path=SMOLLM2)).folder / SMOLLM2_GGUF
    cache_repo(hf_home / "hub", "tiny-org/smol-gguf", {SMOLLM2_GGUF: gguf.read_bytes()})
    spec = ModelSpec(name_or_path="tiny-org/smol-gguf", gguf_file=SMOLLM2_GGUF)
    assert load_config(spec).num_hidden_layers == 30  # SmolLM2-135M's
    assert resolve_source(spec).folder.parent.parent.name == "models--tiny-org--smol-gguf"  # read from the cache
    with pytest.raises(Exception, match="has no file 'other.gguf' in the Hugging Face cache"):
        resolve_source(ModelSpec(name_or_path="tiny-org/smol-gguf", gguf_file="other.gguf"))
