# Session 30: random `apb verify` runs over presets, world sizes, prompt and query lengths, decode
# modes, dtypes and method settings, hunting for an exact row that does not match transformers'
# eager forward, a crash without a clear refusal, or a hang.
# Run (from a folder without an apb/ in it, apb installed or on PYTHONPATH; session 30 ran a wheel
# of the commit under test, installed with `pip install --no-deps --target SITE .`; a third
# argument `wide`: 6-8 hosts and prompts up to 5,000 tokens):
#   cd /tmp/run && PYTHONPATH=SITE /work/main/.venv/bin/python /work/main/docs/results/fuzz-s30/fuzz.py SEED MINUTES \
#     > /work/main/docs/results/fuzz-s30/fuzz-SEED.txt
# Each run's JSON rows and log tail go to docs/results/fuzz-s30/runs/SEED-K.{json,log}.
import json
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
MODELS = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-qwen3", "tiny-mistral-sliding", "tiny-gemma2",
          "tiny-gemma3", "tiny-gpt-oss", "tiny-phi3", "tiny-smollm3", "tiny-deepseek-v3"]
METHODS = "full,ring,ulysses,star,apb,spava"


def size_sets(rng: random.Random) -> list[str]:
    """Random anchor, passing, rounding and exact-layer settings (each drawn or not)."""
    sets = []
    if rng.random() < 0.3:
        sets.append(f"method.anchor_len={rng.choice([0, 1, 7, 64, 0.5])}")
    if rng.random() < 0.3:
        sets.append(f"method.passing_len={rng.choice([1, 5, 33, 0.25, 'all'])}")
    if rng.random() < 0.2:
        sets.append(f"method.round_to={rng.choice([2, 16, 128])}")
    if rng.random() < 0.2:
        sets.append(f"method.exact_layers={rng.choice([1, 2])}")
    return sets


def pick(rng: random.Random, wide: bool = False) -> dict:
    """One run's settings; ``wide``: 6-8 hosts and prompts up to 5,000 tokens."""
    w = rng.choice([6, 7, 8]) if wide else rng.choice([1, 2, 2, 3, 3, 4, 5])
    top = 5000 if wide else 2500
    n = rng.choice([rng.randint(2, 64), rng.randint(65, 600), rng.randint(600, top), w * rng.randint(1, top // w),
                    w * rng.randint(1, top // w) + 1, w - 1 + w * rng.randint(1, 50)])
    n = max(2, n)
    q = rng.choice([1, 1, rng.randint(1, 40), 0])
    q = min(q, n - 1)
    sets = size_sets(rng)
    if rng.random() < 0.2:
        sets.append(f"method.compressor={rng.choice(['snapkv', 'stride'])}")  # retaining_heads needs a trained file
    if rng.random() < 0.25:
        sets.append("method.query_positions=anchor")
    return {"model": rng.choice(MODELS), "w": w, "n": n, "q": q,
            "decode": rng.choice(["gather", "distributed"]),
            "dtype": rng.choice(["float32"] * 4 + ["bfloat16"]), "sets": sets}


def main(seed: int, minutes: float, wide: bool = False) -> None:
    run(seed, minutes, lambda rng: pick(rng, wide), HERE / "runs", timeout_s=60, limit_s=600)


def run(seed: int, minutes: float, choose, runs: Path, timeout_s: int, limit_s: int) -> None:
    """Random verify runs for ``minutes``: settings from ``choose(rng)``, each run's rows and log
    into ``runs``, a line per run on stdout (``timeout_s``: the collectives', ``limit_s``: a run's)."""
    rng = random.Random(seed)
    runs.mkdir(exist_ok=True)
    end = time.time() + minutes * 60
    k = 0
    while time.time() < end:
        c = choose(rng)
        stem = runs / f"{seed}-{k}"
        cmd = [sys.executable, "-m", "apb", "verify", "--model", c["model"], "--methods", METHODS, "--world-size", str(c["w"]),
               "--prompt-len", str(c["n"]), "--query-len", str(c["q"]), "--decode", c["decode"], "--dtype", c["dtype"],
               "--tokens", "3", "--json", f"{stem}.json", "--set", f"parallel.timeout_s={timeout_s}"]
        for s in c["sets"]:
            cmd += ["--set", s]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s)
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = "timeout", str(e.stdout or "") + str(e.stderr or "")
        (stem.with_suffix(".log")).write_text(" ".join(cmd) + "\n" + out[-6000:])
        rows = json.loads(Path(f"{stem}.json").read_text()) if Path(f"{stem}.json").exists() else None
        if isinstance(rows, dict):
            rows = rows.get("rows", rows.get("results"))
        bad, errors = [], set()
        for r in rows or []:
            why = r.get("error") or r.get("reason") or ""
            if r.get("exact_expected") and not r.get("passed"):
                bad.append(f"{r.get('method')}: {why[:200]}")
            elif r.get("error"):
                errors.add(f"{r.get('method')}: {why[:120]}")
        print(f"{k:3d} rc={rc} {time.time() - t0:5.1f}s {c['model']} W={c['w']} n={c['n']} q={c['q']} {c['decode']} "
              f"{c['dtype']} {' '.join(c['sets'])} | exact not passed: {bad if bad else 'none'}"
              + ("" if rows is not None else " | NO JSON") + (f" | refused: {sorted(errors)}" if errors else ""),
              flush=True)
        k += 1


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), len(sys.argv) > 3 and sys.argv[3] == "wide")
