"""Does transformers' own eager forward run each checkpoint make.py made? (What verify's reference needs.)

    python docs/results/families-s32/eager.py MODELS_DIR > docs/results/families-s32/eager.txt

A family whose own forward fails on its tiny checkpoint (sizes make.py cut inconsistently, a cache
it needs) says nothing about apb; one whose forward runs while apb crashed or differed does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def check(path: Path) -> str:
    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager", local_files_only=True,
                                                 dtype=torch.float32).eval()
    ids = torch.randint(3, 250, (1, 157), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    layers = getattr(cache, "layers", None)
    cached = "no cache" if cache is None else f"{type(cache).__name__} of {len(layers) if layers is not None else '?'} layers"
    return f"ok ({cached})"


def main() -> None:
    root = Path(sys.argv[1])
    results = {}
    for path in sorted(p for p in root.iterdir() if (p / "config.json").exists()):
        try:
            results[path.name] = check(path)
        except Exception as e:
            results[path.name] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"{path.name:28s} {results[path.name]}", flush=True)
    (root / "eager.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
