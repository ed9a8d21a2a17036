# Session 33: session 30's random `apb verify` runs (docs/results/fuzz-s30/fuzz.py) on the presets
# whose rotary apb's query shift handles in its own way (a rotary per layer type: tiny-gemma3;
# longrope: tiny-phi3; YaRN with half-width cos: tiny-gpt-oss; MLA: tiny-deepseek-v3; layers
# without RoPE: tiny-smollm3), apb always scoring at true positions (session 33 lets it on Gemma 3
# and Phi-3, which it refused before), prompts past Phi-3's 512 original positions.
# Run (from a folder without an apb/ in it, a wheel of the commit under test on PYTHONPATH):
#   cd /tmp/run && PYTHONPATH=SITE /work/main/.venv/bin/python /work/main/docs/results/fuzz-s33/fuzz.py SEED MINUTES \
#     > /work/main/docs/results/fuzz-s33/fuzz-SEED.txt
# Each run's JSON rows and log tail go to docs/results/fuzz-s33/runs/SEED-K.{json,log}.
import random
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "fuzz-s30"))
from fuzz import run, size_sets  # noqa: E402  session 30's methods and runner

MODELS = ["tiny-gemma3", "tiny-gemma3", "tiny-phi3", "tiny-phi3", "tiny-gpt-oss", "tiny-deepseek-v3", "tiny-smollm3"]


def pick(rng: random.Random) -> dict:
    w = rng.choice([2, 3, 3, 4, 5, 6])
    n = rng.choice([rng.randint(65, 600), rng.randint(600, 3000), w * rng.randint(1, 3000 // w),
                    w * rng.randint(1, 3000 // w) + 1])
    q = min(rng.choice([1, rng.randint(1, 40), rng.randint(1, 40)]), n - 1)
    sets = size_sets(rng)
    if rng.random() < 0.2:
        sets.append("method.compressor=snapkv")  # scores with the query too
    return {"model": rng.choice(MODELS), "w": w, "n": n, "q": q, "decode": rng.choice(["gather", "distributed"]),
            "dtype": rng.choice(["float32"] * 3 + ["bfloat16"]), "sets": sets}


def main(seed: int, minutes: float) -> None:
    run(seed, minutes, pick, HERE / "runs", timeout_s=120, limit_s=900)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
