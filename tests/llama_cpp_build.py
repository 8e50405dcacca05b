"""llama.cpp's Python binding for the slow tests, built once from the llama-cpp-python sdist.

The wheel on PyPI is for other machines; the sdist vendors llama.cpp and builds it here (cmake
and a C/C++ compiler, several minutes). The wheel is cached under ~/.cache/peftctl-tests (or
$PEFTCTL_TEST_CACHE) and unpacked into a folder of its own there, put on sys.path: the test
environment is not changed. Building is a step of its own, `python tests/llama_cpp_build.py`, the
only one that reaches the network (PyPI, pinned versions); the tests skip until it has run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

CACHE = Path(os.environ.get("PEFTCTL_TEST_CACHE", Path.home() / ".cache" / "peftctl-tests"))
SITE = CACHE / "llama_cpp_site"
GGML_F32 = 0  # ggml_type of the KV cache: f32, so that attention is not rounded to f16


# The versions the slow tests were run with: what a user's llama.cpp is compared against stays fixed.
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
DISKCACHE = "diskcache==5.6.3"  # llama_cpp imports it (pure Python); its other requirements are ours
BUILD_COMMAND = "python tests/llama_cpp_build.py"


def import_llama_cpp():
    """The `llama_cpp` module from the cache; the test is skipped (tests never reach the network)
    until `python tests/llama_cpp_build.py` has built it once."""
    if not (SITE / "llama_cpp").is_dir():
        pytest.skip(f"llama.cpp's Python binding is not built yet: run `{BUILD_COMMAND}` once (it downloads "
                    f"{LLAMA_CPP_PYTHON}'s sdist and {DISKCACHE} from PyPI and builds for several minutes)")
    if str(SITE) not in sys.path:
        sys.path.insert(0, str(SITE))
    import llama_cpp

    return llama_cpp


def build() -> None:
    """Download the pinned sdist, build its wheel (cmake and a C/C++ compiler) and unpack it with
    diskcache into the cache's own folder; the Python environment is not changed."""
    missing = [tool for tool in ("cmake", "cc", "c++") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"building llama-cpp-python needs {', '.join(missing)}, not found on PATH")
    sdists, wheels = CACHE / "sdist", CACHE / "wheels"
    _pip("download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PYTHON, "-d", str(sdists))
    sdist = sorted(sdists.glob("llama_cpp_python-*.tar.gz"))[-1]
    # nice and two build jobs: the build shares the machine with whatever else runs.
    _pip("wheel", "--no-deps", str(sdist), "-w", str(wheels), nice=True, env={"CMAKE_BUILD_PARALLEL_LEVEL": "2"})
    wheel = sorted(wheels.glob("llama_cpp_python-*.whl"))[-1]
    _pip("install", "--no-deps", "--target", str(SITE), str(wheel), DISKCACHE)
    print(f"llama.cpp's binding is in {SITE}")


def _pip(*args: str, nice: bool = False, env: dict | None = None) -> None:
    command = (["nice", "-n", "19"] if nice else []) + [sys.executable, "-m", "pip", "-q", *args]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=5400)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])


def llama_cpp_logits(llama_cpp, model: Path, tokens: list[int], lora: Path | None = None,
                     lora_scale: float = 1.0) -> np.ndarray:
    """llama.cpp's logits [len(tokens), vocab] for `tokens`, as `llama-cli -m model --lora lora`
    computes them on the CPU, with two settings for exact comparisons:
      * the KV cache in f32 (its default f16 rounds attention by ~1e-3 relative);
      * no extra buffer types (weight repacking, AMX kernels): on a virtual machine that reports
        AMX without the kernel enabling it, llama.cpp's AMX matmul crashes.
    """
    params = llama_cpp.llama_cpp.llama_model_default_params
    high_level = sys.modules["llama_cpp.llama"]

    def without_extra_buffers():
        chosen = params()
        chosen.use_extra_bufts = False
        return chosen

    high_level.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, lora_scale=lora_scale,
                              logits_all=True, n_ctx=max(64, len(tokens)), n_threads=2, type_k=GGML_F32,
                              type_v=GGML_F32, verbose=False)
    finally:
        high_level.llama_cpp.llama_model_default_params = params
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


if __name__ == "__main__":
    build()
