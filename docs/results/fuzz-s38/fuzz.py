# Session 38: session 30's random `apb verify` runs (docs/results/fuzz-s30/fuzz.py) after sessions
# 35-37 changed what a host keeps and how a cache is decoded: each layer kept in its own shape, a
# sliding layer's cache trimmed to the positions a later token sees, the gather sending only what
# transformers' cache keeps, the decode host receiving straight into a cache with room for the
# answer, and one query row taking its own kernel paths (a bottom-right causal row as one
# non-causal call, an aligned windowed row over its last `window` keys, a bfloat16 row sent twice
# on CPU). Weighted to the presets those changes touch (sliding windows of 64 with and without
# softcapping or sinks, a rotary per layer type, hybrid layers), both decode modes, both dtypes.
# Run (from a folder without an apb/ in it, a wheel of the commit under test on PYTHONPATH):
#   cd /tmp/run && PYTHONPATH=SITE /work/main/.venv/bin/python /work/main/docs/results/fuzz-s38/fuzz.py SEED MINUTES \
#     > /work/main/docs/results/fuzz-s38/fuzz-SEED.txt
# Each run's JSON rows and log tail go to docs/results/fuzz-s38/runs/SEED-K.{json,log}.
import random
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "fuzz-s30"))
from fuzz import run, size_sets  # noqa: E402  session 30's methods and runner

MODELS = ["tiny-mistral-sliding", "tiny-mistral-sliding", "tiny-gemma2", "tiny-gemma2", "tiny-gemma3", "tiny-gemma3",
          "tiny-gpt-oss", "tiny-gpt-oss", "tiny-llama", "tiny-qwen3", "tiny-lfm2", "tiny-qwen3-next"]


def pick(rng: random.Random) -> dict:
    w = rng.choice([1, 2, 2, 3, 3, 4, 5])
    # around the window (64) and a few windows past it, where the trimmed tails start
    n = rng.choice([rng.randint(2, 70), rng.randint(60, 200), rng.randint(200, 2500), w * rng.randint(1, 2500 // w),
                    w * rng.randint(1, 2500 // w) + 1])
    q = min(rng.choice([1, 1, rng.randint(1, 40), rng.randint(60, 70), 0]), n - 1)
    sets = size_sets(rng)
    if rng.random() < 0.2:
        sets.append(f"method.compressor={rng.choice(['snapkv', 'stride'])}")
    return {"model": rng.choice(MODELS), "w": w, "n": n, "q": q, "decode": rng.choice(["gather", "distributed"]),
            "dtype": rng.choice(["float32"] * 3 + ["bfloat16"] * 2), "sets": sets}


def main(seed: int, minutes: float) -> None:
    run(seed, minutes, pick, HERE / "runs", timeout_s=120, limit_s=900)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
