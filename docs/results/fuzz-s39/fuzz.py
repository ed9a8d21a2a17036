# Session 39: session 30's random `apb verify` runs (docs/results/fuzz-s30/fuzz.py) on the presets
# session 38's run left aside. Session 38 weighted its runs to the sliding-window presets; this run
# covers the full-attention ones. Among them: MLA with padded value heads (tiny-deepseek-v3), a
# fused QKV projection (tiny-phi3), layers without RoPE (tiny-smollm3), and QKV biases (tiny-qwen2).
# The code under test is 502bc7b's: sessions 35-38's cache and decode changes, and the grouped
# decode row now taken at a head size of 64. Both decode modes; float32 and bfloat16;
# `method.query_positions=anchor` at times; one run in four on 6-8 hosts with prompts up to
# 5,000 tokens.
# Run (from a folder without an apb/ in it, a wheel of the commit under test on PYTHONPATH):
#   cd /tmp/run && PYTHONPATH=SITE /work/main/.venv/bin/python /work/main/docs/results/fuzz-s39/fuzz.py SEED MINUTES \
#     > /work/main/docs/results/fuzz-s39/fuzz-SEED.txt
# Each run's JSON rows and log tail go to docs/results/fuzz-s39/runs/SEED-K.{json,log}.
import random
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "fuzz-s30"))
from fuzz import pick as pick_s30, run  # noqa: E402  session 30's choices and runner

MODELS = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-qwen3", "tiny-phi3", "tiny-smollm3", "tiny-deepseek-v3",
          "tiny-deepseek-v3", "tiny-gpt-oss"]


def pick(rng: random.Random) -> dict:
    c = pick_s30(rng, wide=rng.random() < 0.25)
    c["model"] = rng.choice(MODELS)
    c["dtype"] = rng.choice(["float32"] * 3 + ["bfloat16"] * 2)
    return c


def main(seed: int, minutes: float) -> None:
    run(seed, minutes, pick, HERE / "runs", timeout_s=120, limit_s=900)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
