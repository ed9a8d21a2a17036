# Session 31: session 30's random `apb verify` runs (docs/results/fuzz-s30/fuzz.py), taken where
# that one did not go: 9-16 hosts, prompts up to 10,000 tokens, and the retaining_heads compressor
# with a weights file made for each model (`random_retaining_heads`, as the tests make theirs).
# Run (from a folder without an apb/ in it, a wheel of the commit under test on PYTHONPATH):
#   cd /tmp/run && PYTHONPATH=SITE /work/main/.venv/bin/python /work/main/docs/results/fuzz-s31/fuzz.py SEED MINUTES \
#     > /work/main/docs/results/fuzz-s31/fuzz-SEED.txt
# Each run's JSON rows and log tail go to docs/results/fuzz-s31/runs/SEED-K.{json,log}; summarise with
# docs/results/fuzz-s30/summary.py pointed at this folder.
import random
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "fuzz-s30"))
from fuzz import MODELS, run, size_sets  # noqa: E402  session 30's presets, methods and runner


def heads_file(model: str) -> Path:
    """A random retaining-heads file for ``model``'s shape (made once, kept under runs/heads/)."""
    from transformers import AutoConfig

    from apb.methods.compressors import random_retaining_heads
    from apb.model.catalog import resolve_model

    out = HERE / "runs" / "heads" / f"{model}.safetensors"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        random_retaining_heads(out, AutoConfig.from_pretrained(resolve_model(model)), hidden=32)
    return out


def pick(rng: random.Random) -> dict:
    w = rng.randint(9, 16)
    n = rng.choice([rng.randint(w, 600), rng.randint(600, 10000), w * rng.randint(1, 10000 // w),
                    w * rng.randint(1, 10000 // w) + 1, w - 1 + w * rng.randint(1, 80)])
    q = min(rng.choice([1, rng.randint(1, 40), rng.randint(1, 40), 0]), n - 1)
    model = rng.choice(MODELS)
    sets = size_sets(rng)
    r = rng.random()
    if r < 0.35:
        sets += ["method.compressor=retaining_heads", f"method.retaining_heads_path={heads_file(model)}"]
    elif r < 0.5:
        sets.append(f"method.compressor={rng.choice(['snapkv', 'stride'])}")
    if rng.random() < 0.25:
        sets.append("method.query_positions=anchor")
    return {"model": model, "w": w, "n": n, "q": q, "decode": rng.choice(["gather", "distributed"]),
            "dtype": rng.choice(["float32"] * 4 + ["bfloat16"]), "sets": sets}


def main(seed: int, minutes: float) -> None:
    run(seed, minutes, pick, HERE / "runs", timeout_s=120, limit_s=1200)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
