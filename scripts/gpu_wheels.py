"""What the GPU machine lacks, as wheels that travel with the proof (`scripts/gpu_proof.py --wheels DIR`).

The lent GPU machine (one H200; Python 3.12, x86-64, torch 2.11 for CUDA 13) has torch,
accelerate, peft, safetensors, typer, rich, huggingface_hub, tokenizers and pyarrow, and no
package registry. peftctl's recipe needs pydantic, QLoRA bitsandbytes, the peer TRL (with
datasets); transformers there is 5.17, peftctl's lock 5.24, so the lock's transformers travels too,
and so does the lock's peft, for a peer of the version the tests hold peftctl to. Versions are the
lock's (constraints.txt). Everything the run carries (the working tree and these wheels) must stay
under 64 MiB: bitsandbytes' wheel is 43 MB, almost all of it libraries for other CUDA versions,
so it is repacked with only its CUDA 13 and CPU libraries (the one it loads there is picked by
torch.version.cuda, "13.0": libbitsandbytes_cuda130.so); its Python code is the published one.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# peftctl's own needs there, then the peer's (datasets needs pyarrow >= 24; an older one there
# only costs the peer rows).
PACKAGES = ["pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions",
            "bitsandbytes", "transformers", "peft", "trl", "datasets", "dill", "multiprocess"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
KEEP_LIBRARIES = re.compile(r"bitsandbytes/libbitsandbytes_(cpu|cuda13\d)\.so$")
CARRY_LIMIT = 64 * 2**20
COMMAND_LIMIT = 2000


def locked_versions(packages: list[str], constraints: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """name==version for each package, from the lock (names compared as pip normalises them)."""
    lock = {}
    for line in constraints.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            lock[_normal(name)] = version.strip()
    missing = [name for name in packages if _normal(name) not in lock]
    if missing:
        raise SystemExit(f"constraints.txt locks no version of {', '.join(missing)}")
    return {name: lock[_normal(name)] for name in packages}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(folder: Path, versions: dict[str, str]) -> None:
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", *platforms, "--dest", str(folder),
               *(f"{name}=={version}" for name, version in versions.items())]
    subprocess.run(command, check=True)


def slim_bitsandbytes(wheel: Path) -> tuple[int, int]:
    """Rewrite bitsandbytes' wheel in place without the libraries the GPU machine cannot load; the
    sizes before and after. RECORD loses the dropped files' lines, so pip installs it as any wheel."""
    before = wheel.stat().st_size
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [n for n in src.namelist() if not n.endswith(".so") or KEEP_LIBRARIES.search(n)]
        dropped = set(src.namelist()) - set(names)
        for name in names:
            data = src.read(name)
            if name.endswith(".dist-info/RECORD"):
                data = "".join(line + "\n" for line in data.decode().splitlines()
                               if line.split(",", 1)[0] not in dropped).encode()
            dst.writestr(src.getinfo(name), data)
    slim.replace(wheel)
    return before, wheel.stat().st_size


def tree_bytes() -> int:
    """The working tree as the device tool sends it: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())


def device_command(folder: str) -> str:
    """The command the device machine runs, from the repository root, with `folder` carried."""
    command = (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
               f"--target /tmp/site {folder}/*.whl && export PYTHONPATH=/tmp/site || exit; "
               "set -o pipefail; PYTHONUNBUFFERED=1 python3 scripts/gpu_proof.py --out $OUT/gpu_proof.json "
               "2>&1 | tee $OUT/gpu_proof.log")
    if len(command) > COMMAND_LIMIT:
        raise SystemExit(f"the device command is {len(command)} characters, over {COMMAND_LIMIT}")
    return command


def main(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):  # one version of each: two would stop the whole install there
        old.unlink()
    download(folder, locked_versions(PACKAGES))
    sizes = {}
    for wheel in sorted(folder.glob("*.whl")):
        sizes[wheel.name] = wheel.stat().st_size
        if wheel.name.startswith("bitsandbytes-"):
            before, after = slim_bitsandbytes(wheel)
            sizes[wheel.name] = after
            print(f"bitsandbytes: {before / 1e6:.1f} MB as published, {after / 1e6:.1f} MB with its CUDA 13 and "
                  "CPU libraries only")
    for name, size in sizes.items():
        print(f"{size / 1e6:8.2f} MB  {name}")
    wheels, tree = sum(sizes.values()), tree_bytes()
    print(f"wheels {wheels / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = {(wheels + tree) / 2**20:.1f} MiB "
          f"of the {CARRY_LIMIT // 2**20} MiB a run carries")
    if wheels + tree > CARRY_LIMIT:
        print("over the limit: leave out the peer's wheels (trl, datasets, dill, multiprocess; its rows then fail "
              "soft), or transformers (the machine's own then runs)", file=sys.stderr)
        return 2
    try:
        carried = folder.resolve().relative_to(ROOT)
    except ValueError:
        print(f"{folder} is outside the repository: only the repository travels", file=sys.stderr)
        return 2
    ignored = subprocess.run(["git", "check-ignore", "-q", str(carried)], cwd=ROOT).returncode == 0
    if not ignored:
        print(f"git does not ignore {carried}: add /{carried}/ to .git/info/exclude, or it travels twice",
              file=sys.stderr)
    print(f"device run: carry [\"{carried}\"], timeout_s 600, command:\n{device_command(str(carried))}")
    return 0 if ignored else 2
