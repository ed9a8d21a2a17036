"""GGUF checkpoints: a ``.gguf`` file becomes a cached Hugging Face folder, once.

A GGUF file (llama.cpp's single-file format, often quantized) is read by transformers, which
dequantizes every tensor, and written back as an ordinary checkpoint folder
(``model.safetensors``, ``config.json``, tokenizer files, ``generation_config.json``) under::

    cache_root()/gguf/<first 16 hex digits of the file's sha256>/

Everything downstream (workers, the reference, the tokenizer) then loads that folder through the
same ``from_pretrained`` path as any other checkpoint, so no method ever sees GGUF.

The cache is keyed by the file's content, not its path: the same file copied elsewhere or
fetched again maps to the same folder, and a changed file can never be served stale. The hash is
recomputed on every call rather than remembered by (path, size, mtime): it reads the file once
(about 1.4 GB/s here, 0.14 s for a 135M-parameter Q4 file), which is less than the load that
follows, since the dequantized folder is several times larger than the GGUF file.

The folder is written to a temporary sibling and renamed into place, so a crash or a concurrent
conversion never leaves a half-written folder where a complete one is expected. It holds
:data:`MANIFEST`, which records the source, its tensor types and the dtype the weights were
saved in (:func:`lossless_dtype`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from apb.model.loading import cache_root

#: written last into a converted folder: what it was made from and how
MANIFEST = "apb-gguf.json"
#: the command that installs what reading GGUF needs (transformers loads GGUF through accelerate)
INSTALL_HINT = "pip install 'apb[gguf]'"
_REQUIRED = ("gguf", "accelerate")
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_READ_CHUNK = 1 << 22


class MissingExtraError(ImportError):
    """A package of the ``gguf`` extra is not installed."""


def require_gguf() -> None:
    missing = [name for name in _REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(f"reading GGUF checkpoints needs the package(s) {', '.join(missing)}, which are not "
                                f"installed; install them with: {INSTALL_HINT}")


def find_gguf(path: str | Path) -> Path:
    """``path`` itself if it is a ``.gguf`` file, else the single ``.gguf`` file in folder ``path``."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(f"{path} holds {len(found)} GGUF files ({', '.join(f.name for f in found)}); "
                             "set model.name_or_path to one of them")
    raise FileNotFoundError(f"{path} is neither a .gguf file nor a folder holding one")


def is_gguf_source(path: str | Path) -> bool:
    """Whether ``path`` is a ``.gguf`` file, or a folder with GGUF files and no ``config.json``."""
    path = Path(path).expanduser()
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def converted_dir(sha256: str) -> Path:
    return cache_root() / "gguf" / sha256[:16]


def is_converted(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def file_sha256(path: Path, progress: bool = True) -> str:
    digest = hashlib.sha256()
    # a bar only on a terminal, and cleared afterwards: this runs on every resolution of the path
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, leave=False,
                                     desc=f"hashing {path.name}", disable=None if progress else True) as bar:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def inspect_gguf(path: Path) -> tuple[Counter, str]:
    """(how many tensors of each GGML type the file holds, :func:`lossless_dtype` of them)."""
    from gguf import GGUFReader  # the optional gguf extra: require_gguf() said how to install it

    tensors = GGUFReader(path).tensors  # parses the metadata once (seconds: the vocabulary is in it)
    return Counter(t.tensor_type.name for t in tensors), lossless_dtype(tensors)


def lossless_dtype(tensors) -> str:
    """The narrowest float dtype that holds every dequantized tensor (a ``GGUFReader``'s) exactly.

    Dequantized blocks (``scale * q + min``, an fp16 scale times an integer) need float32's
    mantissa. A file of one half type keeps it, if its F32 tensors (the norms, as converters write
    them) convert to that type without change; mixed half types or lossy F32 tensors give float32.
    """
    halves = {t.tensor_type.name for t in tensors} - {"F32"}
    if len(halves) != 1 or not halves <= set(_FLOAT_TYPES):
        return "float32"
    half = _FLOAT_TYPES[halves.pop()]
    dtype = getattr(torch, half)
    for t in tensors:
        if t.tensor_type.name == "F32":
            w = torch.from_numpy(np.ascontiguousarray(t.data))
            if not torch.equal(w.to(dtype).float(), w):
                return "float32"
    return half


def convert_gguf(path: str | Path, sha256: str | None = None, progress: bool = True) -> Path:
    """The cached Hugging Face folder for GGUF file ``path`` (or the one ``.gguf`` in folder ``path``).

    Converts on the first call; later calls only hash the file. ``sha256``, when the caller has
    already verified the file's digest, skips the hashing.
    """
    src = find_gguf(path)
    require_gguf()
    digest = sha256 or file_sha256(src, progress)
    target = converted_dir(digest)
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        _convert(src, digest, tmp, target, progress)
        os.rename(tmp, target)  # atomic; fails if a concurrent conversion got there first
    except OSError:
        if not is_converted(target):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"apb: {message}", file=sys.stderr, flush=True)


def _convert(src: Path, digest: str, out: Path, target: Path, progress: bool) -> None:
    size_mb = src.stat().st_size / 2**20
    types, dtype = inspect_gguf(src)
    kinds = ", ".join(f"{n} {k}" for k, n in types.most_common())
    _say(progress, f"converting {src.name} ({size_mb:.0f} MiB; tensors: {kinds}) to a Hugging Face checkpoint "
                   f"in {dtype}, once, into {target}")
    load = dict(gguf_file=src.name, local_files_only=True, trust_remote_code=False)
    _say(progress, "[1/3] tokenizer")
    AutoTokenizer.from_pretrained(str(src.parent), **load).save_pretrained(out)
    _say(progress, "[2/3] dequantizing the weights")
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=getattr(torch, dtype), **load,
                                                 **_dequantize_option())
    _drop_quantization(model)
    _say(progress, "[3/3] writing model.safetensors")
    model.save_pretrained(out)
    manifest = dict(source=src.name, sha256=digest, size_bytes=src.stat().st_size, tensor_types=dict(types),
                    saved_dtype=dtype, transformers=transformers.__version__,
                    gguf=importlib.metadata.version("gguf"))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _say(progress, f"converted: {target}")


def _dequantize_option() -> dict:
    """Ask for dense weights: newer transformers can keep GGUF blocks packed when kernels exist."""
    try:
        from transformers import GgufConfig  # only in newer transformers: probed where it is used
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantization(model) -> None:
    """Forget that the weights came from GGUF: they are dense now, and save as a plain checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

