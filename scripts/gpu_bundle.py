"""Prepare the CUDA checks of an offline GPU node: download the wheels it lacks, on a connected machine.

A GPU node often has no network but a Python with PyTorch and the usual stack already installed.
This script runs on a machine *with* network and builds the missing part for the node's Python
(default CPython 3.12 on manylinux x86-64): it starts from the packages ``scripts/gpu_check.py`` and
the pipeline import (``ROOTS``), follows their ``Requires-Dist`` (markers evaluated for the target,
no extras) and fetches every package of that closure which the node does not have: a binary wheel
from PyPI where one exists, else a wheel built here from the sdist (only pure-Python ones are
accepted: antlr4, deepspeed with its ops left to JIT, rouge-score, sqlitedict, word2number).
Versions are pinned to this environment's, i.e. the versions the test suite runs against.

What the node has: ``--present FILE``, the output of ``pip list --format=freeze`` run on the node
(exact: only what is missing is bundled). Without it, ``PRESENT`` below is assumed: a typical CUDA
deep-learning image (PyTorch, transformers, peft, accelerate, pandas, pyarrow, matplotlib, ...).
``MANIFEST.json`` lists each wheel, its size and why it is there. The folder must stay under
``--max-mib``: a much larger bundle means the node lacks PyTorch or CUDA libraries itself, which
are better installed from its own channel than carried.

Carry the folder to the node with a copy of this repository; there ``scripts/gpu_run.sh`` installs
it with ``pip install --no-index --no-deps --target`` (no network needed), puts the target first on
``PYTHONPATH`` and runs the check.

Usage::

    make gpu-bundle                                          # -> .gpu-wheels/
    python scripts/gpu_bundle.py --present node-freeze.txt   # the node's `pip list --format=freeze`
    python scripts/gpu_bundle.py --out .gpu-wheels --with wandb --python-version 3.11
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata as md
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# What grads needs beyond a CUDA image (setup.cfg's install_requires minus PRESENT), less what the
# check never imports: gguf (the SmolLM2 GGUF does not travel) and wandb (loggers are off; --with).
ROOTS = (
    "hydra-core",
    "omegaconf",
    "deepspeed",
    "lm-eval",
    "KDEpy",
    "datasets",
    "hydra-joblib-launcher",
    "hydra-submitit-launcher",
)
# A typical CUDA deep-learning image's Python packages, assumed when --present is not given.
PRESENT = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
TARGET_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 39)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux1_x86_64"]


def norm(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def local_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"],
        capture_output=True,
        text=True,
    )


def fetch(name: str, version: str | None, out: Path) -> Path:
    """One wheel for ``name`` (binary for the target CPython on manylinux, else a pure wheel built
    from the sdist)."""
    spec = f"{name}=={version}" if version else name
    py = TARGET_ENV["python_version"]
    with tempfile.TemporaryDirectory() as tmp:
        args = ["download", "--no-deps", "--only-binary=:all:", "--python-version", py]
        args += ["--implementation", "cp", "-d", tmp, spec]
        for plat in PLATFORMS:
            args += ["--platform", plat]
        res = _pip(*args)
        if res.returncode:  # sdist only: build a wheel here; it must be pure Python
            res = _pip("wheel", "--no-deps", "-w", tmp, spec)
            if res.returncode:
                res = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", tmp, spec)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if res.returncode or len(wheels) != 1:
            raise RuntimeError(f"could not get a wheel for {spec}:\n{res.stderr[-2000:]}")
        whl = wheels[0]
        tags = whl.stem.split("-")[-3:]
        if tags[1] != "none" and not tags[0].startswith("cp" + py.replace(".", "")):
            raise RuntimeError(f"{whl.name} is not usable on CPython {py} (built here for {tags})")
        dest = out / whl.name
        dest.write_bytes(whl.read_bytes())
        return dest


def requirements(wheel: Path) -> list[tuple[str, str]]:
    """``(name, specifier)`` of the wheel's ``Requires-Dist`` that apply on the target, no extras."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    out = []
    for line in msg.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(TARGET_ENV):
            out.append((req.name, str(req.specifier)))
    return out


def read_present(path: str | None) -> dict[str, str | None]:
    """Packages on the GPU node: ``--present`` file (``name`` or ``name==version`` lines)."""
    if path is None:
        return {norm(n): None for n in PRESENT.split()}
    present: dict[str, str | None] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            present[norm(name)] = version.strip() or None
    return present


def satisfied(present: dict, name: str, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet

    have = present.get(norm(name), "absent")
    if have == "absent":
        return False
    return have is None or not spec or SpecifierSet(spec).contains(have, prereleases=True)


def bundle(out: Path, roots: list[str], present: dict) -> list[dict]:
    """Fetch the closure of ``roots`` minus ``present`` into ``out``; returns the manifest rows."""
    out.mkdir(parents=True, exist_ok=True)
    queue = [(r, "", "root") for r in roots]
    done: dict[str, dict] = {}
    while queue:
        name, spec, why = queue.pop(0)
        key = norm(name)
        if key in done:
            done[key]["needed_by"].append(why)
            continue
        if satisfied(present, name, spec):
            continue
        version = local_version(name)
        wheel = fetch(name, version, out)
        print(f"  {wheel.name:<80} {wheel.stat().st_size / 2**20:6.2f} MiB  ({why})", flush=True)
        done[key] = {"wheel": wheel.name, "bytes": wheel.stat().st_size, "needed_by": [why]}
        queue += [(n, s, key) for n, s in requirements(wheel)]
    keep = {row["wheel"] for row in done.values()}
    for stale in out.glob("*.whl"):  # one version of each: two would stop the install
        if stale.name not in keep:
            stale.unlink()
    return sorted(done.values(), key=lambda r: -r["bytes"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".gpu-wheels")
    ap.add_argument(
        "--with", dest="extra", action="append", default=[], help="extra root, e.g. wandb"
    )
    ap.add_argument(
        "--present", default=None, help="the node's `pip list --format=freeze` (default: PRESENT)"
    )
    ap.add_argument(
        "--max-mib", type=float, default=48.0, help="fail above this folder size (a size guard)"
    )
    ap.add_argument("--python-version", default="3.12", help="the node's CPython version")
    args = ap.parse_args(argv)
    TARGET_ENV["python_version"] = args.python_version
    TARGET_ENV["python_full_version"] = f"{args.python_version}.0"
    out = Path(args.out)
    present = read_present(args.present)
    print(f"bundling into {out}/ for CPython {args.python_version} manylinux x86-64")
    rows = bundle(out, list(ROOTS) + args.extra, present)
    total = sum(r["bytes"] for r in rows) / 2**20
    (out / "MANIFEST.json").write_text(
        json.dumps({"total_mib": round(total, 2), "wheels": rows}, indent=1) + "\n"
    )
    print(f"{len(rows)} wheels, {total:.1f} MiB in {out}/ (limit {args.max_mib:g} MiB)")
    if total > args.max_mib:
        print(f"error: {total:.1f} MiB exceeds --max-mib {args.max_mib:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
